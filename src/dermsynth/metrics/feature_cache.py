"""On-disk cache of extractor features, keyed per image by content hash and per extractor by name + version.

The real TRAIN and TEST features are needed by every quality run, every filter run and every memorisation audit;
they are computed once. Keys are the SHA-256 of each image's pixels (the uint8 array the extractor sees, shape
included), so a renamed file still hits and an edited one misses. Storage is append-only shards under
``cache_root()/features/<name>/<version>/``: ``<shard>.npy`` (features) and ``<shard>.json`` (the hashes of its rows,
written last, so a shard without it is ignored as unfinished).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dermsynth.io import DataError, atomic_save_npy, atomic_write_json
from dermsynth.metrics.features import Extractor
from dermsynth.paths import cache_root
from dermsynth.runlog import get_logger

if TYPE_CHECKING:
    from dermsynth.data.split import Split

log = get_logger("metrics.features")


def image_hashes(images: np.ndarray) -> list[str]:
    """SHA-256 of each uint8 image's shape and pixels."""
    return [hashlib.sha256(f"{im.shape}".encode() + np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


def feature_dir(extractor: Extractor, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "features"
    return root / extractor.name / extractor.version


def _load_index(folder: Path) -> dict[str, tuple[Path, int]]:
    index: dict[str, tuple[Path, int]] = {}
    for meta in sorted(folder.glob("*.json")):
        npy = meta.with_suffix(".npy")
        if npy.is_file():
            for row, h in enumerate(json.loads(meta.read_text())["hashes"]):
                index[h] = (npy, row)
    return index


def cached_features(images: np.ndarray, extractor: Extractor, cache_dir: str | Path | None = None,
                    batch: int = 256, progress: bool = True) -> np.ndarray:
    """Features of ``images`` (uint8 NHWC) in row order; only images never seen by this extractor are computed."""
    hashes = image_hashes(images)
    folder = feature_dir(extractor, cache_dir)
    index = _load_index(folder) if folder.is_dir() else {}
    todo = list(dict.fromkeys(h for h in hashes if h not in index))  # unique, order kept
    if todo:
        first = {h: i for i, h in reversed(list(enumerate(hashes)))}
        rows = np.array([first[h] for h in todo])
        feats = np.concatenate([extractor(images[rows[i:i + batch]])
                                for i in tqdm(range(0, len(rows), batch), desc=f"features {extractor.name}",
                                              disable=not progress, leave=False)]).astype(np.float32)
        shard = hashlib.sha256("".join(todo).encode()).hexdigest()[:20]
        atomic_save_npy(folder / f"{shard}.npy", feats)
        atomic_write_json(folder / f"{shard}.json", {"hashes": todo, "extractor": extractor.version})
        log.info("features %s: computed %d, reused %d", extractor.name, len(todo), len(set(hashes)) - len(todo))
        for row, h in enumerate(todo):
            index[h] = (folder / f"{shard}.npy", row)
    out = np.empty((len(images), extractor.dim), dtype=np.float32)
    arrays: dict[Path, np.ndarray] = {}
    for i, h in enumerate(hashes):
        npy, row = index[h]
        if npy not in arrays:
            arrays[npy] = np.load(npy, mmap_mode="r")
        out[i] = arrays[npy][row]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Loading the sets that every metric compares
# ----------------------------------------------------------------------------------------------------------------------

def read_samples(samples: str | Path) -> pd.DataFrame:
    """A samples folder's manifest (``<samples>/manifest.csv``, or a manifest path) as a canonical DataFrame."""
    from dermsynth.data.manifest import read_manifest

    samples = Path(samples)
    path = samples / "manifest.csv" if samples.is_dir() else samples
    if not path.is_file():
        raise DataError(f"samples manifest not found: {path}; pass a samples folder made by 'dermsynth generate'")
    return read_manifest(path)


def samples_on_split(samples: str | Path, split: str | Path) -> tuple[pd.DataFrame, "Split"]:
    """Read a samples folder and the split it is judged on, refusing images of a generator trained on another split
    (it may have seen this split's test lesions). Done before any output is written."""
    from dermsynth.data.split import load_split
    from dermsynth.generate.provenance import check_manifest_split

    syn, sp = read_samples(samples), load_split(split)
    check_manifest_split(syn, sp, str(samples))
    return syn, sp


def default_out(samples: str | Path, name: str) -> Path:
    """``<samples folder>/<name>``: where a stage writes what it made of a samples folder unless told otherwise."""
    samples = Path(samples)
    return (samples if samples.is_dir() else samples.parent) / name


def native_size(df: pd.DataFrame) -> int:
    """Side of the (square) first image of ``df``: synthetic images are compared with real ones at this size."""
    from PIL import Image

    with Image.open(df["path"].iloc[0]) as im:
        return min(im.size)


def load_images(df: pd.DataFrame, size: int, progress: bool = True) -> np.ndarray:
    """All images of ``df`` center-cropped and resized to ``size`` (via the shared preprocessed-image cache)."""
    if len(df) == 0:
        return np.empty((0, size, size, 3), np.uint8)
    from dermsynth.data.cache import build_cache

    return np.asarray(build_cache(df.reset_index(drop=True), size, progress=progress).array)


def features_and_logits(images: np.ndarray, extractor: Extractor, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cached features split into (features, class logits); logits are (N, 0) for extractors without them."""
    if len(images) == 0:
        return np.empty((0, extractor.dim - extractor.n_logits), np.float32), np.empty((0, extractor.n_logits))
    f = cached_features(images, extractor, progress=progress)
    k = extractor.dim - extractor.n_logits
    return f[:, :k], f[:, k:]
