"""Preprocessed image cache: content, reuse without rebuilding, invalidation on any change."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from dermsynth.data import cache as cache_mod
from dermsynth.data.cache import build_cache, preprocess
from dermsynth.data.manifest import read_manifest
from dermsynth.io import DataError, load_image


@pytest.fixture
def small(ham_manifest, tmp_path):
    """Six sample images copied into tmp (so tests may change their bytes), as a manifest DataFrame."""
    df = read_manifest(ham_manifest).iloc[:6].copy()
    (tmp_path / "img").mkdir()
    df["path"] = [str(shutil.copy(p, tmp_path / "img")) for p in df["path"]]
    return df.reset_index(drop=True)


def test_preprocess_center_crops_then_resizes():
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100] = (255, 0, 0)
    a[:, 100:200] = (0, 255, 0)  # the central square
    a[:, 200:] = (0, 0, 255)
    out = preprocess(Image.fromarray(a), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (np.abs(out.astype(int) - (0, 255, 0)) <= 2).all()


def test_cache_content_and_take(ham_manifest, tmp_path):
    df = read_manifest(ham_manifest)
    c = build_cache(df, 32, tmp_path / "cache", progress=False)
    assert c.array.shape == (57, 32, 32, 3) and c.array.dtype == np.uint8
    assert isinstance(c.array, np.memmap)  # memory-mapped, not loaded
    for k in (0, 30, 56):
        np.testing.assert_array_equal(c.array[k], preprocess(load_image(df["path"][k]), 32))
    ids = [df["image_id"][5], df["image_id"][2]]
    np.testing.assert_array_equal(c.take(ids), c.array[[5, 2]])
    with pytest.raises(KeyError, match="not in cache"):
        c.take(["ISIC_nope"])


def test_cache_reused_without_rebuilding(small, tmp_path, monkeypatch):
    first = build_cache(small, 32, tmp_path / "cache", progress=False)
    mtime = first.path.stat().st_mtime_ns

    def no_decoding(*a, **k):
        raise AssertionError("cache was rebuilt although nothing changed")

    monkeypatch.setattr(cache_mod, "load_image", no_decoding)
    again = build_cache(small.copy(), 32, tmp_path / "cache", progress=False)
    assert again.key == first.key and again.path == first.path
    assert again.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.array, first.array)


def test_cache_invalidated_by_bytes_size_or_order(small, tmp_path):
    first = build_cache(small, 32, tmp_path / "cache", progress=False)
    assert build_cache(small, 48, tmp_path / "cache", progress=False).key != first.key  # resolution
    reordered = small.iloc[::-1].reset_index(drop=True)
    assert build_cache(reordered, 32, tmp_path / "cache", progress=False).key != first.key  # row order

    # change one image's bytes (same name, same size on screen): new key, and the new pixels are cached
    p = small["path"][3]
    a = np.asarray(Image.open(p).convert("RGB")).copy()
    a[:, :] = 255 - a  # invert
    Image.fromarray(a).save(p, quality=95)
    changed = build_cache(small, 32, tmp_path / "cache", progress=False)
    assert changed.key != first.key
    np.testing.assert_array_equal(changed.array[:3], first.array[:3])
    assert np.abs(changed.array[3].astype(int) - first.array[3].astype(int)).mean() > 50


def test_cache_default_folder_and_bad_image(small, tmp_path, monkeypatch):
    monkeypatch.setenv("DERMSYNTH_CACHE", str(tmp_path / "envcache"))
    c = build_cache(small, 16, progress=False)
    assert c.path.parent == tmp_path / "envcache" / "images"
    open(small["path"][2], "wb").write(b"not a jpeg at all")
    with pytest.raises(DataError, match=rf"corrupt or truncated image: .*{small['image_id'][2]}"):
        build_cache(small, 16, progress=False)
    assert len(list((tmp_path / "envcache" / "images").glob("*.npy"))) == 1  # nothing half-written
