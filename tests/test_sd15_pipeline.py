"""SD-1.5 LoRA + textual inversion on a tiny random SD-shaped pipeline: what training changes, diffusers round trips,
exact resume, and generation into the shared samples folder. No SD weights are involved (none exist here)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dermsynth.config import ConfigError
from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import read_manifest, write_manifest
from dermsynth.data.split import SplitConfig, load_split, make_split
from dermsynth.generate.config import GenConfig, GenDataConfig
from dermsynth.generate.sd15 import adapters
from dermsynth.generate.sd15.config import SDConfig
from dermsynth.generate.sd15.sample import (build_pipeline, checkpoint_hash, generate_sd, initial_latents,
                                            load_trained_pipeline, sample_latents)
from dermsynth.generate.sd15.train import STATE_FILE, SDLoraTrainer, class_prompt, train_sd_lora
from dermsynth.generate.sd15.weights import load_components
from dermsynth.io import DataError

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: a 28-image toy split (4 lesions per class) and a tiny random SD-1.5-shaped base folder
# ----------------------------------------------------------------------------------------------------------------------

def make_toy(root: Path) -> dict[str, Path]:
    """28 small images (7 classes x 4 lesions), a 50/25/25 lesion split and a tiny random SD base folder."""
    from dermsynth.generate.sd15.random_base import save_random_base

    rng = np.random.default_rng(0)
    rows = []
    for ci, c in enumerate(CLASSES):
        for k in range(4):
            tint = np.array([30 * ci, 255 - 30 * ci, 120])
            arr = (rng.random((40, 48, 3)) * 60 + tint).clip(0, 255).astype(np.uint8)
            path = root / "images" / f"{c}_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            rows.append({"image_id": f"{c}_{k}", "group_id": f"L-{c}-{k}", "label": c, "path": str(path),
                         "source": "toy"})
    write_manifest(pd.DataFrame(rows), root / "manifest.csv")
    make_split(root / "manifest.csv", root / "split", SplitConfig(fractions=(0.5, 0.25, 0.25)))
    return {"split": root / "split" / "split.json", "base": save_random_base(root / "base", "tiny")}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    return make_toy(tmp_path_factory.mktemp("sd15_toy"))


def sd_config(toy: dict[str, Path], **kw) -> SDConfig:
    base = dict(base=str(toy["base"]), resolution=32, steps=4, batch_size=2, warmup_steps=0, lr_unet=1e-2,
                lr_tokens=1e-2, mixed_precision="no", device="cpu", validate_every=2, validation_per_class=1,
                heldout_images=3, heldout_timesteps=[500], sample_steps=2, checkpoint_every=2, checkpoint_minutes=0,
                keep_checkpoints=1, log_every=0, augment="dihedral", sample_batch_size=2,
                captions=["{token}, {name}", "a dermoscopic image of {token}, {name}"])
    return SDConfig(**{**base, **kw})


def gen_config(toy: dict[str, Path], **kw) -> GenConfig:
    return GenConfig(kind="sd15_lora", data=GenDataConfig(split=str(toy["split"])), sd=sd_config(toy, **kw))


def _prompts(sd: SDConfig, *classes: str) -> list[str]:
    return [class_prompt(sd, c) for c in classes]


# ----------------------------------------------------------------------------------------------------------------------
# What training changes
# ----------------------------------------------------------------------------------------------------------------------

def test_training_changes_only_lora_and_the_used_token_rows(toy):
    sd = sd_config(toy, gradient_checkpointing=True)
    parts = load_components(sd)
    before = {m: {k: v.clone() for k, v in parts[m].state_dict().items()} for m in ("unet", "vae", "text_encoder")}
    vocab = parts["text_encoder"].get_input_embeddings().weight.shape[0]
    trainer = SDLoraTrainer(parts, sd, CPU, torch.float32)
    rows0 = trainer.rows.weight.detach().clone()
    lora0 = {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}
    params = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = trainer.step([(params, _prompts(sd, "df", "mel"))])
    assert np.isfinite(loss)

    # every frozen tensor is bit-identical (peft moved the adapted weights under ".base_layer")
    for m in ("unet", "vae", "text_encoder"):
        now = {k.replace(".base_layer", ""): v for k, v in getattr(trainer, m).state_dict().items() if "lora_" not in k}
        assert set(now) == set(before[m]), m
        for k, v in before[m].items():
            if m == "text_encoder" and k.endswith("token_embedding.weight"):
                assert now[k].shape[0] == vocab + 3 and torch.equal(now[k][:vocab], v)  # 3 rows appended, rest equal
            else:
                assert torch.equal(now[k], v), f"{m}.{k} changed"
    # trained: LoRA matrices, and the rows of the tokens that appeared in the prompts (df, mel), not vasc's
    assert any(not torch.equal(p, lora0[n]) for n, p in trainer.unet.named_parameters() if p.requires_grad)
    order = list(trainer.tokens)
    for cls in ("df", "mel"):
        assert not torch.equal(trainer.rows.weight[order.index(cls)], rows0[order.index(cls)])
    assert torch.equal(trainer.rows.weight[order.index("vasc")], rows0[order.index("vasc")])


def test_mixed_precision_keeps_trainable_params_fp32(toy):
    sd = sd_config(toy, mixed_precision="bf16", text_encoder_lora=True)
    trainer = SDLoraTrainer(load_components(sd, torch.bfloat16), sd, CPU, torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in trainer.params) and len(trainer.params) > 1
    frozen = [p for m in (trainer.unet, trainer.text_encoder) for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    micro = [(torch.randn(2, 8, 16, 16), _prompts(sd, "vasc", "df")), (torch.randn(1, 8, 16, 16), _prompts(sd, "mel"))]
    assert np.isfinite(trainer.step(micro))  # two accumulated micro-batches


def test_cached_and_on_demand_latents_agree(toy):
    from dermsynth.generate.sd15.train import LatentSource, view

    vae = load_components(sd_config(toy))["vae"]
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    cached = LatentSource(vae, images, 8, CPU, torch.float32, cache=True)
    lazy = LatentSource(vae, images, 8, CPU, torch.float32, cache=False)
    idx, views = torch.tensor([2, 0, 2]), torch.tensor([5, 0, 3])
    torch.testing.assert_close(cached.get(idx, views), lazy.get(idx, views), rtol=1e-5, atol=1e-5)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert len({tuple(view(x, k).flatten().tolist()) for k in range(8)}) == 8  # 8 distinct symmetries


def test_saved_files_load_through_diffusers_with_identical_outputs(toy, tmp_path):
    # alpha != rank: a file without alpha metadata would load at the wrong scale; text-encoder LoRA included
    sd = sd_config(toy, lora_rank=4, lora_alpha=8.0, text_encoder_lora=True)
    trainer = SDLoraTrainer(load_components(sd), sd, CPU, torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # large random adapters, so that a wrong load cannot hide in a small difference
        for p in trainer.params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    trainer.save(tmp_path, 0, {})
    assert sorted(os.listdir(tmp_path / adapters.EMBEDDINGS_DIR)) == ["df.safetensors", "mel.safetensors",
                                                                     "vasc.safetensors"]
    assert set(load_file(str(tmp_path / "embeddings" / "mel.safetensors"))) == {"<melanoma>"}

    prompt, neg = class_prompt(sd, "mel"), sd.negative_prompt
    run = dict(prompt=prompt, negative=neg, seeds=[3, 4], steps=3, guidance=4.0, size=32)
    ours = sample_latents(build_pipeline({k: getattr(trainer, k) for k in
                                          ("tokenizer", "text_encoder", "vae", "unet", "scheduler")}, "dpmpp"), **run)
    classes = list(trainer.tokens)
    loaded = load_trained_pipeline(dataclasses.replace(sd, fuse_lora=False), str(toy["base"]), tmp_path, classes,
                                   "dpmpp", CPU, torch.float32)
    torch.testing.assert_close(sample_latents(loaded, **run), ours, rtol=0, atol=1e-5)
    fused = load_trained_pipeline(sd, str(toy["base"]), tmp_path, classes, "dpmpp", CPU, torch.float32)
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())
    torch.testing.assert_close(sample_latents(fused, **run), ours, rtol=1e-3, atol=1e-3)  # fp32 sums reordered
    plain = build_pipeline(load_components(sd), "dpmpp")
    plain.tokenizer.add_tokens(list(trainer.tokens.values()))  # the base alone, same prompt
    plain.text_encoder.resize_token_embeddings(len(plain.tokenizer), mean_resizing=False)
    assert (sample_latents(plain, **run) - ours).abs().max() > 1e-2  # the adapters do matter


def test_our_sampling_loop_matches_the_diffusers_pipeline(toy):
    pipe = build_pipeline(load_components(sd_config(toy)), "dpmpp")
    seeds = [11, 12]
    ours = sample_latents(pipe, "a dermoscopic image", "blurry", seeds, 4, 6.0, 32)
    ref = pipe(prompt=["a dermoscopic image"] * 2, negative_prompt=["blurry"] * 2, num_inference_steps=4,
               guidance_scale=6.0, height=32, width=32, latents=initial_latents(seeds, (4, 16, 16)),
               output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# A run: data, checkpoints, validation, resume
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory) -> dict:
    """A 4-step run; records which images training and held-out validation read."""
    import dermsynth.data.cache as cache

    seen: list[list[str]] = []
    real = cache.build_cache

    def spy(df, size, *a, **kw):
        seen.append(df["image_id"].tolist())
        return real(df, size, *a, **kw)

    out = tmp_path_factory.mktemp("sd15_run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache, "build_cache", spy)
        train_sd_lora(gen_config(toy), out)
    return {"run": out, "seen": seen}


def test_run_reads_only_train_images_of_its_classes(toy, trained):
    split = load_split(toy["split"])
    train_ids, val_ids = set(split.parts["train"]), set(split.parts["val"])
    labels = split.manifest.set_index("image_id")["label"]
    train_seen, held_seen = trained["seen"]
    assert set(train_seen) == {i for i in train_ids if labels[i] in ("df", "vasc", "mel")}
    assert held_seen and set(held_seen) <= val_ids and {labels[i] for i in held_seen} == {"df", "vasc", "mel"}
    info = json.loads((trained["run"] / "generator.json").read_text())
    assert info["kind"] == "sd15_lora" and info["split_fingerprint"] == split.fingerprint
    assert info["tokens"] == {"df": "<dermatofibroma>", "vasc": "<vascular>", "mel": "<melanoma>"}


def test_run_writes_rotated_checkpoints_validation_and_heldout_loss(trained):
    run = trained["run"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]  # keep 1, no temp folders
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step_00000002.png", "step_00000004.png"]
    assert Image.open(run / "validation" / "step_00000004.png").size == (32, 3 * 32)  # one row per class
    summary = pd.read_csv(run / "summary.csv")
    assert summary["step"].tolist() == [2, 4]
    assert {"train_loss", "heldout_loss", "heldout_df", "heldout_vasc", "heldout_mel"} <= set(summary.columns)
    assert summary["heldout_loss"].notna().all()


def test_resume_latest_equals_an_uninterrupted_run(toy, trained, tmp_path):
    out = tmp_path / "run"
    train_sd_lora(gen_config(toy, steps=2), out)  # "interrupted" after step 2
    train_sd_lora(gen_config(toy, steps=4), out, resume="latest")
    a, b = trained["run"] / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004"
    for f in [adapters.LORA_FILE, *(f"embeddings/{c}.safetensors" for c in ("df", "vasc", "mel"))]:
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    sa, sb = (torch.load(p / STATE_FILE, weights_only=True) for p in (a, b))
    ra, rb = (torch.load(p / "rng_rank0.pt", weights_only=True) for p in (a, b))
    assert sa["step"] == sb["step"] == 4 and torch.equal(ra["gen"], rb["gen"])
    for k, st in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][k][n]) for n, v in st.items())
    assert pd.read_csv(out / "summary.csv")["step"].tolist() == [2, 4]


def test_resuming_from_an_older_checkpoint_by_name_drops_the_newer_ones(toy, tmp_path, caplog):
    """--resume step_00000001 finds the run's own checkpoint by name; steps 2-3 of the abandoned continuation are
    deleted (and named in the log), so the new branch's checkpoints are kept and ``latest`` is the new branch."""
    out = tmp_path / "run"
    kw = dict(checkpoint_every=1, keep_checkpoints=5, validate_every=0)
    train_sd_lora(gen_config(toy, steps=3, **kw), out)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [f"step_0000000{i}" for i in (1, 2, 3)]
    with caplog.at_level(logging.WARNING, logger="dermsynth"):
        train_sd_lora(gen_config(toy, steps=2, **kw), out, resume="step_00000001")
    assert "['step_00000002', 'step_00000003']" in caplog.text
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000001", "step_00000002"]
    with pytest.raises(ConfigError, match=r"step_00000009.*available: \['step_00000001', 'step_00000002'\]"):
        train_sd_lora(gen_config(toy, steps=2, **kw), out, resume="step_00000009")


