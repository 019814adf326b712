"""What a faster sampler costs in quality: the same generator, the same classes, scored per sampler and seed.

    python bench/sampler_quality.py --gen GEN_RUN --split SPLIT/split.json --out DIR \
        -v ddim:50:0 -v ddim:50:1 -v dpmpp:25:0 -v dpmpp:25:1 [-c quality.yaml] [--set KEY=VALUE ...]

Each ``-v SAMPLER:STEPS:SEED[:STRENGTH]`` draws ``--per-class`` images of each class into
DIR/<sampler><steps>_s<seed>[_img<strength>] (resumable: existing images are kept; a strength below 1 makes
image-to-image variations of real train images) and scores them with ``dermsynth quality`` into
<folder>/quality-<config hash>-n<per class> (skipped when that quality.json exists; ``--set reference=val`` scores
against the validation part, for choices). The first variant is the reference. DIR/sampler_quality.json is rewritten
after each variant, so a run stopped by a time limit keeps what it scored. Also a generator comparison: run it once
per generator with the same variants and compare the tables; or once per ``--checkpoint`` of one long run (each into
its own --out: a samples folder refuses images of another checkpoint) for quality against training steps.

Why two seeds of a sampler: KID moves between two draws of the same sampler, so a sampler's loss is "measurable"
only if it exceeds that seed-to-seed change. Why the pixel distance: DDIM (eta 0) and DPM-Solver++ both solve the
same probability-flow ODE, so from the same starting noise (same seed) they should give nearly the same image; the
mean |difference| of paired images against that of unrelated images (another seed) shows how near.
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from dermsynth.config import config_hash, load_config
from dermsynth.generate.sample import generate
from dermsynth.io import atomic_write_json, image_array
from dermsynth.metrics.quality import QualityConfig, run_quality

METRICS = ("KID_lite0", "FD_lite0", "recall_lite0", "C2ST_lite0")


Variant = tuple[str, int, int, float]


def parse_variant(spec: str) -> Variant:
    """'dpmpp:25:0' -> ('dpmpp', 25, 0, 1.0); 'dpmpp:25:0:0.25' -> ('dpmpp', 25, 0, 0.25)."""
    try:
        sampler, steps, seed, *rest = spec.split(":")
        if len(rest) > 1:
            raise ValueError
        return sampler, int(steps), int(seed), float(rest[0]) if rest else 1.0
    except ValueError:
        raise SystemExit(f"variant {spec!r}: expected SAMPLER:STEPS:SEED[:STRENGTH], e.g. dpmpp:25:0") from None


def variant_name(v: Variant) -> str:
    sampler, steps, seed, strength = v
    return f"{sampler}{steps}_s{seed}" + (f"_img{strength:g}" if strength != 1.0 else "")


@functools.lru_cache(maxsize=None)  # the table is rebuilt after each variant: each pair of folders is read once
def pixel_distance(a: Path, b: Path) -> float:
    """Mean |a - b| (0-255) over the images both folders hold at the same (label, index)."""
    ma, mb = (pd.read_csv(p / "manifest.csv") for p in (a, b))
    pairs = ma.merge(mb, on=["label", "index"], suffixes=("_a", "_b"))
    if pairs.empty:
        return float("nan")
    d = [np.abs(image_array(a / pa).astype(np.float32) - image_array(b / pb).astype(np.float32)).mean()
         for pa, pb in zip(pairs["path_a"], pairs["path_b"])]
    return float(np.mean(d))


def score(gen: Path, split: Path, out: Path, variant: Variant, classes: str, per_class: int,
          cfg: QualityConfig, checkpoint: str | None = None) -> tuple[Path, dict]:
    """Samples of one variant (made or resumed) and their quality.json (made or read)."""
    sampler, steps, seed, strength = variant
    folder = generate(gen, classes=classes, per_class=per_class, out=out / variant_name(variant),
                      sampler=sampler, steps=steps, seed=seed, strength=strength, checkpoint=checkpoint)
    # another quality config (reference part, draws) or a larger draw scores anew
    qdir = folder / f"quality-{config_hash(cfg)[:8]}-n{per_class}"
    if not (qdir / "quality.json").exists():
        run_quality(folder, split, cfg, qdir)
    qpath = qdir / "quality.json"
    return folder, json.loads(qpath.read_text())


def table(variants: list[Variant], scored: list[tuple[Path, dict]]) -> tuple[list[dict], float | None]:
    """One row per scored variant and class group, and the pixel distance between unrelated same-class images."""
    ref = variants[0]
    ref_folder, ref_q = scored[0]
    # the null: the reference's sampler, steps and strength with another seed
    other_seed = next((f for v, (f, _) in zip(variants, scored)
                       if (v[0], v[1], v[3]) == (ref[0], ref[1], ref[3]) and v[2] != ref[2]), None)
    rows = []
    for v, (folder, q) in zip(variants, scored):
        # paired images exist only for the same seed and noise start (strength); unrelated ones come from another seed
        same_start = v[2] == ref[2] and v[3] == ref[3] and folder != ref_folder
        paired = pixel_distance(ref_folder, folder) if same_start else None
        for group, g in q["groups"].items():
            if "synthetic" not in g:
                continue
            row = {"variant": variant_name(v), "group": group, "N": g["N"], "pixel_vs_ref": paired}
            for m in METRICS:
                row[m] = g["synthetic"].get(m)
                row[m + "_std"] = g["synthetic"].get(m + "_std")
                row[m + "_floor"] = g["floor"].get(m)
            row["KID_minus_ref"] = row["KID_lite0"] - ref_q["groups"][group]["synthetic"]["KID_lite0"]
            rows.append(row)
    return rows, pixel_distance(ref_folder, other_seed) if other_seed is not None else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gen", required=True, type=Path, help="generator run folder")
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("-v", "--variant", action="append", required=True, help="SAMPLER:STEPS:SEED[:STRENGTH] (first = reference)")
    p.add_argument("--classes", default="df,vasc,mel")
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("-c", "--config", type=Path, help="quality YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="quality config override")
    p.add_argument("--checkpoint", help="the generator's checkpoint folder to sample (default: its latest); the "
                   "intermediate checkpoints of one long run give a quality-against-training-steps curve")
    a = p.parse_args()
    cfg = load_config(QualityConfig, a.config, a.set)
    variants = [parse_variant(v) for v in a.variant]
    scored: list[tuple[Path, dict]] = []
    for v in variants:
        scored.append(score(a.gen, a.split, a.out, v, a.classes, a.per_class, cfg, a.checkpoint))
        rows, null_pixel = table(variants[:len(scored)], scored)
        atomic_write_json(a.out / "sampler_quality.json",
                          {"gen": str(a.gen), "checkpoint": a.checkpoint or "latest", "split": str(a.split),
                           "reference": a.variant[0],
                           "variants": a.variant, "scored": len(scored),
                           "pixel_unrelated_same_class": null_pixel, "rows": rows})

    print()  # progress bars end their lines with a carriage return only
    pd.set_option("display.width", 200)
    cols = ["variant", "group", "N", "KID_lite0", "KID_lite0_std", "KID_minus_ref", "KID_lite0_floor", "FD_lite0",
            "FD_lite0_floor", "recall_lite0", "C2ST_lite0", "pixel_vs_ref"]
    for group, t in pd.DataFrame(rows).groupby("group", sort=False):
        print(t[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        print()
    if null_pixel is not None:
        print(f"mean |pixel difference| between unrelated images of the same class (reference vs its other seed): "
              f"{null_pixel:.1f} of 255")


if __name__ == "__main__":
    main()
