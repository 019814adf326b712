"""Preprocessed image cache: every image of a manifest center-cropped and resized once, stored as one uint8 array.

Training loops then index a memory-mapped (N, S, S, 3) array instead of decoding JPEGs. The cache key hashes the
content that matters (each image's bytes and id, the resolution and the transform), so it is reused when nothing
changed and rebuilt when anything did.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from dermsynth.io import atomic_save_npy, atomic_write_json, load_image
from dermsynth.paths import cache_root

TRANSFORM_VERSION = "center_crop_square+bicubic_resize:v1"


@dataclass
class CachedImages:
    """A cached (N, S, S, 3) uint8 array and the image ids of its rows."""

    array: np.ndarray
    ids: list[str]
    key: str
    path: Path

    def rows(self, ids: list[str] | pd.Series) -> np.ndarray:
        pos = {i: k for k, i in enumerate(self.ids)}
        try:
            return np.array([pos[i] for i in ids], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"image id {e.args[0]!r} is not in cache {self.path}") from e

    def take(self, ids: list[str] | pd.Series) -> np.ndarray:
        """The images of ``ids`` (in that order) as an in-memory array."""
        return np.ascontiguousarray(self.array[self.rows(ids)])


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """Center-crop to a square (dermoscopy lesions sit near the centre) and resize to ``size``."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    image = image.crop((left, top, left + s, top + s))
    if s != size:
        image = image.resize((size, size), Image.BICUBIC, reducing_gap=3.0 if s > 2 * size else None)
    return np.asarray(image, dtype=np.uint8)


def cache_key(df: pd.DataFrame, size: int) -> str:
    """Hash of (image id, file bytes) for every row, in order, plus resolution and transform."""
    h = hashlib.sha256(f"{TRANSFORM_VERSION}|{size}|{len(df)}".encode())
    for image_id, path in zip(df["image_id"], df["path"]):
        h.update(str(image_id).encode() + b"\0")
        try:
            h.update(Path(path).read_bytes())
        except OSError:
            h.update(b"<missing>")  # load_image reports it properly while building
    return h.hexdigest()[:24]


def build_cache(df: pd.DataFrame, size: int, cache_dir: str | Path | None = None, progress: bool = True) -> CachedImages:
    """Return the cached array for ``df`` at ``size`` px, building it if its key is new."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "images"
    key = cache_key(df, size)
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if npy.is_file() and meta.is_file():
        ids = json.loads(meta.read_text())["ids"]
        arr = np.load(npy, mmap_mode="r")
        if arr.shape == (len(df), size, size, 3) and ids == df["image_id"].tolist():
            return CachedImages(arr, ids, key, npy)
    arr = np.empty((len(df), size, size, 3), dtype=np.uint8)
    rows = zip(range(len(df)), df["image_id"], df["path"])
    for i, image_id, path in tqdm(rows, total=len(df), desc=f"caching {size}px", disable=not progress, leave=False):
        arr[i] = preprocess(load_image(path, f"image_id {image_id}"), size)
    atomic_save_npy(npy, arr)
    # the id list is written last: a cache without it is treated as absent
    atomic_write_json(meta, {"ids": df["image_id"].tolist(), "size": size, "transform": TRANSFORM_VERSION})
    return CachedImages(np.load(npy, mmap_mode="r"), df["image_id"].tolist(), key, npy)
