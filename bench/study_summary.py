"""Print a study's headline numbers as short plain-text tables (what a GPU round prints last).

    python bench/study_summary.py <study folder>
    python bench/study_summary.py <study folder> --pair A:B --pair <other folder>::A:B   # paired differences

Reads only what the study wrote: timings.json, filter/filter.json, quality/*/quality.json, aggregate/*.csv|json,
and each classifier's predictions.csv, from which it rescores how well the rare classes are *ranked* (one-vs-rest
AUC, threshold-free; studies made before minority AUC was in metrics.json get it too). Test-part numbers are
reported; the best baseline and the primary were chosen on validation by the study itself.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from dermsynth.data.labels import CLASSES
from dermsynth.experiments.stats import lesion_bootstrap_diff
from dermsynth.metrics.classification import classification_metrics
from dermsynth.metrics.quality import group_label
from dermsynth.paths import RunPaths, StudyPaths

METRICS = ("macro_f1", "minority_f1", "balanced_accuracy", "accuracy", "minority_auc")


def _json(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.is_file() else None


def quality_lines(label: str, q: dict | None) -> list[str]:
    """One line per class group of a quality.json: FD/KID beside the real-vs-real floor, precision and recall, and
    the real-vs-synthetic classifier's AUC (C2ST) where measured."""
    lines: list[str] = []
    for c, g in (q or {}).get("groups", {}).items():
        if "synthetic" not in g:
            lines.append(f"quality[{label}] {group_label(c, g):16s} not measured: "
                         f"{g.get('skipped') or g.get('reason') or g}")
            continue
        s, fl, e = g["synthetic"], g["floor"], q["extractor"]
        lines.append(f"quality[{label}] {group_label(c, g):16s} N={g['N']:4d}  "
                     f"FD_{e} {s[f'FD_{e}']:8.1f} +- {s[f'FD_{e}_std']:5.1f} "
                     f"vs floor {fl[f'FD_{e}']:7.1f} ({s[f'FD_{e}'] / fl[f'FD_{e}']:.2f}x)  KID {s[f'KID_{e}']:.4f} vs "
                     f"floor {fl[f'KID_{e}']:.4f}  precision {s[f'precision_{e}']:.2f} recall {s[f'recall_{e}']:.2f}"
                     + (f"  C2ST AUC {s[f'C2ST_{e}']:.2f} vs floor {fl[f'C2ST_{e}']:.2f}" if f"C2ST_{e}" in s else ""))
    return lines


def summary(study: Path, extra_quality: dict[str, Path] | None = None) -> str:
    """The summary text; ``extra_quality``: label -> another quality.json to list beside the study's own."""
    lines: list[str] = [f"study {study}"]
    t = _json(study / "timings.json")
    if t:
        st = {k: round(v.get("elapsed_s", v["wall_s"]), 1) for k, v in t["stages"].items()}
        lines.append(f"elapsed per stage (s): {st}; other {({k: round(v, 1) for k, v in t['other'].items()})}; "
                     f"total {t['total_s']:.0f} s")
    f = _json(study / "filter" / "filter.json")
    if f:
        kept = {c: f"{v['kept']}/{v['in']} {v['by_reason']}" for c, v in f["per_class"].items()}
        lines.append(f"filter kept: {kept}")
        if f.get("class_prob_thresholds"):
            lines.append("class-prob thresholds: " + ", ".join(
                f"{c} {v['threshold']:.3f}" for c, v in f["class_prob_thresholds"].items()))
    for which in ("samples", "filtered"):
        lines += quality_lines(which, _json(study / "quality" / which / "quality.json"))
    for label, path in (extra_quality or {}).items():
        lines += quality_lines(label, _json(Path(path)))
    agg = study / "aggregate"
    if (agg / "table.csv").is_file():
        a = _json(agg / "aggregate.json") or {}
        full = pd.read_csv(agg / "table.csv")
        tab = full[(full["part"] == "test") & full["metric"].isin(METRICS)]
        rows = {}
        for (cond, metric), r in tab.set_index(["condition", "metric"]).iterrows():
            ci = "" if pd.isna(r["ci_lo"]) else f" [{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]"
            sd = "" if pd.isna(r["std"]) else f" +- {r['std']:.3f}"
            rows.setdefault(cond, {})[metric] = f"{r['mean']:.3f}{sd}{ci}"
        lines.append(f"test metrics, mean +- std over {int(tab['n'].max())} seed(s) [95 % t-interval]; best baseline "
                     f"on val: {a.get('best_baseline')}")
        lines.append(pd.DataFrame(rows).T.reindex(columns=list(METRICS)).to_string())
        comp = pd.read_csv(agg / "comparisons.csv")
        comp = comp[(comp["condition"] == a.get("primary")) & comp["metric"].isin(METRICS)]
        for _, r in comp.iterrows():
            lines.append(f"{r['condition']} - {r['reference']} {r['metric']:18s} {r['diff']:+.3f} "
                         f"(seeds CI [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]; lesion bootstrap "
                         f"[{r['boot_lo']:+.3f}, {r['boot_hi']:+.3f}]"
                         + (f"; detectable {r['detectable']:.3f} / {r['boot_detectable']:.3f})" if "detectable" in r
                            else ")"))
        if a.get("primary_val_macro_f1"):
            lines.append(f"primary chosen on val: {a['primary']} (val macro-F1 "
                         + ", ".join(f"{c} {v:.3f}" for c, v in a["primary_val_macro_f1"].items()) + ")")
        lines += decision_lines(full)
        lines += recall_lines(full, a.get("rare_classes", ["df", "vasc", "mel"]))
        lines += sweep_lines(study, full, a)
        lines += ensemble_lines(agg, a)
        lines += ranking(study, a)
    return "\n".join(lines)


