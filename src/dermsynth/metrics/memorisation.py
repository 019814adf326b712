"""Memorisation audit: is a synthetic image a copy of a training image?

For each synthetic image we find its nearest image in the generator's TRAIN part by cosine similarity of extractor
features (centred on the training mean), searching over the 8 flips/rotations of the synthetic image (dermoscopy has
no "up", so a rotated copy is still a copy), and measure SSIM between the best-aligned pair in pixels.

The cosine threshold is calibrated on the data, from two distributions:
- same-lesion pairs: HAM10000 holds several photos of many lesions, i.e. what "this lesion again" looks like to the
  extractor. A synthetic image closer to a training image than the ``quantile``-th percentile of those pairs (default
  the 5th: strict, since a copied lesion in a rare class is the failure that matters) is a copy;
- new lesions: real images of a held-out part (``null_part``, default val, never test) are by construction new lesions
  (the split is lesion-grouped); their nearest-training-image similarity is what an honest, novel image reaches.
The threshold is the larger of the two quantiles (``null_quantile`` of the new-lesion distribution, default 0.99),
so the rule never calls more than about 1 % of genuinely new lesions copies. On HAM10000 with lite0 features the
new-lesion bound is the one that binds: a re-photographed lesion is often *less* similar to its sibling than a new
lesion is to its nearest training image (see the measured numbers in the study report), so the same-lesion quantile
alone would flag nearly every image. The TEST part's flag rate is reported as an out-of-sample check.
A second, pixel-level rule flags near-verbatim copies: SSIM of the aligned best match >= ``ssim_threshold`` (0.9:
above every real new lesion's best match measured on HAM10000 at 64 px, max 0.88).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from dermsynth.io import atomic_open
from dermsynth.metrics.feature_cache import cached_features
from dermsynth.metrics.features import Extractor
from dermsynth.runlog import get_logger

if TYPE_CHECKING:
    from dermsynth.data.split import Split

log = get_logger("metrics.memorisation")

# The 8 symmetries of the square as (k quarter turns, then horizontal flip?).
D4 = tuple((k, f) for f in (False, True) for k in range(4))
ORBITS = {"none": D4[:1], "flip": (D4[0], D4[4]), "d4": D4}


@dataclass
class MemorisationConfig:
    orbit: str = "d4"  # none | flip | d4: the transforms of each synthetic image searched for a match
    center: bool = True  # subtract the training features' mean before cosine (pooled ReLU features are all >= 0)
    quantile: float = 0.05  # copy = cosine similarity >= this quantile of same-lesion pair similarities ...
    null_part: str = "val"  # ... and >= the null_quantile of new lesions' (this part's) nearest-train similarity
    null_quantile: float = 0.99  # ("" part: same-lesion rule alone)
    null_max: int = 1000  # at most this many images of null_part are used (a seeded random subset)
    ssim_threshold: float = 0.90  # or pixel SSIM of the aligned best match at least this (near-verbatim copies)
    fallback_threshold: float = 0.95  # cosine threshold when the training data has no lesion with 2+ photos
    grid_pairs: int = 24  # closest pairs shown in the grid PNG


def transform(images: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Rotate NHWC images by k quarter turns, then mirror left-right if ``flip``."""
    out = np.rot90(images, k, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_cosine(query: np.ndarray, ref: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per query row: index of the most cosine-similar ``ref`` row and that similarity."""
    q, r = _unit(query), _unit(ref)
    idx, sim = np.empty(len(q), np.int64), np.empty(len(q))
    for i in range(0, len(q), chunk):
        s = q[i:i + chunk] @ r.T
        idx[i:i + chunk] = s.argmax(1)
        sim[i:i + chunk] = s.max(1)
    return idx, sim


def same_lesion_similarities(groups: pd.Series | np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of distinct images that share a group (lesion) id."""
    u = _unit(feats)
    sims = []
    for rows in pd.Series(np.asarray(groups)).groupby(np.asarray(groups), sort=False).indices.values():
        if len(rows) > 1:
            s = u[rows] @ u[rows].T
            sims.append(s[np.triu_indices(len(rows), 1)])
    return np.concatenate(sims) if sims else np.empty(0)


def centre_of(train_feats: np.ndarray, cfg: MemorisationConfig) -> np.ndarray:
    """The vector subtracted from every feature before cosine: the training mean, or zero when not centring."""
    return np.asarray(train_feats, np.float64).mean(0) if cfg.center else np.zeros(train_feats.shape[1])


def calibrate(groups: pd.Series | np.ndarray, feats: np.ndarray, cfg: MemorisationConfig,
              null_feats: np.ndarray | None = None) -> dict:
    """The cosine copy threshold: max(same-lesion ``quantile``, new-lesion ``null_quantile``), each when available
    (the fallback, said so, when neither is). ``feats`` are the training features, ``null_feats`` those of held-out
    real images; both are centred here as the audit centres them."""
    mean = centre_of(feats, cfg)
    qs = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
    out: dict = {"n_pairs": 0, "quantiles": {}, "n_null": 0, "null_quantiles": {}}
    parts = []
    sims = same_lesion_similarities(groups, feats - mean)
    if len(sims):
        t = float(np.quantile(sims, cfg.quantile))
        parts.append((t, f"same-lesion q{cfg.quantile:g} = {t:.4f}"))
        out.update(n_pairs=int(len(sims)), quantiles={f"q{q:g}": float(np.quantile(sims, q)) for q in qs})
    if null_feats is not None and len(null_feats):
        _, nn = nearest_cosine(null_feats - mean, feats - mean)
        t = float(np.quantile(nn, cfg.null_quantile))
        parts.append((t, f"new-lesion q{cfg.null_quantile:g} = {t:.4f}"))
        out.update(n_null=int(len(nn)), null_quantiles={f"q{q:g}": float(np.quantile(nn, q)) for q in qs})
    if not parts:
        log.warning("no lesion has two photos and no held-out images were given: copy threshold falls back to "
                    "cosine %.3f", cfg.fallback_threshold)
        return {**out, "threshold": cfg.fallback_threshold, "source": "fallback"}
    best = max(parts)
    return {**out, "threshold": best[0], "source": "max(" + ", ".join(p[1] for p in parts) + ")"}


def null_rows(split: "Split", cfg: MemorisationConfig, seed: int = 0) -> pd.DataFrame:
    """The held-out real images (new lesions) whose nearest-train similarity bounds the threshold; may be empty."""
    if not cfg.null_part:
        return split.manifest.iloc[:0]
    df = split.part(cfg.null_part)
    if cfg.null_max and len(df) > cfg.null_max:
        df = df.iloc[np.sort(np.random.default_rng(seed).choice(len(df), cfg.null_max, replace=False))]
    return df.reset_index(drop=True)


@torch.inference_mode()
def pair_ssim(a: np.ndarray, b: np.ndarray, batch: int = 256) -> np.ndarray:
    """SSIM of each pair of uint8 NHWC images (same size), per pair."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    out = []
    for i in range(0, len(a), batch):
        x = torch.from_numpy(np.ascontiguousarray(a[i:i + batch])).permute(0, 3, 1, 2).float() / 255.0
        y = torch.from_numpy(np.ascontiguousarray(b[i:i + batch])).permute(0, 3, 1, 2).float() / 255.0
        out.append(ssim(x, y, data_range=1.0, reduction="none").reshape(-1))
    return torch.cat(out).double().numpy() if out else np.empty(0)


def audit(syn: pd.DataFrame, syn_images: np.ndarray, train: pd.DataFrame, train_images: np.ndarray,
          train_feats: np.ndarray, extractor: Extractor, cfg: MemorisationConfig | None = None,
          calibration: dict | None = None, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """One row per synthetic image (nearest train image, cosine, orbit transform, SSIM, is_copy) and a summary."""
    cfg = cfg or MemorisationConfig()
    if cfg.orbit not in ORBITS:
        raise ValueError(f"memorisation.orbit must be one of {list(ORBITS)}, got {cfg.orbit!r}")
    calibration = calibration or calibrate(train["group_id"], train_feats, cfg)
    mean = centre_of(train_feats, cfg)
    ref = train_feats - mean
    best_sim = np.full(len(syn), -np.inf)
    best_idx = np.zeros(len(syn), np.int64)
    best_t = np.zeros(len(syn), np.int64)
    for t, (k, flip) in enumerate(ORBITS[cfg.orbit]):
        f = cached_features(transform(syn_images, k, flip), extractor, progress=progress)
        f = f[:, :extractor.dim - extractor.n_logits]
        idx, sim = nearest_cosine(f - mean, ref)
        better = sim > best_sim
        best_sim[better], best_idx[better], best_t[better] = sim[better], idx[better], t
    aligned = np.stack([transform(syn_images[i:i + 1], *ORBITS[cfg.orbit][t])[0] for i, t in enumerate(best_t)]) \
        if len(syn) else syn_images
    ssim = pair_ssim(aligned, train_images[best_idx])
    is_copy = (best_sim >= calibration["threshold"]) | (ssim >= cfg.ssim_threshold)
    rows = pd.DataFrame({
        "image_id": syn["image_id"].to_numpy(), "label": syn["label"].to_numpy(),
        "nearest_train_id": train["image_id"].to_numpy()[best_idx], "nearest_train_label":
            train["label"].to_numpy()[best_idx], "cosine": best_sim, "ssim": ssim,
        "transform": [f"rot{90 * ORBITS[cfg.orbit][t][0]}{'+flip' if ORBITS[cfg.orbit][t][1] else ''}" for t in best_t],
        "is_copy": is_copy,
    })
    summary = {
        "extractor": extractor.name, "orbit": cfg.orbit, "centred": cfg.center, "calibration": calibration,
        "cosine_threshold": calibration["threshold"], "ssim_threshold": cfg.ssim_threshold,
        "copy_rate": {c: float(g["is_copy"].mean()) for c, g in rows.groupby("label")},
        "copies": {c: int(g["is_copy"].sum()) for c, g in rows.groupby("label")},
        "n": {c: int(len(g)) for c, g in rows.groupby("label")},
        "copy_rate_all": float(rows["is_copy"].mean()) if len(rows) else 0.0,
    }
    return rows, summary


def real_flag_rate(test_feats: np.ndarray, train_feats: np.ndarray, threshold: float,
                   cfg: MemorisationConfig | None = None) -> dict:
    """How often a real TEST image (a new lesion) is flagged by the cosine rule: the threshold's false-positive floor
    (without the flip/rotation search, so a lower bound for the audit's own rate)."""
    mean = centre_of(train_feats, cfg or MemorisationConfig())
    _, sim = nearest_cosine(test_feats - mean, train_feats - mean)
    return {"flag_rate": float((sim >= threshold).mean()), "n": int(len(sim)),
            "nn_cosine_quantiles": {f"q{q:g}": float(np.quantile(sim, q)) for q in (0.5, 0.9, 0.99)}}


def closest_pairs_grid(rows: pd.DataFrame, syn_images: np.ndarray, train_images: np.ndarray,
                       train_ids: list[str], path: str | Path, n: int = 24) -> Path:
    """A PNG of the ``n`` synthetic images closest to a training image, each beside its match, with the scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = rows.reset_index(drop=True).sort_values("cosine", ascending=False).head(n)
    pos = {i: k for k, i in enumerate(train_ids)}
    cols = 4  # pairs per row
    nrow = max(1, -(-len(top) // cols))
    fig, axes = plt.subplots(nrow, 2 * cols, figsize=(2 * cols * 1.4, nrow * 1.7), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, (i, r) in enumerate(top.iterrows()):
        a, b = axes[j // cols, 2 * (j % cols)], axes[j // cols, 2 * (j % cols) + 1]
        a.imshow(syn_images[i])
        b.imshow(train_images[pos[r["nearest_train_id"]]])
        flag = "COPY " if r["is_copy"] else ""
        a.set_title(f"{flag}{r['label']} syn", fontsize=6, color="red" if r["is_copy"] else "black")
        b.set_title(f"cos {r['cosine']:.3f} ssim {r['ssim']:.2f}", fontsize=6)
    fig.suptitle("closest synthetic / training pairs (left: synthetic, right: nearest train image)", fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
