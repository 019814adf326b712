"""The memorisation audit: exact, flipped and rotated copies of training images are flagged; calibration."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermsynth.data.split import load_split
from dermsynth.metrics.feature_cache import load_images
from dermsynth.metrics.features import DummyExtractor
from dermsynth.metrics.memorisation import (MemorisationConfig, audit, calibrate, calibrate_orbit, closest_pairs_grid,
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
    cfg = MemorisationConfig(quantile=0.05, center=False)
    cal = calibrate(sims, None, cfg)
    assert cal["threshold"] == pytest.approx(0.8) and cal["n_pairs"] == 2 and "same-lesion" in cal["source"]
    # a pair's similarity is its best over the views of either photo: a view of row 1 equal to row 0 makes pair a 1.0
    turned = feats.copy()
    turned[1] = feats[0]
    assert np.allclose(sorted(same_lesion_similarities(groups, feats, [feats, turned])), [0.8, 1.0])
    # held-out new lesions nearer the training set than the same-lesion pairs: the threshold rises to their quantile
    both = calibrate(sims, np.array([0.9, 0.995]), MemorisationConfig(quantile=0.05, null_quantile=1.0))
    assert both["threshold"] == pytest.approx(0.995) and both["n_null"] == 2
    assert "new-lesion q1 = 0.9950" in both["source"] and "same-lesion q0.05 = 0.8000" in both["source"]
    fb = calibrate(np.empty(0), None, MemorisationConfig(fallback_threshold=0.97))
    assert fb["threshold"] == 0.97 and fb["source"] == "fallback"


def test_calibration_on_the_orbit_centres_like_the_audit(train_set):
    """calibrate_orbit measures same-lesion pairs on centred features, as the audit compares them."""
    train, train_img, _, _ = train_set
    ext = DummyExtractor()
    feats = ext(train_img)
    cfg = MemorisationConfig(orbit="none", quantile=0.05, null_part="")
    cal = calibrate_orbit(train, train_img, feats, None, ext, cfg, progress=False)
    f = feats - feats.mean(0)
    assert cal["n_pairs"] > 0
    assert cal["threshold"] == pytest.approx(np.quantile(same_lesion_similarities(train["group_id"], f), 0.05))


def test_new_lesions_are_flagged_at_the_calibrated_rate_whatever_the_orbit():
    """The threshold is calibrated on the audit's own statistic (the best match over the flips/rotations), so real
    new lesions are flagged at about the calibrated rate; calibrated on single views, the same rule flagged several
    times more of them, since a maximum over 8 views is higher than one view's similarity."""
    rng = np.random.default_rng(0)

    def lesions(n: int) -> np.ndarray:  # smooth random "images": no symmetry, so every view is a different image
        small = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
        return np.stack([np.asarray(Image.fromarray(x).resize((16, 16), Image.BILINEAR)) for x in small])

    train_img, null_img, new_img = lesions(300), lesions(300), lesions(600)
    train = pd.DataFrame({"image_id": [f"t{i}" for i in range(300)], "group_id": [f"g{i}" for i in range(300)],
                          "label": "nv"})
    new = pd.DataFrame({"image_id": [f"n{i}" for i in range(600)], "label": "nv"})
    ext = DummyExtractor()
    feats = ext(train_img)
    cfg = MemorisationConfig(orbit="d4", null_quantile=0.95, ssim_threshold=1.01)
    cal = calibrate_orbit(train, train_img, feats, null_img, ext, cfg, progress=False)
    rows, _ = audit(new, new_img, train, train_img, feats, ext, cfg, cal, progress=False)
    assert 0.02 <= rows["is_copy"].mean() <= 0.09  # about 1 - 0.95 of new lesions
    single = calibrate_orbit(train, train_img, feats, null_img, ext, MemorisationConfig(orbit="none",
                                                                                         null_quantile=0.95))
    assert single["threshold"] < cal["threshold"]
    assert (rows["cosine"] >= single["threshold"]).mean() > 2 * rows["is_copy"].mean()