def test_resume_refuses_a_split_remade_at_the_same_path(toy, tmp_path):
    """Same data.split path, other lesions: the fingerprint kept in the checkpoint (or, for checkpoints written
    before it was, in generator.json) refuses the resume, naming both."""
    manifest = toy["split"].parents[1] / "manifest.csv"
    split = make_split(manifest, tmp_path / "split", SplitConfig(fractions=(0.5, 0.25, 0.25)))
    cfg = gen_config(toy, steps=1, validate_every=0)
    cfg.data.split = str(split)
    out = train_sd_lora(cfg, tmp_path / "run")
    was = load_split(split).fingerprint
    make_split(manifest, tmp_path / "split", SplitConfig(fractions=(0.5, 0.25, 0.25), seed=1))
    now = load_split(split).fingerprint
    assert now != was
    with pytest.raises(DataError, match=f"fingerprint {was[:12]}.*fingerprint {now[:12]}"):
        train_sd_lora(cfg, out, resume="latest")
    state_file = out / "checkpoints" / "step_00000001" / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    assert state.pop("split_fingerprint") == was
    torch.save(state, state_file)  # as saved before checkpoints kept the fingerprint
    with pytest.raises(DataError, match=f"fingerprint {was[:12]}.*fingerprint {now[:12]}"):
        train_sd_lora(cfg, out, resume="latest")


