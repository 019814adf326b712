"""The synthetic-image filter: every rejected image carries every reason that applies.

The test data set is built so that each check's verdict is known in advance: a test extractor reads an image's
feature vector from its first pixel row, so lesions, re-photographs, realistic and unrealistic images and copies are
placed exactly in feature space; the rest of each image is random noise (so only real copies have a high SSIM).
"""
from __future__ import annotations

import json
import logging
import sys
import types

import numpy as np
import pandas as pd
import pytest

from dermsynth.config import ConfigError
from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import read_manifest, write_manifest
from dermsynth.data.split import SplitConfig, load_split, make_split
from dermsynth.io import DataError, atomic_save_image, image_array
from dermsynth.metrics import features as features_mod
from dermsynth.metrics.filter import FilterConfig, class_thresholds, detector_check, run_filter
from test_quality_data import fake_samples

SIZE, DIM = 32, 12  # features = the first 4 pixels (x 3 channels) of row 0, centred


class PixelRow:
    name, version, dim, n_logits = "pixelrow", "pixelrow-test-v1", DIM, 0

    def __call__(self, images):
        return (images[:, 0, :4, :].reshape(len(images), -1).astype(np.float32) - 128.0) / 128.0


def _image(rng, feature, marker=0):
    im = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    im[0, :4, :] = np.clip(np.round(128 + 128 * feature), 0, 255).reshape(4, 3)
    im[1, 0, 0] = marker  # read by the fake classifier: 1 + index of the class it is sure about, 0 = unsure
    return im


def _direction(rng, base, spread):
    v = base + spread * rng.normal(size=DIM) / np.sqrt(DIM)
    return 0.7 * v / np.linalg.norm(v)


@pytest.fixture()
def world(tmp_path, monkeypatch):
    monkeypatch.setitem(features_mod.EXTRACTORS, "pixelrow", lambda spec: PixelRow())
    rng = np.random.default_rng(0)
    bases = {c: rng.normal(size=DIM) for c in ("df", "vasc")}
    rows = []
    for c, base in bases.items():
        for g in range(10):  # 10 lesions per class, 2 photos each (a re-photograph is a small move)
            u = _direction(rng, base / np.linalg.norm(base), 0.5)
            for k in range(2):
                iid = f"{c}_{g}_{k}"
                im = _image(rng, u + 0.01 * k * rng.normal(size=DIM), marker=1 + CLASSES.index(c))
                atomic_save_image(tmp_path / "real" / f"{iid}.png", im)
                rows.append({"image_id": iid, "group_id": f"{c}_{g}", "label": c,
                             "path": str(tmp_path / "real" / f"{iid}.png"), "source": "test"})
    split = make_split(write_manifest(pd.DataFrame(rows), tmp_path / "real" / "manifest.csv"), tmp_path / "split",
                       SplitConfig(seed=0))
    train = load_split(split).part("train")
    copy_src = train[train["label"] == "df"].iloc[0]
    d = bases["df"] / np.linalg.norm(bases["df"])
    good = lambda m=0: _image(rng, _direction(rng, d, 0.1), m)  # noqa: E731  near the class centre: realistic, new
    bad = lambda m=0: _image(rng, -0.7 * d, m)  # noqa: E731  opposite the class: outside its manifold
    sure_df = 1 + CLASSES.index("df")
    images = [good(sure_df), bad(sure_df), image_array(copy_src["path"]), good(0), bad(0)]
    names = ["good", "unrealistic", "copy", "unsure", "unrealistic_unsure"]
    samples = fake_samples(tmp_path / "samples", np.stack(images), ["df"] * 5, ids=names)
    reference_run(tmp_path / "run", split)  # what check (b) reads of the fake classifiers' run
    return samples, split, copy_src["image_id"]


def reference_run(run, on_split, **metrics):
    """A finished classifier run's metrics.json: real-only, on ``on_split``, unless ``metrics`` says otherwise
    (a key given as None is left out)."""
    m = {"split": str(on_split), "split_fingerprint": load_split(on_split).fingerprint,
         "train_counts": {c: {"real": 2, "synthetic": 0} for c in CLASSES}, **metrics}
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if v is not None}))
    return run


