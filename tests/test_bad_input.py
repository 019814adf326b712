"""Every bad input of the data layer: a clear error naming file and row, CLI exit code 2, and nothing written."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermsynth.cli import main
from dermsynth.data.cache import build_cache
from dermsynth.data.manifest import read_manifest
from test_io import png_header_only
from test_readers import isic2018_layout, one_per_class, sample_image

META = "HAM10000_metadata.csv"


def refused(argv: list[str], out: Path, capsys, *needles: str) -> str:
    """Run the CLI; it must exit 2, print every needle in its one-line error, and leave ``out`` unwritten."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("dermsynth: error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert not out.exists(), f"{out} was written"
    return err


def prepare_argv(source: str, root: Path, out: Path, *extra) -> list[str]:
    return [str(a) for a in ("data", "prepare", "--source", source, "--root", root, "--out", out, *extra)]


def edit_metadata(root: Path, fn) -> pd.DataFrame:
    meta = pd.read_csv(root / META, dtype=str, keep_default_na=False)
    meta = fn(meta)
    meta.to_csv(root / META, index=False)
    return meta


@pytest.fixture
def csv_ds(tmp_path, ham_sample) -> Path:
    """root/imgs/<7 sample images, one per class> + root/labels.csv (path,label,group)."""
    root = tmp_path / "ds"
    (root / "imgs").mkdir(parents=True)
    rows = one_per_class(ham_sample)
    for image_id in rows["image_id"]:
        shutil.copy(sample_image(ham_sample, image_id), root / "imgs" / f"{image_id}.jpg")
    pd.DataFrame({"path": "imgs/" + rows["image_id"] + ".jpg", "label": rows["dx"],
                  "group": rows["lesion_id"]}).to_csv(root / "labels.csv", index=False)
    return root


def edit_labels(root: Path, fn) -> None:
    table = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    fn(table).to_csv(root / "labels.csv", index=False)


# ----------------------------------------------------------------------------------------------------------------------
# CSV structure and labels
# ----------------------------------------------------------------------------------------------------------------------

def test_renamed_column_ham(ham_copy, tmp_path, capsys):
    edit_metadata(ham_copy, lambda m: m.rename(columns={"dx": "diagnosis"}))
    refused(prepare_argv("ham10000", ham_copy, tmp_path / "out"), tmp_path / "out", capsys,
            META, "missing column(s) ['dx']", "diagnosis")


def test_missing_column_csv_and_isic(csv_ds, tmp_path, ham_sample, capsys):
    edit_labels(csv_ds, lambda t: t.drop(columns="label"))
    refused(prepare_argv("csv", csv_ds, tmp_path / "out"), tmp_path / "out", capsys,
            "labels.csv", "missing column(s) ['label']")
    root = isic2018_layout(tmp_path / "isic", ham_sample, one_per_class(ham_sample))
    gt = root / "ISIC2018_Task3_Test_GroundTruth.csv"
    pd.read_csv(gt).drop(columns="VASC").to_csv(gt, index=False)
    refused(prepare_argv("isic2018", root, tmp_path / "out"), tmp_path / "out", capsys,
            "ISIC2018_Task3_Test_GroundTruth.csv", "['VASC']")


def test_missing_column_manifest(ham_manifest, tmp_path, capsys):
    m = tmp_path / "m" / "manifest.csv"
    m.parent.mkdir()
    pd.read_csv(ham_manifest).drop(columns="group_id").to_csv(m, index=False)
    refused(["data", "split", "--manifest", m, "--out", tmp_path / "s"], tmp_path / "s", capsys,
            str(m), "missing column(s) ['group_id']")


def test_unknown_label(ham_copy, csv_ds, tmp_path, capsys):
    meta = edit_metadata(ham_copy, lambda m: m.assign(dx=m["dx"].where(m.index != 9, "scc")))
    refused(prepare_argv("ham10000", ham_copy, tmp_path / "out"), tmp_path / "out", capsys,
            f"{META}, row 11 (image_id {meta['image_id'][9]})", "unknown label 'scc'")
    edit_labels(csv_ds, lambda t: t.assign(label=t["label"].where(t.index != 2, "psoriasis")))
    refused(prepare_argv("csv", csv_ds, tmp_path / "out"), tmp_path / "out", capsys,
            "labels.csv, row 4", "unknown label 'psoriasis'")


def test_empty_manifest_file(tmp_path, capsys):
    m = tmp_path / "m" / "manifest.csv"
    m.parent.mkdir()
    m.write_bytes(b"")  # 0 bytes: not even a header line
    refused(["data", "split", "--manifest", m, "--out", tmp_path / "s"], tmp_path / "s", capsys,
            str(m), "the file is empty")


