"""A blind real-vs-synthetic sheet for a human rater, and its scoring.

``make_sheet`` draws ``per_class`` random synthetic images per class and as many real TRAIN images of the same
class, re-encodes all of them the same way (same size, PNG, no metadata: synthetic PNGs carry an "AI-generated" text
chunk and real ones start as JPEGs, either of which would give the answer away), names them by a random item number,
shuffles them and writes ``sheet.html`` (the page to rate), ``ratings.csv`` (item, class, rating: fill with
real / synthetic / unsure) and a hidden key ``.key.csv``. ``score_sheet`` reads the filled ratings and the key and
returns the human accuracy (chance = 0.5), overall and per class, and writes ``score.json``.
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from dermsynth.data.split import load_split
from dermsynth.io import DataError, atomic_save_image, atomic_write_csv, atomic_write_json, atomic_write_text
from dermsynth.metrics.feature_cache import load_images, native_size, read_samples

RATINGS = ("real", "synthetic", "unsure")
KEY = ".key.csv"


def make_sheet(samples: str | Path, split: str | Path, out: str | Path, per_class: int = 50, seed: int = 0) -> Path:
    """Write the sheet folder; returns the path of ``sheet.html``."""
    out = Path(out)
    syn = read_samples(samples)
    train = load_split(split).part("train")
    size = native_size(syn)
    rng = np.random.default_rng(seed)
    picks = []
    for c in dict.fromkeys(syn["label"]):
        s, r = syn[syn["label"] == c], train[train["label"] == c]
        n = min(per_class, len(s), len(r))  # equal numbers, so always guessing one answer scores 0.5
        if n == 0:
            continue
        picks.append(s.iloc[rng.choice(len(s), n, replace=False)].assign(truth="synthetic"))
        picks.append(r.iloc[rng.choice(len(r), n, replace=False)].assign(truth="real"))
    if not picks:
        raise DataError(f"{samples}: no class has both synthetic images and real train images to show")
    items = pd.concat(picks, ignore_index=True)
    items = items.iloc[rng.permutation(len(items))].reset_index(drop=True)
    items["item"] = [f"{i + 1:04d}" for i in range(len(items))]
    images = load_images(items[["image_id", "group_id", "label", "path", "source"]], size, progress=False)
    for item, im in zip(items["item"], images):
        atomic_save_image(out / "images" / f"{item}.png", im)
    atomic_write_csv(out / "ratings.csv", pd.DataFrame({"item": items["item"], "class": items["label"], "rating": ""}))
    atomic_write_csv(out / KEY, items[["item", "label", "truth", "image_id", "path"]])
    cards = "".join(
        f'<figure><img src="images/{i}.png" width="{max(size, 128)}"><figcaption>{i} ({html.escape(c)})</figcaption>'
        f"</figure>" for i, c in zip(items["item"], items["label"]))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>real or synthetic?</title>
<style>body{{font-family:sans-serif}}figure{{display:inline-block;margin:4px;font-size:12px}}
img{{image-rendering:pixelated}}</style></head><body>
<h1>Real or synthetic?</h1>
<p>{len(items)} dermoscopy images, half real and half made by a generator, in random order. For each item number, write
<b>real</b>, <b>synthetic</b> or <b>unsure</b> in the <code>rating</code> column of <code>ratings.csv</code>, then run
<code>dermsynth visual-check score --out {html.escape(str(out))} --ratings ratings.csv</code>. Do not open {KEY}.
Research use only.</p>{cards}</body></html>"""
    return atomic_write_text(out / "sheet.html", page)


def score_sheet(out: str | Path, ratings: str | Path | None = None) -> dict:
    """Accuracy of the filled ratings against the hidden key, overall and per class; writes ``score.json``."""
    out = Path(out)
    ratings = Path(ratings) if ratings else out / "ratings.csv"
    if not ratings.is_absolute() and not ratings.is_file():
        ratings = out / ratings
    if not (out / KEY).is_file():
        raise DataError(f"{out}: no answer key ({KEY}); make the sheet with 'dermsynth visual-check make' first")
    if not ratings.is_file():
        raise DataError(f"ratings file not found: {ratings}")
    key = pd.read_csv(out / KEY, dtype=str)
    got = pd.read_csv(ratings, dtype=str, keep_default_na=False)
    if not {"item", "rating"} <= set(got.columns):
        raise DataError(f"{ratings}: needs columns item, rating; found {list(got.columns)}")
    got["item"] = got["item"].str.zfill(4)
    got["rating"] = got["rating"].str.strip().str.lower()
    bad = got[~got["rating"].isin(RATINGS + ("",))]
    if len(bad):
        r = bad.index[0]
        raise DataError(f"{ratings}, row {r + 2}: rating {bad['rating'].iloc[0]!r} is not one of {list(RATINGS)}")
    df = key.merge(got[["item", "rating"]], on="item", how="left").fillna({"rating": ""})

    def score(d: pd.DataFrame) -> dict:
        decided = d[d["rating"].isin(("real", "synthetic"))]
        correct = int((decided["rating"] == decided["truth"]).sum())
        return {"items": int(len(d)), "rated": int(d["rating"].ne("").sum()), "decided": int(len(decided)),
                "unsure": int((d["rating"] == "unsure").sum()), "correct": correct,
                "accuracy": correct / len(decided) if len(decided) else None,
                # unsure and blank count as wrong here: the rate at which a person can point out the fakes
                "accuracy_all_items": correct / len(d) if len(d) else None,
                "synthetic_called_real": int(((d["truth"] == "synthetic") & (d["rating"] == "real")).sum())}

    result = {"overall": score(df), "per_class": {c: score(g) for c, g in df.groupby("label")},
              "chance": 0.5, "note": "accuracy over items rated real or synthetic; 0.5 = indistinguishable"}
    atomic_write_json(out / "score.json", result)
    return result