def recall_lines(table: pd.DataFrame, rare: list[str]) -> list[str]:
    """Test recall / precision of each rare class per condition, means over seeds. Why: at CPU size, synthetic images
    of a class lowered the recall of REAL lesions of that class and raised its precision (BENCHMARKS.md, the CPU
    levers), a sign that the classifier ties the synthetic look to the class; this shows whether a study repeats it."""
    t = table[table["part"] == "test"].set_index(["condition", "metric"])["mean"]
    lines = ["rare classes on test, recall / precision (mean over seeds):"]
    for cond in dict.fromkeys(table["condition"]):
        parts = [f"{c} {t[(cond, f'recall_{c}')]:.2f} / {t[(cond, f'precision_{c}')]:.2f}" for c in rare
                 if (cond, f"recall_{c}") in t.index and (cond, f"precision_{c}") in t.index]
        if parts:
            lines.append(f"  {cond:28s} " + "  ".join(parts))
    return lines if len(lines) > 1 else []


def sweep_lines(study: Path, table: pd.DataFrame, info: dict) -> list[str]:
    """The synthetic:real ratio sweep in ratio order: the synthetic images each run really used (a class's share is
    capped by the images its filter kept), val and test macro-F1, test minority F1 and AUC, means over seeds."""
    ratios = info.get("ratios") or {}
    if len(ratios) < 2:
        return []
    t = table.set_index(["condition", "part", "metric"])["mean"]
    lines = ["synthetic:real ratio sweep (synthetic images used per class in each condition's first seed; means "
             "over seeds):"]
    for cond, r in sorted(ratios.items(), key=lambda kv: kv[1]):
        seeds = sorted(info["seeds"].get(cond, []))
        m = _json(RunPaths(StudyPaths(study).classifier(cond, seeds[0])).metrics) if seeds else None
        per = ((m or {}).get("synthetic") or {}).get("per_class", {})
        used = ", ".join(f"{c} {v['used']}/{v['real']}" for c, v in sorted(per.items())) or "none"
        scores = "  ".join(f"{part} {metric} {t[(cond, part, metric)]:.3f}"
                           for part, metric in (("val", "macro_f1"), ("test", "macro_f1"), ("test", "minority_f1"),
                                                ("test", "minority_auc")) if (cond, part, metric) in t.index)
        lines.append(f"  ratio {r:<5g} {cond:26s} synthetic/real {used}  {scores}")
    return lines


def ensemble_lines(agg: Path, info: dict) -> list[str]:
    """Each condition's seed ensemble (test, lesion-bootstrap CI) and the primary's minus the best baseline's."""
    if not (agg / "ensembles.csv").is_file():
        return []
    ens = pd.read_csv(agg / "ensembles.csv")
    if not len(ens):
        return []
    lines = ["seed ensembles (probabilities averaged over seeds, rule refitted on val), test [lesion bootstrap]:"]
    for cond, e in ens.groupby("condition", sort=False):
        e = e.set_index("metric")
        lines.append(f"  {cond:20s} seeds {int(e['n_seeds'].iloc[0])}  " + "  ".join(
            f"{m} {e.loc[m, 'value']:.3f} [{e.loc[m, 'ci_lo']:.3f}, {e.loc[m, 'ci_hi']:.3f}]"
            for m in METRICS if m in e.index))
    comp = info.get("ensemble_comparison") or {}
    for m, d in comp.get("metrics", {}).items():
        if m in METRICS:
            lines.append(f"  ensemble {comp['condition']} - {comp['reference']} {m:18s} {d['diff']:+.3f} "
                         f"[{d['lo']:+.3f}, {d['hi']:+.3f}]")
    return lines


def decision_lines(table: pd.DataFrame) -> list[str]:
    """Per condition: the decision rule's tau (fitted on val) and test macro-F1 / minority F1, argmax -> rule."""
    t = table.set_index(["condition", "part", "metric"])["mean"]
    conds = [c for c in dict.fromkeys(table["condition"]) if (c, "val", "decision_tau") in t.index]
    if not conds:
        return []
    lines = ["decision rule (prior shift, tau fitted on val): test argmax -> rule, mean over seeds"]
    for c in conds:
        parts = [f"{m} {t[(c, 'test_argmax', m)]:.3f} -> {t[(c, 'test', m)]:.3f}"
                 for m in ("macro_f1", "minority_f1", "balanced_accuracy", "accuracy")
                 if (c, "test_argmax", m) in t.index and (c, "test", m) in t.index]
        lines.append(f"  {c:20s} tau {t[(c, 'val', 'decision_tau')]:+.2f}  " + "  ".join(parts))
    return lines