def test_trailing_delimiter_is_read_and_an_extra_value_refused(csv_ds, ham_manifest, tmp_path, capsys):
    """Excel ends data rows with a delimiter: the columns must stay where the header puts them."""
    def rewrite(src: Path, dst: Path, edit) -> None:
        head, *rows = src.read_text().splitlines()
        dst.write_text("\n".join([head, *(edit(i, r) for i, r in enumerate(rows))]) + "\n")

    labels = csv_ds / "labels.csv"
    want = sorted(pd.read_csv(labels)["label"])
    rewrite(labels, labels, lambda i, r: r + ",")
    assert main(prepare_argv("csv", csv_ds, tmp_path / "out")) == 0
    capsys.readouterr()
    assert sorted(read_manifest(tmp_path / "out" / "manifest.csv")["label"]) == want
    m = tmp_path / "m" / "manifest.csv"
    m.parent.mkdir()
    rewrite(ham_manifest, m, lambda i, r: r + ",")
    assert read_manifest(m)["image_id"].tolist() == read_manifest(ham_manifest)["image_id"].tolist()
    m.write_text("\n" + m.read_text())  # a blank line before the header: the header is still not a data row
    assert read_manifest(m)["image_id"].tolist() == read_manifest(ham_manifest)["image_id"].tolist()
    # a value beyond the header's columns (an unquoted comma in a path, say) is refused, not dropped
    rewrite(labels, labels, lambda i, r: r + "oops" if i == 2 else r)
    refused(prepare_argv("csv", csv_ds, tmp_path / "out2"), tmp_path / "out2", capsys,
            "labels.csv, row 4", "more values than the header")
    rewrite(ham_manifest, m, lambda i, r: r + ",oops" if i == 2 else r)
    refused(["data", "split", "--manifest", m, "--out", tmp_path / "s"], tmp_path / "s", capsys,
            f"{m}, row 4", "more values than the header")


def test_isic_row_not_one_hot(tmp_path, ham_sample, capsys):
    root = isic2018_layout(tmp_path / "isic", ham_sample, one_per_class(ham_sample))
    gt = root / "ISIC2018_Task3_Test_GroundTruth.csv"
    t = pd.read_csv(gt)
    t.loc[1, "NV"] = 1.0 - t.loc[1, "NV"]  # row 3 now has two ones or none
    t.to_csv(gt, index=False)
    refused(prepare_argv("isic2018", root, tmp_path / "out"), tmp_path / "out", capsys,
            "ISIC2018_Task3_Test_GroundTruth.csv, row 3", "exactly one 1")


# ----------------------------------------------------------------------------------------------------------------------
# Image files
# ----------------------------------------------------------------------------------------------------------------------

def test_missing_image_file(ham_copy, csv_ds, tmp_path, capsys):
    meta = pd.read_csv(ham_copy / META)
    victim = meta["image_id"][20]
    next(ham_copy.glob(f"HAM10000_images_part_*/{victim}.jpg")).unlink()
    refused(prepare_argv("ham10000", ham_copy, tmp_path / "out"), tmp_path / "out", capsys,
            f"{META}, row 22", f"image file for '{victim}' not found")
    edit_labels(csv_ds, lambda t: t.assign(path=t["path"].where(t.index != 1, "imgs/gone.jpg")))
    refused(prepare_argv("csv", csv_ds, tmp_path / "out"), tmp_path / "out", capsys,
            "labels.csv, row 3", "image file not found", "gone.jpg")


def test_corrupt_jpeg(ham_copy, tmp_path, capsys):
    victim = pd.read_csv(ham_copy / META)["image_id"][5]
    path = next(ham_copy.glob(f"HAM10000_images_part_*/{victim}.jpg"))
    path.write_bytes(b"<html>404 not found</html>")
    refused(prepare_argv("ham10000", ham_copy, tmp_path / "out"), tmp_path / "out", capsys,
            f"{META}, row 7", "not a readable image", str(path))


def test_truncated_jpeg(csv_ds, tmp_path, capsys):
    path = csv_ds / pd.read_csv(csv_ds / "labels.csv")["path"][3]  # data row 5 of the CSV
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    refused(prepare_argv("csv", csv_ds, tmp_path / "out"), tmp_path / "out", capsys,
            "labels.csv, row 5", "truncated", path.name)


def test_decompression_bomb(csv_ds, tmp_path, capsys):
    png_header_only(csv_ds / "imgs" / "bomb.png", 30000, 30000)
    edit_labels(csv_ds, lambda t: t.assign(path=t["path"].where(t.index != 0, "imgs/bomb.png")))
    refused(prepare_argv("csv", csv_ds, tmp_path / "out"), tmp_path / "out", capsys,
            "labels.csv, row 2", "too large", "bomb.png")


