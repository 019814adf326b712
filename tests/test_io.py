"""Atomic writers and safe image loading (mode conversion, corrupt / truncated / missing / oversized files); neither,
nor the run log, changes process-wide state."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from dermsynth import io as dio
from dermsynth.io import (DataError, atomic_open, atomic_save_image, atomic_save_npy, atomic_write_csv,
                          atomic_write_json, atomic_write_text, image_array, load_image, read_json, sha256_file)
from dermsynth.runlog import LOGGER_NAME, run_log


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb that costs nothing to make)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------------

def test_atomic_open_keeps_old_file_on_crash(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write("half of the new")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_atomic_writers_round_trip(tmp_path):
    atomic_write_json(tmp_path / "sub" / "x.json", {"a": np.int64(3), "b": np.float32(0.5), "p": Path("/q"),
                                                     "arr": np.arange(3)})
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": 3, "b": 0.5, "p": "/q", "arr": [0, 1, 2]}
    atomic_write_csv(tmp_path / "t.csv", pd.DataFrame({"a": [1, 2]}))
    assert (tmp_path / "t.csv").read_text() == "a\n1\n2\n"
    atomic_save_npy(tmp_path / "a.npy", np.eye(3, dtype=np.uint8))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.eye(3))
    atomic_save_image(tmp_path / "s.png", np.full((4, 4, 3), 7, np.uint8), text={"generator": "test"})
    with Image.open(tmp_path / "s.png") as im:
        assert im.text["generator"] == "test"
    assert leftovers(tmp_path) == []
    assert sha256_file(tmp_path / "t.csv") == hashlib.sha256(b"a\n1\n2\n").hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Image modes are converted to 8-bit RGB with sensible values
# ----------------------------------------------------------------------------------------------------------------------

def test_grayscale_and_bilevel(tmp_path):
    Image.fromarray(np.full((5, 6), 100, np.uint8), "L").save(tmp_path / "g.png")
    a = image_array(tmp_path / "g.png")
    assert a.shape == (5, 6, 3) and (a == 100).all()
    Image.new("1", (4, 4), 1).save(tmp_path / "b.png")
    assert (image_array(tmp_path / "b.png") == 255).all()


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((2, 3, 4), np.uint8)
    a[..., 0] = 200  # red
    a[0, :, 3] = 255  # opaque row
    a[1, :, 3] = 0  # transparent row
    a[1, 2, 3] = 128  # half transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    rgb = image_array(tmp_path / "a.png").astype(int)
    assert (rgb[0] == (200, 0, 0)).all()
    assert (rgb[1, :2] == (255, 255, 255)).all()
    assert np.allclose(rgb[1, 2], (227, 127, 127), atol=2)  # half red over white


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (4, 2))
    p.putpalette([10, 20, 30, 240, 100, 50] + [0] * 762)
    p.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    p.save(tmp_path / "p.png")
    rgb = image_array(tmp_path / "p.png")
    assert tuple(rgb[0, 0]) == (10, 20, 30) and tuple(rgb[0, 1]) == (240, 100, 50)
    p.save(tmp_path / "pt.png", transparency=0)
    rgb = image_array(tmp_path / "pt.png")
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[0, 1]) == (240, 100, 50)


def test_16bit_grey_scales_the_full_range(tmp_path):
    a = np.array([[0, 100, 32768, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    rgb = image_array(tmp_path / "g16.png")
    assert rgb[0, :, 0].tolist() == [0, 0, 128, 255]  # 100/65535 is black, not 100/255
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = image_array(tmp_path / "c.jpg")[0, 0].astype(int)
    assert r > 200 and g < 60 and b < 60  # pure red


# ----------------------------------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------------------------------

def jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_missing_corrupt_truncated(tmp_path):
    with pytest.raises(DataError, match=r"image file not found: .*nope.jpg \(row 7\)"):
        load_image(tmp_path / "nope.jpg", "row 7")
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError, match=r"corrupt or truncated image: .*c.jpg \(row 3\)"):
        load_image(tmp_path / "c.jpg", "row 3")
    data = jpeg(tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"corrupt or truncated image: .*t.jpg.*truncated"):
        load_image(tmp_path / "t.jpg")


def test_decompression_bomb(tmp_path, monkeypatch):
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 200
    with pytest.raises(DataError, match=r"too large: .*bomb.png"):
        load_image(bomb, "row 2")
    # our own limit, below Pillow's: an ordinary image over a lowered limit is refused before decoding
    monkeypatch.setattr(dio, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"too large: .*t.jpg \(row 5\) is 64x64"):
        load_image(jpeg(tmp_path / "t.jpg"), "row 5")


# ----------------------------------------------------------------------------------------------------------------------
# Process-wide state is left alone
# ----------------------------------------------------------------------------------------------------------------------

def test_atomic_files_get_the_umask_without_touching_it(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        def refuse(*_):
            raise AssertionError("the process umask was changed (a race with other threads creating files)")

        monkeypatch.setattr(os, "umask", refuse)
        written = [atomic_write_text(tmp_path / "a.txt", "x"), atomic_save_npy(tmp_path / "a.npy", np.eye(2)),
                   atomic_write_csv(tmp_path / "t.csv", pd.DataFrame({"a": [1]}))]
        monkeypatch.undo()
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [0o640] * 3  # as a plain open() under umask 027
    assert leftovers(tmp_path) == []


def test_load_image_keeps_pil_settings_and_still_refuses_truncated_files(tmp_path, monkeypatch):
    """A program may let PIL pad truncated images process-wide; load_image leaves that setting alone but still
    refuses a truncated file."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    whole = jpeg(tmp_path / "whole.jpg")
    assert load_image(whole).size == (64, 64)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "w.png")
    assert load_image(tmp_path / "w.png").size == (64, 64)  # a whole PNG is not taken for a truncated one
    for src in (whole, tmp_path / "w.png"):
        cut = tmp_path / f"cut{src.suffix}"
        cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        with pytest.raises(DataError, match=rf"corrupt or truncated image: .*{cut.name} \(row 4\)"):
            load_image(cut, "row 4")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_run_log_restores_the_logger_level(tmp_path):
    logger = logging.getLogger(LOGGER_NAME)
    before = logger.level
    try:
        logger.setLevel(logging.WARNING)
        with run_log(tmp_path / "run"):
            assert logger.level == logging.INFO
            logger.info("into the file")
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(before)
    assert "into the file" in (tmp_path / "run" / "log.txt").read_text()


def test_read_json_names_the_file_when_it_is_absent_or_corrupt(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": 1}')
    assert read_json(good, "settings") == {"a": 1}
    with pytest.raises(DataError, match="no samples here: make one"):
        read_json(tmp_path / "absent.json", "settings", "no samples here: make one")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a": 1')
    with pytest.raises(DataError, match=r"bad\.json: corrupt settings: .*; delete it"):
        read_json(bad, "settings", hint="delete it")
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match=r"bad\.json: corrupt settings"):
        read_json(bad, "settings")
