"""The canonical manifest: one row per image, the single format every reader produces and every stage reads.

Required columns: image_id, group_id (lesion id), label (canonical code), path, source. Any other column
(age, sex, localization, dx_type, mask_path; for synthetic images seed, generator, checkpoint_hash, ...) is kept.
Relative paths are relative to the folder holding manifest.csv and may not escape it; in a relative path a backslash
(a CSV written on Windows) separates folders like a slash.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from dermsynth.data.labels import CLASSES, canonical_label
from dermsynth.io import DataError, atomic_write_csv

REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "group_id", "label", "path", "source")
_SPARE = "\0spare"  # the name of read_csv_checked's extra column; no header can hold it


def read_csv_checked(path: Path, **kwargs: Any) -> pd.DataFrame:
    """``pd.read_csv`` (``kwargs`` passed on) that accepts a trailing delimiter on data rows and refuses a row with more
    values than the header; an empty or unreadable file is a DataError naming it.

    Why: pandas reads rows with one value more than the header (``a.jpg,nv,`` as Excel writes them) as "the first
    column is an index" and shifts every column one left, so every later check complains about the wrong column.
    """
    try:
        columns = list(pd.read_csv(path, nrows=0, **kwargs).columns)
        # the header's line: pandas skips blank lines before it, and so must the data read below
        with open(path, encoding=kwargs.get("encoding") or "utf-8", errors="replace") as f:
            header = next((i for i, line in enumerate(f) if line.strip()), 0)
        # one spare column takes the value after a trailing delimiter (pandas sizes rows by the header line, so it is
        # skipped and named here); index_col=False keeps the columns in place
        table = pd.read_csv(path, header=None, skiprows=header + 1, names=[*columns, _SPARE], index_col=False,
                            **kwargs)
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: the file is empty (not even a header line)") from e
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV: {e}") from e
    spare = table.pop(_SPARE)
    extra = (spare.notna() & (spare.astype(str).str.strip() != "")).to_numpy().nonzero()[0]
    if len(extra):
        raise DataError(f"{path}, row {extra[0] + header + 2}: more values than the header has columns {columns}; quote a value "
                        f"that contains the delimiter, or remove the extra value")
    return table


def validate_manifest(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check columns, ids, labels; return a copy with canonical labels. ``where`` names the file in errors."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; found {list(df.columns)}; required {list(REQUIRED_COLUMNS)}")
    if len(df) == 0:
        raise DataError(f"{where}: the manifest is empty (no images)")
    df = df.copy()
    for col in ("image_id", "group_id", "path", "source"):
        bad = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{where}, row {row + 2}: empty {col}")  # +2: header line and 1-based rows
        df[col] = df[col].astype(str)
    df["label"] = [canonical_label(v, f"{where}, row {i + 2}") for i, v in enumerate(df["label"])]
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        rows = (dup.to_numpy().nonzero()[0][:4] + 2).tolist()
        ids = df.loc[dup, "image_id"].unique()[:4].tolist()
        raise DataError(f"{where}: duplicate image_id {ids} at rows {rows}; each image must appear once")
    return df


def resolve_path(raw: str, root: Path, where: str) -> Path:
    """Resolve a manifest path against ``root``; a relative path that escapes ``root`` is refused."""
    return Path(_resolve_under(str(raw), str(root.resolve()), where))


def _resolve_under(raw: str, root_r: str, where: str) -> str:
    """``resolve_path`` on strings with ``root`` already resolved (read_manifest resolves it once, not per row)."""
    if os.path.isabs(raw):
        return raw
    posix = raw.replace("\\", "/")  # a CSV written on Windows: imgs\a.jpg is imgs/a.jpg
    if ".." not in posix.split("/"):
        # cannot leave root by its text; a plain join keeps 10k-row manifests fast (no lstat per path component)
        return os.path.join(root_r, posix)
    full = os.path.realpath(os.path.join(root_r, posix))
    if full != root_r and not full.startswith(root_r.rstrip(os.sep) + os.sep):
        raise DataError(f"{where}: path {raw!r} escapes the manifest folder {root_r}; refusing to read it")
    return full


def read_manifest(path: str | Path, check_files: bool = False) -> pd.DataFrame:
    """Read and validate a manifest.csv; ``path`` column comes back absolute."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    # ids and hashes stay text: a hex hash of digits only (or "123e45...") would otherwise come back a number
    text = ("image_id", "group_id", "path", "source", "label", "checkpoint_hash", "init_image_id")
    df = read_csv_checked(path, dtype=dict.fromkeys(text, str), keep_default_na=False, na_values=[""])
    df = validate_manifest(df, str(path))
    root = str(path.parent.resolve())
    df["path"] = [_resolve_under(p, root, f"{path}, row {i + 2}") for i, p in enumerate(df["path"])]
    if check_files:
        for i, p in enumerate(df["path"]):
            if not os.path.isfile(p):
                raise DataError(f"{path}, row {i + 2}: image file not found: {p}")
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Validate and write atomically; paths under the manifest's folder are stored relative to it."""
    path = Path(path)
    df = validate_manifest(df, str(path))
    # lexical (abspath) rather than resolve(): no lstat per path component, which made 10k-row writes slow; the
    # folder is matched both as spelled and as resolved, so a symlinked output folder still gets relative paths
    roots = {os.path.abspath(path.parent) + os.sep, str(path.parent.resolve()) + os.sep}
    rel = []
    for p in df["path"]:
        ap = os.path.abspath(p if os.path.isabs(p) else os.path.join(path.parent, p))
        rel.append(next((ap[len(r):] for r in roots if ap.startswith(r)), ap))
    df = df.assign(path=rel)
    front = list(REQUIRED_COLUMNS)
    df = df[front + [c for c in df.columns if c not in front]]
    return atomic_write_csv(path, df)


def class_counts(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images and lesions per class, in canonical class order (classes absent from ``df`` get 0)."""
    out = {}
    for c in CLASSES:
        sub = df[df["label"] == c]
        out[c] = {"images": int(len(sub)), "lesions": int(sub["group_id"].nunique())}
    return out
