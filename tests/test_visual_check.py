"""The blind real-vs-synthetic sheet: balanced, shuffled, nothing in the files gives the answer away; scoring."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermsynth.io import DataError
from dermsynth.metrics.visual_check import KEY, make_sheet, score_sheet
from test_quality_data import fake_samples, ham_split_json  # noqa: F401  (fixture)


@pytest.fixture()
def sheet(ham_split_json, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    samples = fake_samples(tmp_path / "samples", images, ["df"] * 6 + ["vasc"] * 6)
    out = tmp_path / "sheet"
    make_sheet(samples, ham_split_json, out, per_class=3, seed=0)
    return out


def test_sheet_is_balanced_shuffled_and_blind(sheet):
    key = pd.read_csv(sheet / KEY, dtype=str)
    ratings = pd.read_csv(sheet / "ratings.csv", dtype=str, keep_default_na=False)
    assert len(key) == 12 and (ratings["rating"] == "").all()
    assert key.groupby(["label", "truth"]).size().tolist() == [3, 3, 3, 3]  # 3 real + 3 synthetic per class
    assert key["truth"].tolist() != sorted(key["truth"].tolist())  # shuffled
    assert "truth" not in ratings.columns and "image_id" not in ratings.columns
    page = (sheet / "sheet.html").read_text()
    assert "ISIC_" not in page and "syn_" not in page and "synthetic</td>" not in page
    sizes, texts = set(), set()
    for item in key["item"]:
        with Image.open(sheet / "images" / f"{item}.png") as im:
            sizes.add(im.size)
            texts.update(im.info)  # no PNG text chunk (the synthetic ones were written with one)
    assert sizes == {(40, 40)} and not texts & {"ai_generated"}


def test_scoring(sheet):
    key = pd.read_csv(sheet / KEY, dtype=str)
    perfect = pd.DataFrame({"item": key["item"], "rating": key["truth"]})
    perfect.to_csv(sheet / "perfect.csv", index=False)
    s = score_sheet(sheet, sheet / "perfect.csv")
    assert s["overall"]["accuracy"] == 1.0 and s["per_class"]["df"]["correct"] == 6
    all_real = pd.DataFrame({"item": key["item"], "rating": "real"})
    all_real.loc[0, "rating"] = "unsure"
    all_real.to_csv(sheet / "real.csv", index=False)
    s = score_sheet(sheet, sheet / "real.csv")
    n_real_decided = int((key["truth"][1:] == "real").sum())
    assert s["overall"]["accuracy"] == pytest.approx(n_real_decided / 11) and s["overall"]["unsure"] == 1
    assert json.loads((sheet / "score.json").read_text())["overall"]["decided"] == 11
    bad = pd.DataFrame({"item": key["item"], "rating": "maybe"})
    bad.to_csv(sheet / "bad.csv", index=False)
    with pytest.raises(DataError, match="maybe"):
        score_sheet(sheet, sheet / "bad.csv")


def test_make_without_samples_or_split_is_a_clear_error(tmp_path, capsys):
    from dermsynth.cli import main

    for missing in (["--split", "s.json"], ["--samples", "samples"]):
        assert main(["visual-check", "make", "--out", str(tmp_path / "sheet"), *missing]) == 2
        err = capsys.readouterr().err
        assert "visual-check make needs --samples and --split" in err and "Traceback" not in err
