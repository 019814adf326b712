"""The benchmark helpers that a GPU round depends on, checked on CPU: the compact HAM10000 archive reads back
through the normal data path."""
from __future__ import annotations

import importlib.util
import tarfile
from pathlib import Path

import pandas as pd
from PIL import Image

from dermsynth.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compact_archive_unpacks_to_a_ham10000_folder_with_small_images(ham_sample, tmp_path):
    pack = _load("pack_ham10000")
    archive = pack.pack(ham_sample, tmp_path / "ham-compact.tar.gz", short_side=64, quality=80)
    assert not (tmp_path / "ham-compact.tar.gz.tmp").exists()
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x" / "ham-compact"
    manifest = pd.read_csv(prepare("ham10000", root, tmp_path / "prepared"))
    original = pd.read_csv(ham_sample / "HAM10000_metadata.csv")
    assert sorted(manifest["image_id"]) == sorted(original["image_id"])
    for p in list(root.glob("HAM10000_images_part_*/*.jpg"))[:5]:
        with Image.open(p) as im:
            assert min(im.size) == 64 and abs(im.width / im.height - 4 / 3) < 0.02  # aspect kept
