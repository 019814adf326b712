"""``dermsynth filter``: keep the synthetic images that look real, look like their class, and are not copies.

Four checks, each recorded per image so a rejection can be read back:
  (a) realism: the image's features lie inside the real TRAIN k-NN manifold of its class (inside at least one real
      image's ball of radius = distance to its k-th real neighbour; Kynkaanniemi et al. 2019), reason
      ``outside_real_manifold``;
  (b) class confidence: a classifier trained on real images only gives the intended class probability >= threshold,
      reason ``low_class_prob`` (skipped, with a warning, when no classifier run is given). The threshold is
      ``min_class_prob``, or, with ``class_prob_quantile`` q > 0, per class c: min(min_class_prob, the q-quantile of
      that classifier's P(c) on the split's real VAL images of class c) (val only: test is never looked at);
  (c) not a copy: the memorisation audit does not flag it, reason ``copy_of_train``;
  (d) off by default: does not look synthetic. With ``detector_keep`` f > 0, per class a linear real-vs-synthetic
      classifier (the C2ST's, metrics.distribution) is fitted on the class's synthetic and real TRAIN features; each
      synthetic image is scored by a model fitted without it, and all but the fraction f that look least synthetic
      are rejected, reason ``looks_synthetic``. Why: a classifier trained on real + synthetic images can learn the
      synthetic look as evidence for a class; keeping the images with the least of it weakens that cue. The
      detector's held-out AUC per class is recorded (0.5: synthetic and real cannot be told apart). It ranks every
      image of the class, not only those (a)-(c) keep, so its count of rejections reads on its own as theirs do;
      the share kept after all four checks is then at most f.
Writes ``manifest.csv`` (kept images, canonical, paths to the original PNGs), ``rejected.csv`` (every rejected image
and all its reasons) and ``filter.json`` (per-class counts in / kept / rejected by reason, thresholds, and check (b)'s
threshold per class with how it was obtained).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dermsynth.config import ConfigError, save_config, to_dict
from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import REQUIRED_COLUMNS, write_manifest
from dermsynth.io import DataError, atomic_write_csv, atomic_write_json, read_json
from dermsynth.metrics.distribution import c2st_auc_of, c2st_scores, realism_inside
from dermsynth.metrics.feature_cache import (default_out, features_and_logits, load_images, native_size,
                                              samples_on_split)
from dermsynth.metrics.features import ExtractorSpec, make_extractor
from dermsynth.metrics.memorisation import MemorisationConfig, audit, calibrate_orbit, null_rows
from dermsynth.paths import RunPaths
from dermsynth.runlog import get_logger, run_log

log = get_logger("metrics.filter")

REASONS = ("outside_real_manifold", "low_class_prob", "copy_of_train", "looks_synthetic")


@dataclass
class FilterConfig:
    features: ExtractorSpec = field(default_factory=ExtractorSpec)
    image_size: int = 0  # px at which synthetic and real images are compared; 0 = the synthetic images' own size
    realism: bool = True  # check (a)
    realism_k: int = 5  # k of the class's real TRAIN k-NN manifold (capped at n_train - 1)
    classifier: str = ""  # real-only classifier run folder for check (b); the --classifier argument overrides it
    min_class_prob: float = 0.5  # check (b): keep if P(intended class) >= this (0.5 of 7 classes implies the argmax)
    # Check (b) per class: > 0 lowers class c's threshold to the q-quantile of P(c) on the split's real VAL images of
    # class c (never above min_class_prob), i.e. keep a synthetic image that looks at least as much like its class as
    # the lowest q of real new lesions of that class do. Why: a real-only classifier is unsure even of REAL rare-class
    # images (HAM10000 df, vasc), so one absolute number rejected every rare synthetic image. 0 = min_class_prob only.
    class_prob_quantile: float = 0.0
    copies: bool = True  # check (c)
    memorisation: MemorisationConfig = field(default_factory=MemorisationConfig)
    detector_keep: float = 0.0  # check (d): the fraction of each class's images it keeps; 0 = off
    detector_folds: int = 5  # cross-fitting folds of check (d)
    seed: int = 0


def class_probs(run_dir: str | Path | None, images: np.ndarray, labels: pd.Series,
                split_fingerprint: str) -> np.ndarray | None:
    """P(intended class) per image from a real-only classifier run, or None (warned) when there is none to use.

    The run must be finished, trained on the split being filtered (``split_fingerprint``) and on real images only,
    else DataError: a classifier trained on another split may have seen this split's val/test lesions, which would
    then leak into the choice of synthetic images; one trained on synthetic images would judge them by its own kind."""
    if not run_dir:
        log.warning("filter: no classifier run given: the class-confidence check (b) is skipped")
        return None
    metrics = RunPaths(run_dir).metrics
    m = read_json(metrics, "metrics file", f"filter: classifier run {run_dir} is not finished (no {metrics.name}); "
                  f"check (b) needs a finished real-only classifier run on this split (dermsynth train-clf)")
    if m.get("split_fingerprint") != split_fingerprint:
        raise DataError(f"filter: classifier run {run_dir} was trained on split {m.get('split')} (fingerprint "
                        f"{str(m.get('split_fingerprint'))[:12]}...), not on the split being filtered (fingerprint "
                        f"{split_fingerprint[:12]}...): it may have seen this split's val/test lesions; train a "
                        f"real-only classifier on this split")
    if "train_counts" not in m:
        raise DataError(f"filter: classifier run {run_dir}: its {metrics.name} has no train_counts, so it cannot be "
                        f"shown to be real-only; check (b) needs a classifier trained on real images only")
    n_syn = sum(int(v.get("synthetic", 0)) for v in m["train_counts"].values())
    if n_syn:
        raise DataError(f"filter: classifier run {run_dir} is not real-only: it trained on {n_syn} synthetic "
                        f"image(s) (train_counts in {metrics.name}); check (b) needs a classifier trained on real "
                        f"images only (no data.synthetic)")
    try:
        from dermsynth.classify.predict import predict_images
    except ImportError as e:
        log.warning("filter: dermsynth.classify.predict is unavailable (%s): check (b) is skipped", e)
        return None
    probs = np.asarray(predict_images(Path(run_dir), images))
    return probs[np.arange(len(images)), [CLASSES.index(c) for c in labels]]


def class_thresholds(val_p: np.ndarray, val_labels: pd.Series | np.ndarray, classes: list[str],
                     cfg: FilterConfig) -> dict[str, dict]:
    """Check (b)'s threshold per class, with the number of val images behind it and how it was obtained.

    ``val_p``: P(own class) of each real val image (from the same reference classifier). With class_prob_quantile
    q > 0 the threshold of class c is min(min_class_prob, q-quantile of val_p over the val images of class c);
    otherwise, or without a val image of c, it is min_class_prob."""
    labels, q = np.asarray(val_labels), cfg.class_prob_quantile
    out = {}
    for c in classes:
        p = val_p[labels == c] if q > 0 else np.empty(0)
        if q <= 0:
            out[c] = {"threshold": float(cfg.min_class_prob), "n_val": 0, "source": "min_class_prob"}
        elif len(p) == 0:
            log.warning("filter: the split's val part has no %s image: its class-prob threshold stays "
                        "min_class_prob=%s", c, cfg.min_class_prob)
            out[c] = {"threshold": float(cfg.min_class_prob), "n_val": 0,
                      "source": "min_class_prob (no val image of the class)"}
        else:
            v = float(np.quantile(p, q))
            out[c] = {"threshold": min(float(cfg.min_class_prob), v), "n_val": int(len(p)),
                      "source": "val quantile" if v < cfg.min_class_prob else
                      "min_class_prob (val quantile is not below it)"}
            log.info("filter %s: q%g of P(%s) on %d real val images = %.4f -> threshold %.4f", c, q, c, len(p), v,
                     out[c]["threshold"])
    return out


def detector_check(syn_f: np.ndarray, syn_labels: pd.Series, train_f: np.ndarray, train_labels: pd.Series,
                   cfg: FilterConfig) -> tuple[np.ndarray, np.ndarray, dict[str, dict]]:
    """Check (d): held-out "looks synthetic" score per synthetic image, whether it is kept, and per class the
    detector's AUC and the score cut-off."""
    score, keep, info = np.full(len(syn_f), np.nan), np.ones(len(syn_f), bool), {}
    for c in dict.fromkeys(syn_labels):
        m_s, m_t = (syn_labels == c).to_numpy(), (train_labels == c).to_numpy()
        if m_s.sum() < 2 or m_t.sum() < 2:
            log.warning("filter: class %s has %d synthetic and %d train image(s): the detector check is skipped", c,
                        int(m_s.sum()), int(m_t.sum()))
            continue
        s = c2st_scores(syn_f[m_s], train_f[m_t], cfg.detector_folds, seed=cfg.seed)
        own = s[:m_s.sum()]
        n_keep = int(np.ceil(cfg.detector_keep * len(own)))
        cut = np.sort(own)[n_keep - 1]  # ties at the cut-off are kept
        score[m_s], keep[m_s] = own, own <= cut
        auc = c2st_auc_of(s, len(own))
        info[c] = {"auc": auc, "cutoff": float(cut), "kept": int((own <= cut).sum()), "n_train": int(m_t.sum())}
        log.info("filter %s: real-vs-synthetic detector AUC %.3f (held out); keeps the %d least synthetic-looking "
                 "of %d", c, auc, info[c]["kept"], len(own))
    return score, keep, info