def predictions(study: Path, cond: str, seeds: list[int]) -> list[pd.DataFrame] | None:
    """The test predictions.csv of each seed of a condition, or None when one is missing. Runs are found in this
    folder (it may have been moved since it ran)."""
    files = [RunPaths(StudyPaths(study).classifier(cond, s)).predictions for s in sorted(seeds)]
    if not files or not all(f.is_file() for f in files):
        return None
    return [pd.read_csv(f, dtype={"image_id": str, "group_id": str}) for f in files]


def ranking(study: Path, info: dict, n_boot: int = 1000) -> list[str]:
    """Rare-class one-vs-rest AUC per condition from predictions.csv, and the primary minus every other condition."""
    rare = info.get("rare_classes", ["df", "vasc", "mel"])
    preds: dict[str, list[pd.DataFrame]] = {}
    for cond, seeds in info.get("seeds", {}).items():
        found = predictions(study, cond, seeds)
        if found is not None:
            preds[cond] = found
    if not preds:
        return []
    lines = ["rare-class ranking on test (one-vs-rest AUC, mean over seeds; threshold-free):"]
    for cond, ps in preds.items():
        ms = [classification_metrics(p["label"], p[[f"prob_{c}" for c in CLASSES]].to_numpy(), p["group_id"],
                                     rare=rare, n_boot=0) for p in ps]
        per = "  ".join(f"{c} {sum(m['per_class'][c]['auc'] or 0 for m in ms) / len(ms):.3f}" for c in rare)
        lines.append(f"  {cond:20s} minority AUC {sum(m['minority_auc'] for m in ms) / len(ms):.3f}  ({per})")
    primary = info.get("primary")
    for other in (c for c in preds if c != primary and primary in preds and len(preds[c]) == len(preds[primary])):
        d = lesion_bootstrap_diff(preds[primary], preds[other], rare=rare, n_boot=n_boot)["minority_auc"]
        lines.append(f"  {primary} - {other}: minority AUC {d['diff']:+.3f} (lesion bootstrap "
                     f"[{d['lo']:+.3f}, {d['hi']:+.3f}])")
    return lines


def pair_lines(study: Path, spec: str, n_boot: int = 1000) -> list[str]:
    """Paired lesion-bootstrap differences A - B on test for ``spec`` = "[folder::]A:B" (A and B conditions of the
    same seeds; A may come from another study folder on the same split, e.g. the same recipe on other samples)."""
    where, _, pair = spec.rpartition("::")
    a, sep, b = pair.partition(":")
    if not sep or not a or not b:
        raise SystemExit(f"--pair {spec!r}: expected A:B or FOLDER::A:B")
    folder_a = Path(where) if where else study
    sides = []
    for folder, cond in ((folder_a, a), (study, b)):
        info = _json(folder / "aggregate" / "aggregate.json") or {}
        seeds = (info.get("seeds") or {}).get(cond)
        found = predictions(folder, cond, seeds) if seeds else None
        if found is None:
            raise SystemExit(f"--pair {spec!r}: {folder} has no finished runs of condition {cond!r} "
                             f"(its conditions: {sorted(info.get('seeds') or {})})")
        sides.append((info, found))
    (info_a, pa), (info_b, pb) = sides
    if sorted(info_a["seeds"][a]) != sorted(info_b["seeds"][b]):
        raise SystemExit(f"--pair {spec!r}: the seeds differ ({info_a['seeds'][a]} against {info_b['seeds'][b]})")
    rare = info_b.get("rare_classes", ["df", "vasc", "mel"])
    d = lesion_bootstrap_diff(pa, pb, rare=rare, n_boot=n_boot)
    label = f"{where + '::' if where else ''}{a} - {b}"
    return [f"{label}, test, {len(pa)} seeds paired (lesion bootstrap 95 %, {n_boot} replicates):"] + [
        f"  {m:18s} {d[m]['diff']:+.3f} [{d[m]['lo']:+.3f}, {d[m]['hi']:+.3f}]" for m in METRICS if m in d]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", type=Path)
    p.add_argument("--quality", action="append", default=[], metavar="LABEL=PATH",
                   help="another quality.json to list beside the study's (e.g. samples of another sampler)")
    p.add_argument("--pair", action="append", default=[], metavar="[FOLDER::]A:B",
                   help="print the paired lesion-bootstrap difference A - B on test (A from FOLDER if given)")
    a = p.parse_args()
    print(summary(a.study, dict(q.split("=", 1) for q in a.quality)))
    for spec in a.pair:
        print("\n".join(pair_lines(a.study, spec)))


if __name__ == "__main__":
    main()
