"""The data verbs end to end through ``dermsynth.cli.main``: prepare -> split -> show, plus show on a manifest."""
from __future__ import annotations

import json

import pandas as pd
from PIL import Image

from dermsynth.cli import main
from dermsynth.data.labels import CLASSES
from dermsynth.data.split import load_split


def test_prepare_split_show(ham_sample, tmp_path, capsys):
    data, split_dir, show_dir = tmp_path / "data", tmp_path / "split", tmp_path / "show"
    assert main(["data", "prepare", "--source", "ham10000", "--root", str(ham_sample), "--out", str(data),
                 "--masks"]) == 0
    assert capsys.readouterr().out.strip() == str(data / "manifest.csv")
    assert main(["data", "split", "--manifest", str(data / "manifest.csv"), "--out", str(split_dir)]) == 0
    split = load_split(split_dir)
    assert split.info["totals"]["train"]["images"] + split.info["totals"]["val"]["images"] + \
        split.info["totals"]["test"]["images"] == 57
    capsys.readouterr()
    assert main(["data", "show", "--split", str(split_dir / "split.json"), "--out", str(show_dir)]) == 0
    printed = capsys.readouterr().out
    assert all(c in printed for c in CLASSES) and "test:lesions" in printed

    counts = pd.read_csv(show_dir / "counts.csv")
    assert list(counts.columns) == ["part", "label", "images", "lesions"]
    for p in ("train", "val", "test"):
        for c in CLASSES:
            row = counts[(counts["part"] == p) & (counts["label"] == c)].iloc[0]
            assert row["images"] == split.info["counts"][p][c]["images"]
            assert row["lesions"] == split.info["counts"][p][c]["lesions"]
    allrow = counts[(counts["part"] == "all") & (counts["label"] == "all")].iloc[0]
    assert (allrow["images"], allrow["lesions"]) == (57, 42)
    for c in CLASSES:
        with Image.open(show_dir / f"sheet_{c}.png") as im:
            # 8 or 9 thumbnails of 96 px: one row of 8 (+1 for nv), under a title strip
            assert im.width == 8 * 98 + 2 and im.height in (20 + 98 + 2, 20 + 2 * 98 + 2)
    assert not list(show_dir.glob(".*.tmp"))


def test_show_manifest_and_kfold(ham_manifest, tmp_path, capsys):
    assert main(["data", "show", "--manifest", str(ham_manifest), "--out", str(tmp_path / "show")]) == 0
    counts = pd.read_csv(tmp_path / "show" / "counts.csv")
    assert set(counts["part"]) == {"all"} and counts.set_index("label").loc["nv", "images"] == 9
    assert main(["data", "split", "--manifest", str(ham_manifest), "--out", str(tmp_path / "k"),
                 "--set", "mode=kfold", "--set", "k=3"]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["fold0", "fold1", "fold2"]
    assert json.loads((tmp_path / "k" / "fold2" / "split.json").read_text())["fold"] == 2
    assert main(["data", "show", "--out", str(tmp_path / "none")]) == 2
    assert "exactly one of --manifest or --split" in capsys.readouterr().err


def test_show_contact_sheet_caps_at_64(tmp_path, ham_manifest):
    from dermsynth.data.show import MAX_THUMBS, contact_sheet
    from dermsynth.data.manifest import read_manifest

    df = read_manifest(ham_manifest)
    many = pd.concat([df] * 2, ignore_index=True)  # 114 rows
    sheet = contact_sheet(many, "title")
    assert MAX_THUMBS == 64 and sheet.size == (8 * 98 + 2, 20 + 8 * 98 + 2)
