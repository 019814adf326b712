"""Lesion-grouped, class-stratified splits.

HAM10000 has several photos of many lesions; a split by image puts one lesion on both sides and inflates every
score. We split *lesions* (groups), stratified by class, then expand to images, and assert in code that no group
spans two parts. ``split.json`` records the parts, per-part counts and a fingerprint that later stages check.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import class_counts, read_manifest
from dermsynth.io import DataError, atomic_write_json, read_json
from dermsynth.paths import split_path

PARTS = ("train", "val", "test")


@dataclass
class SplitConfig:
    mode: str = "holdout"  # holdout (train/val/test) | kfold (k folds, each with its own val part)
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    k: int = 5
    seed: int = 0
    merge_near_duplicates: bool = False  # perceptual-hash merge of near-identical images across lesions
    phash_max_distance: int = 12  # bits of a 256-bit pHash: copies differ by <= 10, distinct HAM lesions by >= 42
    # scarcity: keep only this fraction of a class's TRAIN lesions (e.g. {df: 0.25}); the others join no part, so
    # val and test stay those of the full split and a scarce study is scored on the same images as a full one
    train_keep_of: dict[str, float] = field(default_factory=dict)


@dataclass
class Split:
    """A loaded split: the full manifest and the image ids of each part."""

    path: Path
    manifest_path: Path
    manifest: pd.DataFrame
    parts: dict[str, list[str]]
    fingerprint: str
    info: dict = field(default_factory=dict)

    def images(self) -> pd.DataFrame:
        """Manifest rows of every part (a split may leave some of its manifest out: ``train_keep_of``)."""
        return self.manifest[self.manifest["image_id"].isin(all_ids(self.parts))]

    def part(self, name: str) -> pd.DataFrame:
        """Manifest rows of one part, in the order stored in split.json."""
        if name not in self.parts:
            raise KeyError(f"split {self.path} has no part {name!r}; parts: {list(self.parts)}")
        idx = self.manifest.set_index("image_id", drop=False)
        return idx.loc[self.parts[name]].reset_index(drop=True)


def all_ids(parts: dict[str, list[str]]) -> set[str]:
    """The image ids of every part."""
    return set().union(*map(set, parts.values()))


def fingerprint(parts: dict[str, list[str]]) -> str:
    """SHA-256 over the sorted image ids of each part: equal iff the same images sit in the same parts."""
    canon = {name: sorted(ids) for name, ids in sorted(parts.items())}
    return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()


def _lesion_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per group with its (majority) label; the unit that is split. Ties go to the first canonical class."""
    counts = df.groupby(["group_id", "label"]).size().rename("n").reset_index()
    counts["order"] = counts["label"].map({c: i for i, c in enumerate(CLASSES)})
    counts = counts.sort_values(["group_id", "n", "order"], ascending=[True, False, True])
    return counts.drop_duplicates("group_id")[["group_id", "label"]].reset_index(drop=True)


def _check_enough_lesions(lesions: pd.DataFrame, n_parts: int, where: str) -> None:
    counts = lesions["label"].value_counts()
    few = {c: int(counts.get(c, 0)) for c in sorted(lesions["label"].unique()) if counts.get(c, 0) < n_parts}
    if few:
        detail = ", ".join(f"{c} has {n} lesion(s)" for c, n in few.items())
        raise DataError(f"{where}: every class must reach each of the {n_parts} parts, but {detail}; "
                        f"add data for these classes or drop them from the manifest")


