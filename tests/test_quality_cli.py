"""`dermsynth quality` and `dermsynth filter` end to end on the HAM10000 sample with the real lite0 extractor."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dermsynth.cli import main
from dermsynth.data.split import load_split
from dermsynth.metrics.feature_cache import load_images
from test_quality_data import fake_samples, ham_split

FAST = ["--set", "features.name=lite0", "--set", "features.input_size=64", "--set", "features.batch_size=32"]


@pytest.fixture(scope="module")
def setup(ham_sample, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qcli")
    split = ham_split(ham_sample, tmp / "ham", fractions=(0.4, 0.2, 0.4))  # a test part of several images per class
    sp = load_split(split)
    val, train = sp.part("val"), sp.part("train")
    val = val[val["label"].isin(["df", "vasc"])].reset_index(drop=True)
    images = load_images(val, 64, progress=False)
    copied = load_images(train[train["label"] == "df"].iloc[:1], 64, progress=False)
    # stand-in generator output: real val images (new lesions) plus one verbatim copy of a training image
    samples = fake_samples(tmp / "samples", np.concatenate([images, copied]), val["label"].tolist() + ["df"])
    return samples, split, train[train["label"] == "df"]["image_id"].iloc[0], tmp


def test_quality_cli(setup):
    samples, split, copied_id, tmp = setup
    out = tmp / "quality"
    rc = main(["quality", "--samples", str(samples), "--split", str(split), "--out", str(out), *FAST,
               "--set", "repeats=3", "--set", "memorisation.orbit=flip", "--set", "diversity_pairs=20"])
    assert rc == 0
    q = json.loads((out / "quality.json").read_text())
    assert q["extractor"] == "lite0" and q["image_size"] == 64 and set(q["groups"]) == {"df", "vasc", "pooled"}
    assert q["groups"]["pooled"]["classes"] == ["df", "vasc"]
    assert "pooled df+vasc" in (out / "quality.html").read_text()
    for name, g in q["groups"].items():
        assert g["N"] == sum(g["draw_per_class"].values()) and g["N"] <= g["available"]["test"]
        for side in ("synthetic", "floor"):
            assert {"FD_lite0", "KID_lite0", "KID_lite0_std", "precision_lite0", "coverage_lite0"} <= set(g[side])
            assert 0.0 <= g[side]["C2ST_lite0"] <= 1.0
            assert any(k.startswith("diversity_") for k in g[side])
    assert "FID" not in json.dumps(q["groups"]) and "IS_lite0" not in json.dumps(q["groups"])
    memo = pd.read_csv(out / "memorisation.csv")
    row = memo[memo["image_id"] == memo["image_id"].iloc[-1]].iloc[0]
    assert row["is_copy"] and row["nearest_train_id"] == copied_id and row["cosine"] > 0.999
    assert q["memorisation"]["copies"]["df"] >= 1 and 0 <= q["memorisation"]["real_test_flag_rate"]["flag_rate"] <= 1
    for f in ("quality.html", "grid_df.png", "metrics_vs_floor.png", "closest_pairs.png", "config.yaml", "log.txt"):
        assert (out / f).is_file(), f
    assert "KID_lite0" in (out / "quality.html").read_text()


def test_pooled_classes_choose_the_pooled_group_and_an_absent_class_is_refused(setup, capsys):
    samples, split, _, tmp = setup
    args = ["quality", "--samples", str(samples), "--split", str(split), *FAST, "--set", "repeats=2",
            "--set", "memorisation.orbit=flip", "--set", "diversity_pairs=10"]
    # one class pooled is no pool: only the per-class rows remain
    assert main([*args, "--out", str(tmp / "q_df"), "--set", "pooled_classes=[df]"]) == 0
    q = json.loads((tmp / "q_df" / "quality.json").read_text())
    assert set(q["groups"]) == {"df", "vasc"} and q["groups"]["df"]["classes"] == ["df"]
    assert main([*args, "--out", str(tmp / "q_mel"), "--set", "pooled_classes=[df, mel]"]) == 2
    err = capsys.readouterr().err
    assert "pooled_classes" in err and "'mel'" in err and str(samples) in err
    assert not (tmp / "q_mel").exists()  # refused before anything is written


def test_copies_are_searched_in_train_whatever_the_floor_and_old_figures_are_not_shown(setup, capsys):
    samples, split, copied_id, tmp = setup
    out = tmp / "q_val_floor"
    out.mkdir()
    (out / "grid_mel.png").write_bytes(b"a figure of an earlier run into this folder")
    args = ["quality", "--samples", str(samples), "--split", str(split), *FAST, "--set", "repeats=2",
            "--set", "memorisation.orbit=flip", "--set", "diversity_pairs=10"]
    assert main([*args, "--out", str(out), "--set", "floor_part=val"]) == 0
    memo = pd.read_csv(out / "memorisation.csv")
    # the samples are val images: searched in val, every one would be its own "copy"
    assert memo["is_copy"].tolist() == [False] * (len(memo) - 1) + [True]
    assert memo["nearest_train_id"].iloc[-1] == copied_id
    page = (out / "quality.html").read_text()
    assert "grid_df.png" in page and "grid_mel" not in page
    # new lesions of the test part must not set the copy threshold (a choice)
    assert main([*args, "--out", str(tmp / "q_null_test"), "--set", "memorisation.null_part=test"]) == 2
    assert "memorisation.null_part" in capsys.readouterr().err


def test_filter_cli(setup):
    samples, split, copied_id, tmp = setup
    out = tmp / "filtered"
    rc = main(["filter", "--samples", str(samples), "--split", str(split), "--out", str(out), *FAST,
               "--set", "memorisation.orbit=flip"])
    assert rc == 0
    info = json.loads((out / "filter.json").read_text())
    rej = pd.read_csv(out / "rejected.csv", keep_default_na=False)
    copy_row = rej[rej["nearest_train_id"] == copied_id]
    assert "copy_of_train" in copy_row["reasons"].iloc[0]
    assert info["total"]["in"] == info["total"]["kept"] + info["total"]["rejected"]
    assert info["checks"]["class_prob"].startswith("skipped")


def test_bad_input_exits_2(setup, capsys):
    _, split, _, tmp = setup
    assert main(["quality", "--samples", str(tmp / "nope"), "--split", str(split)]) == 2
    assert "samples manifest not found" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["quality", "filter"])
def test_samples_of_a_generator_trained_on_another_split_are_refused(setup, verb):
    """A generator that saw other lesions may have seen this split's test part: both verbs refuse its images."""
    samples, split, _, tmp = setup
    gen = tmp / f"other_gen_{verb}"
    gen.mkdir()
    (gen / "generator.json").write_text(json.dumps({"kind": "scratch", "split_fingerprint": "0" * 64}))
    df = pd.read_csv(samples / "manifest.csv")
    moved = tmp / f"samples_other_{verb}"
    moved.mkdir()
    for p in df["path"]:
        (moved / p).parent.mkdir(parents=True, exist_ok=True)
        (moved / p).write_bytes((samples / p).read_bytes())
    df.assign(generator=str(gen)).to_csv(moved / "manifest.csv", index=False)
    out = tmp / f"refused_{verb}"
    rc = main([verb, "--samples", str(moved), "--split", str(split), "--out", str(out), *FAST])
    assert rc == 2
    assert not out.exists()  # refused before anything was written
