"""``dermsynth data prepare``: read a dataset in its own layout and write the canonical ``manifest.csv``.

One reader per layout (see :mod:`dermsynth.data.readers`), chosen from a plain dict. Before anything is written every
image is probed: it must exist, be a readable image of sane size, and end where its format says it ends (a cheap
tail check; a file failing it is fully decoded, which is the judge). On any bad input nothing is written.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from dermsynth.data import readers
from dermsynth.data.manifest import class_counts, write_manifest
from dermsynth.io import MAX_IMAGE_PIXELS, DataError, atomic_write_json, load_image
from dermsynth.paths import DatasetPaths
from dermsynth.runlog import get_logger

log = get_logger("data.prepare")

# source -> (reader, the prepare() options it accepts). An option given to a reader that ignores it is an error,
# so that e.g. --masks on ISIC data does not silently do nothing.
READERS: dict[str, tuple[Callable[..., pd.DataFrame], frozenset[str]]] = {
    "ham10000": (readers.read_ham10000, frozenset({"masks"})),
    "isic2018": (readers.read_isic2018, frozenset({"csv"})),
    "isic2019": (readers.read_isic2019, frozenset({"csv", "ham_root", "extra_classes"})),
    "csv": (readers.read_csv_labels, frozenset({"csv"})),
    "folder": (readers.read_folder, frozenset()),
}


def prepare(source: str, root: str | Path, out: str | Path, csv: str | Path | None = None,
            ham_root: str | Path | None = None, masks: bool = False, *, check_images: bool = False,
            extra_classes: str = "drop") -> Path:
    """Read ``root`` as ``source`` and write ``out/manifest.csv`` (+ ``out/prepare.json``); returns the manifest path.

    ``check_images`` fully decodes every image (slow) instead of the header + tail probe. ``extra_classes``
    (isic2019 only): "drop" leaves SCC/UNK out with a logged count, "error" refuses them.
    """
    t0 = time.perf_counter()
    # absolute from here on: readers' paths must not depend on the working directory (a relative image path in
    # the manifest would be read relative to the manifest's folder)
    root, out = Path(os.path.abspath(root)), Path(out)
    if source not in READERS:
        raise DataError(f"unknown source {source!r}; choose one of {sorted(READERS)}")
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    reader, accepted = READERS[source]
    given = {k: v for k, v in {"csv": csv, "ham_root": ham_root, "masks": masks,
                               "extra_classes": None if extra_classes == "drop" else extra_classes}.items() if v}
    unused = sorted(set(given) - accepted)
    if unused:
        raise DataError(f"option(s) {unused} do not apply to source {source!r} (it accepts {sorted(accepted)})")
    given = {k: Path(os.path.abspath(v)) if k in ("csv", "ham_root") else v for k, v in given.items()}

    df = reader(root, **given)
    dropped = dict(df.attrs.get("dropped", {}))
    if len(df) == 0:
        raise DataError(f"{root}: no images found for source {source!r}; nothing to prepare")
    check_unique_ids(df)
    sizes = [probe_image(Path(p), w, full=check_images)
             for p, w in tqdm(zip(df["path"], df["_where"]), total=len(df), desc="checking images", disable=None)]
    df = df.assign(width=[s[0] for s in sizes], height=[s[1] for s in sizes])
    df = df.drop(columns="_where").sort_values("image_id", kind="stable").reset_index(drop=True)

    manifest = write_manifest(df, DatasetPaths(out).manifest)
    summary = {
        "source": source, "root": str(root.resolve()), "options": {k: str(v) for k, v in given.items()},
        "images": len(df), "lesions": int(df["group_id"].nunique()), "counts": class_counts(df),
        "dropped": dropped, "check_images": check_images, "wall_s": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out / "prepare.json", summary)
    log.info("prepared %s: %d images, %d lesions -> %s (%.1f s)", source, summary["images"], summary["lesions"],
             manifest, summary["wall_s"])
    return manifest


def check_unique_ids(df: pd.DataFrame) -> None:
    """Each image id once: two rows with one id would be one image counted twice (and could straddle a split)."""
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        first = df.loc[dup, "image_id"].iloc[0]
        rows = df.loc[df["image_id"] == first, "_where"].tolist()
        raise DataError(f"duplicate image_id {first!r} at {' and '.join(rows)}; {int(dup.sum())} rows share an id "
                        f"with another; each image must appear once")


def probe_image(path: Path, where: str, full: bool = False) -> tuple[int, int]:
    """(width, height) of a readable image; missing, corrupt, truncated or oversized files raise DataError."""
    if full:
        return load_image(path, where).size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            with Image.open(path) as im:  # reads the header only
                (w, h), fmt = im.size, im.format
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{where}: image too large: {path}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: not a readable image: {path}: {e}; replace the file or remove the row") from e
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(f"{where}: image too large: {path} claims {w}x{h} = {w * h / 1e6:.0f} MP (limit "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP; possible decompression bomb)")
    if not _ends_cleanly(path, fmt):
        load_image(path, where)  # a truncated file fails here with a clear message; odd but valid files pass
    return w, h


def _ends_cleanly(path: Path, fmt: str | None) -> bool:
    """True when the file ends with its format's end marker (JPEG EOI, PNG IEND): a cheap truncation test."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(size - 32, 0))
        tail = f.read()
    if fmt == "JPEG":
        return tail.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return tail.endswith(b"IEND\xaeB`\x82")
    return False  # other formats: decode fully
