"""Training runs end to end on tiny data: outputs, provenance, resume equivalence, early stopping, DDP, the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dermsynth.classify.config import ClfConfig
from dermsynth.classify.predict import predict_images
from dermsynth.classify.train import SUMMARY_COLUMNS, train_classifier
from dermsynth.cli import main as cli_main
from dermsynth.config import ConfigError, load_config
from dermsynth.data.cache import build_cache
from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import write_manifest
from dermsynth.data.split import load_split, make_split
from dermsynth.data.toy import ToyConfig, make_toy
from dermsynth.io import atomic_save_image

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "clf_tiny.yaml"
TIMING = ["img_s", "elapsed_s"]


@pytest.fixture(scope="module")
def toy_split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clf_train")
    manifest = make_toy(root / "toy", ToyConfig(n_images=160, size=24, seed=2))
    return make_split(manifest, root / "split")


def tiny_cfg(split: Path, *overrides: str) -> ClfConfig:
    return load_config(ClfConfig, TINY, [f"data.split={split}", "data.image_size=24", "train.epochs=2",
                                         "train.batch_size=16", "eval.n_boot=50", *overrides])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "best" / "model.safetensors"))


def _same_run(a: Path, b: Path) -> None:
    """Bit-identical best weights, per-epoch history (timing aside), predictions and test/val metrics."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = pd.read_csv(a / "summary.csv"), pd.read_csv(b / "summary.csv")
    pd.testing.assert_frame_equal(sa.drop(columns=TIMING), sb.drop(columns=TIMING))
    pd.testing.assert_frame_equal(pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv"))
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["test"] == mb["test"] and ma["val"] == mb["val"] and ma["best_epoch"] == mb["best_epoch"]


def _write_synthetic(root: Path, per_class: dict[str, int], size: int = 24) -> Path:
    """A samples folder in the canonical form: random PNGs, source=synthetic, group_id = image_id."""
    rng = np.random.default_rng(0)
    rows = []
    for c, n in per_class.items():
        for i in range(n):
            path = root / "images" / f"syn_{c}_{i:04d}.png"
            atomic_save_image(path, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            rows.append({"image_id": path.stem, "group_id": path.stem, "label": c, "path": str(path),
                         "source": "synthetic"})
    return write_manifest(pd.DataFrame(rows), root / "manifest.csv")


class Interrupt(Exception):
    pass


def _interrupt_at(global_step: int):
    def hook(epoch: int, step: int, g: int) -> None:
        if g == global_step:
            raise Interrupt
    return hook


# ----------------------------------------------------------------------------------------------------------------------

def test_run_writes_outputs_with_provenance(toy_split, tmp_path):
    syn = _write_synthetic(tmp_path / "syn", {"df": 20, "vasc": 20, "mel": 20})
    cfg = tiny_cfg(toy_split, f"data.synthetic={syn}")
    run = tmp_path / "run"
    m = train_classifier(cfg, run)
    for name in ("config.yaml", "log.txt", "summary.csv", "predictions.csv", "metrics.json", "train_set.csv",
                 "checkpoints/best/model.safetensors", "checkpoints/best/meta.json"):
        assert (run / name).is_file(), name
    assert not list((run / "checkpoints").glob("step_*"))  # training state is dropped once metrics.json exists
    summary = pd.read_csv(run / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS and summary["epoch"].tolist() == [1, 2]
    assert m["best_epoch"] == int(summary["epoch"][summary["val_macro_f1"].idxmax()])
    assert m == json.loads((run / "metrics.json").read_text())
    assert {"test", "val", "best_epoch", "extra", "wall_s", "train_counts"} <= set(m)
    assert m["decision"] == {"rule": "argmax"}
    assert 0 <= m["test"]["macro_f1"] <= 1 and set(m["test"]["ci"]) >= {"macro_f1", "minority_f1"}

    # provenance: synthetic images trained on (and recorded), never scored
    split = load_split(toy_split)
    train_set = pd.read_csv(run / "train_set.csv")
    syn_rows = train_set[train_set["source"] == "synthetic"]
    assert len(syn_rows) == sum(v["synthetic"] for v in m["train_counts"].values()) > 0
    assert set(syn_rows["label"]) <= {"df", "vasc", "mel"}
    for c in ("df", "vasc", "mel"):
        assert m["train_counts"][c]["synthetic"] == min(20, m["train_counts"][c]["real"])
    preds = pd.read_csv(run / "predictions.csv")
    assert preds["image_id"].tolist() == split.parts["test"]
    assert (preds["source"] != "synthetic").all()
    assert list(preds.columns[:4]) == ["image_id", "group_id", "label", "source"]
    probs = preds[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    # validation probabilities are kept too, and agree with the validation metrics of the best epoch
    val = pd.read_csv(run / "val_predictions.csv")
    assert val["image_id"].tolist() == split.parts["val"]
    val_pred = np.asarray(CLASSES)[val[[f"prob_{c}" for c in CLASSES]].to_numpy().argmax(1)]
    assert (val_pred == val["label"]).mean() == pytest.approx(m["val"]["accuracy"])

    # predict_images reproduces the best epoch's test probabilities from the run folder alone
    test_df = split.part("test")
    images = build_cache(split.manifest, 24).take(test_df["image_id"])
    assert np.allclose(predict_images(run, images), probs, atol=1e-5)
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 48 px: resized to the run's 24 px
    assert predict_images(run, big).shape == (len(images), 7)

    # the run folder is protected; resume of a finished run returns its metrics; a changed config is refused
    with pytest.raises(ConfigError, match="--resume"):
        train_classifier(cfg, run)
    assert train_classifier(cfg, run, resume=True) == m
    with pytest.raises(ConfigError, match="train.lr"):
        train_classifier(tiny_cfg(toy_split, f"data.synthetic={syn}", "train.lr=0.1"), run, resume=True)


def test_resume_mid_epoch_and_at_epoch_end_equals_uninterrupted(toy_split, tmp_path):
    """Interrupt a run (i) right after a mid-epoch time checkpoint and (ii) early in an epoch with epoch-end
    checkpoints only (the partial epoch is replayed); both resumed runs end bit-identical to an uninterrupted one."""
    over = ["train.epochs=2", "train.augment.randaugment=true", "train.augment.scale_min=0.8", "model.drop_rate=0.3",
            "train.sampler=oversample", "train.loss=focal"]
    full = tmp_path / "full"
    train_classifier(tiny_cfg(toy_split, *over), full)
    steps = len(pd.read_csv(full / "train_set.csv")) // 16  # optimiser steps per epoch

    mid = tmp_path / "mid"
    cfg_mid = tiny_cfg(toy_split, *over, "train.checkpoint_minutes=1e-9")  # a checkpoint after every step
    with pytest.raises(Interrupt):
        train_classifier(cfg_mid, mid, on_step=_interrupt_at(steps + 2))
    assert not (mid / "metrics.json").exists()
    train_classifier(cfg_mid, mid, resume=True)
    _same_run(full, mid)

    edge = tmp_path / "edge"
    cfg_edge = tiny_cfg(toy_split, *over)
    with pytest.raises(Interrupt):
        train_classifier(cfg_edge, edge, on_step=_interrupt_at(steps + 1))
    assert len(pd.read_csv(edge / "summary.csv")) == 1
    train_classifier(cfg_edge, edge, resume=True)
    _same_run(full, edge)


def test_early_stopping_and_extra_test_sets(toy_split, tmp_path):
    split = load_split(toy_split)
    unseen = write_manifest(split.part("test"), tmp_path / "unseen" / "manifest.csv")  # no train lesion in it
    cfg = tiny_cfg(toy_split, "train.epochs=8", "train.patience=1", "train.lr=1e-9",
                   f"eval.extra_test={{again: {unseen}}}")
    m = train_classifier(cfg, tmp_path / "run")
    f1 = pd.read_csv(tmp_path / "run" / "summary.csv")["val_macro_f1"].tolist()
    best, bad, expected_stop = -1.0, 0, len(f1)
    for i, v in enumerate(f1):  # replay the rule: stop after `patience` epochs without a strictly better val F1
        best, bad = (v, 0) if v > best else (best, bad + 1)
        if bad >= 1:
            expected_stop = i + 1
            break
    assert m["epochs_run"] == len(f1) == expected_stop < 8 and m["stopped_early"]
    assert m["best_epoch"] == int(np.argmax(f1)) + 1
    assert m["extra"]["again"]["n"] == len(split.parts["test"])
    assert len(pd.read_csv(tmp_path / "run" / "predictions_again.csv")) == len(split.parts["test"])


def test_real_only_last_epochs_draw_real_rows_only_and_early_stopping_skips_to_them(toy_split, tmp_path,
                                                                                    monkeypatch):
    import dermsynth.classify.train as train_mod

    syn = _write_synthetic(tmp_path / "syn", {"df": 20, "vasc": 20, "mel": 20})
    seen: list[np.ndarray] = []
    epochs: list[int] = []
    real_batch = train_mod._batch
    monkeypatch.setattr(train_mod, "_batch", lambda images, labels, idx, *a: seen.append(idx) or
                        real_batch(images, labels, idx, *a))
    run = tmp_path / "run"
    m = train_classifier(tiny_cfg(toy_split, f"data.synthetic={syn}", "train.epochs=2",
                                  "train.real_only_last_epochs=1", "train.sampler=oversample"), run,
                         on_step=lambda e, s, g: epochs.append(e))
    is_syn = (pd.read_csv(run / "train_set.csv")["source"] == "synthetic").to_numpy()
    per_epoch = [np.concatenate([b for b, e in zip(seen, epochs) if e == k]) for k in (0, 1)]
    assert is_syn[per_epoch[0]].any() and not is_syn[per_epoch[1]].any()  # epoch 2: real rows only
    assert len(per_epoch[0]) == len(per_epoch[1])  # same number of draws: the schedule's steps per epoch hold
    assert m["real_only_from_epoch"] == 2

    # early stopping before the real-only epochs (9-10) skips ahead to them
    run2 = tmp_path / "run2"
    m2 = train_classifier(tiny_cfg(toy_split, f"data.synthetic={syn}", "train.epochs=10", "train.patience=1",
                                   "train.lr=1e-9", "train.real_only_last_epochs=2"), run2)
    summary = pd.read_csv(run2 / "summary.csv")
    ran, f1 = summary["epoch"].tolist(), summary["val_macro_f1"].tolist()
    stop = next(i + 1 for i in range(1, len(f1)) if f1[i] <= max(f1[:i]))  # the rule: patience 1, strictly better
    assert stop < 8 and ran[:stop] == list(range(1, stop + 1))
    assert ran[stop] == 9 and ran[stop:] in ([9], [9, 10])
    assert m2["epochs_run"] == len(ran) and m2["real_only_from_epoch"] == 9 and m2["stopped_early"]
    with pytest.raises(ConfigError, match="real_only_last_epochs"):
        train_classifier(tiny_cfg(toy_split, "train.epochs=2", "train.real_only_last_epochs=2"), tmp_path / "r3")


def test_synthetic_loss_weight_scales_the_synthetic_rows_of_each_batch(toy_split, tmp_path, monkeypatch):
    import dermsynth.classify.train as train_mod

    syn = _write_synthetic(tmp_path / "syn", {"df": 20, "vasc": 20, "mel": 20})
    seen: list[np.ndarray] = []
    weights: list[torch.Tensor | None] = []
    real_batch, real_build = train_mod._batch, train_mod.build_loss
    monkeypatch.setattr(train_mod, "_batch", lambda images, labels, idx, *a: seen.append(idx) or
                        real_batch(images, labels, idx, *a))

    def build(*a):
        loss = real_build(*a)
        forward = loss.forward
        loss.forward = lambda logits, y, w=None: weights.append(w) or forward(logits, y, w)
        return loss

    monkeypatch.setattr(train_mod, "build_loss", build)
    run = tmp_path / "run"
    train_classifier(tiny_cfg(toy_split, f"data.synthetic={syn}", "train.synthetic_loss_weight=0.25",
                              "train.real_only_last_epochs=1"), run)
    is_syn = (pd.read_csv(run / "train_set.csv")["source"] == "synthetic").to_numpy()
    assert len(weights) == len(seen) and is_syn.any()
    for idx, w in zip(seen, weights):
        assert torch.equal(w, torch.from_numpy(np.where(is_syn[idx], 0.25, 1.0)).float())
    assert any(is_syn[idx].any() for idx in seen)  # some batches held synthetic rows, so 0.25 was used
    assert "a synthetic image weighs 0.25 in the loss" in (run / "log.txt").read_text()

    seen.clear(), weights.clear()  # real-only training: no weights at all, the plain loss
    train_classifier(tiny_cfg(toy_split, "train.synthetic_loss_weight=0.25"), tmp_path / "real")
    assert weights and all(w is None for w in weights)
    with pytest.raises(ConfigError, match="synthetic_loss_weight must be > 0"):
        train_classifier(tiny_cfg(toy_split, "train.synthetic_loss_weight=0"), tmp_path / "r3")


def test_synthetic_redraw_shows_more_synthetic_images_at_the_same_share_and_resumes_exactly(toy_split, tmp_path,
                                                                                            monkeypatch):
    import dermsynth.classify.train as train_mod

    syn = _write_synthetic(tmp_path / "syn", {"df": 20, "vasc": 20, "mel": 20})
    seen: list[np.ndarray] = []
    real_batch = train_mod._batch
    monkeypatch.setattr(train_mod, "_batch", lambda images, labels, idx, *a: seen.append(idx) or
                        real_batch(images, labels, idx, *a))
    sets = [f"data.synthetic={syn}", "data.synthetic_ratio=0.5", "train.epochs=4"]
    drawn = {}
    for name, extra in (("fixed", []), ("redraw", ["data.synthetic_redraw=true"])):
        seen.clear()
        m = train_classifier(tiny_cfg(toy_split, *sets, *extra), tmp_path / name)
        train_set = pd.read_csv(tmp_path / name / "train_set.csv")
        ids = train_set["image_id"].to_numpy()[np.concatenate(seen)]
        drawn[name] = (set(ids[np.char.startswith(ids.astype(str), "syn_")]), len(ids), m)
    (fixed_ids, n_fixed, m_fixed), (redraw_ids, n_redraw, m_redraw) = drawn["fixed"], drawn["redraw"]
    assert n_fixed == n_redraw  # the same steps per epoch: the quota, not the pool, sets an epoch's length
    assert len(redraw_ids) > len(fixed_ids) == sum(v["synthetic"] for v in m_fixed["train_counts"].values())
    assert {c: v["synthetic"] for c, v in m_redraw["train_counts"].items()} == \
        {c: v["synthetic"] for c, v in m_fixed["train_counts"].items()}
    assert m_redraw["train_counts"]["mel"]["synthetic_pool"] == 20 and m_redraw["synthetic"]["redraw"]
    assert "each epoch draws its" in (tmp_path / "redraw" / "log.txt").read_text()

    cfg = tiny_cfg(toy_split, *sets, "data.synthetic_redraw=true", "train.checkpoint_minutes=1e-9")  # killed in epoch 3
    with pytest.raises(Interrupt):
        train_classifier(cfg, tmp_path / "resumed", on_step=_interrupt_at(2 * len(seen) // 4 + 1))
    train_classifier(cfg, tmp_path / "resumed", resume=True)
    _same_run(tmp_path / "redraw", tmp_path / "resumed")


def test_prior_shift_decision_is_fitted_on_val_and_scored_everywhere(toy_split, tmp_path):
    from sklearn.metrics import f1_score

    from dermsynth.classify.decision import class_prior, decide, fit_prior_shift, prior_offsets

    taus = [-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
    m = train_classifier(tiny_cfg(toy_split, "eval.decision=prior_shift", f"eval.decision_taus={taus}"),
                         tmp_path / "run")
    d = m["decision"]
    assert d["rule"] == "prior_shift" and d["tau"] in taus
    prior = class_prior([m["train_counts"][c]["real"] for c in CLASSES])
    assert np.allclose(list(d["prior"].values()), prior)

    def table(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = pd.read_csv(tmp_path / "run" / name)
        return (t["label"].map(CLASSES.index).to_numpy(), t[[f"prob_{c}" for c in CLASSES]].to_numpy(),
                t["pred"].map(CLASSES.index).to_numpy())

    yv, pv, _ = table("val_predictions.csv")
    assert fit_prior_shift(pv, yv, prior, taus)[0] == pytest.approx(d["tau"])  # refit from what the run wrote
    yt, pt, dt = table("predictions.csv")
    assert np.array_equal(dt, decide(pt, prior_offsets(prior, d["tau"])))  # pred is the rule's decision
    labels = np.unique(np.r_[yt, dt])
    assert m["test"]["macro_f1"] == pytest.approx(f1_score(yt, dt, average="macro", labels=labels, zero_division=0))
    plain = pt.argmax(1)
    assert d["argmax"]["test"]["accuracy"] == pytest.approx((plain == yt).mean())
    assert m["val"]["macro_f1"] >= d["argmax"]["val"]["macro_f1"] - 1e-9  # the fit never loses on val
    with pytest.raises(ConfigError, match="decision_taus"):
        train_classifier(tiny_cfg(toy_split, "eval.decision=prior_shift", "eval.decision_taus=[]"), tmp_path / "r2")


def test_weight_averaging_is_what_is_scored_and_resumes_exactly(toy_split, tmp_path):
    """train.ema_decay: a decay of ~0 keeps the raw weights (the run equals a plain one); a real decay changes the
    scored weights; a run interrupted mid-epoch resumes its average bit-identically."""
    plain, near0, ema = tmp_path / "plain", tmp_path / "near0", tmp_path / "ema"
    train_classifier(tiny_cfg(toy_split), plain)
    train_classifier(tiny_cfg(toy_split, "train.ema_decay=1e-12"), near0)
    _same_run(plain, near0)
    train_classifier(tiny_cfg(toy_split, "train.ema_decay=0.9"), ema)
    wp, we = _weights(plain), _weights(ema)
    assert wp.keys() == we.keys() and not all(torch.equal(wp[k], we[k]) for k in wp)

    resumed = tmp_path / "resumed"
    cfg = tiny_cfg(toy_split, "train.ema_decay=0.9", "train.checkpoint_minutes=1e-9")
    with pytest.raises(Interrupt):
        train_classifier(cfg, resumed, on_step=_interrupt_at(3))
    train_classifier(cfg, resumed, resume=True)
    _same_run(ema, resumed)
    with pytest.raises(ConfigError, match="ema_decay"):
        train_classifier(tiny_cfg(toy_split, "train.ema_decay=1.0"), tmp_path / "bad")


def test_tta_scores_the_best_epoch_with_eight_views_and_picks_it_plain(toy_split, tmp_path):
    from dermsynth.classify.augment import dihedral_views
    from dermsynth.classify.predict import load_classifier, predict_probs
    from dermsynth.metrics.classification import classification_metrics

    m = train_classifier(tiny_cfg(toy_split, "eval.tta=true"), tmp_path / "run")
    model, norm, _, _ = load_classifier(tmp_path / "run")
    split = load_split(toy_split)
    cache = build_cache(split.manifest, 24)
    test = torch.from_numpy(cache.take(split.part("test")["image_id"]))
    views = [predict_probs(model, (v * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(), norm,
                           torch.device("cpu"), amp=False)
             for v in dihedral_views(test.permute(0, 3, 1, 2).float() / 255)]
    written = pd.read_csv(tmp_path / "run" / "predictions.csv")[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(written, torch.stack(views).mean(0).numpy(), atol=1e-5)
    assert not np.allclose(written, views[0].numpy(), atol=1e-3)  # the views really differ
    # the best epoch was chosen on plain validation probabilities (8x cheaper), not on the TTA ones
    val = split.part("val")
    plain = predict_probs(model, torch.from_numpy(cache.take(val["image_id"])), norm, torch.device("cpu"), amp=False)
    assert m["best_val_macro_f1"] == pytest.approx(classification_metrics(val["label"], plain.numpy(),
                                                                          n_boot=0)["macro_f1"])


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_result(toy_split, tmp_path):
    """SIGKILL a CLI training process after its first checkpoint, resume, compare with an uninterrupted run."""
    over = ["train.epochs=5", "train.checkpoint_every=1", "train.augment.randaugment=true"]
    full = tmp_path / "full"
    train_classifier(tiny_cfg(toy_split, *over), full)
    killed = tmp_path / "killed"
    args = ["-c", str(TINY), "--out", str(killed)]
    for item in [f"data.split={toy_split}", "data.image_size=24", "train.batch_size=16", "eval.n_boot=50", *over]:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dermsynth.cli", "train-clf", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((killed / "checkpoints").glob("step_*/state.pt")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (killed / "metrics.json").exists():
        pytest.skip("the run finished before it could be killed (machine too fast for this test's timing)")
    train_classifier(tiny_cfg(toy_split, *over), killed, resume=True)
    _same_run(full, killed)


@pytest.mark.slow
def test_ddp_two_cpu_processes_one_epoch(toy_split, tmp_path):
    """accelerate launch, 2 processes, gloo on CPU: one epoch, rank 0 writes a complete run folder."""
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file() or not torch.distributed.is_gloo_available():
        pytest.skip("accelerate launcher or torch.distributed gloo backend not available")
    run = tmp_path / "ddp"
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dermsynth.cli", "train-clf", "-c", str(TINY),
           "--out", str(run)]
    for item in [f"data.split={toy_split}", "data.image_size=24", "train.epochs=1", "train.batch_size=16",
                 "eval.n_boot=20", "train.device=cpu"]:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["processes"] == 2 and m["epochs_run"] == 1
    assert len(pd.read_csv(run / "summary.csv")) == 1
    preds = pd.read_csv(run / "predictions.csv")
    assert preds["image_id"].tolist() == load_split(toy_split).parts["test"]  # gathered back in order
    assert (run / "log.txt").read_text().count("epoch 1/1") == 1  # rank 0 alone writes the log


# one rank of a 2-process run: argv = config, out, global step to stop after (0: none), resume (0/1), overrides
_DDP_WORKER = """
import json, sys
from dermsynth.classify.config import ClfConfig
from dermsynth.classify.train import train_classifier
from dermsynth.config import load_config

config, out, stop, resume, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]

class Stop(Exception):
    pass

def hook(epoch, step, g):
    if g == stop:
        raise Stop

try:
    train_classifier(load_config(ClfConfig, config, json.loads(overrides)), out, resume=resume, on_step=hook)
except Stop:
    pass
"""


@pytest.mark.slow
def test_ddp_resume_mid_epoch_equals_uninterrupted_train_loss_included(toy_split, tmp_path, monkeypatch):
    """2 processes over gloo, stopped right after a mid-epoch checkpoint (written by rank 0 alone) and resumed: the
    run ends as an uninterrupted one does, and so does the resumed epoch's logged train_loss, which covers both
    ranks' batches of the partial epoch (not rank 0's counted twice)."""
    if not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed gloo backend not available")
    from gloo import run_gloo

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    over = [f"data.split={toy_split}", "data.image_size=24", "train.epochs=2", "train.batch_size=16",
            "eval.n_boot=20", "train.device=cpu"]

    def launch(out: Path, *extra: str, stop: int = 0, resume: bool = False) -> None:
        run_gloo([sys.executable, "-c", _DDP_WORKER, str(TINY), str(out), str(stop), str(int(resume)),
                  json.dumps([*over, *extra])], tmp_path / "cache", timeout=600)

    full = tmp_path / "full"
    launch(full)
    steps = len(pd.read_csv(full / "train_set.csv")) // (16 * 2)  # optimiser steps per epoch, 2 ranks
    assert steps >= 2 and json.loads((full / "metrics.json").read_text())["processes"] == 2
    mid = tmp_path / "mid"
    launch(mid, "train.checkpoint_minutes=1e-9", stop=steps + 1)  # one step into epoch 2
    assert not (mid / "metrics.json").exists() and len(pd.read_csv(mid / "summary.csv")) == 1
    launch(mid, "train.checkpoint_minutes=1e-9", resume=True)
    wf, wm = _weights(full), _weights(mid)
    assert wf.keys() == wm.keys() and all(torch.equal(wf[k], wm[k]) for k in wf)
    # the per-epoch history, train_loss of the resumed epoch 2 included, and the predictions: every rank scores its
    # shard with rank 0's BatchNorm statistics, the ones a checkpoint keeps
    sf, sm = pd.read_csv(full / "summary.csv"), pd.read_csv(mid / "summary.csv")
    pd.testing.assert_frame_equal(sf.drop(columns=TIMING), sm.drop(columns=TIMING))
    pd.testing.assert_frame_equal(pd.read_csv(full / "predictions.csv"), pd.read_csv(mid / "predictions.csv"))


def test_cli_end_to_end_on_toy(toy_split, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["train-clf", "-c", str(TINY), "--set", f"data.split={toy_split}", "--set", "train.epochs=1",
                   "--set", "eval.n_boot=20", "--out", str(out)])
    assert rc == 0 and (out / "metrics.json").is_file()
    assert cli_main(["train-clf", "-c", str(TINY), "--set", "train.nope=1", "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["train-clf", "-c", str(TINY), "--out", str(tmp_path / "y")]) == 2  # no data.split
    hybrid = REPO / "configs" / "clf_hybrid.yaml"
    assert cli_main(["train-clf", "-c", str(hybrid), "--set", f"data.split={toy_split}", "--out",
                     str(tmp_path / "z")]) == 2  # hybrid without synthetic images is refused
    assert "data.synthetic" in capsys.readouterr().err


def test_cli_end_to_end_on_ham10000_sample(ham_manifest, tmp_path):
    split = make_split(ham_manifest, tmp_path / "split")
    out = tmp_path / "ham_run"
    rc = cli_main(["train-clf", "-c", str(TINY), "--set", f"data.split={split}", "--set", "train.epochs=2",
                   "--set", "eval.n_boot=20", "--out", str(out)])
    assert rc == 0
    preds = pd.read_csv(out / "predictions.csv")
    assert preds["image_id"].str.startswith("ISIC_").all()
    assert preds["image_id"].tolist() == load_split(split).parts["test"]
    assert json.loads((out / "metrics.json").read_text())["test"]["n"] == len(preds)


def test_all_recipes_load():
    for path in sorted((REPO / "configs").glob("clf_*.yaml")):
        cfg = load_config(ClfConfig, path)
        assert cfg.train.epochs >= 1 and cfg.model.name
    names = {p.stem for p in (REPO / "configs").glob("clf_*.yaml")}
    assert {"clf_resnet50", "clf_efficientnet_b0", "clf_lite0", "clf_oversample", "clf_randaugment", "clf_focal",
            "clf_hybrid", "clf_tiny"} <= names
