"""Does a classifier use softness as a cue for the rare classes? (a check of the shortcut synthetic images can teach)

    python bench/softness_shortcut.py --split SPLIT/split.json --soft 64 RUN [RUN ...]

Synthetic images made at a lower resolution than the classifier's input are softer than real photos, and only the
rare classes get them, so a classifier trained on them can learn "soft => rare". This scores each classifier run's
real TEST images twice: as they are, and resampled down to ``--soft`` px and back up (what an upsampled synthetic
image looks like). It prints, for the images of the other (common) classes, the share predicted as a rare class and
their mean rare-class probability, sharp vs soft, and the rare classes' recall, sharp vs soft. A run that learnt
the shortcut calls many more soft common lesions rare than sharp ones; compare with a run trained without synthetic
images, which shows how much softening alone moves predictions.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dermsynth.classify.augment import lowres
from dermsynth.classify.config import ClfConfig
from dermsynth.classify.predict import predict_images
from dermsynth.config import load_config
from dermsynth.data.cache import build_cache
from dermsynth.data.labels import CLASSES, parse_classes
from dermsynth.data.split import load_split
from dermsynth.paths import RunPaths


def soften(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images resampled down to ``size`` px and back (the classifier augmentation's own code)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    y = lowres(x, size, torch.zeros(len(x)), prob=1.0)
    return (y * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def shortcut(run: Path, labels: np.ndarray, sharp: np.ndarray, soft: np.ndarray, rare: list[str],
             device: str = "cpu") -> dict:
    """Rare-class predictions on common-class and rare-class test images, sharp vs soft."""
    rare_idx = [CLASSES.index(c) for c in rare]
    is_rare = np.isin(labels, rare_idx)
    out: dict = {"run": str(run)}
    both = predict_images(run, np.concatenate([sharp, soft]), device=device)  # one model load for both
    for name, p in (("sharp", both[:len(sharp)]), ("soft", both[len(sharp):])):
        pred = p.argmax(1)
        out[name] = {
            "common_called_rare": float(np.isin(pred[~is_rare], rare_idx).mean()),
            "common_mean_p_rare": float(p[~is_rare][:, rare_idx].sum(1).mean()),
            "rare_recall": {c: float((pred[labels == i] == i).mean()) for c, i in zip(rare, rare_idx)
                            if (labels == i).any()},
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="classifier run folders (all with the same image size)")
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--soft", type=int, required=True, help="the synthetic images' native size in px")
    p.add_argument("--rare", default="df,vasc,mel")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    a = p.parse_args()
    size = load_config(ClfConfig, RunPaths(a.runs[0]).config).data.image_size
    split = load_split(a.split)
    test = split.part("test")
    sharp = build_cache(split.manifest, size).take(test["image_id"])
    soft = soften(sharp, a.soft)
    labels = np.array([CLASSES.index(c) for c in test["label"]])
    rare = parse_classes(a.rare)
    rows = [shortcut(run, labels, sharp, soft, rare, a.device) for run in a.runs]
    print(f"test part: {len(labels)} images at {size} px; soft = resampled to {a.soft} px and back")
    print(f"{'run':28s} {'common called rare':>24s} {'common mean P(rare)':>24s}   rare recall sharp -> soft")
    for r in rows:
        s, t = r["sharp"], r["soft"]
        rec = ", ".join(f"{c} {s['rare_recall'][c]:.2f}->{t['rare_recall'][c]:.2f}" for c in s["rare_recall"])
        name = "/".join(Path(r["run"]).parts[-2:])  # condition/seed in a study
        print(f"{name:28s} {s['common_called_rare']:10.3f} -> {t['common_called_rare']:.3f}   "
              f"{s['common_mean_p_rare']:10.3f} -> {t['common_mean_p_rare']:.3f}   {rec}")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