@pytest.fixture()
def fake_classifier(monkeypatch):
    """A stand-in for dermsynth.classify.predict: sure of the class marked in pixel (1, 0), else uniform."""
    def predict_images(run_dir, images):
        probs = np.full((len(images), len(CLASSES)), 1 / len(CLASSES))
        for i, im in enumerate(images):
            if im[1, 0, 0]:
                probs[i] = 0.01
                probs[i, im[1, 0, 0] - 1] = 1 - 0.01 * (len(CLASSES) - 1)
        return probs

    module = types.ModuleType("dermsynth.classify.predict")
    module.predict_images = predict_images
    monkeypatch.setitem(sys.modules, "dermsynth.classify.predict", module)


def _cfg():
    cfg = FilterConfig()
    cfg.features.name = "pixelrow"
    return cfg


def test_filter_reasons_per_image(world, fake_classifier, tmp_path):
    samples, split, copy_id = world
    out = run_filter(samples, split, _cfg(), tmp_path / "filtered", classifier=tmp_path / "run")
    kept = read_manifest(out / "manifest.csv")
    assert kept["image_id"].tolist() == ["good"]
    assert kept["path"].iloc[0] == str((samples / "images" / "good.png").resolve())  # points at the original PNG
    assert kept["source"].iloc[0] == "synthetic" and "class_prob" in kept and "realism" in kept
    rej = pd.read_csv(out / "rejected.csv", keep_default_na=False).set_index("image_id")
    assert rej.loc["unrealistic", "reasons"] == "outside_real_manifold"
    assert rej.loc["copy", "reasons"] == "copy_of_train" and rej.loc["copy", "nearest_train_id"] == copy_id
    assert rej.loc["unsure", "reasons"] == "low_class_prob"
    assert rej.loc["unrealistic_unsure", "reasons"] == "outside_real_manifold;low_class_prob"
    info = json.loads((out / "filter.json").read_text())
    assert info["per_class"]["df"] == {"in": 5, "kept": 1, "rejected": 4, "by_reason": {
        "outside_real_manifold": 2, "low_class_prob": 2, "copy_of_train": 1, "looks_synthetic": 0}}
    assert info["detector"] is None and "detector" not in info["checks"]  # check (d) is off by default
    assert info["extractor"] == "pixelrow" and "same-lesion" in info["memorisation"]["calibration"]["source"]


def test_filter_without_classifier_skips_that_check_and_warns(world, tmp_path, caplog):
    samples, split, _ = world
    with caplog.at_level(logging.WARNING, logger="dermsynth"):
        out = run_filter(samples, split, _cfg(), tmp_path / "filtered")
    assert "check (b) is skipped" in caplog.text
    kept = read_manifest(out / "manifest.csv")
    assert sorted(kept["image_id"]) == ["good", "unsure"]
    assert json.loads((out / "filter.json").read_text())["checks"]["class_prob"].startswith("skipped")


def test_filter_thresholds_are_configurable(world, fake_classifier, tmp_path):
    samples, split, _ = world
    cfg = _cfg()
    cfg.realism, cfg.copies, cfg.min_class_prob = False, False, 0.1  # uniform 1/7 = 0.14 now passes
    out = run_filter(samples, split, cfg, tmp_path / "filtered", classifier=tmp_path / "run")
    assert len(read_manifest(out / "manifest.csv")) == 5



def _fake_predict(monkeypatch, predict_images):
    module = types.ModuleType("dermsynth.classify.predict")
    module.predict_images = predict_images
    monkeypatch.setitem(sys.modules, "dermsynth.classify.predict", module)


