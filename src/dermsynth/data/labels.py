"""Canonical class codes of HAM10000 / ISIC and the aliases that map other spellings onto them."""
from __future__ import annotations

import math

from dermsynth.io import DataError

# Order is fixed: it is the index order of every classifier head and every generator's class embedding.
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

CLASS_NAMES: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}

# Lower-cased spellings seen in ISIC ground truths, folder trees and papers.
ALIASES: dict[str, str] = {
    **{c: c for c in CLASSES},
    "ak": "akiec", "actinic keratosis": "akiec", "actinic_keratosis": "akiec", "bowen": "akiec",
    "basal cell carcinoma": "bcc", "basal_cell_carcinoma": "bcc",
    "bkl": "bkl", "benign keratosis": "bkl", "benign_keratosis": "bkl", "seborrheic keratosis": "bkl",
    "dermatofibroma": "df",
    "melanoma": "mel",
    "nevus": "nv", "nevi": "nv", "melanocytic nevus": "nv", "melanocytic_nevi": "nv", "nevus_": "nv",
    "vascular": "vasc", "vascular lesion": "vasc", "vascular_lesion": "vasc", "vascular lesions": "vasc",
}


def canonical_label(raw: object, where: str = "") -> str:
    """Map a raw label to its canonical code; an unknown label is an error naming ``where`` (file and row)."""
    key = str(raw).strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    loc = f" at {where}" if where else ""
    if raw is None or key == "" or (isinstance(raw, float) and math.isnan(raw)):  # pandas reads an empty cell as NaN
        raise DataError(f"empty label{loc}; every image needs one of {list(CLASSES)}")
    raise DataError(f"unknown label {raw!r}{loc}; known classes: {list(CLASSES)} (aliases: {sorted(ALIASES)})")


def class_index(label: str) -> int:
    return CLASSES.index(label)


def parse_classes(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"df,vasc,mel"`` or a list -> canonical codes (aliases allowed), order kept, duplicates removed."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        if str(item).strip():
            c = canonical_label(item, "class list")
            if c not in out:
                out.append(c)
    return out
