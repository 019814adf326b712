"""From-scratch generator runs on a tiny random split: training, checkpoints, resume, provenance, sampling, CLI."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dermsynth.cli import main as cli_main
from dermsynth.config import ConfigError, load_config
from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import read_manifest, write_manifest
from dermsynth.data.split import SplitConfig, load_split, make_split
from dermsynth.generate.config import GenConfig
from dermsynth.generate.provenance import check_samples_split, check_split_fingerprint, read_generator_info
from dermsynth.generate.sample import generate, plan_scratch, regenerate, run_shard
from dermsynth.generate.samples import read_png_metadata, write_samples_manifest
from dermsynth.generate.scratch_train import list_checkpoints
from dermsynth.generate.train import train_generator
from dermsynth.io import DataError, atomic_save_image

REPO = Path(__file__).resolve().parents[1]


def make_random_split(root: Path, seed: int = 0) -> Path:
    """7 classes x 5 lesions x 1-2 images of 20 px noise tinted per class; a lesion-grouped split of them."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, label in enumerate(CLASSES):
        tint = np.array([40 * k % 255, 255 - 30 * k, 90 + 20 * k])
        for lesion in range(5):
            for view in range(1 + lesion % 2):
                img = np.clip(rng.normal(tint, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                image_id = f"img_{label}_{lesion}_{view}"
                atomic_save_image(root / "images" / f"{image_id}.png", img)
                rows.append({"image_id": image_id, "group_id": f"les_{label}_{lesion}", "label": label,
                             "path": str(root / "images" / f"{image_id}.png"), "source": "toy"})
    write_manifest(pd.DataFrame(rows), root / "manifest.csv")
    return make_split(root / "manifest.csv", root / "split", SplitConfig(seed=seed))


def tiny_config(split: Path, **train) -> GenConfig:
    overrides = [f"data.split={split}", "data.image_size=16", "model.size=test", "train.batch_size=8",
                 "train.steps=4", "train.log_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                 "train.validate_every=0", "train.validation_per_class=2", "train.validation_steps=2",
                 "train.warmup_steps=2", "sample.steps=3", "sample.batch_size=4"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(GenConfig, REPO / "configs" / "gen_tiny.yaml", overrides)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return make_random_split(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, split) -> Path:
    """A 4-step run (checkpoints at 2 and 4), shared by the sampling tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DERMSYNTH_CACHE", str(tmp_path_factory.mktemp("cache")))
        return train_generator(tiny_config(split), tmp_path_factory.mktemp("runs") / "gen")


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    out.update({f"ema.{k}": v for k, v in load_file(ckpt / "ema.safetensors").items()})
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    for i, st in opt["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------

def test_training_run_layout_and_provenance(trained, split):
    info = read_generator_info(trained)
    sp = json.loads(split.read_text())
    assert info["kind"] == "scratch" and info["split_fingerprint"] == sp["fingerprint"]
    assert info["train_images"] == len(sp["parts"]["train"])  # the train part only, nothing from val/test
    assert info["classes"] == list(CLASSES) and info["trained_steps"] == 4 and info["ranks_in_sync"]
    assert [c.name for c in list_checkpoints(trained)] == ["step_00000002", "step_00000004"]
    state = json.loads((trained / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["step"] == 4 and state["dermsynth_version"] and state["config"]["model"]["size"] == "test"
    summary = pd.read_csv(trained / "summary.csv")
    assert summary["step"].tolist() == [2, 4]
    assert {"loss_q1", "loss_q2", "loss_q3", "loss_q4", "img_per_s"} <= set(summary.columns)
    assert np.isfinite(summary["loss"]).all()
    assert (trained / "validation" / "step_00000004.png").is_file()  # a grid at the end even with validate_every=0
    assert (trained / "config.yaml").is_file() and (trained / "log.txt").is_file()
    t = _tensors(trained / "checkpoints" / "step_00000004")
    assert any(not torch.equal(t[k], t["ema." + k[6:]]) for k in t if k.startswith("model."))  # EMA lags


def test_rotation_and_resume_give_the_uninterrupted_result(tmp_path, split):
    full = train_generator(tiny_config(split, checkpoint_every=1, keep_checkpoints=2), tmp_path / "full")
    assert [c.name for c in list_checkpoints(full)] == ["step_00000003", "step_00000004"]  # rotation keeps 2
    part = train_generator(tiny_config(split, steps=2), tmp_path / "part")
    with pytest.raises(DataError, match="--resume latest"):
        train_generator(tiny_config(split), part)  # no silent restart over existing checkpoints
    train_generator(tiny_config(split), part, resume="latest")
    a, b = _tensors(full / "checkpoints" / "step_00000004"), _tensors(part / "checkpoints" / "step_00000004")
    assert a.keys() == b.keys() and len(a) > 20
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    losses = [pd.read_csv(r / "summary.csv")["loss"].tolist() for r in (full, part)]
    assert losses[0] == losses[1]


def test_resuming_from_an_older_checkpoint_drops_the_newer_ones(tmp_path, split, caplog):
    """Resuming from step 1 of a run that reached step 4 abandons steps 2-4: they are deleted (and named in the log),
    so rotation cannot drop the new branch's checkpoints in their favour and ``latest`` is the new branch."""
    run = train_generator(tiny_config(split, checkpoint_every=1, keep_checkpoints=4), tmp_path / "gen")
    assert [c.name for c in list_checkpoints(run)] == [f"step_0000000{i}" for i in (1, 2, 3, 4)]
    before = _tensors(run / "checkpoints" / "step_00000002")
    with caplog.at_level(logging.WARNING, logger="dermsynth"):
        train_generator(tiny_config(split, steps=2, checkpoint_every=1, keep_checkpoints=2), run,
                        resume="step_00000001")
    assert "['step_00000002', 'step_00000003', 'step_00000004']" in caplog.text
    assert [c.name for c in list_checkpoints(run)] == ["step_00000001", "step_00000002"]
    after = _tensors(run / "checkpoints" / "step_00000002")  # the new branch's step 2 (the same steps again)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_another_split_or_network(tmp_path, trained, split):
    other = make_random_split(tmp_path / "other", seed=1)
    with pytest.raises(DataError, match="trained on split"):
        train_generator(tiny_config(other), trained, resume="latest")
    cfg = tiny_config(split)
    cfg.model.prediction_type = "epsilon" if cfg.model.prediction_type == "v_prediction" else "v_prediction"
    with pytest.raises(DataError, match="model.prediction_type"):
        train_generator(cfg, trained, resume="latest")


def test_class_subset_epsilon_and_min_snr(tmp_path, split):
    cfg = tiny_config(split, steps=2)
    cfg.data.classes = ["df", "vasc"]
    cfg.model.prediction_type = "epsilon"
    cfg.train.snr_gamma = 5.0
    run = train_generator(cfg, tmp_path / "gen")
    info = read_generator_info(run)
    assert info["classes"] == ["df", "vasc"] and info["schedule"]["prediction_type"] == "epsilon"
    with pytest.raises(DataError, match="not trained on class"):
        generate(run, classes="mel", per_class=1)


# ----------------------------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------------------------

def test_fingerprint_check_refuses_another_split(tmp_path, trained, split):
    check_split_fingerprint(trained, split)  # its own split passes
    check_split_fingerprint(trained, split.parent)
    other = make_random_split(tmp_path / "other", seed=1)
    with pytest.raises(DataError, match="trained on split"):
        check_split_fingerprint(trained, other)
    with pytest.raises(DataError, match="not a generator run"):
        check_split_fingerprint(tmp_path, split)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------

def test_generate_writes_manifest_and_png_provenance_and_resumes(trained, split):
    out = generate(trained, classes="df,vasc", per_class=5, steps=3, batch_size=4)
    assert out == trained / "samples" / "step00000004_dpmpp3_g2.0_s0"
    df = read_manifest(out / "manifest.csv", check_files=True)
    assert len(df) == 10 and set(df["source"]) == {"synthetic"} and (df["group_id"] == df["image_id"]).all()
    assert df.groupby("label")["index"].apply(sorted).to_dict() == {"df": list(range(5)), "vasc": list(range(5))}
    for col in ("seed", "generator", "checkpoint_hash", "guidance", "sampler", "steps"):
        assert df[col].notna().all(), col
    for _, row in df.iterrows():
        meta = read_png_metadata(row["path"])
        assert meta["ai_generated"] == "true" and meta["dermsynth:class"] == row["label"]
        assert meta["dermsynth:seed"] == str(row["seed"]) and meta["dermsynth:checkpoint_hash"] == row["checkpoint_hash"]
    check_samples_split(out, split)
    # resume: a lost image is remade identically, the others are not touched
    victim, keep = Path(df["path"][2]), Path(df["path"][7])
    pixels, mtime = np.asarray(Image.open(victim)), keep.stat().st_mtime_ns
    victim.unlink()
    assert generate(trained, classes="df,vasc", per_class=5, steps=3) == out  # batch size from samples.json
    assert np.array_equal(np.asarray(Image.open(victim)), pixels) and keep.stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="other settings"):
        generate(trained, classes="df", per_class=5, steps=3, batch_size=2, out=out)


def test_regenerate_one_image_bit_identically_from_its_manifest_row(trained):
    out = generate(trained, classes="mel", per_class=6, sampler="ddim", steps=3, guidance=1.5, batch_size=4, seed=11)
    df = read_manifest(out / "manifest.csv")
    row = df[df["index"] == 5].iloc[0]  # second batch, second image
    assert np.array_equal(regenerate(row.to_dict()), np.asarray(Image.open(row["path"])))
    row0 = df[df["index"] == 0].iloc[0]
    assert not np.array_equal(regenerate(row0.to_dict()), np.asarray(Image.open(row["path"])))


def test_image_to_image_starts_from_real_train_images_and_regenerates(trained, split):
    """strength < 1: each image records the real train image of its class it started from (cycling through all of
    them), its own folder and ids, and is remade bit-identically from its manifest row."""
    out = generate(trained, classes="df,mel", per_class=5, sampler="ddim", steps=4, batch_size=4, strength=0.5)
    assert out.name == "step00000004_ddim4_g2.0_s0_img0.5"
    df = read_manifest(out / "manifest.csv", check_files=True)
    train = load_split(split).part("train")
    assert (df["strength"] == 0.5).all()
    for label, rows in df.groupby("label"):
        src = rows.sort_values("index")["init_image_id"].tolist()
        own = set(train.loc[train["label"] == label, "image_id"])
        n = min(len(own), len(src))
        assert set(src) <= own and len(set(src[:n])) == n  # every real image is used before any twice
    for _, row in df.iterrows():
        assert read_png_metadata(row["path"])["dermsynth:init_image_id"] == row["init_image_id"]
    noise = generate(trained, classes="df,mel", per_class=5, sampler="ddim", steps=4, batch_size=4)
    assert not set(df["image_id"]) & set(read_manifest(noise / "manifest.csv")["image_id"])
    row = df[df["index"] == 4].iloc[0]  # second batch
    assert np.array_equal(regenerate(row.to_dict()), np.asarray(Image.open(row["path"])))
    with pytest.raises(ConfigError, match="no denoising step"):
        generate(trained, classes="df", per_class=1, steps=4, strength=0.1)


def test_image_to_image_from_another_class_records_and_regenerates(trained, split, tmp_path):
    """init_from df:mel: df images start from real mel train images (major-to-minor translation), each row says so,
    the folder and ids are its own, and any image is remade bit-identically from its manifest row."""
    out = generate(trained, classes="df,vasc", per_class=5, sampler="ddim", steps=4, batch_size=4, strength=0.5,
                   init_from="df:mel")
    assert out.name == "step00000004_ddim4_g2.0_s0_img0.5_from-df.mel"
    assert json.loads((out / "samples.json").read_text())["init_from"] == {"df": "mel"}
    df = read_manifest(out / "manifest.csv", check_files=True)
    train = load_split(split).part("train").set_index("image_id")
    for label, source in (("df", "mel"), ("vasc", "vasc")):
        rows = df[df["label"] == label]
        assert (rows["init_label"] == source).all()
        assert (train.loc[rows["init_image_id"], "label"] == source).all()
    row = df[(df["label"] == "df") & (df["index"] == 4)].iloc[0]
    assert read_png_metadata(row["path"])["dermsynth:init_label"] == "mel"
    assert np.array_equal(regenerate(row.to_dict()), np.asarray(Image.open(row["path"])))
    own = generate(trained, classes="df", per_class=5, sampler="ddim", steps=4, batch_size=4, strength=0.5)
    assert not set(df["image_id"]) & set(read_manifest(own / "manifest.csv")["image_id"])
    like = generate(None, classes="df", per_class=2, out=tmp_path / "like", seed=1, like=out)
    assert (read_manifest(like / "manifest.csv")["init_label"] == "mel").all()
    with pytest.raises(ConfigError, match="strength < 1"):
        generate(trained, classes="df", per_class=1, steps=4, init_from="df:mel")
    for bad in ("df:df", "df:xx", "df"):
        with pytest.raises(ConfigError, match="init_from"):
            generate(trained, classes="df", per_class=1, steps=4, strength=0.5, init_from=bad)


def test_a_folder_keeps_its_precision_and_x0_clipping_when_the_generator_changes_them(tmp_path, split):
    """precision and clip_x0 are the folder's: regenerate and drawing --like it use them (not generator.json's
    sampling block, which a resumed training rewrites) and a rerun that would draw its missing images otherwise is
    refused."""
    cfg = tiny_config(split, steps=2)
    cfg.sample.precision, cfg.sample.clip_x0 = "bf16", False  # bf16 autocast works on CPU too
    run = train_generator(cfg, tmp_path / "gen")
    out = generate(run, classes="df", per_class=3, steps=3, batch_size=2, out=tmp_path / "s")
    s = json.loads((out / "samples.json").read_text())
    assert (s["precision"], s["clip_x0"]) == ("bf16", False)
    train_generator(tiny_config(split, steps=2), run, resume="latest")  # rewrites sampling: precision auto, clipping
    assert read_generator_info(run)["sampling"]["precision"] == "auto"
    df = read_manifest(out / "manifest.csv")
    for _, row in df.iterrows():
        assert np.array_equal(regenerate(row.to_dict()), np.asarray(Image.open(row["path"]))), row["image_id"]
    now = read_manifest(generate(run, classes="df", per_class=3, steps=3, batch_size=2, out=tmp_path / "now")
                        / "manifest.csv")
    assert now["image_id"].tolist() == df["image_id"].tolist()  # precision and clip_x0 do not enter the ids
    assert any(not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
               for a, b in zip(df["path"], now["path"]))  # ... but they do change the images
    like = json.loads((generate(None, classes="df", per_class=1, out=tmp_path / "like", seed=1, like=out)
                       / "samples.json").read_text())
    assert (like["precision"], like["clip_x0"]) == ("bf16", False)  # drawn like the folder, not like the generator now
    Path(df["path"][0]).unlink()
    with pytest.raises(DataError, match="precision: folder has 'bf16', asked 'auto'"):
        generate(run, classes="df", per_class=3, steps=3, out=out)


def test_a_sampling_block_replaces_the_one_the_generator_recorded(trained, tmp_path):
    """The study passes its current generator.sample: it decides the folder's settings, not generator.json's block
    (written when the generator trained); an argument given still wins over both."""
    block = {"sampler": "ddim", "steps": 3, "guidance": 1.5, "batch_size": 2, "use_ema": False,
             "precision": "bf16", "clip_x0": False}
    assert read_generator_info(trained)["sampling"] != block
    out = generate(trained, classes="df", per_class=2, out=tmp_path / "s", sampling=block)
    s = json.loads((out / "samples.json").read_text())
    assert {k: s[k] for k in ("sampler", "steps", "guidance", "batch_size", "precision", "clip_x0")} == {
        k: v for k, v in block.items() if k != "use_ema"}
    assert s["weights"] == "raw"
    s = json.loads((generate(trained, classes="df", per_class=1, out=tmp_path / "t", steps=2, sampling=block)
                    / "samples.json").read_text())
    assert (s["steps"], s["sampler"]) == (2, "ddim")


def test_generate_like_a_raw_weights_folder_keeps_raw_weights(trained, tmp_path):
    ref = generate(trained, classes="df", per_class=1, out=tmp_path / "ref", steps=2, batch_size=1, checkpoint="raw")
    like = generate(None, classes="df", per_class=1, out=tmp_path / "like", seed=1, like=ref)
    a, b = (json.loads((f / "samples.json").read_text()) for f in (ref, like))
    assert a["weights"] == b["weights"] == "raw" and a["checkpoint_hash"] == b["checkpoint_hash"]
    ema = generate(None, classes="df", per_class=1, out=tmp_path / "ema", seed=1, like=ref, checkpoint="ema")
    assert json.loads((ema / "samples.json").read_text())["weights"] == "ema"  # a given choice wins


def test_generate_like_copies_a_folders_settings_but_not_its_seed(trained, tmp_path):
    """--like SAMPLES: generator, checkpoint (here not the latest), sampler, steps, guidance, batch size and strength
    come from SAMPLES; given arguments win; the seed must be given, since SAMPLES's own would redraw its images."""
    early = list_checkpoints(trained)[0]
    ref = generate(trained, classes="df", per_class=2, out=tmp_path / "ref", sampler="ddim", steps=4, guidance=1.5,
                   batch_size=2, checkpoint=str(early), strength=0.5)
    like = generate(None, classes="df,mel", per_class=2, out=tmp_path / "like", seed=1, like=ref)
    a, b = (json.loads((f / "samples.json").read_text()) for f in (ref, like))
    assert a["checkpoint"] == b["checkpoint"] == str(early.resolve()) and a["checkpoint_step"] == 2
    for key in ("generator", "sampler", "steps", "guidance", "batch_size", "strength", "checkpoint_hash"):
        assert a[key] == b[key], key
    assert (a["seed"], b["seed"]) == (0, 1)
    ma, mb = (read_manifest(f / "manifest.csv") for f in (ref, like))
    assert set(mb["label"]) == {"df", "mel"} and not set(ma["seed"]) & set(mb["seed"])
    other = generate(None, classes="df", per_class=2, out=tmp_path / "other", seed=2, like=ref, guidance=3.0)
    assert json.loads((other / "samples.json").read_text())["guidance"] == 3.0  # a given argument wins
    with pytest.raises(ConfigError, match="needs a seed"):
        generate(None, classes="df", per_class=1, out=tmp_path / "x", like=ref)
    with pytest.raises(DataError, match="not a samples folder"):
        generate(None, classes="df", per_class=1, seed=1, like=tmp_path)
    with pytest.raises(ConfigError, match="--gen"):
        generate(None, classes="df", per_class=1)


def test_simulated_shards_cover_each_index_once(trained, tmp_path):
    args = (trained, read_generator_info(trained), "df,vasc,mel", 7, tmp_path / "sharded", "dpmpp", 2, 2.0, 0, 2,
            "latest")
    plan = plan_scratch(*args)
    written = [run_shard(plan_scratch(*args, write=False), r, 3) for r in range(3)]
    ids = [it.image_id for w in written for it in w]
    assert len(ids) == len(set(ids)) == 21 and all(written)
    write_samples_manifest(plan.folder, plan.batches, plan.settings)
    df = read_manifest(plan.folder / "manifest.csv", check_files=True)
    assert sorted(df["image_id"]) == sorted(ids)
    assert run_shard(plan, 0, 1) == []  # everything exists: nothing is redone


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------

def test_cli_train_gen_and_generate(tmp_path, split, capsys):
    run = tmp_path / "gen"
    sets = ["--set", f"data.split={split}", "--set", "data.image_size=16", "--set", "model.size=test",
            "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.validation_steps=2",
            "--set", "train.validation_per_class=1"]
    assert cli_main(["train-gen", "-c", str(REPO / "configs" / "gen_tiny.yaml"), "--out", str(run), *sets]) == 0
    assert cli_main(["train-gen", "-c", str(REPO / "configs" / "gen_tiny.yaml"), "--out", str(run), "--resume",
                     *sets]) == 0  # already at its last step: resumes to the same place
    assert cli_main(["generate", "--gen", str(run), "--classes", "df", "--per-class", "2", "--steps", "2",
                     "--sampler", "ddim", "--batch-size", "2"]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(read_manifest(out / "manifest.csv")) == 2
    assert cli_main(["train-gen", "--out", str(tmp_path / "x"), "--set", "train.nope=1"]) == 2
    assert cli_main(["generate", "--gen", str(tmp_path), "--classes", "df"]) == 2
    assert cli_main(["generate", "--like", str(out), "--classes", "df", "--per-class", "1", "--seed", "1",
                     "--out", str(tmp_path / "like")]) == 0
    assert read_manifest(tmp_path / "like" / "manifest.csv")["steps"].tolist() == [2]
    assert cli_main(["generate", "--like", str(out), "--classes", "df"]) == 2  # no --seed
    assert cli_main(["generate", "--gen", str(run), "--classes", "df", "--per-class", "1", "--steps", "2",
                     "--sampler", "ddim", "--batch-size", "2", "--strength", "0.5", "--init-from", "df:nv",
                     "--out", str(tmp_path / "m2m")]) == 0
    assert read_manifest(tmp_path / "m2m" / "manifest.csv")["init_label"].tolist() == ["nv"]
    assert cli_main(["generate", "--gen", str(run), "--classes", "df", "--init-from", "df:nv"]) == 2  # no --strength
