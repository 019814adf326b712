"""``dermsynth data show``: how many images and lesions each part holds per class, and what the classes look like.

Writes ``counts.csv`` (part, label, images, lesions), prints the same as a table, and saves one contact sheet per
class (``sheet_<class>.png``, up to 64 thumbnails from a fixed seed) so a human can eyeball labels and image quality.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from dermsynth.data.cache import preprocess
from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import class_counts, read_manifest
from dermsynth.io import DataError, atomic_save_image, atomic_write_csv, load_image
from dermsynth.runlog import get_logger

log = get_logger("data.show")

THUMB, GAP, COLS, MAX_THUMBS, HEADER = 96, 2, 8, 64, 20


def counts_table(parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Tidy counts: one row per (part, class) plus a per-part "all" row."""
    rows = []
    for name, sub in parts.items():
        for c, n in class_counts(sub).items():
            rows.append({"part": name, "label": c, **n})
        rows.append({"part": name, "label": "all", "images": len(sub), "lesions": int(sub["group_id"].nunique())})
    return pd.DataFrame(rows, columns=["part", "label", "images", "lesions"])


def contact_sheet(df: pd.DataFrame, title: str, seed: int = 0) -> Image.Image:
    """A grid of up to 64 center-cropped thumbnails (a seeded sample of ``df``) under a one-line title."""
    pick = df.sample(n=min(len(df), MAX_THUMBS), random_state=seed) if len(df) > MAX_THUMBS else df
    n_rows = -(-len(pick) // COLS)
    cols = min(COLS, len(pick))
    sheet = Image.new("RGB", (cols * (THUMB + GAP) + GAP, HEADER + n_rows * (THUMB + GAP) + GAP), (255, 255, 255))
    for k, (image_id, path) in enumerate(zip(pick["image_id"], pick["path"])):
        thumb = Image.fromarray(preprocess(load_image(path, f"image_id {image_id}"), THUMB))
        sheet.paste(thumb, (GAP + (k % COLS) * (THUMB + GAP), HEADER + GAP + (k // COLS) * (THUMB + GAP)))
    ImageDraw.Draw(sheet).text((GAP + 2, 4), title, fill=(0, 0, 0), font=ImageFont.load_default())
    return sheet


def show(manifest: str | Path | None = None, split: str | Path | None = None, out: str | Path = "show") -> Path:
    """Counts per part x class and one contact sheet per class, for a manifest or a split; returns ``out``."""
    if (manifest is None) == (split is None):
        raise DataError("data show: give exactly one of --manifest or --split")
    out = Path(out)
    if split is not None:
        from dermsynth.data.split import load_split

        s = load_split(split)
        parts = {p: s.part(p) for p in s.parts}
        df = parts["all"] = s.images()
    else:
        df = read_manifest(manifest)
        parts = {"all": df}
    counts = counts_table(parts)
    atomic_write_csv(out / "counts.csv", counts)

    wide = counts.pivot(index="label", columns="part", values=["images", "lesions"])
    wide.columns = [f"{part}:{what}" for what, part in wide.columns]
    order = [f"{p}:{w}" for p in parts for w in ("images", "lesions")]
    print(wide.reindex(index=[*CLASSES, "all"], columns=order).to_string())

    for c in CLASSES:
        sub = df[df["label"] == c]
        if len(sub) == 0:
            log.info("no %s images: no contact sheet", c)
            continue
        title = f"{c}: {len(sub)} images, {sub['group_id'].nunique()} lesions (showing {min(len(sub), MAX_THUMBS)})"
        atomic_save_image(out / f"sheet_{c}.png", contact_sheet(sub, title))
    log.info("counts and contact sheets written to %s", out)
    return out


__all__ = ["show", "counts_table", "contact_sheet"]
