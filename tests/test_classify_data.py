"""Real + synthetic mixing: train part only, per-class ratio, provenance, and the never-in-val/test checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermsynth.classify.config import ClfConfig, DataConfig
from dermsynth.classify.data import check_no_synthetic, load_clf_data, load_images, open_caches, synthetic_ratios
from dermsynth.data.cache import build_cache
from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import read_manifest, write_manifest
from dermsynth.data.split import make_split
from dermsynth.data.toy import ToyConfig, make_toy
from dermsynth.io import DataError, atomic_save_image


def write_synthetic(root: Path, per_class: dict[str, int], size: int = 24, generator: str | None = None) -> Path:
    """A samples folder in the canonical form: random PNGs, source=synthetic, group_id = image_id."""
    rng = np.random.default_rng(0)
    rows = []
    for c, n in per_class.items():
        for i in range(n):
            image_id = f"syn_{c}_{i:04d}"
            path = root / "images" / f"{image_id}.png"
            atomic_save_image(path, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            rows.append({"image_id": image_id, "group_id": image_id, "label": c, "path": str(path),
                         "source": "synthetic", "seed": i, **({"generator": generator} if generator else {})})
    return write_manifest(pd.DataFrame(rows), root / "manifest.csv")


@pytest.fixture(scope="module")
def toy_split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clf_data")
    manifest = make_toy(root / "toy", ToyConfig(n_images=120, size=24, seed=1))
    return make_split(manifest, root / "split")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("syn"), {"df": 3, "vasc": 30, "mel": 30, "nv": 10})


def _cfg(split: Path, synthetic: Path | None = None, **data) -> ClfConfig:
    cfg = ClfConfig()
    cfg.data = DataConfig(split=str(split), image_size=24, synthetic=str(synthetic) if synthetic else None, **data)
    return cfg


def test_ratio_one_matches_real_counts_in_rare_classes_only(toy_split, synthetic):
    d = load_clf_data(_cfg(toy_split, synthetic))
    real = d.split.part("train")
    counts = d.train_counts()
    for c in ("vasc", "mel"):
        assert counts[c]["synthetic"] == (real["label"] == c).sum() > 0  # 50 % real / 50 % synthetic
    assert counts["df"]["synthetic"] == min(3, (real["label"] == "df").sum())  # capped by what exists
    assert counts["nv"]["synthetic"] == 0  # common classes stay real only, though nv samples exist
    info = d.synthetic["per_class"]
    assert set(info) == {"df", "vasc", "mel"} and info["df"]["available"] == 3
    assert info["df"]["used"] == counts["df"]["synthetic"]
    assert (d.train["source"] == "synthetic").sum() == sum(v["synthetic"] for v in counts.values())
    for part in (d.val, d.test):
        assert not part["image_id"].str.startswith("syn_").any()
    assert len(d.train) == len(real) + sum(v["synthetic"] for v in counts.values())


def test_ratio_settings(toy_split, synthetic):
    d = load_clf_data(_cfg(toy_split, synthetic, synthetic_ratio=2.0, synthetic_ratio_per_class={"mel": 0.5}))
    real = d.split.part("train")
    n_mel, n_vasc = (real["label"] == "mel").sum(), (real["label"] == "vasc").sum()
    assert d.train_counts()["mel"]["synthetic"] == round(0.5 * n_mel)
    assert d.train_counts()["vasc"]["synthetic"] == min(30, 2 * n_vasc)
    assert synthetic_ratios(DataConfig(synthetic_classes=["vascular"], synthetic_ratio=0.25)) == {"vasc": 0.25}
    none = load_clf_data(_cfg(toy_split))
    assert (none.train["source"] != "synthetic").all() and none.synthetic == {}


def test_redraw_keeps_the_whole_pool_and_a_per_epoch_quota(toy_split, synthetic):
    fixed = load_clf_data(_cfg(toy_split, synthetic, synthetic_ratio=0.25))
    d = load_clf_data(_cfg(toy_split, synthetic, synthetic_ratio=0.25, synthetic_redraw=True))
    assert d.synthetic["redraw"] and not fixed.synthetic["redraw"] and fixed.synthetic_quota() == {}
    assert d.synthetic["per_class"] == fixed.synthetic["per_class"]  # the same mix per epoch
    counts, fixed_counts = d.train_counts(), fixed.train_counts()
    for c in ("vasc", "mel"):  # all 30 synthetic images are in the train part; an epoch draws its quota of them
        used = d.synthetic["per_class"][c]["used"]
        assert 0 < used < 30 and (d.train["label"].eq(c) & d.synthetic_mask()).sum() == 30
        assert counts[c] == {**fixed_counts[c], "synthetic_pool": 30} and d.synthetic_quota()[CLASSES.index(c)] == used
    assert (d.train["image_id"] == "syn_nv_0000").sum() == 0  # a class without a ratio gets none, pool or not


def test_synthetic_in_val_or_test_is_refused(toy_split, tmp_path):
    d = load_clf_data(_cfg(toy_split))
    check_no_synthetic(d.test, "test")  # real only: fine
    leaked = d.test.copy()
    leaked.loc[0, "source"] = "synthetic"
    with pytest.raises(DataError, match="synthetic image"):
        check_no_synthetic(leaked, "test part")
    with pytest.raises(DataError, match="synthetic image"):
        check_no_synthetic(d.val, "val part", synthetic_ids={d.val["image_id"].iloc[0]})
    # a split whose manifest marks a test image synthetic is refused at load time
    split = json.loads(toy_split.read_text())
    m = read_manifest(split["manifest"])
    m.loc[m["image_id"] == split["parts"]["test"][0], "source"] = "synthetic"
    write_manifest(m, tmp_path / "m" / "manifest.csv")
    bad = make_split(tmp_path / "m" / "manifest.csv", tmp_path / "s")
    assert json.loads(bad.read_text())["parts"]["test"] == split["parts"]["test"]
    with pytest.raises(DataError, match="test part.*synthetic"):
        load_clf_data(_cfg(bad))


def test_bad_synthetic_manifests(toy_split, synthetic, tmp_path):
    syn = read_manifest(synthetic)
    real = write_manifest(syn.assign(source="ham10000"), tmp_path / "a" / "manifest.csv")
    with pytest.raises(DataError, match="synthetic images only"):
        load_clf_data(_cfg(toy_split, real))
    split = json.loads(toy_split.read_text())
    clash = syn.copy()
    clash.loc[0, "image_id"] = split["parts"]["train"][0]
    with pytest.raises(DataError, match="also name real images"):
        load_clf_data(_cfg(toy_split, write_manifest(clash, tmp_path / "b" / "manifest.csv")))
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generator.json").write_text(json.dumps({"split_fingerprint": "0" * 64}))
    other = write_synthetic(tmp_path / "c", {"df": 2}, generator=str(gen))
    with pytest.raises(DataError, match="another split"):
        load_clf_data(_cfg(toy_split, other))
    (gen / "generator.json").write_text(json.dumps({"split_fingerprint": split["fingerprint"]}))
    assert load_clf_data(_cfg(toy_split, other)).train_counts()["df"]["synthetic"] > 0
    cfg = _cfg(toy_split)
    cfg.eval.extra_test = {"leaky": str(synthetic)}
    with pytest.raises(DataError, match="extra_test leaky"):
        load_clf_data(cfg)


def test_extra_test_set_sharing_images_or_lesions_with_train_is_refused(toy_split, tmp_path):
    """Scores on an extra test set that holds training images, or other photos of training lesions, are inflated."""
    d = load_clf_data(_cfg(toy_split))
    train = d.split.part("train")
    unseen = d.split.part("test")
    lesion = train.iloc[[0]].assign(image_id="another_photo")  # a new image of a training lesion
    sets = {"overlap": pd.concat([unseen, train.iloc[:2]]), "same_lesion": pd.concat([unseen, lesion]),
            "unseen": unseen}
    for name, df in sets.items():
        cfg = _cfg(toy_split)
        cfg.eval.extra_test = {name: str(write_manifest(df, tmp_path / name / "manifest.csv"))}
        if name == "unseen":
            assert len(load_clf_data(cfg).extra["unseen"]) == len(unseen)
            continue
        with pytest.raises(DataError, match=f"extra_test {name}.*train part") as e:
            load_clf_data(cfg)
        assert train["group_id"].iloc[0] in str(e.value)
        if name == "overlap":
            assert "2 image id(s)" in str(e.value) and train["image_id"].iloc[0] in str(e.value)


def test_load_images_rows_in_order_across_caches(toy_split, synthetic):
    d = load_clf_data(_cfg(toy_split, synthetic))
    arr = load_images(d.train, 24, None, open_caches(d.manifests, 24, None))
    assert arr.shape == (len(d.train), 24, 24, 3) and arr.dtype == np.uint8
    direct = build_cache(d.train, 24).take(d.train["image_id"])
    assert np.array_equal(arr, direct)