def test_grayscale_rgba_palette_16bit_are_converted(tmp_path, capsys):
    """Not refused: converted to RGB with the values one would expect."""
    root = tmp_path / "tree" / "nv"
    root.mkdir(parents=True)
    Image.fromarray(np.full((48, 64), 100, np.uint8), "L").save(root / "gray.png")
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent -> white background
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    pal = Image.new("P", (64, 48), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.save(root / "palette.png")
    Image.fromarray(np.full((48, 64), 32768, np.uint16)).save(root / "deep16.png")
    assert main(prepare_argv("folder", tmp_path / "tree", tmp_path / "out")) == 0
    df = read_manifest(tmp_path / "out" / "manifest.csv").set_index("image_id")
    cache = build_cache(df.reset_index(), 16, tmp_path / "cache", progress=False)
    expect = {"gray": (100, 100, 100), "rgba": (255, 255, 255), "palette": (10, 20, 30), "deep16": (128, 128, 128)}
    for image_id, rgb in expect.items():
        px = cache.take([image_id])[0]
        assert (px == rgb).all(), (image_id, px[0, 0])


# ----------------------------------------------------------------------------------------------------------------------
# Dataset-level problems
# ----------------------------------------------------------------------------------------------------------------------

def test_duplicate_image_ids(ham_copy, csv_ds, tmp_path, capsys):
    edit_metadata(ham_copy, lambda m: pd.concat([m, m.iloc[[4]]], ignore_index=True))
    refused(prepare_argv("ham10000", ham_copy, tmp_path / "out"), tmp_path / "out", capsys,
            "duplicate image_id", f"{META}, row 6", f"{META}, row 59")
    # one file name in two folders: same id from the file stem
    first = csv_ds / pd.read_csv(csv_ds / "labels.csv")["path"][0]  # data row 2
    (csv_ds / "more").mkdir()
    shutil.copy(first, csv_ds / "more" / first.name)
    edit_labels(csv_ds, lambda t: pd.concat([t, t.iloc[[0]].assign(path=f"more/{first.name}", group="X")],
                                            ignore_index=True))
    refused(prepare_argv("csv", csv_ds, tmp_path / "out"), tmp_path / "out", capsys,
            f"duplicate image_id '{first.stem}'", "labels.csv, row 2", "labels.csv, row 9")


def test_empty_dataset(ham_copy, csv_ds, tmp_path, capsys):
    edit_metadata(ham_copy, lambda m: m.iloc[:0])
    refused(prepare_argv("ham10000", ham_copy, tmp_path / "out"), tmp_path / "out", capsys, "no images found")
    edit_labels(csv_ds, lambda t: t.iloc[:0])
    refused(prepare_argv("csv", csv_ds, tmp_path / "out"), tmp_path / "out", capsys, "no images found")
    (tmp_path / "tree" / "mel").mkdir(parents=True)
    refused(prepare_argv("folder", tmp_path / "tree", tmp_path / "out"), tmp_path / "out", capsys, "no images found")
    m = tmp_path / "m" / "manifest.csv"
    m.parent.mkdir()
    m.write_text("image_id,group_id,label,path,source\n")
    refused(["data", "split", "--manifest", m, "--out", tmp_path / "s"], tmp_path / "s", capsys,
            str(m), "empty")


def test_class_with_fewer_lesions_than_parts(ham_manifest, tmp_path, capsys):
    df = pd.read_csv(ham_manifest)
    df_lesions = df.loc[df["label"] == "df", "group_id"].unique()
    keep = (df["label"] != "df") | df["group_id"].isin(df_lesions[:2])
    m = tmp_path / "m" / "manifest.csv"
    m.parent.mkdir()
    df[keep].assign(path=read_manifest(ham_manifest)["path"][keep]).to_csv(m, index=False)
    refused(["data", "split", "--manifest", m, "--out", tmp_path / "s"], tmp_path / "s", capsys,
            str(m), "df has 2 lesion(s)", "3 parts")
    refused(["data", "split", "--manifest", m, "--out", tmp_path / "k", "--set", "mode=kfold", "--set", "k=5"],
            tmp_path / "k", capsys, "df has 2 lesion(s)")


def test_path_escaping_its_root(ham_manifest, csv_ds, tmp_path, capsys):
    m = tmp_path / "m" / "manifest.csv"
    m.parent.mkdir()
    df = read_manifest(ham_manifest)
    df.loc[3, "path"] = "../../etc/passwd"
    df.to_csv(m, index=False)
    refused(["data", "split", "--manifest", m, "--out", tmp_path / "s"], tmp_path / "s", capsys,
            f"{m}, row 5", "'../../etc/passwd' escapes")
    refused(["data", "show", "--manifest", m, "--out", tmp_path / "show"], tmp_path / "show", capsys, "escapes")
    edit_labels(csv_ds, lambda t: t.assign(path=t["path"].where(t.index != 4, "../../etc/passwd")))
    refused(prepare_argv("csv", csv_ds, tmp_path / "out"), tmp_path / "out", capsys,
            "labels.csv, row 6", "escapes")
