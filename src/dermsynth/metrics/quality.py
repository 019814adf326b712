"""``dermsynth quality``: how close are the synthetic images to real ones, measured against a real-vs-real floor.

Per synthetic class and pooled over them (or over ``pooled_classes``), the synthetic images and, as the floor, real
TRAIN images are each compared with real TEST images at the SAME N: both sides are subsampled to N = min(test,
synthetic, train) images of the class (pooled: drawn class by class in the test part's proportions), ``repeats``
times, and every number is the mean (and std) over those draws (but diversity, a mean over image pairs whose
expectation does not depend on N: it uses every image of each side). A metric at N = 17 (dermatofibroma's test part)
is biased; the floor at the same N shows how much of the number is that bias and how much is the generator. KID's
unbiased estimator is the headline for small N. The classifier two-sample test (C2ST: cross-validated AUC of a linear
classifier telling the synthetic images' features from the real ones) says how visible a "synthetic look" is, which a
classifier trained on both can learn as evidence for the classes that have synthetic images; its floor is the same
test between real train and real test images (about 0.5).

Synthetic images are compared with real images at the synthetic images' own resolution (real ones are downsized to
it), so resolution alone does not separate them. Every number is named by its extractor (FD_lite0, KID_lite0; FID and
IS only with Inception). Writes ``quality.json`` and a page ``quality.html`` with a table and figures.
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dermsynth.config import save_config, to_dict
from dermsynth.data.labels import CLASSES, parse_classes
from dermsynth.io import DataError, atomic_open, atomic_write_csv, atomic_write_json, atomic_write_text
from dermsynth.metrics import distribution as dist
from dermsynth.metrics.diversity import pairwise_diversity
from dermsynth.metrics.feature_cache import (default_out, features_and_logits, load_images, native_size,
                                              samples_on_split)
from dermsynth.metrics.features import ExtractorSpec, make_extractor, metric_name
from dermsynth.metrics.memorisation import (MemorisationConfig, audit, calibrate_orbit, closest_pairs_grid,
                                            null_rows, real_flag_rate)
from dermsynth.runlog import get_logger, run_log

log = get_logger("metrics.quality")


@dataclass
class QualityConfig:
    features: ExtractorSpec = field(default_factory=ExtractorSpec)
    image_size: int = 0  # px at which real and synthetic images are compared; 0 = the synthetic images' own size
    reference: str = "test"  # the real part both synthetic and floor images are compared with
    floor_part: str = "train"  # the real part that plays "synthetic" for the floor
    max_n: int = 0  # cap on N per class (0: no cap)
    # the classes of the "pooled" group; empty: every synthetic class. A study whose samples include classes that are
    # not rare pools its rare classes only, so its pooled row compares with a rare-only study's
    pooled_classes: list[str] = field(default_factory=list)
    repeats: int = 20  # random equal-N draws per number (mean and std are over draws)
    kid_subset_size: int = 1000  # KID subset size when N is larger than this
    prdc_k: int = 5  # k of the k-NN manifolds (capped at N - 1)
    # folds of the classifier two-sample test (cross-validated AUC of real vs synthetic features; 0: not run)
    c2st_folds: int = 5
    diversity_pairs: int = 100  # image pairs for mean pairwise LPIPS / MS-SSIM (all pairs when fewer)
    grid: int = 32  # images per class in each grid figure
    memorisation: MemorisationConfig = field(default_factory=MemorisationConfig)
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------------
# Equal-N comparison of one source set with the reference set
# ----------------------------------------------------------------------------------------------------------------------

def equal_n_counts(ref: dict[str, int], *sources: dict[str, int], max_n: int = 0) -> dict[str, int]:
    """Images to draw per class so every set gives the same N in the reference's class proportions."""
    total = sum(ref.values())
    scale = 1.0 if not max_n else min(1.0, max_n / total)
    for src in sources:
        for c, n in ref.items():
            scale = min(scale, src.get(c, 0) / n) if n else scale
    return {c: int(np.floor(n * scale + 1e-9)) for c, n in ref.items()}


