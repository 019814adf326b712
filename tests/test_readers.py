"""Readers -> canonical manifest: HAM10000 (Dataverse and Kaggle copies, masks), ISIC 2018/2019, CSV, folder tree."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dermsynth.data.labels import CLASSES, canonical_label, parse_classes
from dermsynth.data.manifest import read_manifest
from dermsynth.data.prepare import prepare
from dermsynth.io import DataError

SAMPLE_COUNTS = {"akiec": 8, "bcc": 8, "bkl": 8, "df": 8, "mel": 8, "nv": 9, "vasc": 8}


def metadata(ham_sample: Path) -> pd.DataFrame:
    return pd.read_csv(ham_sample / "HAM10000_metadata.csv", dtype=str)


def sample_image(ham_sample: Path, image_id: str) -> Path:
    return next(ham_sample.glob(f"HAM10000_images_part_*/{image_id}.jpg"))


def one_per_class(ham_sample: Path) -> pd.DataFrame:
    return metadata(ham_sample).drop_duplicates("dx").sort_values("dx").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------------
# HAM10000
# ----------------------------------------------------------------------------------------------------------------------

def test_ham10000_dataverse_layout(ham_manifest, ham_sample):
    df = read_manifest(ham_manifest)
    meta = metadata(ham_sample).set_index("image_id")
    assert len(df) == 57 and df["group_id"].nunique() == 42
    assert df["label"].value_counts().to_dict() == SAMPLE_COUNTS
    assert (df["group_id"] == meta.loc[df["image_id"], "lesion_id"].to_numpy()).all()
    assert (df["label"] == meta.loc[df["image_id"], "dx"].to_numpy()).all()
    assert set(df["source"]) == {"ham10000"}
    assert {"age", "sex", "localization", "dx_type", "dataset"} <= set(df.columns)
    assert all(Path(p).is_file() and Path(p).stem == i for p, i in zip(df["path"], df["image_id"]))
    assert (df["width"] == 200).all() and (df["height"] == 150).all()  # 1/3 scale, not assumed 600x450
    assert df["image_id"].is_monotonic_increasing
    info = json.loads((ham_manifest.parent / "prepare.json").read_text())
    assert info["images"] == 57 and info["lesions"] == 42
    assert {c: v["images"] for c, v in info["counts"].items()} == SAMPLE_COUNTS


def test_ham10000_kaggle_variant_reads_the_same(tmp_path, ham_sample, ham_manifest, caplog):
    root = tmp_path / "kaggle"
    meta = metadata(ham_sample).drop(columns="dataset")
    meta["age"] = meta["age"].map(lambda a: f"{float(a):.1f}" if a else a)  # Kaggle writes 80.0
    root.mkdir()
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    # Kaggle ships every image twice: upper- and lower-case folder names
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        shutil.copytree(ham_sample / part, root / part)
        shutil.copytree(ham_sample / part, root / part.lower())
    with caplog.at_level(logging.WARNING, logger="dermsynth"):
        kaggle = read_manifest(prepare("ham10000", root, tmp_path / "out"))
    dup = [r.getMessage() for r in caplog.records if "found more than once" in r.getMessage()]
    assert len(dup) == 1 and "57 image file(s)" in dup[0] and "ham10000_images_part_1/" in dup[0]
    dataverse = read_manifest(ham_manifest)
    assert "dataset" not in kaggle.columns
    cols = ["image_id", "group_id", "label", "source", "age", "sex", "localization", "dx_type"]
    pd.testing.assert_frame_equal(kaggle[cols], dataverse[cols])
    assert pd.api.types.is_numeric_dtype(kaggle["age"]) and kaggle["age"].max() <= 90


def test_ham10000_images_anywhere_under_root(tmp_path, ham_sample):
    root = tmp_path / "ham"
    root.mkdir()
    shutil.copy(ham_sample / "HAM10000_metadata.csv", root / "HAM10000_metadata.csv")
    for i, img in enumerate(sorted(ham_sample.glob("HAM10000_images_part_*/*.jpg"))):
        dest = root / "downloads" / f"batch{i % 3}" / "deeper" / img.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(img, dest)
    df = read_manifest(prepare("ham10000", root, tmp_path / "out"))
    assert len(df) == 57 and all(Path(p).is_file() for p in df["path"])


def test_ham10000_masks(tmp_path, ham_sample, ham_copy):
    df = read_manifest(prepare("ham10000", ham_sample, tmp_path / "out", masks=True))
    assert all(Path(m).name == f"{i}_segmentation.png" and Path(m).is_file()
               for m, i in zip(df["mask_path"], df["image_id"]))
    shutil.rmtree(ham_copy / "HAM10000_segmentations_lesion_tschandl")
    with pytest.raises(DataError, match="no lesion masks found"):
        prepare("ham10000", ham_copy, tmp_path / "out2", masks=True)
    assert not (tmp_path / "out2").exists()


def test_relative_root_and_out(tmp_path, ham_sample, monkeypatch):
    """Paths given relative to the working directory still resolve to the images, wherever the manifest goes."""
    shutil.copytree(ham_sample, tmp_path / "data" / "ham")
    monkeypatch.chdir(tmp_path)
    m = prepare("ham10000", Path("data/ham"), Path("runs/x/data"))
    monkeypatch.chdir(ham_sample)  # read from elsewhere
    df = read_manifest(tmp_path / m)
    assert all(Path(p).is_file() for p in df["path"])
    assert pd.read_csv(tmp_path / m)["path"][0].startswith(str(tmp_path / "data" / "ham"))


def test_option_that_does_not_apply_is_refused(tmp_path, ham_sample):
    with pytest.raises(DataError, match=r"\['masks'\] do not apply to source 'isic2018'"):
        prepare("isic2018", ham_sample, tmp_path / "out", masks=True)
    with pytest.raises(DataError, match="unknown source 'ham'"):
        prepare("ham", ham_sample, tmp_path / "out")
    with pytest.raises(DataError, match="dataset folder not found"):
        prepare("ham10000", tmp_path / "nowhere", tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------------
# ISIC 2018 Task 3 and ISIC 2019
# ----------------------------------------------------------------------------------------------------------------------

def isic2018_layout(root: Path, ham_sample: Path, rows: pd.DataFrame) -> Path:
    images = root / "ISIC2018_Task3_Test_Images"
    images.mkdir(parents=True)
    gt = pd.DataFrame({"image": rows["image_id"]})
    for col in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"):
        gt[col] = (rows["dx"].str.upper() == col).astype(float).to_numpy()
    for image_id in rows["image_id"]:
        shutil.copy(sample_image(ham_sample, image_id), images / f"{image_id}.jpg")
    gt.to_csv(root / "ISIC2018_Task3_Test_GroundTruth.csv", index=False)
    return root


def test_isic2018(tmp_path, ham_sample):
    rows = one_per_class(ham_sample)
    root = isic2018_layout(tmp_path / "isic2018", ham_sample, rows)
    df = read_manifest(prepare("isic2018", root, tmp_path / "out"))
    expected = dict(zip(rows["image_id"], rows["dx"]))
    assert dict(zip(df["image_id"], df["label"])) == expected
    assert (df["group_id"] == df["image_id"]).all()  # no lesion ids published
    assert set(df["source"]) == {"isic2018"}


@pytest.mark.parametrize("values", [(1.0, 1.0), (0.0, 0.0), (0.5, 0.5), ("x", 1.0)])
def test_isic2018_row_not_one_hot(tmp_path, ham_sample, values):
    root = isic2018_layout(tmp_path / "isic2018", ham_sample, one_per_class(ham_sample))
    gt_path = root / "ISIC2018_Task3_Test_GroundTruth.csv"
    gt = pd.read_csv(gt_path, dtype=str)
    gt.loc[3, ["MEL", "NV"]] = [str(v) for v in values]
    gt.loc[3, ["BCC", "AKIEC", "BKL", "DF", "VASC"]] = "0.0"
    gt.to_csv(gt_path, index=False)
    with pytest.raises(DataError, match=r"ISIC2018_Task3_Test_GroundTruth.csv, row 5 .*exactly one 1"):
        prepare("isic2018", root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def isic2019_layout(root: Path, ham_sample: Path, with_metadata: bool = True) -> Path:
    """Seven HAM images (one per class), two non-HAM ones (an SCC and an UNK), and two new MEL images of one lesion."""
    images = root / "ISIC_2019_Training_Input"
    images.mkdir(parents=True)
    rows = one_per_class(ham_sample)
    code = {"akiec": "AK", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL", "nv": "NV", "vasc": "VASC"}
    entries = [(i, code[dx], lesion) for i, dx, lesion in zip(rows["image_id"], rows["dx"], rows["lesion_id"])]
    entries += [("ISIC_9000001", "SCC", "BCN_1"), ("ISIC_9000002_downsampled", "UNK", ""),
                ("ISIC_9000003", "MEL", "BCN_7"), ("ISIC_9000004", "MEL", "BCN_7")]
    src = sample_image(ham_sample, rows["image_id"][0])
    for image_id, _, _ in entries:
        shutil.copy(sample_image(ham_sample, image_id) if image_id.startswith("ISIC_002") or
                    image_id.startswith("ISIC_003") else src, images / f"{image_id}.jpg")
    cols = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
    gt = pd.DataFrame([{"image": i, **{c: float(c == k) for c in cols}} for i, k, _ in entries])
    gt.to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    if with_metadata:
        pd.DataFrame([{"image": i, "age_approx": "55.0", "anatom_site_general": "anterior torso", "lesion_id": lesion,
                       "sex": "female"} for i, _, lesion in entries]).to_csv(
            root / "ISIC_2019_Training_Metadata.csv", index=False)
    return root


def test_isic2019_maps_ak_drops_scc_unk_and_uses_lesion_ids(tmp_path, ham_sample, caplog):
    root = isic2019_layout(tmp_path / "isic2019", ham_sample)
    with caplog.at_level(logging.INFO, logger="dermsynth"):
        df = read_manifest(prepare("isic2019", root, tmp_path / "out"))
    assert len(df) == 9  # 11 rows - SCC - UNK
    assert not df["image_id"].isin(["ISIC_9000001", "ISIC_9000002_downsampled"]).any()
    assert "dropped 2 image(s) not among the 7 classes (SCC 1, UNK 1)" in caplog.text
    ak = one_per_class(ham_sample).query("dx == 'akiec'")["image_id"].item()
    assert df.set_index("image_id").loc[ak, "label"] == "akiec"
    assert set(df["label"]) == set(CLASSES)
    bcn = df[df["image_id"].isin(["ISIC_9000003", "ISIC_9000004"])]
    assert set(bcn["group_id"]) == {"BCN_7"}  # lesion_id from the metadata file groups them
    assert (df["age"] == 55).all() and set(df["localization"]) == {"anterior torso"}
    info = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert info["dropped"] == {"SCC": 1, "UNK": 1}
    with pytest.raises(DataError, match=r"ISIC_2019_Training_GroundTruth.csv, row 9 \(image ISIC_9000001\): class SCC"):
        prepare("isic2019", root, tmp_path / "out2", extra_classes="error")


def test_isic2019_without_metadata_groups_by_image(tmp_path, ham_sample):
    root = isic2019_layout(tmp_path / "isic2019", ham_sample, with_metadata=False)
    df = read_manifest(prepare("isic2019", root, tmp_path / "out"))
    assert (df["group_id"] == df["image_id"]).all()


@pytest.mark.parametrize("use_folder", [False, True])
def test_isic2019_deduplicates_against_ham10000(tmp_path, ham_sample, ham_manifest, use_folder):
    root = isic2019_layout(tmp_path / "isic2019", ham_sample)
    df = read_manifest(prepare("isic2019", root, tmp_path / "out", ham_root=ham_sample if use_folder else ham_manifest))
    assert sorted(df["image_id"]) == ["ISIC_9000003", "ISIC_9000004"]
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["dropped"]["ham10000"] == 7
    # a copy that already lacks the HAM images is fine: only the kept rows need files
    for image_id in one_per_class(ham_sample)["image_id"]:
        (root / "ISIC_2019_Training_Input" / f"{image_id}.jpg").unlink()
    assert len(read_manifest(prepare("isic2019", root, tmp_path / "out3", ham_root=ham_manifest))) == 2


# ----------------------------------------------------------------------------------------------------------------------
# Generic CSV, folder tree, aliases
# ----------------------------------------------------------------------------------------------------------------------

def test_generic_csv_with_aliases_groups_and_extra_columns(tmp_path, ham_sample):
    rows = one_per_class(ham_sample)
    (tmp_path / "ds" / "imgs").mkdir(parents=True)
    raw = {"akiec": "AK", "bcc": "Basal cell carcinoma", "bkl": "BKL", "df": "dermatofibroma", "mel": "Melanoma",
           "nv": "nevus", "vasc": "Vascular lesion"}
    table = []
    for image_id, dx, lesion in zip(rows["image_id"], rows["dx"], rows["lesion_id"]):
        shutil.copy(sample_image(ham_sample, image_id), tmp_path / "ds" / "imgs" / f"{image_id}.jpg")
        table.append({"path": f"imgs/{image_id}.jpg", "label": raw[dx], "group": lesion, "site": "back"})
    pd.DataFrame(table).to_csv(tmp_path / "ds" / "labels.csv", index=False)
    df = read_manifest(prepare("csv", tmp_path / "ds", tmp_path / "out"))
    assert dict(zip(df["image_id"], df["label"])) == dict(zip(rows["image_id"], rows["dx"]))
    assert dict(zip(df["image_id"], df["group_id"])) == dict(zip(rows["image_id"], rows["lesion_id"]))
    assert set(df["site"]) == {"back"} and set(df["source"]) == {"csv"}

    # the CSV may live elsewhere: paths are relative to its own folder; without groups each image is one
    other = tmp_path / "elsewhere"
    other.mkdir()
    pd.DataFrame(table).drop(columns="group").assign(path=lambda t: "../ds/" + t["path"]).to_csv(
        other / "list.csv", index=False)
    with pytest.raises(DataError, match="escapes"):  # ../ds leaves the CSV's folder
        prepare("csv", tmp_path / "ds", tmp_path / "out2", csv=other / "list.csv")
    pd.DataFrame(table).drop(columns="group").to_csv(tmp_path / "ds" / "nogroup.csv", index=False)
    df2 = read_manifest(prepare("csv", tmp_path / "ds", tmp_path / "out3", csv=tmp_path / "ds" / "nogroup.csv"))
    assert (df2["group_id"] == df2["image_id"]).all()


def test_generic_csv_written_on_windows(tmp_path, ham_sample):
    """Backslash-separated relative paths resolve, and the image id is the file's stem, not "imgs\\ISIC_x"."""
    rows = one_per_class(ham_sample)
    (tmp_path / "ds" / "imgs").mkdir(parents=True)
    for image_id in rows["image_id"]:
        shutil.copy(sample_image(ham_sample, image_id), tmp_path / "ds" / "imgs" / f"{image_id}.jpg")
    pd.DataFrame({"path": "imgs\\" + rows["image_id"] + ".jpg", "label": rows["dx"]}).to_csv(
        tmp_path / "ds" / "labels.csv", index=False)
    df = read_manifest(prepare("csv", tmp_path / "ds", tmp_path / "out"), check_files=True)
    assert dict(zip(df["image_id"], df["label"])) == dict(zip(rows["image_id"], rows["dx"]))


