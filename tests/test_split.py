"""Lesion-grouped, stratified splits: invariants, fingerprints, k-fold, errors, near-duplicate merging."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermsynth.data.dedup import close_pairs, merge_near_duplicates
from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import read_manifest, write_manifest
from dermsynth.data.split import PARTS, SplitConfig, fingerprint, load_split, make_split
from dermsynth.io import DataError


def check_invariants(split, fractions=(0.70, 0.15, 0.15)) -> None:
    """Recomputed from scratch, not from split.json's own counts."""
    df = split.manifest
    part_of = {i: p for p, ids in split.parts.items() for i in ids}
    assert sum(len(ids) for ids in split.parts.values()) == len(part_of) == len(df)  # disjoint and complete
    spans = df.assign(part=df["image_id"].map(part_of)).groupby("group_id")["part"].nunique()
    assert spans.max() == 1, "a lesion spans two parts"
    lesions = df.drop_duplicates("group_id")
    for c in CLASSES:
        n = (lesions["label"] == c).sum()
        for p, f in zip(PARTS, fractions):
            got = split.part(p).query("label == @c")["group_id"].nunique()
            assert got >= 1, f"{c} missing from {p}"
            assert abs(got - f * n) <= 1, f"{c} in {p}: {got} lesions, expected {f * n:.2f}"
            assert split.info["counts"][p][c]["lesions"] == got


