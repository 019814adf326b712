"""Readers: one function per dataset layout, each returning canonical manifest rows.

Every reader returns a DataFrame with the manifest's required columns (image_id, group_id, label, path, source), any
metadata it found, and a private ``_where`` column ("file, row N") that :func:`dermsynth.data.prepare.prepare` uses to
name the offending row when a later check fails. Readers only look at file names and CSVs; decoding checks happen in
``prepare``. Labels go through :func:`canonical_label`, so an unknown label is always an error naming file and row.
"""
from __future__ import annotations

import filecmp
import os
from pathlib import Path
from typing import Literal

import pandas as pd

from dermsynth.data.labels import CLASSES, canonical_label
from dermsynth.data.manifest import read_csv_checked, resolve_path
from dermsynth.io import DataError
from dermsynth.runlog import get_logger

log = get_logger("data.readers")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OUT_COLUMNS = ("image_id", "group_id", "label", "path", "source")


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------------

def index_images(root: Path, same_stem: Literal["first", "error"] = "first") -> dict[str, Path]:
    """Map file stem -> path for every image anywhere under ``root`` (walked in sorted order).

    ``same_stem`` says what two files with one stem mean. "first" (the dataset readers, whose CSVs name images by
    stem): datasets get copied around with duplicated folders (Kaggle's HAM10000 ships both
    ``HAM10000_images_part_1`` and ``ham10000_images_part_1``), so the first path in sorted order is kept and the
    others are logged as a warning with examples. "error" (a folder tree, where the stem is the image id): two files
    whose contents differ are two photos that would share one id, a DataError naming both; an identical copy counts
    once.
    """
    found: dict[str, Path] = {}
    skipped: list[tuple[Path, Path]] = []  # (kept, skipped)
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop, or two links to one folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS or name.startswith("."):
                continue
            path, first = Path(dirpath) / name, found.get(stem)
            if first is None:
                found[stem] = path
                continue
            if same_stem == "error" and not filecmp.cmp(first, path, shallow=False):
                raise DataError(f"{first} and {path}: two different images with the same file name {stem!r}; the "
                                f"image id is the file name, so one id would stand for two photos. Rename one of them, "
                                f"or list the images in a CSV with an image_id column and read it with --source csv")
            skipped.append((first, path))
    if skipped:
        examples = "; ".join(f"{b} (kept {a})" for a, b in skipped[:3])
        log.warning("%s: %d image file(s) found more than once (duplicated folders?); kept the first copy of each in "
                    "sorted order; skipped e.g. %s", root, len(skipped), examples)
    return found


def read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV (or Dataverse .tab) as strings; a missing column is an error listing what was found."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    sep = "\t" if path.suffix.lower() == ".tab" else ","
    table = read_csv_checked(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(table.columns)}; "
                        f"required {list(required)} (was a column renamed?)")
    return table.apply(lambda s: s.str.strip())


def where_rows(path: Path, n: int) -> list[str]:
    """``"file, row N"`` for data rows 0..n-1 (row numbers count the header as row 1, like a spreadsheet)."""
    return [f"{path}, row {i + 2}" for i in range(n)]


