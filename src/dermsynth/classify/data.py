"""The classifier's data: split parts, synthetic images mixed into the train part only, and cached uint8 arrays.

Synthetic images join the *train* part, per class, at a configured ratio to the real images of that class; they are
checked never to appear in val, test or an extra test set, and every sample keeps its ``source`` so the run records
exactly what it trained on. An extra test set must also share no image or lesion with the train part.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dermsynth.classify.config import ClfConfig, DataConfig
from dermsynth.config import ConfigError
from dermsynth.data.cache import CachedImages, build_cache
from dermsynth.data.labels import CLASSES, parse_classes
from dermsynth.data.manifest import read_manifest
from dermsynth.data.split import Split, load_split
from dermsynth.generate.provenance import check_manifest_split
from dermsynth.io import DataError

SYNTHETIC = "synthetic"
COLUMNS = ["image_id", "group_id", "label", "source", "path"]


@dataclass
class ClfData:
    """Rows of each part (image_id, group_id, label, source, path), with labels as indices into CLASSES."""

    split: Split
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    synthetic: dict = field(default_factory=dict)  # what was mixed in: per class real/ratio/available/used (per epoch)
    manifests: dict[str, pd.DataFrame] = field(default_factory=dict)  # full source manifests (cache units)

    def synthetic_mask(self) -> np.ndarray:
        """True for the training rows that are synthetic images."""
        return (self.train["source"] == SYNTHETIC).to_numpy()

    def synthetic_quota(self) -> dict[int, int]:
        """Class index -> synthetic images each epoch draws afresh (data.synthetic_redraw); {} for one fixed draw."""
        if not self.synthetic.get("redraw"):
            return {}
        return {CLASSES.index(c): v["used"] for c, v in self.synthetic["per_class"].items() if v["used"]}

    def train_counts(self) -> dict[str, dict[str, int]]:
        """Per class, how many real and synthetic training images an epoch draws from (with a redraw, also the
        ``synthetic_pool`` that each epoch's synthetic images come from)."""
        syn = self.synthetic_mask()
        quota = self.synthetic_quota()
        counts = {}
        for i, c in enumerate(CLASSES):
            n_syn = int(((self.train["label"] == c) & syn).sum())
            counts[c] = {"real": int(((self.train["label"] == c) & ~syn).sum()), "synthetic": quota.get(i, n_syn)}
            if i in quota:
                counts[c]["synthetic_pool"] = n_syn
        return counts


def labels_of(df: pd.DataFrame) -> np.ndarray:
    return np.array(df["label"].map(CLASSES.index), dtype=np.int64)


def check_no_synthetic(df: pd.DataFrame, where: str, synthetic_ids: set[str] | frozenset = frozenset()) -> None:
    """Refuse a val/test set holding synthetic images (by source or by id): scoring on them would be meaningless."""
    bad = (df["source"].astype(str).str.lower() == SYNTHETIC) | df["image_id"].isin(synthetic_ids)
    if bad.any():
        ids = df.loc[bad, "image_id"].head(5).tolist()
        raise DataError(f"{where}: {int(bad.sum())} synthetic image(s) found, e.g. {ids}; synthetic images may only "
                        f"join the train part (data.synthetic), never val or test")


def check_disjoint_from_train(df: pd.DataFrame, train: pd.DataFrame, where: str) -> None:
    """Refuse a test set sharing images or lesions (group_id) with the train part: the classifier learnt from them,
    so its scores there would be inflated."""
    ids = sorted(set(df["image_id"]) & set(train["image_id"]))
    groups = sorted(set(df["group_id"]) & set(train["group_id"]))
    if ids or groups:
        raise DataError(f"{where}: {len(ids)} image id(s) (e.g. {ids[:5]}) and {len(groups)} lesion group id(s) "
                        f"(e.g. {groups[:5]}) also appear in the split's train part; a test set must hold unseen "
                        f"lesions only (drop those rows, or use the split's test part)")


def synthetic_ratios(cfg: DataConfig) -> dict[str, float]:
    ratios = {c: cfg.synthetic_ratio for c in parse_classes(cfg.synthetic_classes)}
    for c, r in cfg.synthetic_ratio_per_class.items():
        ratios[parse_classes([c])[0]] = float(r)
    bad = {c: r for c, r in ratios.items() if r < 0}
    if bad:
        raise ConfigError(f"data.synthetic_ratio must be >= 0, got {bad}")
    return ratios


def mix_synthetic(train: pd.DataFrame, syn: pd.DataFrame, ratios: dict[str, float], seed: int,
                  redraw: bool = False) -> tuple[pd.DataFrame, dict]:
    """Add ``round(ratio * n_real)`` synthetic images per class (capped by what exists), picked at random by ``seed``.

    ``redraw``: add all of a class's synthetic images instead; each epoch then picks its ``used`` of them
    (:func:`dermsynth.classify.sampling.epoch_rows`)."""
    rng = np.random.default_rng(seed)
    parts, info = [train], {}
    for c in CLASSES:
        n_real = int((train["label"] == c).sum())
        pool = syn[syn["label"] == c]
        want = int(round(ratios.get(c, 0.0) * n_real))
        used = min(want, len(pool))
        if used and redraw:
            parts.append(pool)
        elif used:
            parts.append(pool.iloc[np.sort(rng.choice(len(pool), size=used, replace=False))])
        if c in ratios:
            info[c] = {"ratio": ratios[c], "real": n_real, "requested": want, "available": int(len(pool)), "used": used}
    mixed = pd.concat(parts, ignore_index=True)
    return mixed, info


def load_clf_data(cfg: ClfConfig) -> ClfData:
    """Split parts + synthetic mixing + extra test sets, all checked."""
    if not cfg.data.split:
        raise ConfigError("data.split is required: the path of a split.json (dermsynth data split ...)")
    if cfg.data.synthetic_required and not cfg.data.synthetic:
        raise ConfigError("this recipe mixes synthetic images: set data.synthetic to a samples manifest.csv "
                          "(dermsynth generate / filter output)")
    if cfg.eval.decision != "argmax" and not cfg.eval.decision_taus:
        # checked before training, not after it: the rule is fitted once the best epoch is known
        raise ConfigError(f"eval.decision={cfg.eval.decision} needs at least one value in eval.decision_taus")
    split = load_split(cfg.data.split)
    parts = {p: split.part(p)[COLUMNS].copy() for p in ("train", "val", "test")}
    syn_ids: set[str] = set()
    info: dict = {}
    manifests = {"split": split.manifest}
    if cfg.data.synthetic:
        syn = read_manifest(cfg.data.synthetic)
        where = str(cfg.data.synthetic)
        not_syn = syn["source"].astype(str).str.lower() != SYNTHETIC
        if not_syn.any():
            raise DataError(f"{where}: data.synthetic must list synthetic images only (source=synthetic); rows "
                            f"{(np.flatnonzero(not_syn.to_numpy())[:5] + 2).tolist()} have source "
                            f"{syn.loc[not_syn, 'source'].unique()[:3].tolist()}")
        clash = set(syn["image_id"]) & set(split.manifest["image_id"])
        if clash:
            raise DataError(f"{where}: image ids {sorted(clash)[:5]} also name real images of {split.manifest_path}")
        check_manifest_split(syn, split, where)
        syn_ids = set(syn["image_id"])
        manifests["synthetic"] = syn
        redraw = cfg.data.synthetic_redraw
        parts["train"], info = mix_synthetic(parts["train"], syn[COLUMNS], synthetic_ratios(cfg.data), cfg.train.seed,
                                             redraw)
        info = {"manifest": str(Path(cfg.data.synthetic).resolve()), "per_class": info, "redraw": redraw}
    for p in ("val", "test"):
        check_no_synthetic(parts[p], f"{split.path}: {p} part", syn_ids)
    extra = {}
    for name, path in cfg.eval.extra_test.items():
        df = read_manifest(path)[COLUMNS].copy()
        check_no_synthetic(df, f"eval.extra_test {name} ({path})", syn_ids)
        check_disjoint_from_train(df, parts["train"], f"eval.extra_test {name} ({path})")
        extra[name] = df
    return ClfData(split, parts["train"], parts["val"], parts["test"], extra, info, manifests)


def open_caches(manifests: dict[str, pd.DataFrame], size: int, cache_dir: str | None) -> list[CachedImages]:
    """The preprocessed cache of each whole source manifest (built once, then shared by every run, part and ratio)."""
    return [build_cache(df, size, cache_dir) for df in manifests.values()]


def load_images(df: pd.DataFrame, size: int, cache_dir: str | None, caches: list[CachedImages] | None = None) -> np.ndarray:
    """uint8 (N, S, S, 3) images of ``df`` in row order, taken from ``caches`` (see :func:`open_caches`); rows found
    in none of them (or no ``caches``) are cached as ``df`` itself."""
    out = np.empty((len(df), size, size, 3), dtype=np.uint8)
    done = np.zeros(len(df), dtype=bool)
    for cache in caches or []:
        mask = df["image_id"].isin(set(cache.ids)).to_numpy() & ~done
        if mask.any():
            out[mask] = cache.take(df.loc[mask, "image_id"])
            done |= mask
    if not done.all():
        rest = df.loc[~done]
        out[~done] = build_cache(rest, size, cache_dir).take(rest["image_id"])
    return out