def synthetic_manifest(tmp_path, lesions_per_class: dict[str, int], seed: int = 0):
    """A file-free manifest with 1-3 images per lesion (the split never opens images)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, n in lesions_per_class.items():
        for k in range(n):
            for j in range(int(rng.integers(1, 4))):
                rows.append({"image_id": f"{c}_{k}_{j}", "group_id": f"L_{c}_{k}", "label": c,
                             "path": f"img/{c}_{k}_{j}.jpg", "source": "synthetic-test"})
    return write_manifest(pd.DataFrame(rows), tmp_path / "manifest.csv")


def test_holdout_invariants_on_sample(ham_manifest, tmp_path):
    split = load_split(make_split(ham_manifest, tmp_path / "s"))
    check_invariants(split)
    assert split.info["totals"]["test"]["lesions"] == 7  # one lesion of each class


def test_holdout_stratified_within_one_lesion_at_ham10000_scale(tmp_path):
    # HAM10000's lesion counts per class (7,470 lesions; df 73, vasc 98)
    counts = {"akiec": 228, "bcc": 327, "bkl": 727, "df": 73, "mel": 614, "nv": 5403, "vasc": 98}
    m = synthetic_manifest(tmp_path, counts)
    check_invariants(load_split(make_split(m, tmp_path / "s0")))
    fr = (0.8, 0.1, 0.1)
    check_invariants(load_split(make_split(m, tmp_path / "s80", SplitConfig(fractions=fr, seed=1))), fr)


def test_fingerprint_stable_and_sensitive(ham_manifest, tmp_path):
    a = load_split(make_split(ham_manifest, tmp_path / "a"))
    b = load_split(make_split(ham_manifest, tmp_path / "b"))
    assert a.fingerprint == b.fingerprint and a.parts == b.parts
    c = load_split(make_split(ham_manifest, tmp_path / "c", SplitConfig(seed=1)))
    assert c.fingerprint != a.fingerprint
    # one image fewer in the manifest -> another fingerprint
    df = read_manifest(ham_manifest)
    smaller = write_manifest(df.iloc[1:], tmp_path / "smaller" / "manifest.csv")
    assert load_split(make_split(smaller, tmp_path / "d")).fingerprint != a.fingerprint
    # moving one image between parts changes it; order within a part does not
    moved = {p: list(ids) for p, ids in a.parts.items()}
    moved["val"].append(moved["train"].pop())
    assert fingerprint(moved) != a.fingerprint
    assert fingerprint({p: ids[::-1] for p, ids in a.parts.items()}) == a.fingerprint


def test_load_split_refuses_edits(ham_manifest, tmp_path):
    path = make_split(ham_manifest, tmp_path / "s")
    info = json.loads(path.read_text())
    info["parts"]["test"].append(info["parts"]["train"].pop())
    path.write_text(json.dumps(info))
    with pytest.raises(DataError, match="fingerprint mismatch"):
        load_split(path)
    # the manifest losing an image after the split is caught too
    m = write_manifest(read_manifest(ham_manifest), tmp_path / "m" / "manifest.csv")
    path2 = make_split(m, tmp_path / "s2")
    write_manifest(read_manifest(m).iloc[1:], m)
    with pytest.raises(DataError, match="absent from"):
        load_split(path2)


def test_kfold(ham_manifest, tmp_path):
    out = make_split(ham_manifest, tmp_path / "k", SplitConfig(mode="kfold", k=3))
    folds = [load_split(out / f"fold{i}") for i in range(3)]
    tests = [set(f.parts["test"]) for f in folds]
    assert set().union(*tests) == set(read_manifest(ham_manifest)["image_id"])  # test folds cover everything
    assert sum(map(len, tests)) == 57  # and never overlap
    for i, f in enumerate(folds):
        assert set(f.parts["val"]) == tests[(i + 1) % 3]
        assert f.info["fold"] == i and f.info["k"] == 3
        check_invariants(f, fractions=(1 / 3, 1 / 3, 1 / 3))
    with pytest.raises(DataError, match="k >= 3"):
        make_split(ham_manifest, tmp_path / "k2", SplitConfig(mode="kfold", k=2))
    with pytest.raises(DataError, match="vasc has 6 lesion"):
        make_split(ham_manifest, tmp_path / "k7", SplitConfig(mode="kfold", k=7))


def test_too_few_lesions_names_class_and_count(tmp_path):
    m = synthetic_manifest(tmp_path, {"nv": 20, "mel": 5, "df": 2})
    with pytest.raises(DataError, match=r"df has 2 lesion\(s\)"):
        make_split(m, tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.0, 0.0, 0.0), (0.8, 0.2)])
def test_bad_fractions(ham_manifest, tmp_path, fractions):
    with pytest.raises(DataError, match="fractions"):
        make_split(ham_manifest, tmp_path / "s", SplitConfig(fractions=fractions))


# ----------------------------------------------------------------------------------------------------------------------
# Near-duplicate merging
# ----------------------------------------------------------------------------------------------------------------------

def with_copies(ham_manifest, tmp_path):
    """The sample plus two re-encoded, slightly resized copies of sample images filed under new lesion ids."""
    df = read_manifest(ham_manifest)
    originals = df.drop_duplicates("label").iloc[:2]
    rows = []
    for k, r in enumerate(originals.itertuples()):
        im = Image.open(r.path).convert("RGB").resize((190, 142))
        dest = tmp_path / "copies" / f"copy{k}.jpg"
        dest.parent.mkdir(exist_ok=True)
        im.save(dest, quality=70)
        rows.append({"image_id": f"copy{k}", "group_id": f"NEW_{k}", "label": r.label, "path": str(dest),
                     "source": "test"})
    m = write_manifest(pd.concat([df, pd.DataFrame(rows)], ignore_index=True), tmp_path / "dup" / "manifest.csv")
    return m, originals


def test_close_pairs_counts_bits():
    h = np.zeros((4, 32), np.uint8)  # four 256-bit hashes
    h[1, 0] = 0b0000_0111  # 3 bits from h[0]
    h[2, 31] = 0xFF  # 8 bits from h[0], 11 from h[1]
    h[3] = 0xFF  # 256 bits from h[0]
    assert close_pairs(h, 3, chunk=3).tolist() == [[0, 1]]
    assert close_pairs(h, 8).tolist() == [[0, 1], [0, 2]]
    assert close_pairs(h, 11).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_merge_near_duplicates(ham_manifest, tmp_path, caplog):
    m, originals = with_copies(ham_manifest, tmp_path)
    df = read_manifest(m)
    with caplog.at_level(logging.INFO, logger="dermsynth"):
        merged = merge_near_duplicates(df, max_distance=12)
    assert "2 merge(s) across groups, 44 -> 42 groups" in caplog.text
    g = merged.set_index("image_id")["group_id"]
    for k, orig in enumerate(originals["image_id"]):
        assert g[f"copy{k}"] == g[orig]
    assert merged.set_index("image_id").loc["copy0", "lesion_id_orig"] == "NEW_0"
    untouched = ~merged["image_id"].str.startswith("copy")
    assert (merged.loc[untouched, "group_id"] == df.loc[untouched, "group_id"]).all()  # real lesions stay apart
    assert (merge_near_duplicates(df, max_distance=0)["group_id"] == df["group_id"]).sum() >= len(df) - 2


def test_split_with_merge_keeps_duplicates_together(ham_manifest, tmp_path):
    m, originals = with_copies(ham_manifest, tmp_path)
    path = make_split(m, tmp_path / "s", SplitConfig(merge_near_duplicates=True))  # default threshold
    split = load_split(path)
    assert len(split.info["group_merges"]) == 2
    part_of = {i: p for p, ids in split.parts.items() for i in ids}
    for k, orig in enumerate(originals["image_id"]):
        assert part_of[f"copy{k}"] == part_of[orig]
        assert split.manifest.set_index("image_id").loc[f"copy{k}", "group_id"] == \
            split.manifest.set_index("image_id").loc[orig, "group_id"]
    shutil.rmtree(tmp_path / "copies")  # load_split does not need the images


def test_train_keep_of_thins_train_only(tmp_path):
    counts = {"akiec": 40, "bcc": 40, "bkl": 40, "df": 40, "mel": 60, "nv": 200, "vasc": 40}
    m = synthetic_manifest(tmp_path, counts)
    full = load_split(make_split(m, tmp_path / "full"))
    cfg = SplitConfig(train_keep_of={"df": 0.25, "mel": 0.5})
    scarce = load_split(make_split(m, tmp_path / "scarce", cfg))
    # val and test are those of the full split, image for image, so both studies score the same test images
    assert scarce.parts["val"] == full.parts["val"] and scarce.parts["test"] == full.parts["test"]
    train_full, train = full.part("train"), scarce.part("train")
    assert set(train["image_id"]) < set(train_full["image_id"])
    n_full = train_full.groupby("label")["group_id"].nunique()
    n = train.groupby("label")["group_id"].nunique()
    assert n["df"] == round(n_full["df"] * 0.25) and n["mel"] == round(n_full["mel"] * 0.5)
    for c in ("akiec", "bcc", "bkl", "nv", "vasc"):  # classes not named keep every train image
        assert set(train.query("label == @c")["image_id"]) == set(train_full.query("label == @c")["image_id"])
    # what was left out is recorded, and whole lesions are dropped (no lesion keeps part of its images)
    dropped = set(train_full["group_id"]) - set(train["group_id"])
    assert scarce.info["left_out"]["df"]["lesions"] + scarce.info["left_out"]["mel"]["lesions"] == len(dropped)
    assert not dropped & set(scarce.manifest.loc[scarce.manifest["image_id"].isin(train["image_id"]), "group_id"])
    assert scarce.info["train_keep_of"] == {"df": 0.25, "mel": 0.5}
    assert scarce.fingerprint != full.fingerprint
    # seeded: the same config gives the same split
    assert load_split(make_split(m, tmp_path / "again", cfg)).parts == scarce.parts


@pytest.mark.parametrize("keep, msg", [({"xyz": 0.5}, "unknown class"), ({"df": 0.0}, r"\(0, 1\]")])
def test_train_keep_of_errors(ham_manifest, tmp_path, keep, msg):
    with pytest.raises(DataError, match=msg):
        make_split(ham_manifest, tmp_path / "s", SplitConfig(train_keep_of=keep))