def test_class_thresholds_are_val_quantiles_capped_with_fallback(caplog):
    """Per class: the q-quantile of P(class) on that class's val images, never above min_class_prob; a class with no
    val image falls back to min_class_prob with a warning."""
    labels = ["df"] * 5 + ["vasc"] * 4 + ["nv"]
    val_p = np.array([5, 12, 20, 50, 60, 150, 175, 200, 225, 225]) / 250  # df P 0.02..0.24, vasc P 0.6..0.9
    cfg = FilterConfig(min_class_prob=0.5, class_prob_quantile=0.1)
    with caplog.at_level(logging.WARNING, logger="dermsynth"):
        thr = class_thresholds(val_p, pd.Series(labels), ["df", "vasc", "mel"], cfg)
    assert thr["df"]["threshold"] == pytest.approx(np.quantile(np.array([5, 12, 20, 50, 60]) / 250, 0.1))  # 0.0312
    assert 0.02 < thr["df"]["threshold"] < 0.05  # an interpolated quantile, far below min_class_prob
    assert thr["df"]["n_val"] == 5 and thr["df"]["source"] == "val quantile"
    assert thr["vasc"]["threshold"] == 0.5  # its val quantile (0.63) is above min_class_prob: capped
    assert thr["mel"]["threshold"] == 0.5 and "no mel image" in caplog.text  # absent from val: fallback, warned
    assert set(thr) == {"df", "vasc", "mel"}  # nv (in val, not asked for) gets none
    assert class_thresholds(val_p, labels, ["df"], FilterConfig(min_class_prob=0.5))["df"] == {
        "threshold": 0.5, "n_val": 0, "source": "min_class_prob"}  # q = 0: the absolute threshold


def test_calibrated_threshold_keeps_what_the_absolute_one_rejects(world, monkeypatch, tmp_path):
    """A classifier unsure even of real df (P = 0.3 on every marked image) rejects every synthetic df image at 0.5;
    calibrated on the real val df images, the marked synthetic image passes and the unmarked ones (P 1/7) do not."""
    def predict_images(run_dir, images):
        probs = np.full((len(images), len(CLASSES)), 1 / len(CLASSES))
        for i, im in enumerate(images):
            if im[1, 0, 0]:
                probs[i] = 0.7 / (len(CLASSES) - 1)
                probs[i, im[1, 0, 0] - 1] = 0.3
        return probs

    _fake_predict(monkeypatch, predict_images)
    samples, split, _ = world
    cfg = _cfg()
    cfg.realism, cfg.copies = False, False
    out = run_filter(samples, split, cfg, tmp_path / "absolute", classifier=tmp_path / "run")
    assert len(pd.read_csv(out / "manifest.csv")) == 0
    info = json.loads((out / "filter.json").read_text())
    assert info["class_prob_thresholds"] == {"df": {"threshold": 0.5, "n_val": 0, "source": "min_class_prob"}}

    cfg.class_prob_quantile = 0.1
    out = run_filter(samples, split, cfg, tmp_path / "calibrated", classifier=tmp_path / "run")
    kept = read_manifest(out / "manifest.csv")["image_id"]
    assert sorted(kept) == ["copy", "good", "unrealistic"]  # the marked df images (checks (a), (c) are off here)
    n_val = int((load_split(split).part("val")["label"] == "df").sum())
    info = json.loads((out / "filter.json").read_text())
    assert n_val > 0 and info["class_prob_thresholds"] == {
        "df": {"threshold": pytest.approx(0.3), "n_val": n_val, "source": "val quantile"}}
    assert "q0.1" in info["checks"]["class_prob"] and "df 0.3" in info["checks"]["class_prob"]
    rej = pd.read_csv(out / "rejected.csv", keep_default_na=False).set_index("image_id")
    assert set(rej.index) == {"unsure", "unrealistic_unsure"}
    assert (rej["reasons"] == "low_class_prob").all()


def test_class_prob_check_refuses_a_classifier_not_real_only_on_this_split(world, fake_classifier, tmp_path):
    """Check (b) uses only a finished classifier trained on real images of this very split: one trained on another
    split may have seen its val/test lesions, which would then leak into the choice of synthetic images."""
    samples, split, _ = world
    cfg = _cfg()
    cfg.realism, cfg.copies = False, False
    counts = {c: {"real": 2, "synthetic": 3 if c == "df" else 0} for c in CLASSES}
    bad = {"unfinished": ({}, "unfinished.*not finished"),
           "other_split": ({"split_fingerprint": "0" * 64, "split": "elsewhere/split.json"},
                           "other_split was trained on split elsewhere/split.json"),
           "hybrid": ({"train_counts": counts}, "hybrid is not real-only: it trained on 3 synthetic"),
           "old": ({"train_counts": None}, "old: its metrics.json has no train_counts")}
    for name, (metrics, message) in bad.items():
        run = reference_run(tmp_path / name, split, **metrics)
        if name == "unfinished":  # a run still training (or killed) has no metrics.json yet
            (run / "metrics.json").unlink()
        with pytest.raises(DataError, match=message):
            run_filter(samples, split, cfg, tmp_path / f"filtered_{name}", classifier=run)
    kept = read_manifest(run_filter(samples, split, cfg, tmp_path / "ok", classifier=tmp_path / "run") / "manifest.csv")
    assert sorted(kept["image_id"]) == ["copy", "good", "unrealistic"]  # a real-only run on this split: used


