"""Does a classifier use softness, or the synthetic look, as a cue for the rare classes? (shortcuts synthetic images
can teach)

    python bench/softness_shortcut.py --split SPLIT/split.json [--soft 64] [--synthetic HELD_OUT/manifest.csv] RUN ...

Synthetic images made at a lower resolution than the classifier's input are softer than real photos, and only the
rare classes get them, so a classifier trained on them can learn "soft => rare". This scores each classifier run's
real TEST images twice: as they are, and resampled down to ``--soft`` px and back up (what an upsampled synthetic
image looks like). It prints, for the images of the other (common) classes, the share predicted as a rare class and
their mean rare-class probability, sharp vs soft, and the rare classes' recall, sharp vs soft. A run that learnt
the shortcut calls many more soft common lesions rare than sharp ones; compare with a run trained without synthetic
images, which shows how much softening alone moves predictions.

``--synthetic`` adds a third set: synthetic images that no run trained on (another seed's draw of the same generator,
common classes included), scored the same way. Softness is one trait of the synthetic look; this tests all of it. A
run that learnt "synthetic => rare" calls synthetic common-class images rare far more often than a run trained
without synthetic images does (that run's rate is what the images' own look does, with no shortcut learnt).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dermsynth.classify.augment import lowres
from dermsynth.classify.config import ClfConfig
from dermsynth.classify.predict import predict_images
from dermsynth.config import load_config
from dermsynth.data.cache import build_cache
from dermsynth.data.labels import CLASSES, parse_classes
from dermsynth.data.manifest import read_manifest
from dermsynth.data.split import load_split
from dermsynth.paths import RunPaths


def soften(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images resampled down to ``size`` px and back (the classifier augmentation's own code)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    y = lowres(x, size, torch.zeros(len(x)), prob=1.0)
    return (y * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_set(df: pd.DataFrame, size: int, rows: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``rows`` (default: all of ``df``) at ``size`` px and their class indices. The cache is built
    over the whole ``df``, so a split's manifest reuses the cache its classifiers trained from."""
    rows = df if rows is None else rows
    return build_cache(df, size).take(rows["image_id"]), np.array([CLASSES.index(c) for c in rows["label"]])


def rare_calls(p: np.ndarray, labels: np.ndarray, rare_idx: list[int]) -> dict:
    """From probabilities ``p`` of images of ``labels``: the share of common-class images predicted as a rare class
    (pooled and per class), their mean rare-class probability, and each rare class's recall."""
    pred = p.argmax(1)
    common = ~np.isin(labels, rare_idx)
    return {
        "common_n": int(common.sum()),
        "common_called_rare": float(np.isin(pred[common], rare_idx).mean()) if common.any() else float("nan"),
        "common_mean_p_rare": float(p[common][:, rare_idx].sum(1).mean()) if common.any() else float("nan"),
        # per common class: the share called each rare class (their sum: the share called rare)
        "called_rare_by_class": {CLASSES[i]: {CLASSES[r]: float((pred[labels == i] == r).mean()) for r in rare_idx}
                                 for i in sorted(set(labels.tolist()) - set(rare_idx))},
        "rare_recall": {CLASSES[i]: float((pred[labels == i] == i).mean()) for i in rare_idx if (labels == i).any()},
    }


def shortcut(run: Path, sets: dict[str, tuple[np.ndarray, np.ndarray]], rare: list[str], device: str = "cpu") -> dict:
    """Rare-class predictions of one run on each named set of (images, labels): e.g. sharp, soft, synthetic."""
    rare_idx = [CLASSES.index(c) for c in rare]
    names = list(sets)
    probs = predict_images(run, np.concatenate([sets[n][0] for n in names]), device=device)  # one model load
    out: dict = {"run": str(run)}
    start = 0
    for n in names:
        images, labels = sets[n]
        out[n] = rare_calls(probs[start:start + len(images)], labels, rare_idx)
        start += len(images)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="classifier run folders (all with the same image size)")
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--soft", type=int, help="the synthetic images' native size in px (omit when it is the runs')")
    p.add_argument("--synthetic", type=Path, help="manifest.csv of synthetic images none of the runs trained on")
    p.add_argument("--rare", default="df,vasc,mel")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    a = p.parse_args()
    size = load_config(ClfConfig, RunPaths(a.runs[0]).config).data.image_size
    split = load_split(a.split)
    test = split.part("test")
    sharp, labels = image_set(split.manifest, size, test)
    sets = {"sharp": (sharp, labels)}
    if a.soft and a.soft < size:  # at the classifier's own size softening changes nothing
        sets["soft"] = (soften(sharp, a.soft), labels)
    if a.synthetic:
        sets["synthetic"] = image_set(read_manifest(a.synthetic, check_files=True), size)
    rare = parse_classes(a.rare)
    rows = [shortcut(run, sets, rare, a.device) for run in a.runs]
    names = list(sets)
    print(f"test part: {len(labels)} images at {size} px"
          + (f"; soft = resampled to {a.soft} px and back" if "soft" in sets else "")
          + (f"; synthetic = {len(sets['synthetic'][1])} images of {a.synthetic}" if a.synthetic else ""))
    w = max(len("common mean P(rare)"), 9 * len(names) - 4)  # each column: one 0.000 per set, ' -> ' between
    print(f"each column: {' -> '.join(names)}")
    print(f"{'run':28s} {'common called rare':>{w}s}   {'common mean P(rare)':>{w}s}   rare recall")
    for r in rows:
        called = " -> ".join(f"{r[n]['common_called_rare']:.3f}" for n in names)
        mean_p = " -> ".join(f"{r[n]['common_mean_p_rare']:.3f}" for n in names)
        rec = ", ".join(f"{c} " + "->".join(f"{r[n]['rare_recall'][c]:.2f}" for n in names
                                            if c in r[n]["rare_recall"]) for c in r["sharp"]["rare_recall"])
        name = "/".join(Path(r["run"]).parts[-2:])  # condition/seed in a study
        print(f"{name:28s} {called:>{w}s}   {mean_p:>{w}s}   {rec}")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