def test_checkpoints_every_m_minutes(toy, tmp_path):
    cfg = gen_config(toy, steps=3, checkpoint_every=0, checkpoint_minutes=1e-9, keep_checkpoints=5, validate_every=0)
    train_sd_lora(cfg, tmp_path / "run")  # every step is "overdue"
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == [
        "step_00000001", "step_00000002", "step_00000003"]


def test_existing_run_needs_resume_and_the_same_settings(toy, trained):
    with pytest.raises(ConfigError, match="--resume latest"):
        train_sd_lora(gen_config(toy), trained["run"])
    with pytest.raises(ConfigError, match="lora_rank"):
        train_sd_lora(gen_config(toy, lora_rank=2), trained["run"], resume="latest")
    with pytest.raises(ConfigError, match="lacks"):
        train_sd_lora(gen_config(toy, prompt="a dermoscopic image of {name}"), trained["run"] / "x")


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------

def test_generate_writes_the_samples_folder_and_resumes(trained):
    from dermsynth.generate.samples import read_png_metadata

    folder = generate_sd(trained["run"], classes="df,vasc", per_class=3, steps=2, guidance=3.0, seed=0)
    assert folder == trained["run"] / "samples" / "step00000004_dpmpp2_g3.0_s0"
    m = read_manifest(folder / "manifest.csv")
    assert len(m) == 6 and m["label"].value_counts().to_dict() == {"df": 3, "vasc": 3}
    assert (m["source"] == "synthetic").all() and (m["group_id"] == m["image_id"]).all()
    assert {"seed", "generator", "checkpoint_hash", "guidance", "sampler", "steps"} <= set(m.columns)
    assert (m["sampler"] == "dpmpp").all() and (m["steps"] == 2).all() and m["seed"].nunique() == 6
    meta = read_png_metadata(m["path"].iloc[0])
    assert meta["ai_generated"] == "true" and meta["dermsynth:kind"] == "sd15_lora"
    assert Image.open(m["path"].iloc[0]).size == (32, 32)

    victim, other = Path(m["path"].iloc[4]), Path(m["path"].iloc[0])
    data, stamp = victim.read_bytes(), other.stat().st_mtime_ns
    victim.unlink()
    from dermsynth.generate.sample import generate  # the `dermsynth generate` entry point dispatches on the kind

    assert generate(trained["run"], classes="df,vasc", per_class=3, steps=2, guidance=3.0, seed=0) == folder
    assert victim.read_bytes() == data  # regenerated bit-identically from its seed
    assert other.stat().st_mtime_ns == stamp  # finished images are kept
    with pytest.raises(Exception, match="other settings"):
        generate_sd(trained["run"], classes="df", per_class=1, steps=2, guidance=3.0, seed=0, batch_size=1,
                    out=folder)


