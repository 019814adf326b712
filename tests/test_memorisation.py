"""The memorisation audit: exact, flipped and rotated copies of training images are flagged; calibration."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermsynth.data.split import load_split
from dermsynth.metrics.feature_cache import load_images
from dermsynth.metrics.features import DummyExtractor
from dermsynth.metrics.memorisation import (MemorisationConfig, audit, calibrate, closest_pairs_grid,
                                            same_lesion_similarities, transform)
from test_quality_data import ham_split_json  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def train_set(ham_split_json):
    train = load_split(ham_split_json).part("train")
    test = load_split(ham_split_json).part("test")
    return train, load_images(train, 64, progress=False), test, load_images(test, 64, progress=False)


def _synthetic(train, train_img, test, test_img):
    images = np.stack([train_img[0], transform(train_img[1:2], 0, True)[0], transform(train_img[2:3], 1, False)[0],
                       transform(train_img[3:4], 3, True)[0], test_img[0]])
    labels = [train["label"][0], train["label"][1], train["label"][2], train["label"][3], test["label"][0]]
    syn = pd.DataFrame({"image_id": [f"s{i}" for i in range(5)], "label": labels})
    return syn, images


def test_exact_flipped_and_rotated_copies_are_flagged(train_set, tmp_path):
    train, train_img, test, test_img = train_set
    syn, images = _synthetic(*train_set)
    ext = DummyExtractor()
    train_f = ext(train_img)
    rows, summary = audit(syn, images, train, train_img, train_f, ext, MemorisationConfig(orbit="d4"), progress=False)
    copies = rows.iloc[:4]
    assert copies["is_copy"].all()
    assert copies["nearest_train_id"].tolist() == train["image_id"][:4].tolist()
    assert np.allclose(copies["cosine"], 1.0, atol=1e-5) and np.allclose(copies["ssim"], 1.0, atol=1e-4)
    assert copies["transform"].tolist()[:2] == ["rot0", "rot0+flip"]
    # the new lesion from the test part is less similar to its nearest training image than any copy
    assert rows["cosine"][4] < 0.999 and rows["ssim"][4] < 0.9
    assert sum(summary["copies"].values()) >= 4 and set(summary["copy_rate"]) == set(syn["label"])
    png = closest_pairs_grid(rows, images, train_img, train["image_id"].tolist(), tmp_path / "pairs.png", n=5)
    assert Image.open(png).size[0] > 100


def test_without_the_orbit_a_flipped_copy_escapes(train_set):
    """Why the audit searches flips/rotations: without them a mirrored copy does not match its source."""
    train, train_img, test, test_img = train_set
    syn, images = _synthetic(*train_set)
    ext = DummyExtractor()
    strict = {"threshold": 0.999, "source": "test", "n_pairs": 0, "quantiles": {}}
    rows, _ = audit(syn, images, train, train_img, ext(train_img), ext, MemorisationConfig(orbit="none"),
                    calibration=strict, progress=False)
    assert rows["is_copy"].tolist()[:1] == [True]
    assert not rows["is_copy"][1:4].all()
    assert rows["cosine"][1] < 0.999


def test_calibration_uses_same_lesion_pairs_or_says_it_fell_back():
    feats = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8], [1, 1]], float)
    groups = np.array(["a", "a", "b", "b", "c"])  # two lesions with two photos each; "c" has one
    sims = same_lesion_similarities(groups, feats)
    assert np.allclose(sorted(sims), [0.8, 0.8])
    cal = calibrate(groups, feats, MemorisationConfig(quantile=0.05, center=False))
    assert cal["threshold"] == pytest.approx(0.8) and cal["n_pairs"] == 2 and "same-lesion" in cal["source"]
    # centred (the default): the shared mean (0.48, 0.48) is removed first, so pairs are compared by what differs
    centred = calibrate(groups, feats, MemorisationConfig(quantile=0.05))
    f = feats - feats.mean(0)
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    assert centred["threshold"] == pytest.approx(np.quantile([cos(f[0], f[1]), cos(f[2], f[3])], 0.05))
    # held-out new lesions as close to the training set as 0.95: the threshold rises to their 0.99 quantile
    # (new lesions: [0.6, 0.8] * 1.01 has cosine 1.0 with train row 3; [1, 0.1] has 0.995 with row 0)
    null = np.array([[0.606, 0.808], [1.0, 0.1]])
    both = calibrate(groups, feats, MemorisationConfig(quantile=0.05, center=False, null_quantile=0.0), null)
    assert both["threshold"] == pytest.approx(1 / np.sqrt(1.01)) and both["n_null"] == 2
    assert "new-lesion q0 = " in both["source"] and "same-lesion q0.05 = 0.8000" in both["source"]
    fb = calibrate(np.array(["a", "b", "c"]), feats[:3], MemorisationConfig(fallback_threshold=0.97))
    assert fb["threshold"] == 0.97 and fb["source"] == "fallback"
