"""Shared builders for the metrics tests: the 57-image HAM10000 sample as a manifest + lesion split, and fake
samples folders (canonical manifest, source="synthetic", PNGs) made from real images or arrays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermsynth.data.manifest import write_manifest
from dermsynth.data.split import SplitConfig, load_split, make_split
from dermsynth.io import atomic_save_image
from dermsynth.metrics.feature_cache import load_images, read_samples


def ham_split(sample: Path, out: Path, fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)) -> Path:
    """Manifest of the HAM10000 sample (built from its metadata CSV) and a lesion split; returns split.json."""
    if (out / "split" / "split.json").is_file():
        return out / "split" / "split.json"
    meta = pd.read_csv(sample / "HAM10000_metadata.csv")
    paths = {p.stem: p for p in sample.glob("HAM10000_images_part_*/*.jpg")}
    df = pd.DataFrame({"image_id": meta["image_id"], "group_id": meta["lesion_id"], "label": meta["dx"],
                       "path": [str(paths[i]) for i in meta["image_id"]], "source": "ham10000"})
    return make_split(write_manifest(df, out / "manifest.csv"), out / "split", SplitConfig(fractions=fractions, seed=0))


def fake_samples(out: Path, images: np.ndarray, labels: list[str], ids: list[str] | None = None) -> Path:
    """A samples folder as the generator writes it: images/<id>.png + manifest.csv (group_id = image_id)."""
    ids = ids or [f"syn_{labels[i]}_{i:04d}" for i in range(len(images))]
    for i, im in zip(ids, images):
        atomic_save_image(out / "images" / f"{i}.png", im, text={"ai_generated": "true"})
    df = pd.DataFrame({"image_id": ids, "group_id": ids, "label": labels,
                       "path": [str(out / "images" / f"{i}.png") for i in ids], "source": "synthetic",
                       "seed": 0, "generator": "test"})
    write_manifest(df, out / "manifest.csv")
    return out


def real_as_synthetic(split_json: Path, out: Path, part: str, classes: list[str], size: int = 64) -> Path:
    """A fake samples folder holding the real images of ``part`` for ``classes`` (a perfect generator stand-in)."""
    df = load_split(split_json).part(part)
    df = df[df["label"].isin(classes)].reset_index(drop=True)
    return fake_samples(out, load_images(df, size, progress=False), df["label"].tolist())


@pytest.fixture(scope="session")
def ham_split_json(ham_sample, tmp_path_factory) -> Path:
    return ham_split(ham_sample, tmp_path_factory.mktemp("ham"))


def test_fake_samples_folder_is_canonical(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    folder = fake_samples(tmp_path / "s", images, ["df", "vasc", "df"])
    df = read_samples(folder)
    assert df["source"].eq("synthetic").all() and df["label"].tolist() == ["df", "vasc", "df"]
    assert np.array_equal(load_images(df, 16, progress=False), images)


def test_ham_split_has_every_class_in_test(ham_split_json):
    sp = load_split(ham_split_json)
    assert set(sp.part("test")["label"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