def test_folder_tree_with_alias_names(tmp_path, ham_sample):
    rows = one_per_class(ham_sample)
    names = {"akiec": "actinic_keratosis", "bcc": "BCC", "bkl": "benign_keratosis", "df": "df", "mel": "melanoma",
             "nv": "melanocytic_nevi", "vasc": "vascular_lesion"}
    for image_id, dx in zip(rows["image_id"], rows["dx"]):
        dest = tmp_path / "tree" / names[dx] / "sub" / f"{image_id}.jpg"
        dest.parent.mkdir(parents=True)
        shutil.copy(sample_image(ham_sample, image_id), dest)
    (tmp_path / "tree" / "README.txt").write_text("not an image")
    df = read_manifest(prepare("folder", tmp_path / "tree", tmp_path / "out"))
    assert dict(zip(df["image_id"], df["label"])) == dict(zip(rows["image_id"], rows["dx"]))
    assert (df["group_id"] == df["image_id"]).all()

    (tmp_path / "tree" / "train").mkdir()
    with pytest.raises(DataError, match=r"unknown label 'train' at class folder .*tree/train"):
        prepare("folder", tmp_path / "tree", tmp_path / "out2")


def test_folder_tree_refuses_two_images_with_one_name(tmp_path, ham_sample):
    """Two patients' img_001.jpg are two photos: refused with both paths named, never one of them dropped."""
    a, b = one_per_class(ham_sample)["image_id"][:2]
    for patient, src in (("patientA", a), ("patientB", b)):
        (tmp_path / "tree" / "nv" / patient).mkdir(parents=True)
        shutil.copy(sample_image(ham_sample, src), tmp_path / "tree" / "nv" / patient / "img_001.jpg")
    with pytest.raises(DataError, match=r"patientA/img_001.jpg and .*patientB/img_001.jpg: two different images with "
                                        r"the same file name 'img_001'.*Rename one"):
        prepare("folder", tmp_path / "tree", tmp_path / "out")
    # an identical copy is one image
    shutil.copy(tmp_path / "tree" / "nv" / "patientA" / "img_001.jpg", tmp_path / "tree" / "nv" / "patientB")
    df = read_manifest(prepare("folder", tmp_path / "tree", tmp_path / "out"))
    assert df["image_id"].tolist() == ["img_001"] and "patientA" in df["path"].item()
    # one name in two class folders
    (tmp_path / "tree" / "mel").mkdir()
    shutil.copy(sample_image(ham_sample, b), tmp_path / "tree" / "mel" / "img_001.jpg")
    with pytest.raises(DataError, match=r"duplicate image_id 'img_001' at .*mel/img_001.jpg and .*nv/patientA"):
        prepare("folder", tmp_path / "tree", tmp_path / "out2")


def test_aliases():
    assert canonical_label(" AK ") == "akiec" and canonical_label("Melanoma") == "mel"
    assert canonical_label("AKIEC") == "akiec" and canonical_label("VASC") == "vasc"
    assert parse_classes("df, vascular lesion,mel,df") == ["df", "vasc", "mel"]
    with pytest.raises(DataError, match=r"unknown label 'scc' at x.csv, row 3"):
        canonical_label("scc", "x.csv, row 3")
