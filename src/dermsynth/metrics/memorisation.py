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
so the rule never calls more than about 1 % of genuinely new lesions copies. Both distributions are measured with
the audit's own statistic, the best match over the same flips/rotations: a maximum over 8 views is higher than one
view's similarity, so a threshold calibrated on single views would call several times more new lesions copies. On HAM10000 with lite0 features the
new-lesion bound is the one that binds: a re-photographed lesion is often *less* similar to its sibling than a new
lesion is to its nearest training image (see the measured numbers in the study report), so the same-lesion quantile
alone would flag nearly every image. The TEST part's flag rate is reported as an out-of-sample check.
A second, pixel-level rule flags near-verbatim copies: SSIM of the aligned best match >= ``ssim_threshold`` (0.9:
above every real new lesion's best match measured on HAM10000 at 64 px, max 0.88).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch

from dermsynth.config import ConfigError
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

    def __post_init__(self) -> None:
        if self.null_part == "test":  # the threshold decides which synthetic images the filter keeps
            raise ConfigError("memorisation.null_part must not be 'test': the copy threshold is a choice, and "
                              "choices are made on the train or val part only")


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


def same_lesion_similarities(groups: pd.Series | np.ndarray, feats: np.ndarray,
                             views: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Cosine similarity of every pair of distinct images that share a group (lesion) id.

    With ``views`` (the features of each flip/rotation of the same images, row for row) a pair's similarity is its
    best over turning either photo, as the audit matches a synthetic image against a training image."""
    u = _unit(feats)
    uv = [_unit(v) for v in views] if views is not None else [u]
    sims = []
    for rows in pd.Series(np.asarray(groups)).groupby(np.asarray(groups), sort=False).indices.values():
        if len(rows) > 1:
            s = np.max([v[rows] @ u[rows].T for v in uv], axis=0)
            s = np.maximum(s, s.T)  # either photo of the pair may be the turned one
            sims.append(s[np.triu_indices(len(rows), 1)])
    return np.concatenate(sims) if sims else np.empty(0)


def centre_of(train_feats: np.ndarray, cfg: MemorisationConfig) -> np.ndarray:
    """The vector subtracted from every feature before cosine: the training mean, or zero when not centring."""
    return np.asarray(train_feats, np.float64).mean(0) if cfg.center else np.zeros(train_feats.shape[1])


def calibrate(pair_sims: np.ndarray, null_sims: np.ndarray | None, cfg: MemorisationConfig) -> dict:
    """The cosine copy threshold: max(same-lesion ``quantile``, new-lesion ``null_quantile``), each when available
    (the fallback, said so, when neither is). ``pair_sims``: same-lesion pair similarities; ``null_sims``: each
    held-out real image's similarity to its nearest training image (both as the audit measures: centred features,
    best over the orbit; :func:`calibrate_orbit` computes them)."""
    qs = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
    out: dict = {"n_pairs": 0, "quantiles": {}, "n_null": 0, "null_quantiles": {}, "orbit": cfg.orbit}
    parts = []
    if len(pair_sims):
        t = float(np.quantile(pair_sims, cfg.quantile))
        parts.append((t, f"same-lesion q{cfg.quantile:g} = {t:.4f}"))
        out.update(n_pairs=int(len(pair_sims)), quantiles={f"q{q:g}": float(np.quantile(pair_sims, q)) for q in qs})
    if null_sims is not None and len(null_sims):
        t = float(np.quantile(null_sims, cfg.null_quantile))
        parts.append((t, f"new-lesion q{cfg.null_quantile:g} = {t:.4f}"))
        out.update(n_null=int(len(null_sims)), null_quantiles={f"q{q:g}": float(np.quantile(null_sims, q)) for q in qs})
    if not parts:
        log.warning("no lesion has two photos and no held-out images were given: copy threshold falls back to "
                    "cosine %.3f", cfg.fallback_threshold)
        return {**out, "threshold": cfg.fallback_threshold, "source": "fallback"}
    best = max(parts)
    return {**out, "threshold": best[0], "source": "max(" + ", ".join(p[1] for p in parts) + ")"}


def orbit_features(images: np.ndarray, extractor: Extractor, orbit: str, progress: bool = True) -> list[np.ndarray]:
    """Features (logits dropped) of each flip/rotation of ``images`` that ``orbit`` searches, in ORBITS order."""
    if orbit not in ORBITS:
        raise ValueError(f"memorisation.orbit must be one of {list(ORBITS)}, got {orbit!r}")
    d = extractor.dim - extractor.n_logits
    return [cached_features(transform(images, k, flip), extractor, progress=progress)[:, :d]
            for k, flip in ORBITS[orbit]]


def nearest_over_orbit(views: Sequence[np.ndarray], ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: index of its most cosine-similar ``ref`` row over all its views, that similarity, and the view.
    ``views`` and ``ref`` are already centred."""
    n = len(views[0])
    best_sim, best_idx, best_t = np.full(n, -np.inf), np.zeros(n, np.int64), np.zeros(n, np.int64)
    for t, f in enumerate(views):
        idx, sim = nearest_cosine(f, ref)
        better = sim > best_sim
        best_sim[better], best_idx[better], best_t[better] = sim[better], idx[better], t
    return best_idx, best_sim, best_t


def calibrate_orbit(train: pd.DataFrame, train_images: np.ndarray, train_feats: np.ndarray,
                    null_images: np.ndarray | None, extractor: Extractor, cfg: MemorisationConfig,
                    progress: bool = True) -> dict:
    """:func:`calibrate` on the audit's own statistic: every same-lesion pair and every held-out image (new lesion)
    is matched over the orbit, on features centred like the audit's. Only the training images of lesions with
    two or more photos are turned (the others are in no pair)."""
    mean = centre_of(train_feats, cfg)
    groups = np.asarray(train["group_id"])
    multi = pd.Series(groups).duplicated(keep=False).to_numpy()
    pair_sims = np.empty(0)
    if multi.any():
        views = orbit_features(train_images[multi], extractor, cfg.orbit, progress)
        pair_sims = same_lesion_similarities(groups[multi], train_feats[multi] - mean, [v - mean for v in views])
    null_sims = None
    if null_images is not None and len(null_images):
        views = orbit_features(null_images, extractor, cfg.orbit, progress)
        _, null_sims, _ = nearest_over_orbit([v - mean for v in views], train_feats - mean)
    return calibrate(pair_sims, null_sims, cfg)


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
    calibration = calibration or calibrate_orbit(train, train_images, train_feats, None, extractor, cfg, progress)
    mean = centre_of(train_feats, cfg)
    views = orbit_features(syn_images, extractor, cfg.orbit, progress)
    best_idx, best_sim, best_t = nearest_over_orbit([v - mean for v in views], train_feats - mean)
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


def real_flag_rate(images: np.ndarray, train_feats: np.ndarray, threshold: float, extractor: Extractor,
                   cfg: MemorisationConfig | None = None, progress: bool = True) -> dict:
    """How often real images of new lesions (the TEST part, never used for calibration) are flagged by the cosine
    rule, matched over the orbit as the audit matches synthetic images: the rule's out-of-sample false-positive
    rate."""
    cfg = cfg or MemorisationConfig()
    mean = centre_of(train_feats, cfg)
    views = orbit_features(images, extractor, cfg.orbit, progress)
    _, sim, _ = nearest_over_orbit([v - mean for v in views], train_feats - mean)
    return {"flag_rate": float((sim >= threshold).mean()) if len(sim) else 0.0, "n": int(len(sim)),
            "orbit": cfg.orbit,
            "nn_cosine_quantiles": {f"q{q:g}": float(np.quantile(sim, q)) for q in (0.5, 0.9, 0.99)} if len(sim)
            else {}}


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