def _draw(feats: dict[str, np.ndarray], counts: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([feats[c][rng.choice(len(feats[c]), n, replace=False)] for c, n in counts.items()])


def compare(source: dict[str, np.ndarray], ref: dict[str, np.ndarray], counts: dict[str, int], extractor: str,
            cfg: QualityConfig, seed: int) -> dict[str, float]:
    """FD, KID, precision/recall/density/coverage and C2ST AUC of ``source`` vs ``ref`` at N = sum(counts), over
    ``repeats`` draws."""
    n = sum(counts.values())
    rng = np.random.default_rng(seed)
    c2st_rng = np.random.default_rng([seed, 1])  # its own stream: the draws, and so FD/KID, are as without it
    k = min(cfg.prdc_k, n - 1)
    vals: dict[str, list[float]] = {m: [] for m in ("FD", "KID", "precision", "recall", "density", "coverage", "C2ST")}
    for _ in range(cfg.repeats):
        s, r = _draw(source, counts, rng), _draw(ref, counts, rng)
        vals["FD"].append(dist.frechet_distance(s, r))
        vals["KID"].extend(dist.kid_subsets(s, r, cfg.kid_subset_size, 1, seed=int(rng.integers(1 << 31))))
        if cfg.c2st_folds:
            vals["C2ST"].append(dist.c2st_auc(s, r, cfg.c2st_folds, seed=int(c2st_rng.integers(1 << 31))))
        if k >= 1:
            for m, v in dist.prdc(r, s, k).items():
                vals[m].append(v)
    out: dict[str, float] = {}
    for m, v in vals.items():
        if v:
            out[metric_name(m, extractor)] = float(np.mean(v))
            out[metric_name(m, extractor) + "_std"] = float(np.std(v))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------

def equal_n_inception_score(logits: dict[str, np.ndarray], counts: dict[str, int], repeats: int,
                             seed: int) -> tuple[float, float]:
    """Inception Score over ``repeats`` draws of ``counts`` images per class: IS grows with N (its chunks' marginals
    sharpen), so a synthetic set and its floor are scored at the same N, as every other number here."""
    rng = np.random.default_rng(seed)
    v = [dist.inception_score(_draw(logits, counts, rng))[0] for _ in range(repeats)]
    return float(np.mean(v)), float(np.std(v))


def _by_class(df: pd.DataFrame, feats: np.ndarray, classes: list[str]) -> dict[str, np.ndarray]:
    return {c: feats[(df["label"] == c).to_numpy()] for c in classes}


def run_quality(samples: str | Path, split: str | Path, cfg: QualityConfig | None = None,
                out: str | Path | None = None) -> Path:
    """Measure the samples folder against the split's real parts; returns the path of ``quality.json``."""
    cfg = cfg or QualityConfig()
    samples = Path(samples)
    syn, sp = samples_on_split(samples, split)  # refuses a generator trained on another split, before any write
    classes = [c for c in CLASSES if c in set(syn["label"])]  # canonical order
    wanted = parse_classes(cfg.pooled_classes)
    absent = sorted(set(wanted) - set(classes))
    if absent:
        raise DataError(f"quality.pooled_classes names {absent}, which {samples} has no synthetic image of "
                        f"(its classes: {classes})")
    pooled = [c for c in classes if c in wanted] if wanted else classes
    out = Path(out) if out is not None else default_out(samples, "quality")
    with run_log(out):
        t0 = time.time()
        save_config(cfg, out / "config.yaml")
        size = cfg.image_size or native_size(syn)
        train_all = sp.part(cfg.floor_part)
        ref_df = sp.part(cfg.reference)
        ref_df = ref_df[ref_df["label"].isin(classes)].reset_index(drop=True)
        missing = [c for c in classes if not (ref_df["label"] == c).any()]
        if missing:
            raise DataError(f"{sp.path}: the {cfg.reference} part has no image of class(es) {missing}, "
                            f"so the synthetic images of those classes cannot be compared with anything real")
        log.info("quality: %d synthetic images of %s at %d px vs %s; extractor %s", len(syn), classes, size,
                 cfg.reference, cfg.features.name)

        extractor = make_extractor(cfg.features)
        ename = extractor.name
        syn_img, train_img, ref_img = load_images(syn, size), load_images(train_all, size), load_images(ref_df, size)
        syn_f, syn_logits = features_and_logits(syn_img, extractor)
        train_f, _ = features_and_logits(train_img, extractor)
        ref_f, ref_logits = features_and_logits(ref_img, extractor)

        train_c = train_all[train_all["label"].isin(classes)].reset_index(drop=True)
        train_cf = train_f[train_all["label"].isin(classes).to_numpy()]
        S, T, R = _by_class(syn, syn_f, classes), _by_class(train_c, train_cf, classes), _by_class(ref_df, ref_f, classes)
        logits = {"synthetic": _by_class(syn, syn_logits, classes), "floor": _by_class(ref_df, ref_logits, classes)}
        groups: dict[str, dict] = {}
        todo = [(c, [c]) for c in classes] + ([("pooled", pooled)] if len(pooled) > 1 else [])
        for gi, (name, cls) in enumerate(todo):
            counts = equal_n_counts({c: len(R[c]) for c in cls}, {c: len(S[c]) for c in cls},
                                    {c: len(T[c]) for c in cls}, max_n=cfg.max_n)
            n = sum(counts.values())
            g: dict = {"N": n, "classes": list(cls), "draw_per_class": counts,
                       "available": {"synthetic": sum(len(S[c]) for c in cls), cfg.floor_part: sum(len(T[c]) for c in cls),
                                     cfg.reference: sum(len(R[c]) for c in cls)}}
            if n < 2:
                g["skipped"] = f"N={n}: too few images to compare"
                groups[name] = g
                continue
            g["synthetic"] = compare({c: S[c] for c in cls}, {c: R[c] for c in cls}, counts, ename, cfg, cfg.seed + gi)
            g["floor"] = compare({c: T[c] for c in cls}, {c: R[c] for c in cls}, counts, ename, cfg, cfg.seed + gi)
            mask_s = syn["label"].isin(cls).to_numpy()
            mask_r = ref_df["label"].isin(cls).to_numpy()
            for key, imgs in (("synthetic", syn_img[mask_s]), ("floor", ref_img[mask_r])):
                d = pairwise_diversity(imgs, cfg.diversity_pairs, seed=cfg.seed)
                g[key][f"diversity_{d['metric']}"] = d["value"]
                g[key][f"diversity_{d['metric']}_std"] = d["std"]
            g["floor"]["diversity_of"] = f"real {cfg.reference} images"
            if extractor.n_logits:  # the floor: real reference images at the same N
                for key, lg in logits.items():
                    m, sd = equal_n_inception_score({c: lg[c] for c in cls}, counts, cfg.repeats, cfg.seed + gi)
                    g[key][metric_name("IS", ename)], g[key][metric_name("IS", ename) + "_std"] = m, sd
            g["ratio_to_floor"] = {m: _ratio(g["synthetic"][m], g["floor"][m])
                                   for m in (metric_name("FD", ename), metric_name("KID", ename))}
            groups[name] = g
            log.info("%s N=%d: %s %.4g (floor %.4g), %s %.4g (floor %.4g)", name, n,
                     metric_name("KID", ename), g["synthetic"][metric_name("KID", ename)],
                     g["floor"][metric_name("KID", ename)], metric_name("FD", ename),
                     g["synthetic"][metric_name("FD", ename)], g["floor"][metric_name("FD", ename)])

        # copies are searched in what the generator learnt from, the TRAIN part, whatever part plays the floor
        if cfg.floor_part == "train":
            gen_df, gen_img, gen_f = train_all, train_img, train_f
        else:
            gen_df = sp.part("train")
            gen_img = load_images(gen_df, size)
            gen_f, _ = features_and_logits(gen_img, extractor)
        null_img = load_images(null_rows(sp, cfg.memorisation, cfg.seed), size)
        calib = calibrate_orbit(gen_df, gen_img, gen_f, null_img, extractor, cfg.memorisation)
        rows, memo = audit(syn, syn_img, gen_df, gen_img, gen_f, extractor, cfg.memorisation, calib)
        # the rule's false-positive rate out of sample: real TEST images of these classes, whatever the reference
        test_df = sp.part("test")
        test_img = ref_img if cfg.reference == "test" else load_images(test_df[test_df["label"].isin(classes)], size)
        memo["real_test_flag_rate"] = real_flag_rate(test_img, gen_f, calib["threshold"], extractor, cfg.memorisation)
        memo["note"] = ("copy = cosine >= cosine_threshold (max of the same-lesion and new-lesion quantiles) or "
                        "SSIM >= ssim_threshold, every image matched over the orbit; real_test_flag_rate: how often "
                        "real new lesions of the test part (never used for calibration) pass the cosine rule")
        atomic_write_csv(out / "memorisation.csv", rows)
        closest_pairs_grid(rows, syn_img, gen_img, gen_df["image_id"].tolist(), out / "closest_pairs.png",
                           cfg.memorisation.grid_pairs)
        result = {
            "extractor": ename, "extractor_version": extractor.version, "feature_input_size": cfg.features.input_size,
            "image_size": size, "samples": str(samples.resolve()), "split": str(sp.path),
            "split_fingerprint": sp.fingerprint, "reference": cfg.reference, "floor": f"real {cfg.floor_part}",
            "repeats": cfg.repeats, "classes": classes, "groups": groups, "memorisation": memo,
            "higher_is_better": {metric_name(m, ename): hb for m, hb in dist.HIGHER_IS_BETTER.items()},
            "how": ("synthetic and real-floor sets are each compared with the real reference set at the same N "
                    "(random equal-N draws, mean and std over draws); N is stated per group"),
            "config": to_dict(cfg), "wall_s": None,
        }
        _figures(out, result, syn, syn_img, train_c, train_img[train_all["label"].isin(classes).to_numpy()], cfg)
        result["wall_s"] = round(time.time() - t0, 2)
        path = atomic_write_json(out / "quality.json", result)
        _page(out, result)
        log.info("quality written to %s (%.1f s)", path, result["wall_s"])
        return path


def group_label(name: str, group: dict) -> str:
    """A group's name for tables and figures; the pooled group names its classes (older files lack them)."""
    return f"{name} {'+'.join(group['classes'])}" if name == "pooled" and group.get("classes") else name


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b and np.isfinite(b) and b > 0 else None


# ----------------------------------------------------------------------------------------------------------------------
# Figures and the page
# ----------------------------------------------------------------------------------------------------------------------

def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _grid(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` random images tiled into one square-ish uint8 mosaic."""
    pick = np.random.default_rng(seed).permutation(len(images))[:n]
    cols = int(np.ceil(np.sqrt(max(len(pick), 1))))
    rows = int(np.ceil(len(pick) / cols)) if len(pick) else 1
    s = images.shape[1]
    tile = np.full((rows * s, cols * s, 3), 255, np.uint8)
    for j, i in enumerate(pick):
        tile[(j // cols) * s:(j // cols + 1) * s, (j % cols) * s:(j % cols + 1) * s] = images[i]
    return tile


def _figures(out: Path, result: dict, syn: pd.DataFrame, syn_img: np.ndarray, train: pd.DataFrame,
             train_img: np.ndarray, cfg: QualityConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for c in result["classes"]:
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
        for ax, imgs, title in ((axes[0], syn_img[(syn["label"] == c).to_numpy()], "synthetic"),
                                (axes[1], train_img[(train["label"] == c).to_numpy()], f"real {cfg.floor_part}")):
            ax.imshow(_grid(imgs, cfg.grid, cfg.seed))
            ax.set_title(f"{c}: {title}", fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        _save(fig, out / f"grid_{c}.png")
    ename = result["extractor"]
    names = [g for g, v in result["groups"].items() if "synthetic" in v]
    if not names:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    x = np.arange(len(names))
    for ax, m in zip(axes, (metric_name("KID", ename), metric_name("FD", ename))):
        for off, key, col in ((-0.2, "synthetic", "tab:red"), (0.2, "floor", "tab:gray")):
            v = [result["groups"][g][key][m] for g in names]
            e = [result["groups"][g][key][m + "_std"] for g in names]
            ax.bar(x + off, v, 0.4, yerr=e, color=col, label=key if key == "synthetic" else "real-vs-real floor")
        ax.set_xticks(x, [f"{group_label(g, result['groups'][g])}\nN={result['groups'][g]['N']}" for g in names],
                      fontsize=8)
        ax.set_title(f"{m} vs real {result['reference']} (lower is better)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "metrics_vs_floor.png")


def _page(out: Path, result: dict) -> Path:
    """quality.html: one table (synthetic | floor per metric and group) and the figures."""
    groups = {g: v for g, v in result["groups"].items() if "synthetic" in v}
    metrics = sorted({m for v in groups.values() for m in v["synthetic"] if not m.endswith("_std")})
    head = "".join(f"<th>{html.escape(group_label(g, v))} (N={v['N']})<br>synthetic | floor</th>"
                   for g, v in groups.items())
    body = ""
    for m in metrics:
        cells = ""
        for v in groups.values():
            s, f = v["synthetic"].get(m), v["floor"].get(m)
            cells += f"<td>{_fmt(s)} | {_fmt(f)}</td>"
        body += f"<tr><th>{html.escape(m)}</th>{cells}</tr>"
    memo = result["memorisation"]
    memo_rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{memo['copies'][c]} / {memo['n'][c]}</td>"
                        f"<td>{memo['copy_rate'][c]:.3f}</td></tr>" for c in memo["copy_rate"])
    # this run's figures only: a rerun into the folder with fewer classes leaves older grids behind
    names = [f"grid_{c}.png" for c in result["classes"]] + ["metrics_vs_floor.png", "closest_pairs.png"]
    figs = "".join(f'<figure><img src="{n}" style="max-width:100%"><figcaption>{n[:-4]}</figcaption></figure>'
                   for n in names if (out / n).is_file())
    text = f"""<!doctype html><html><head><meta charset="utf-8"><title>dermsynth quality</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{border:1px solid #ccc;padding:3px 6px;
font-size:13px}}table{{border-collapse:collapse}}</style></head><body>
<h1>Synthetic image quality</h1>
<p>Extractor <b>{html.escape(result['extractor'])}</b> ({html.escape(result['extractor_version'])}); images compared at
{result['image_size']} px. Each cell: synthetic vs real {html.escape(result['reference'])} | real-vs-real floor
({html.escape(result['floor'])} vs {html.escape(result['reference'])}) at the same N, mean over {result['repeats']}
random draws. C2ST: cross-validated AUC of a linear classifier telling the two sets apart (0.5: they cannot be told
apart). Research use only; AI-generated images.</p>
<table><tr><th>metric</th>{head}</tr>{body}</table>
<h2>Memorisation</h2><p>cosine threshold {memo['cosine_threshold']:.4f} ({html.escape(memo['calibration']['source'])},
{memo['calibration']['n_pairs']} same-lesion pairs); SSIM threshold {memo['ssim_threshold']}; real test images flagged
by the cosine rule: {memo['real_test_flag_rate']['flag_rate']:.3f}.</p>
<table><tr><th>class</th><th>copies</th><th>copy rate</th></tr>{memo_rows}</table>
<h2>Figures</h2>{figs}
<details><summary>quality.json</summary><pre>{html.escape(json.dumps(result, indent=1, default=str))}</pre></details>
</body></html>"""
    return atomic_write_text(out / "quality.html", text)


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and v is not None else "-"