def run_filter(samples: str | Path, split: str | Path, cfg: FilterConfig | None = None, out: str | Path | None = None,
               classifier: str | Path | None = None) -> Path:
    """Filter a samples folder; returns the output folder (manifest.csv, rejected.csv, filter.json)."""
    cfg = cfg or FilterConfig()
    samples = Path(samples)
    if not 0.0 <= cfg.class_prob_quantile <= 1.0:
        raise ConfigError(f"filter.class_prob_quantile must be in [0, 1], got {cfg.class_prob_quantile}")
    if not 0.0 <= cfg.detector_keep <= 1.0:
        raise ConfigError(f"filter.detector_keep must be in [0, 1] (0 = off), got {cfg.detector_keep}")
    if cfg.detector_keep > 0 and cfg.detector_folds < 2:
        raise ConfigError(f"filter.detector_folds must be >= 2 (held-out scores), got {cfg.detector_folds}")
    syn, sp = samples_on_split(samples, split)  # refuses a generator trained on another split, before any write
    out = Path(out) if out is not None else default_out(samples, "filtered")
    with run_log(out):
        t0 = time.time()
        save_config(cfg, out / "config.yaml")
        train = sp.part("train")
        size = cfg.image_size or native_size(syn)
        extractor = make_extractor(cfg.features)
        syn_img, train_img = load_images(syn, size), load_images(train, size)
        syn_f, _ = features_and_logits(syn_img, extractor)
        train_f, _ = features_and_logits(train_img, extractor)
        table = syn.copy()
        reasons: list[list[str]] = [[] for _ in range(len(syn))]
        checks: dict[str, str] = {}

        if cfg.realism:
            table["realism"] = np.nan
            for c in table["label"].unique():
                m_s, m_t = (table["label"] == c).to_numpy(), (train["label"] == c).to_numpy()
                k = min(cfg.realism_k, int(m_t.sum()) - 1)
                if k < 1:
                    log.warning("filter: class %s has %d train image(s): no manifold, realism check skipped", c,
                                int(m_t.sum()))
                    continue
                inside, score = realism_inside(train_f[m_t], syn_f[m_s], k)
                table.loc[m_s, "realism"] = score
                for i in np.flatnonzero(m_s)[~inside]:
                    reasons[i].append("outside_real_manifold")
            checks["realism"] = f"inside the class's real train k-NN manifold, k={cfg.realism_k}"

        run = classifier or cfg.classifier
        classes = list(dict.fromkeys(syn["label"]))
        val = sp.part("val").iloc[:0]
        if cfg.class_prob_quantile > 0:  # calibration images: real val images of the filtered classes (never test)
            val = sp.part("val")
            val = val[val["label"].isin(classes)]
        # one pass of the reference classifier over the synthetic and the val images (one model load)
        images = np.concatenate([syn_img, load_images(val, size)]) if len(val) else syn_img
        probs = class_probs(run, images, pd.concat([syn["label"], val["label"]]), sp.fingerprint)
        thresholds: dict[str, dict] | None = None
        if probs is not None:
            probs, val_p = probs[:len(syn)], probs[len(syn):]
            thresholds = class_thresholds(val_p, val["label"], classes, cfg)
            thr = {c: t["threshold"] for c, t in thresholds.items()}
            table["class_prob"] = probs
            for i in np.flatnonzero(probs < syn["label"].map(thr).to_numpy()):
                reasons[i].append("low_class_prob")
            how = f"{cfg.min_class_prob}"
            if cfg.class_prob_quantile > 0:
                how = (f"min(min_class_prob={cfg.min_class_prob}, q{cfg.class_prob_quantile} of P(class) on the "
                       f"split's real val images of that class)")
            checks["class_prob"] = f"P(intended class) >= {how} by {run}"
            if cfg.class_prob_quantile > 0:
                checks["class_prob"] += ": " + ", ".join(f"{c} {t:.4g}" for c, t in thr.items())
        else:
            checks["class_prob"] = "skipped: no classifier run"

        memo = None
        if cfg.copies:
            null_img = load_images(null_rows(sp, cfg.memorisation, cfg.seed), size)
            calib = calibrate_orbit(train, train_img, train_f, null_img, extractor, cfg.memorisation)
            rows, memo = audit(syn, syn_img, train, train_img, train_f, extractor, cfg.memorisation, calib)
            table["nearest_train_id"], table["copy_cosine"], table["copy_ssim"] = (
                rows["nearest_train_id"].to_numpy(), rows["cosine"].to_numpy(), rows["ssim"].to_numpy())
            for i in np.flatnonzero(rows["is_copy"].to_numpy()):
                reasons[i].append("copy_of_train")
            checks["copies"] = (f"cosine < {memo['cosine_threshold']:.4f} ({memo['calibration']['source']}) "
                                f"and SSIM < {cfg.memorisation.ssim_threshold}, orbit {cfg.memorisation.orbit}")

        detector = None
        if cfg.detector_keep > 0:
            table["synthetic_score"], keep, detector = detector_check(syn_f, syn["label"], train_f, train["label"], cfg)
            for i in np.flatnonzero(~keep):
                reasons[i].append("looks_synthetic")
            checks["detector"] = (f"among the {cfg.detector_keep:g} of its class that a real-vs-synthetic classifier "
                                  f"(fitted on real train images, {cfg.detector_folds}-fold held out) finds least "
                                  "synthetic")

        table["reasons"] = [";".join(r) for r in reasons]
        kept = table[table["reasons"] == ""].drop(columns="reasons")
        rejected = table[table["reasons"] != ""]
        if len(kept):
            write_manifest(kept, out / "manifest.csv")
        else:
            log.warning("filter: every synthetic image was rejected; manifest.csv has no rows")
            atomic_write_csv(out / "manifest.csv", pd.DataFrame(columns=list(REQUIRED_COLUMNS)))
        atomic_write_csv(out / "rejected.csv", rejected)
        per_class = {}
        for c in dict.fromkeys(table["label"]):
            sub = table[table["label"] == c]
            per_class[c] = {"in": int(len(sub)), "kept": int((sub["reasons"] == "").sum()),
                            "rejected": int((sub["reasons"] != "").sum()),
                            "by_reason": {r: int(sub["reasons"].str.contains(r).sum()) for r in REASONS}}
        summary = {"samples": str(samples.resolve()), "split": str(sp.path), "split_fingerprint": sp.fingerprint,
                   "extractor": extractor.name, "extractor_version": extractor.version, "image_size": size,
                   "checks": checks, "class_prob_thresholds": thresholds, "detector": detector,
                   "per_class": per_class,
                   "total": {"in": int(len(table)), "kept": int(len(kept)), "rejected": int(len(rejected))},
                   "memorisation": memo, "config": to_dict(cfg), "wall_s": round(time.time() - t0, 2)}
        atomic_write_json(out / "filter.json", summary)
        for c, v in per_class.items():
            log.info("filter %s: kept %d of %d (%s)", c, v["kept"], v["in"],
                     ", ".join(f"{r} {n}" for r, n in v["by_reason"].items() if n) or "no rejections")
        return out