def test_a_samples_folder_takes_more_classes_later(trained, tmp_path):
    """The checkpoint hash covers every class the run learnt, so a folder begun with df can take vasc later; a folder
    begun before (hashed over df alone) keeps its hash and so its image ids."""
    from dermsynth.generate import samples as S

    out = generate_sd(trained["run"], classes="df", per_class=1, steps=2, batch_size=1, out=tmp_path / "s")
    generate_sd(trained["run"], classes="df,vasc", per_class=1, steps=2, out=out)
    assert sorted(read_manifest(out / "manifest.csv")["label"]) == ["df", "vasc"]

    legacy = tmp_path / "legacy"
    old = json.loads((out / S.SAMPLES_JSON).read_text())
    old["checkpoint_hash"] = checkpoint_hash(trained["run"] / "checkpoints" / "step_00000004", ["df"])
    old["prompts"] = {"df": old["prompts"]["df"]}
    legacy.mkdir()
    (legacy / S.SAMPLES_JSON).write_text(json.dumps(old))
    generate_sd(trained["run"], classes="df,vasc", per_class=1, steps=2, out=legacy)
    assert json.loads((legacy / S.SAMPLES_JSON).read_text())["checkpoint_hash"] == old["checkpoint_hash"]
    ids = read_manifest(legacy / "manifest.csv")["image_id"]
    assert ids.str.startswith(f"syn-{S.settings_tag(old)}-").all()
    assert not set(ids) & set(read_manifest(out / "manifest.csv")["image_id"])