def test_class_prob_quantile_out_of_range_is_refused(world, tmp_path):
    samples, split, _ = world
    cfg = _cfg()
    cfg.class_prob_quantile = 1.5
    with pytest.raises(ConfigError, match="class_prob_quantile"):
        run_filter(samples, split, cfg, tmp_path / "filtered", classifier=tmp_path / "run")
    assert not (tmp_path / "filtered").exists()  # refused before anything is written


def test_detector_keeps_the_least_synthetic_looking_images():
    """Synthetic features = real ones plus a tell of random strength along one direction: the held-out detector
    keeps the fraction asked for, and those are the images with the weakest tell; a class whose synthetic images
    are drawn like its real ones gets a detector AUC near chance."""
    rng = np.random.default_rng(0)
    tell = rng.uniform(0, 4, 120)
    syn = np.concatenate([rng.normal(size=(120, 10)) + tell[:, None] * np.eye(10)[0], rng.normal(size=(60, 10))])
    labels = pd.Series(["mel"] * 120 + ["nv"] * 60)
    train = rng.normal(size=(400, 10))
    score, keep, info = detector_check(syn, labels, train, pd.Series(["mel"] * 200 + ["nv"] * 200),
                                       FilterConfig(detector_keep=0.25))
    mel = labels.eq("mel").to_numpy()
    assert keep[mel].sum() == info["mel"]["kept"] == 30 and keep[~mel].sum() == 15  # ceil(0.25 * n) per class
    # the score follows what the detector can see (the coordinate along the tell, noise included), and the kept
    # images are those with the weaker tells
    assert np.corrcoef(score[mel], syn[mel, 0])[0, 1] > 0.9
    assert tell[keep[mel]].mean() + 1.0 < tell[~keep[mel]].mean()
    assert info["mel"]["auc"] > 0.8 and abs(info["nv"]["auc"] - 0.5) < 0.15
    assert (score[keep & mel] <= info["mel"]["cutoff"]).all() and (score[~keep & mel] > info["mel"]["cutoff"]).all()


def test_detector_check_in_the_filter_run(world, fake_classifier, tmp_path):
    samples, split, _ = world
    cfg = _cfg()
    cfg.realism, cfg.copies, cfg.min_class_prob, cfg.detector_keep = False, False, 0.1, 0.4
    out = run_filter(samples, split, cfg, tmp_path / "filtered", classifier=tmp_path / "run")
    info = json.loads((out / "filter.json").read_text())
    assert info["per_class"]["df"]["kept"] == 2 and info["per_class"]["df"]["by_reason"]["looks_synthetic"] == 3
    assert 0.0 <= info["detector"]["df"]["auc"] <= 1.0 and "least" in info["checks"]["detector"]
    kept = read_manifest(out / "manifest.csv")
    rej = pd.read_csv(out / "rejected.csv", keep_default_na=False)
    assert (rej["reasons"] == "looks_synthetic").all()
    assert kept["synthetic_score"].max() < rej["synthetic_score"].min()


def test_detector_keep_out_of_range_is_refused(world, tmp_path):
    samples, split, _ = world
    cfg = _cfg()
    cfg.detector_keep = 1.2
    with pytest.raises(ConfigError, match="detector_keep"):
        run_filter(samples, split, cfg, tmp_path / "filtered")
    cfg.detector_keep, cfg.detector_folds = 0.5, 1
    with pytest.raises(ConfigError, match="detector_folds"):
        run_filter(samples, split, cfg, tmp_path / "filtered")
    assert not (tmp_path / "filtered").exists()