def _require_values(table: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    for col in columns:
        empty = (table[col] == "").to_numpy().nonzero()[0]
        if len(empty):
            raise DataError(f"{path}, row {empty[0] + 2}: empty {col}")


def _locate(table_ids: pd.Series, images: dict[str, Path], wheres: list[str], root: Path) -> list[str]:
    paths = []
    for image_id, where in zip(table_ids, wheres):
        p = images.get(image_id)
        if p is None:
            raise DataError(f"{where}: image file for {image_id!r} not found anywhere under {root} "
                            f"(expected {image_id}.jpg or .png); restore the file or remove the row")
        paths.append(str(p))
    return paths


def _find_file(root: Path, names: tuple[str, ...], what: str, depth: int = 1) -> Path:
    """The first of ``names`` (glob patterns) in ``root`` or its subfolders up to ``depth``; exactly one must match."""
    for level in range(depth + 1):
        prefix = "*/" * level
        hits = sorted({p for n in names for p in root.glob(prefix + n) if p.is_file()})
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DataError(f"{root}: several {what} files found: {[str(h) for h in hits]}; pass the one to use with --csv")
    raise DataError(f"{root}: no {what} file found (looked for {list(names)}); pass it with --csv")


# ----------------------------------------------------------------------------------------------------------------------
# HAM10000 (Harvard Dataverse or Kaggle copy)
# ----------------------------------------------------------------------------------------------------------------------

HAM_METADATA = ("HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata")
HAM_META_COLUMNS = ("age", "sex", "localization", "dx_type", "dataset")


def read_ham10000(root: Path, masks: bool = False) -> pd.DataFrame:
    """HAM10000: ``HAM10000_metadata.csv`` + images anywhere under ``root``; group_id = lesion_id.

    The Kaggle copy lacks the ``dataset`` column and writes ages as ``80.0``; both read to the same manifest. With
    ``masks``, ``mask_path`` points at ``ISIC_x_segmentation.png`` (Tschandl et al. 2020) where it exists.
    """
    meta = _find_file(root, HAM_METADATA, "HAM10000_metadata.csv")
    table = read_table(meta, ("lesion_id", "image_id", "dx"))
    _require_values(table, ("lesion_id", "image_id", "dx"), meta)
    wheres = [f"{w} (image_id {i})" for w, i in zip(where_rows(meta, len(table)), table["image_id"])]
    images = index_images(root)
    df = pd.DataFrame({
        "image_id": table["image_id"],
        "group_id": table["lesion_id"],
        "label": [canonical_label(v, w) for v, w in zip(table["dx"], wheres)],
        "path": _locate(table["image_id"], images, wheres, root),
        "source": "ham10000",
    })
    for col in HAM_META_COLUMNS:
        if col in table.columns:
            df[col] = table[col].to_numpy()
    if "age" in df.columns:
        # "80.0" (Kaggle) and "80" (Dataverse) are the same age; empty or "NaN" is unknown
        df["age"] = pd.to_numeric(df["age"], errors="coerce").round().astype("Int64")
    if masks:
        df["mask_path"] = [str(images[k]) if k in images else "" for k in table["image_id"] + "_segmentation"]
        n_found = int((df["mask_path"] != "").sum())
        if n_found == 0:
            raise DataError(f"{root}: --masks given but no lesion masks found "
                            f"(expected HAM10000_segmentations_lesion_tschandl/ISIC_x_segmentation.png)")
        if n_found < len(df):
            log.warning("%d of %d images have no lesion mask; their mask_path is empty", len(df) - n_found, len(df))
    df["_where"] = wheres
    return df


# ----------------------------------------------------------------------------------------------------------------------
# ISIC 2018 Task 3 and ISIC 2019 (one-hot ground-truth CSVs)
# ----------------------------------------------------------------------------------------------------------------------

ISIC2018_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC2019_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
# Not among the 7 canonical classes: invasive squamous cell carcinoma is not akiec (which holds actinic keratosis and
# intraepithelial carcinoma), and UNK has no diagnosis. These rows are dropped (counted) or refused.
ISIC2019_EXTRA = ("SCC", "UNK")


def one_hot_labels(table: pd.DataFrame, columns: tuple[str, ...], path: Path) -> list[str]:
    """The column name that holds the single 1 of each row; any other row is an error naming file and row."""
    vals = table[list(columns)].apply(pd.to_numeric, errors="coerce")
    ok = vals.isin([0, 1]).all(axis=1) & (vals.sum(axis=1) == 1)
    bad = (~ok).to_numpy().nonzero()[0]
    if len(bad):
        i = int(bad[0])
        got = dict(zip(columns, table[list(columns)].iloc[i].tolist()))
        raise DataError(f"{path}, row {i + 2} (image {table['image'].iloc[i]}): expected exactly one 1 among "
                        f"{list(columns)}, got {got}; {len(bad)} such row(s) in all")
    return [columns[j] for j in vals.to_numpy().argmax(axis=1)]


def read_isic2018(root: Path, csv: Path | None = None) -> pd.DataFrame:
    """ISIC 2018 Task 3 (test or validation): images + one-hot ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``.

    These sets publish no lesion ids, so group_id = image_id (each image its own group).
    """
    gt = Path(csv) if csv else _find_file(root, ("ISIC2018_Task3_*GroundTruth*.csv", "*GroundTruth*.csv"),
                                           "ISIC 2018 Task 3 ground-truth CSV")
    table = read_table(gt, ("image", *ISIC2018_COLUMNS))
    _require_values(table, ("image",), gt)
    if "Training" in gt.name:
        log.warning("%s: the ISIC 2018 training set is HAM10000 without lesion ids; read it with --source ham10000 "
                    "so that images of one lesion stay together", gt.name)
    codes = one_hot_labels(table, ISIC2018_COLUMNS, gt)
    wheres = [f"{w} (image {i})" for w, i in zip(where_rows(gt, len(table)), table["image"])]
    df = pd.DataFrame({
        "image_id": table["image"],
        "group_id": table["image"],
        "label": [canonical_label(c, w) for c, w in zip(codes, wheres)],
        "path": _locate(table["image"], index_images(root), wheres, root),
        "source": "isic2018",
    })
    df["_where"] = wheres
    return df


def ham_ids(ham_root: Path) -> tuple[set[str], set[str]]:
    """(image ids, lesion ids) of HAM10000 from a prepared manifest.csv, a metadata CSV, or a folder holding either."""
    ham_root = Path(ham_root)
    if ham_root.is_dir():
        candidates = [ham_root / "manifest.csv", *(ham_root / n for n in HAM_METADATA)]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            raise DataError(f"--ham-root {ham_root}: holds neither manifest.csv nor HAM10000_metadata.csv")
        ham_root = hit
    if not ham_root.is_file():
        raise DataError(f"--ham-root {ham_root}: not found")
    head = read_table(ham_root, ())
    if {"image_id", "group_id"} <= set(head.columns):
        return set(head["image_id"]), set(head["group_id"])
    if {"image_id", "lesion_id"} <= set(head.columns):
        return set(head["image_id"]), set(head["lesion_id"])
    raise DataError(f"--ham-root {ham_root}: expected columns image_id and group_id (manifest) or lesion_id "
                    f"(HAM10000 metadata); found {list(head.columns)}")


def read_isic2019(root: Path, csv: Path | None = None, ham_root: Path | None = None,
                  extra_classes: str = "drop") -> pd.DataFrame:
    """ISIC 2019 training: one-hot ``image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK`` (AK -> akiec).

    SCC/UNK rows are dropped with a logged count (``extra_classes="error"`` refuses them instead). The optional
    ``ISIC_2019_Training_Metadata.csv`` gives lesion_id (used as group where filled), age, sex and site. With
    ``ham_root``, images (and lesions) that are also in HAM10000 are dropped, so the two never overlap.
    """
    if extra_classes not in ("drop", "error"):
        raise DataError(f"extra_classes must be 'drop' or 'error', got {extra_classes!r}")
    gt = Path(csv) if csv else _find_file(root, ("ISIC_2019_Training_GroundTruth*.csv", "*GroundTruth*.csv"),
                                           "ISIC 2019 ground-truth CSV")
    table = read_table(gt, ("image", *ISIC2019_COLUMNS))
    _require_values(table, ("image",), gt)
    codes = pd.Series(one_hot_labels(table, ISIC2019_COLUMNS, gt), index=table.index)
    wheres = pd.Series([f"{w} (image {i})" for w, i in zip(where_rows(gt, len(table)), table["image"])],
                       index=table.index)
    extra = codes.isin(ISIC2019_EXTRA)
    if extra.any() and extra_classes == "error":
        i = int(extra.to_numpy().nonzero()[0][0])
        raise DataError(f"{wheres.iloc[i]}: class {codes.iloc[i]} is not among the 7 classes {list(CLASSES)}; "
                        f"{int(extra.sum())} such row(s); use extra_classes='drop' to leave them out")
    dropped = {c: int((codes == c).sum()) for c in ISIC2019_EXTRA}
    if extra.any():
        log.info("%s: dropped %d image(s) not among the 7 classes (%s)", gt.name, int(extra.sum()),
                 ", ".join(f"{c} {n}" for c, n in dropped.items()))
    table, codes, wheres = table[~extra], codes[~extra], wheres[~extra]

    groups = table["image"].copy()
    meta_cols: dict[str, pd.Series] = {}
    meta_hits = [p for p in (gt.parent / "ISIC_2019_Training_Metadata.csv", root / "ISIC_2019_Training_Metadata.csv")
                 if p.is_file()]
    if meta_hits:
        meta = read_table(meta_hits[0], ("image",)).drop_duplicates("image").set_index("image")
        if "lesion_id" in meta.columns:
            lesion = table["image"].map(meta["lesion_id"]).fillna("")
            groups = groups.where(lesion == "", lesion)
            log.info("%s: lesion_id known for %d of %d images", meta_hits[0].name, int((lesion != "").sum()), len(table))
        for src, dst in (("age_approx", "age"), ("sex", "sex"), ("anatom_site_general", "localization")):
            if src in meta.columns:
                meta_cols[dst] = table["image"].map(meta[src]).fillna("")
    else:
        log.warning("%s: no ISIC_2019_Training_Metadata.csv beside it; group_id = image id (lesion ids unknown)",
                    gt.name)

    df = pd.DataFrame({
        "image_id": table["image"],
        "group_id": groups,
        "label": [canonical_label(c, w) for c, w in zip(codes, wheres)],
        "source": "isic2019",
    })
    for k, v in meta_cols.items():
        df[k] = v
    if "age" in df.columns:
        df["age"] = pd.to_numeric(df["age"], errors="coerce").round().astype("Int64")
    if ham_root is not None:
        ham_images, ham_lesions = ham_ids(ham_root)
        overlap = df["image_id"].isin(ham_images) | df["group_id"].isin(ham_lesions)
        log.info("dropped %d ISIC 2019 image(s) that are HAM10000 images or lesions (%s)", int(overlap.sum()), ham_root)
        dropped["ham10000"] = int(overlap.sum())
        df, wheres = df[~overlap], wheres[~overlap]
    # locate files last: a HAM-deduplicated ISIC 2019 copy may legitimately lack the HAM images
    df["path"] = _locate(df["image_id"], index_images(root), wheres.tolist(), root)
    df["_where"] = wheres.to_numpy()
    df.attrs["dropped"] = dropped
    return df.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------------
# Generic CSV and class-per-folder tree
# ----------------------------------------------------------------------------------------------------------------------

def read_csv_labels(root: Path, csv: Path | None = None) -> pd.DataFrame:
    """A CSV with ``path,label[,group][,image_id]`` (default ``root/labels.csv``); paths relative to the CSV's folder.

    A relative path that leaves the CSV's folder is refused; backslashes in a relative path (a CSV written on Windows)
    separate folders. Without a group column every image is its own group (then a split cannot keep photos of one
    lesion together: add the column when you know the lesions).
    """
    csv = Path(csv) if csv else root / "labels.csv"
    table = read_table(csv, ("path", "label"))
    _require_values(table, ("path", "label"), csv)
    wheres = where_rows(csv, len(table))
    base = csv.parent
    paths = [str(resolve_path(p, base, w)) for p, w in zip(table["path"], wheres)]
    stems = pd.Series([Path(p.replace("\\", "/")).stem for p in table["path"]])  # imgs\a.jpg (Windows): a
    ids = table["image_id"] if "image_id" in table.columns else stems
    ids = ids.where(ids != "", stems)
    if "group" in table.columns:
        groups = table["group"].where(table["group"] != "", ids)
    else:
        log.warning("%s: no 'group' column; each image is its own group (lesion-level splitting impossible)", csv)
        groups = ids
    df = pd.DataFrame({
        "image_id": ids.to_numpy(),
        "group_id": groups.to_numpy(),
        "label": [canonical_label(v, w) for v, w in zip(table["label"], wheres)],
        "path": paths,
        "source": "csv",
    })
    for col in table.columns:
        if col not in ("path", "label", "group", "image_id", *OUT_COLUMNS):
            df[col] = table[col].to_numpy()
    df["_where"] = wheres
    return df


def read_folder(root: Path) -> pd.DataFrame:
    """A class-per-folder tree ``root/<class>/**/<image>``; folder names go through the alias map.

    The image id is the file name without its extension, so two different images with one name anywhere in the tree
    (``nv/patientA/img_001.jpg`` and ``nv/patientB/img_001.jpg``, or the same name in two class folders) are refused
    with both paths named: rename them, or list the images in a CSV with an ``image_id`` column (``--source csv``).
    An identical copy of a file under its class folder counts once. No lesion ids exist in such a tree, so every image
    is its own group.
    """
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = canonical_label(sub.name, f"class folder {sub}")
        for stem, path in index_images(sub, same_stem="error").items():
            rows.append({"image_id": stem, "group_id": stem, "label": label, "path": str(path), "source": "folder",
                         "_where": str(path)})
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        log.warning("%s: %d image(s) directly in the root belong to no class folder; ignored", root, len(loose))
    if rows:
        log.warning("%s: a folder tree has no lesion ids; each image is its own group", root)
    return pd.DataFrame(rows, columns=[*OUT_COLUMNS, "_where"])