def _allocate(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split ``n`` lesions into parts by largest remainder (each within 1 of n*f), at least 1 per part when n allows."""
    exact = [n * f for f in fractions]
    alloc = [int(e) for e in exact]
    for k in sorted(range(len(exact)), key=lambda k: (alloc[k] - exact[k], k))[: n - sum(alloc)]:
        alloc[k] += 1
    for k in range(len(alloc)):  # a tiny class can round to 0 in a part: lend it one lesion from the largest part
        if alloc[k] == 0 and n >= len(alloc):
            alloc[alloc.index(max(alloc))] -= 1
            alloc[k] = 1
    return alloc


def _holdout(lesions: pd.DataFrame, cfg: SplitConfig) -> dict[str, str]:
    """Per class: shuffle its lesions (seeded) and cut them at the largest-remainder counts of each part.

    Allocating all three parts at once keeps every class within 1 lesion of its expected count in every part;
    two chained ``train_test_split`` calls each round on their own and can drift further (nv on HAM10000: 1.1).
    """
    if len(cfg.fractions) != len(PARTS) or min(cfg.fractions) <= 0 or abs(sum(cfg.fractions) - 1) > 1e-6:
        raise DataError(f"split fractions must be 3 positive numbers summing to 1, got {cfg.fractions}")
    rng = np.random.default_rng(cfg.seed)
    assign: dict[str, str] = {}
    for c in sorted(lesions["label"].unique(), key=CLASSES.index):
        groups = np.sort(lesions.loc[lesions["label"] == c, "group_id"].to_numpy())
        groups = groups[rng.permutation(len(groups))]
        bounds = np.cumsum([0, *_allocate(len(groups), cfg.fractions)])
        for p, lo, hi in zip(PARTS, bounds[:-1], bounds[1:]):
            assign.update({g: p for g in groups[lo:hi]})
    return assign


def _thin_train(lesions: pd.DataFrame, assign: dict[str, str], cfg: SplitConfig) -> dict[str, str]:
    """Drop all but ``train_keep_of[c]`` of each class's train lesions (seeded, at least one kept) from ``assign``.

    Applied after the parts are cut, so val and test are exactly those of the split without it.
    """
    unknown = sorted(set(cfg.train_keep_of) - set(CLASSES))
    if unknown:
        raise DataError(f"split.train_keep_of: unknown class(es) {unknown}; classes are {list(CLASSES)}")
    bad = {c: f for c, f in cfg.train_keep_of.items() if not 0 < f <= 1}
    if bad:
        raise DataError(f"split.train_keep_of: fractions must be in (0, 1], got {bad}")
    rng = np.random.default_rng([cfg.seed, 1])  # a stream of its own: the parts' shuffle is not disturbed
    kept = dict(assign)
    for c in sorted(cfg.train_keep_of, key=CLASSES.index):
        groups = np.sort([g for g in lesions.loc[lesions["label"] == c, "group_id"] if assign.get(g) == "train"])
        n_keep = max(1, round(len(groups) * cfg.train_keep_of[c]))
        for g in groups[rng.permutation(len(groups))][n_keep:]:
            del kept[g]
    return kept


def _assert_grouped(df: pd.DataFrame, parts: dict[str, list[str]]) -> None:
    where = {i: p for p, ids in parts.items() for i in ids}
    part_of_image = df["image_id"].map(where)
    spans = df.assign(part=part_of_image).groupby("group_id")["part"].nunique()
    leaked = spans[spans > 1]
    if len(leaked):
        raise AssertionError(f"lesion(s) {leaked.index[:5].tolist()} span two parts: the split would leak")
    if part_of_image.isna().any():
        raise AssertionError("some images were assigned to no part")


def _expand(df: pd.DataFrame, assign: dict[str, str], parts: tuple[str, ...]) -> dict[str, list[str]]:
    df = df[df["group_id"].isin(assign)]  # lesions thinned out of train join no part
    out = {p: df.loc[df["group_id"].map(assign) == p, "image_id"].tolist() for p in parts}
    _assert_grouped(df, out)
    return out


def _write(manifest: Path, df: pd.DataFrame, parts: dict[str, list[str]], cfg: SplitConfig, out: Path,
           extra: dict | None = None) -> Path:
    info = {
        "manifest": str(Path(manifest).resolve()),
        "mode": cfg.mode,
        "seed": cfg.seed,
        "fractions": list(cfg.fractions),
        **({"train_keep_of": dict(cfg.train_keep_of),
            "left_out": class_counts(df[~df["image_id"].isin(all_ids(parts))])}
           if cfg.train_keep_of else {}),
        "fingerprint": fingerprint(parts),
        "part_fingerprints": {p: fingerprint({p: ids}) for p, ids in parts.items()},
        "counts": {p: class_counts(df[df["image_id"].isin(set(ids))]) for p, ids in parts.items()},
        "totals": {p: {"images": len(ids), "lesions": int(df[df["image_id"].isin(set(ids))]["group_id"].nunique())}
                   for p, ids in parts.items()},
        **(extra or {}),
        "parts": parts,
    }
    return atomic_write_json(split_path(out), info)


def make_split(manifest: str | Path, out: str | Path, cfg: SplitConfig | None = None) -> Path:
    """Split ``manifest`` into lesion-grouped parts; writes ``out/split.json`` (k-fold: ``out/fold{i}/split.json``)."""
    cfg = cfg or SplitConfig()
    manifest, out = Path(manifest), Path(out)
    df = read_manifest(manifest)
    extra: dict = {}
    if cfg.merge_near_duplicates:
        from dermsynth.data.dedup import merge_near_duplicates

        df = merge_near_duplicates(df, cfg.phash_max_distance)
        changed = df["group_id"] != df["lesion_id_orig"]
        # recorded so that load_split sees the merged groups too (the manifest on disk keeps the original ids)
        extra["group_merges"] = dict(zip(df.loc[changed, "lesion_id_orig"], df.loc[changed, "group_id"]))
    lesions = _lesion_table(df)
    if cfg.mode == "holdout":
        _check_enough_lesions(lesions, len(PARTS), str(manifest))
        parts = _expand(df, _thin_train(lesions, _holdout(lesions, cfg), cfg), PARTS)
        return _write(manifest, df, parts, cfg, out, extra)
    if cfg.mode != "kfold":
        raise DataError(f"unknown split mode {cfg.mode!r}; use 'holdout' or 'kfold'")
    if cfg.k < 3:
        # fold i is test and fold i+1 validation: with k=2 nothing would be left to train on
        raise DataError(f"k-fold needs k >= 3 (one test fold, one validation fold, the rest train), got {cfg.k}")
    _check_enough_lesions(lesions, cfg.k, str(manifest))
    skf = StratifiedKFold(n_splits=cfg.k, shuffle=True, random_state=cfg.seed)
    ids, labels = lesions["group_id"].to_numpy(), lesions["label"].to_numpy()
    folds = [ids[test] for _, test in skf.split(ids, labels)]
    paths = []
    for i in range(cfg.k):
        # fold i is the test part, fold i+1 the validation part, the rest train
        assign = {g: "train" for g in ids} | {g: "val" for g in folds[(i + 1) % cfg.k]} | {g: "test" for g in folds[i]}
        parts = _expand(df, _thin_train(lesions, assign, cfg), PARTS)
        paths.append(_write(manifest, df, parts, cfg, out / f"fold{i}", {"fold": i, "k": cfg.k, **extra}))
    return out


def load_split(path: str | Path) -> Split:
    """Read split.json (or a folder holding it), re-read its manifest and verify ids and fingerprint."""
    path = Path(path)
    if path.is_dir():
        path = split_path(path)
    info = read_json(path, "split file", f"split not found: {path}")
    manifest_path = Path(info["manifest"])
    if not manifest_path.is_absolute():
        manifest_path = (path.parent / manifest_path).resolve()
    df = read_manifest(manifest_path)
    merges = info.get("group_merges") or {}
    if merges:
        df["lesion_id_orig"] = df["group_id"]
        df["group_id"] = df["group_id"].map(lambda g: merges.get(g, g))
    parts = {p: list(ids) for p, ids in info["parts"].items()}
    known = set(df["image_id"])
    for p, ids in parts.items():
        missing = [i for i in ids if i not in known]
        if missing:
            raise DataError(f"{path}: part {p!r} names {len(missing)} image(s) absent from {manifest_path}, "
                            f"e.g. {missing[:3]}; the manifest changed after the split was made")
    fp = fingerprint(parts)
    if fp != info.get("fingerprint"):
        raise DataError(f"{path}: fingerprint mismatch (file edited by hand?)")
    _assert_grouped(df[df["image_id"].isin(all_ids(parts))], parts)
    return Split(path=path, manifest_path=manifest_path, manifest=df, parts=parts, fingerprint=fp, info=info)


def split_summary(split: Split) -> pd.DataFrame:
    """Tidy table: part x class -> images, lesions."""
    rows = []
    for p in split.parts:
        sub = split.part(p)
        for c, n in class_counts(sub).items():
            rows.append({"part": p, "label": c, **n})
    return pd.DataFrame(rows)


__all__ = ["SplitConfig", "Split", "make_split", "load_split", "fingerprint", "split_summary", "PARTS", "CLASSES"]
