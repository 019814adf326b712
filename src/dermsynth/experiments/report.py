"""``dermsynth report <study>``: one self-contained HTML page (every image embedded) and its Markdown twin.

The page is written for someone who did not run the study: the answer first (does the primary condition beat the best
baseline, and how sure are we), then the evidence in pipeline order (data, synthetic images, their quality and
memorisation, the filter, classifier results, curves, confusion matrices, training curves), then provenance. Every
section reads the study's own files, and a stage's folder only when aggregate.json lists its unit as planned and done
with the current config (a folder left over from another configuration is said to be left over); a missing piece is
said to be missing, never filled in.

Both documents are built from one list of blocks, so they cannot disagree. Figures: matplotlib with the Agg backend.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from dermsynth.data.labels import CLASS_NAMES, CLASSES
from dermsynth.experiments.aggregate import load_aggregate
from dermsynth.experiments.config import ratio_name
from dermsynth.experiments.stats import paired_t
from dermsynth.io import DataError, atomic_write_bytes, atomic_write_text, load_image
from dermsynth.metrics.quality import group_label
from dermsynth.paths import RunPaths, StudyPaths

NOTICE = ("Research use only, not for diagnosis. Synthetic images in this report are AI-generated and show no real "
          "patient.")
HEADLINE = [("macro_f1", "macro-F1"), ("minority_f1", "minority F1"), ("balanced_accuracy", "balanced acc."),
            ("accuracy", "accuracy"), ("auc_macro_ovr", "AUC (OvR)"), ("minority_auc", "minority AUC")]


# ----------------------------------------------------------------------------------------------------------------------
# A document of blocks, rendered twice
# ----------------------------------------------------------------------------------------------------------------------

class Doc:
    """Headings, paragraphs, tables, figures and code blocks, rendered to HTML (embedded images) and Markdown."""

    def __init__(self, fig_dir: Path):
        self.blocks: list[tuple] = []
        self.fig_dir = fig_dir

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str, kind: str = "") -> None:
        self.blocks.append(("p", text, kind))

    def missing(self, what: str) -> None:
        self.p(f"Not available: {what}.", "missing")

    def table(self, df: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(("table", df, caption))

    def fig(self, png: bytes, name: str, caption: str) -> None:
        atomic_write_bytes(self.fig_dir / f"{name}.png", png)
        self.blocks.append(("fig", png, name, caption))

    def pre(self, text: str, summary: str) -> None:
        self.blocks.append(("pre", text, summary))

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}"
               "</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                cls = f" class='{b[2]}'" if b[2] else ""
                out.append(f"<p{cls}>{html.escape(b[1])}</p>")
            elif b[0] == "table":
                t = b[1].to_html(index=False, na_rep="", border=0, classes="t", escape=True)
                cap = f"<p class='cap'>{html.escape(b[2])}</p>" if b[2] else ""
                out.append(f"<div class='tw'>{t}</div>{cap}")
            elif b[0] == "fig":
                data = base64.b64encode(b[1]).decode()
                out.append(f"<figure><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(b[3])}</figcaption></figure>")
            elif b[0] == "pre":
                out.append(f"<details><summary>{html.escape(b[2])}</summary><pre>{html.escape(b[1])}</pre></details>")
        out.append("</body></html>")
        return "\n".join(out)

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(f"*{b[1]}*" if b[2] in ("missing", "notice") else b[1])
            elif b[0] == "table":
                out.append(_md_table(b[1]) + (f"\n\n*{b[2]}*" if b[2] else ""))
            elif b[0] == "fig":
                out.append(f"![{b[2]}](figures/{b[2]}.png)\n\n*{b[3]}*")
            elif b[0] == "pre":
                out.append(f"<details><summary>{b[2]}</summary>\n\n```\n{b[1]}\n```\n</details>")
        return "\n\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table.t{border-collapse:collapse;font-size:13px}table.t td,table.t th{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}table.t th{background:#f3f3f3}.tw{overflow-x:auto}
p.missing{color:#a60}p.notice{background:#fff3cd;padding:.6em;border:1px solid #e0c36a}p.cap{font-size:12px;color:#555}
figure{margin:1em 0}figure img{max-width:100%}figcaption{font-size:12px;color:#555}pre{font-size:12px;overflow-x:auto}
p.answer{background:#eef5ff;padding:.6em;border:1px solid #9cc0ee}"""


def _md_table(df: pd.DataFrame) -> str:
    cells = df.astype(object).where(df.notna(), "")
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(str(v).replace("|", "/").replace("\n", " ") for v in r) + " |"
            for r in cells.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------

def _f(v: Any, d: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{d}f}" if isinstance(v, (float, np.floating)) else str(v)


def _signed(v: float, d: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:+.{d}f}"


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _current(paths: StudyPaths, info: dict, unit: str) -> bool:
    """Whether the folder of study unit ``unit`` holds this study's result: the study planned the unit (aggregate.json
    records it with its hash) and its state still says done with that hash. A folder of a unit no longer planned is
    never deleted, so without this check another configuration's samples, filter or FID would read as this study's.
    An aggregate.json without the record (aggregate called outside a study, or written by an earlier release) takes
    every folder as the study's."""
    planned = info.get("units")
    if planned is None:
        return True
    state = _json(paths.unit_state(unit)) or {}
    return unit in planned and state.get("hash") == planned[unit] and state.get("status") == "done"


def _left_over(doc: Doc, what: str, folder: Path) -> None:
    doc.missing(f"{what}: {folder} is left over from another configuration of this study (its unit is not planned, "
                f"or not finished, with the current config), so it is not shown")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _thumbs(paths: list[str], size: int = 64) -> list[np.ndarray]:
    out = []
    for p in paths:
        try:
            out.append(np.asarray(load_image(p).resize((size, size))))
        except DataError:
            continue
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------

def _answer(doc: Doc, agg: dict) -> None:
    info, comp, crit = agg["info"], agg["comparisons"], agg["criteria"]
    best, primary = info["best_baseline"], info["primary"]
    doc.h(2, "The answer")
    vals = ", ".join(f"{b} {_f(v)}" for b, v in info["baseline_val_macro_f1"].items())
    doc.p(f"Best baseline, chosen on the VALIDATION part (never test): {best} (mean validation macro-F1: {vals}).")
    if info.get("primary_val_macro_f1"):
        pvals = ", ".join(f"{c} {_f(v)}" for c, v in info["primary_val_macro_f1"].items())
        doc.p(f"Primary condition, chosen the same way among the synthetic recipes: {primary} (mean validation "
              f"macro-F1: {pvals}).")
    rows = comp[comp["condition"] == primary] if len(comp) else comp
    if not len(rows):
        doc.missing(f"a comparison of {primary!r} with {best!r} (the primary condition has no finished runs, or is the "
                    f"best baseline itself)")
    for _, r in rows.iterrows():
        # minority AUC beside minority F1: a gain in F1 without one in AUC is a threshold shift, not better ranking
        if r["metric"] not in ("macro_f1", "minority_f1", "balanced_accuracy", "minority_auc"):
            continue
        boot = (f"; lesion bootstrap 95 % CI [{_signed(r['boot_lo'])}, {_signed(r['boot_hi'])}]"
                if math.isfinite(r["boot_lo"]) else "")
        verdict = _verdict(r)
        doc.p(f"{primary} minus {best}, test {dict(HEADLINE)[r['metric']]}: {_signed(r['diff'])} (mean over {int(r['n'])} paired "
              f"seed(s); 95 % t-interval [{_signed(r['diff_lo'])}, {_signed(r['diff_hi'])}], paired t-test p = "
              f"{_f(r['p'])}{boot}): {verdict}.{_detectable(r)}", "answer")
    _synthetic_note(doc, agg)
    if len(crit):
        met = crit["status"].str.startswith("met").sum()
        doc.p(f"Seed success criteria: {met} of {len(crit)} met (table below).")


def _detectable(r: pd.Series) -> str:
    """The sentence naming the smallest true difference a comparison row's seeds and test lesions could detect (80 %
    power), or '' when neither is known (e.g. an aggregate written before these columns existed)."""
    seeds, lesions = r.get("detectable", math.nan), r.get("boot_detectable", math.nan)
    parts = ([f"{_f(seeds)} over these {int(r['n'])} seeds"] if math.isfinite(seeds) else []) + \
        ([f"{_f(lesions)} over these test lesions"] if math.isfinite(lesions) else [])
    return (" Smallest true difference detectable with 80 % power: " + " and ".join(parts) + ".") if parts else ""


def _verdict(r: pd.Series) -> str:
    """Plain words for a difference judged by two intervals: over seeds (training noise), over lesions (test noise)."""
    def side(lo: float, hi: float) -> int:
        return 0 if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi else (1 if lo > 0 else -1)

    t, b = side(r["diff_lo"], r["diff_hi"]), side(r["boot_lo"], r["boot_hi"])
    word = {1: "better", -1: "worse"}
    if not math.isfinite(r["boot_lo"]):  # no predictions.csv: only the seeds speak
        return (f"{word[t]} across seeds" if t else "not distinguishable across seeds") + " (no lesion bootstrap)"
    if t and t == b:
        return f"{word[t]}, beyond both the seed-to-seed and the test-lesion noise"
    if t and not b:
        return f"{word[t]} on every seed's average, but within the noise of which lesions are in the test part"
    if b and not t:
        if not (math.isfinite(r["diff_lo"]) and math.isfinite(r["diff_hi"])):  # one seed: no interval over seeds
            return f"{word[b]} on this test part (lesion bootstrap); one seed, so training noise is not measured"
        return f"{word[b]} on this test part, but within the seed-to-seed noise"
    if t and b:
        return "the two intervals disagree in sign: no conclusion"
    return "not distinguishable from the baseline at this number of seeds and test lesions"


def _synthetic_note(doc: Doc, agg: dict) -> None:
    """How many synthetic images the primary condition really used, and what the filter changed (paired by seed)."""
    info, runs = agg["info"], agg["runs"]
    primary, kinds = info["primary"], info.get("synthetic", {})
    counts = info.get("train_counts", {}).get(primary, {})
    rare = info.get("rare_classes", [])
    if counts and kinds.get(primary, "none") != "none":
        syn = sum(counts.get(c, {}).get("synthetic", 0) for c in rare)
        real = sum(counts.get(c, {}).get("real", 0) for c in rare)
        per = ", ".join(f"{c} {counts[c].get('synthetic', 0)}/{counts[c].get('real', 0)}" for c in rare if c in counts)
        few = syn < 0.1 * max(real, 1)
        pool = sum(counts.get(c, {}).get("synthetic_pool", 0) for c in rare)  # data.synthetic_redraw
        fresh = f", each epoch drawing them afresh from {pool} kept images" if pool else ""
        doc.p(f"{primary} trained on {syn} synthetic beside {real} real images of the rare classes ({per}){fresh}"
              + (": too few to change much; the filter and quality sections show why." if few else "."),
              "answer" if few else "")
    # the filter's effect is read only between two conditions that differ in nothing but the filter
    twins = info.get("filter_twins", {})
    filtered = primary if primary in twins else next(iter(twins), None)
    if filtered and len(runs):
        test = runs[runs["part"] == "test"]
        for m, label in (("macro_f1", "macro-F1"), ("minority_f1", "minority F1")):
            a = test[(test["condition"] == filtered) & (test["metric"] == m)].set_index("seed")["value"]
            b = test[(test["condition"] == twins[filtered]) & (test["metric"] == m)].set_index("seed")["value"]
            common = sorted(set(a.index) & set(b.index))
            if len(common) >= 2:
                r = paired_t(a.loc[common].to_numpy(), b.loc[common].to_numpy())
                doc.p(f"What the filter buys: {filtered} minus {twins[filtered]}, test {label}: {_signed(r['diff'])} "
                      f"(95 % t-interval over {len(common)} seeds [{_signed(r['diff_lo'])}, {_signed(r['diff_hi'])}], "
                      f"p = {_f(r['p'])}).")


def _data(doc: Doc, paths: StudyPaths) -> dict | None:
    doc.h(2, "Data")
    split = _json(paths.split)
    if split is None:
        doc.missing(f"{paths.split} (the split stage has not run)")
        return None
    parts = [p for p in ("train", "val", "test") if p in split.get("counts", {})]
    rows = []
    for c in CLASSES:
        row = {"class": f"{c} ({CLASS_NAMES[c]})"}
        for p in parts:
            n = split["counts"][p].get(c, {"images": 0, "lesions": 0})
            row[p] = f"{n['images']} ({n['lesions']})"
        rows.append(row)
    rows.append({"class": "all", **{p: f"{split['totals'][p]['images']} ({split['totals'][p]['lesions']})"
                                    for p in parts}})
    doc.table(pd.DataFrame(rows), "images (lesions) per class and part; every lesion lies in exactly one part")
    doc.p(f"Manifest: {split.get('manifest')}. Lesion-grouped {split.get('mode')} split, fractions "
          f"{split.get('fractions')}, seed {split.get('seed')}; fingerprint {split.get('fingerprint')}.")
    return split


def _grids(doc: Doc, paths: StudyPaths, rare: list[str], info: dict) -> None:
    doc.h(2, "Real and synthetic images")
    samples = paths.samples / "manifest.csv"
    if samples.is_file() and not _current(paths, info, "samples"):
        _left_over(doc, "synthetic samples", paths.samples)
        return
    if not samples.is_file():
        doc.missing("synthetic samples (this study uses no synthetic images, or generation has not run)")
        return
    try:
        from dermsynth.data.split import load_split

        train = load_split(paths.split).part("train")
    except (DataError, KeyError) as e:
        doc.missing(f"the split's train images ({e})")
        return
    syn = pd.read_csv(samples, dtype=str)
    syn["path"] = [str((samples.parent / p).resolve()) if not Path(p).is_absolute() else p for p in syn["path"]]
    kept = rejected = None
    if _current(paths, info, "filter"):
        kept = _read_csv(paths.filtered / "manifest.csv", paths.filtered)
        rejected = _read_csv(paths.filtered / "rejected.csv", paths.filtered)
    rng = np.random.default_rng(0)
    n = 8
    plt = _plt()
    for c in rare:
        rows = [("real (train)", train.loc[train["label"] == c, "path"].tolist())]
        if kept is not None:
            rows += [("synthetic, kept", kept.loc[kept["label"] == c, "path"].tolist()),
                     ("synthetic, rejected", rejected.loc[rejected["label"] == c, "path"].tolist()
                      if rejected is not None and "path" in rejected else [])]
        else:
            rows += [("synthetic", syn.loc[syn["label"] == c, "path"].tolist())]
        fig, axes = plt.subplots(len(rows), n, figsize=(n * 1.1, len(rows) * 1.25), squeeze=False)
        for (title, ps), ax_row in zip(rows, axes):
            pick = [ps[i] for i in rng.permutation(len(ps))[:n]]
            ims = _thumbs(pick)
            for j, ax in enumerate(ax_row):
                ax.axis("off")
                if j < len(ims):
                    ax.imshow(ims[j])
            ax_row[0].set_title(f"{title} ({len(ps)})", fontsize=8, loc="left")
        fig.suptitle(f"{c}: {CLASS_NAMES[c]}", fontsize=9)
        doc.fig(_png(fig), f"grid_{c}", f"{c}: random real training images, and random synthetic images "
                                        f"{'the filter kept and rejected' if kept is not None else ''} (AI-generated)")


def _read_csv(path: Path, root: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "path" in df:
        df["path"] = [str((root / p).resolve()) if p and not Path(p).is_absolute() else p for p in df["path"]]
    return df


def _quality(doc: Doc, paths: StudyPaths, info: dict) -> None:
    doc.h(2, "Synthetic image quality against the real-vs-real floor")
    found = False
    for which, label in (("samples", "all generated images"), ("filtered", "the images the filter kept")):
        q = _json(paths.quality / which / "quality.json")
        if q is not None and not _current(paths, info, f"quality/{which}"):
            _left_over(doc, f"quality of {label}", paths.quality / which)
            found = True  # said why it is not shown
            continue
        if q is None:
            continue
        found = True
        doc.h(3, f"Quality of {label}")
        groups = {g: v for g, v in q.get("groups", {}).items() if "synthetic" in v}
        metrics = [m for m in next(iter(groups.values()))["synthetic"]
                   if not m.endswith("_std") and isinstance(next(iter(groups.values()))["synthetic"][m], (int, float))
                   ] if groups else []
        rows = []
        for m in metrics:
            row = {"metric": m}
            for g, v in groups.items():
                s, f, sd = v["synthetic"].get(m), v["floor"].get(m), v["synthetic"].get(m + "_std")
                ratio = (f" (x{s / f:.1f})" if isinstance(s, (int, float)) and isinstance(f, (int, float)) and f > 0
                         and m.split("_")[0] in ("FD", "KID", "FID") else "")
                spread = f" ± {_f(sd, 4)}" if sd is not None else ""
                row[f"{group_label(g, v)} (N={v['N']})"] = f"{_f(s, 4)}{spread} | {_f(f, 4)}{ratio}"
            rows.append(row)
        skipped = {g: v["skipped"] for g, v in q.get("groups", {}).items() if "skipped" in v}
        if rows:
            doc.table(pd.DataFrame(rows), f"each cell: synthetic vs real {q.get('reference')} | real-vs-real floor "
                                          f"({q.get('floor')} vs {q.get('reference')}) at the same N, mean over "
                                          f"{q.get('repeats')} draws; features: {q.get('extractor')} (FD_x / KID_x "
                                          "are not Inception FID / KID unless x is Inception); (xk) = k times the floor; "
                                          "C2ST_x: cross-validated AUC of a linear classifier telling the set from "
                                          "the real one (0.5: cannot be told apart, 1: separable)")
        if skipped:
            doc.p("Skipped groups: " + "; ".join(f"{g}: {w}" for g, w in skipped.items()), "missing")
        png = paths.quality / which / "metrics_vs_floor.png"
        if png.is_file():
            doc.fig(png.read_bytes(), f"quality_{which}", f"KID and FD per class against the floor ({label})")
        _memorisation(doc, paths, which, q)
    if not found:
        doc.missing("quality.json (the quality stage has not run)")


def _memorisation(doc: Doc, paths: StudyPaths, which: str, q: dict) -> None:
    memo = q.get("memorisation")
    if not memo:
        return
    rows = [{"class": c, "copies": f"{memo['copies'][c]} / {memo['n'][c]}", "copy rate": _f(memo["copy_rate"][c])}
            for c in memo.get("copy_rate", {})]
    flag = (memo.get("real_test_flag_rate") or {}).get("flag_rate")
    cal = memo.get("calibration") or {}
    doc.table(pd.DataFrame(rows), f"memorisation audit ({which}): a synthetic image is a copy when its nearest training "
                                  f"image is closer (cosine >= {_f(memo.get('cosine_threshold'), 4)}, from "
                                  f"{cal.get('source', '?')}) than typical photos of one lesion, or its pixels match "
                                  f"(SSIM >= {memo.get('ssim_threshold')}); real test images (new lesions) flagged by "
                                  f"the same rule: {_f(flag)}")
    png = paths.quality / which / "closest_pairs.png"
    if png.is_file() and which == "samples":
        doc.fig(png.read_bytes(), "closest_pairs", "the synthetic images closest to a training image (left) beside "
                                                   "that training image (right)")


def _filter(doc: Doc, paths: StudyPaths, info: dict) -> None:
    doc.h(2, "Filter")
    f = _json(paths.filtered / "filter.json")
    if f is not None and not _current(paths, info, "filter"):
        _left_over(doc, "filter.json", paths.filtered)
        return
    if f is None:
        doc.missing("filter.json (the filter has not run)")
        return
    rows = []
    for c, v in f.get("per_class", {}).items():
        rows.append({"class": c, "generated": v["in"], "kept": v["kept"], "kept %": _f(100 * v["kept"] / max(v["in"], 1), 1),
                     **{r.replace("_", " "): n for r, n in v.get("by_reason", {}).items()}})
    doc.table(pd.DataFrame(rows), "images per class and why they were rejected (an image can fail several checks)")
    doc.p("Checks: " + "; ".join(f"{k}: {v}" for k, v in f.get("checks", {}).items()) + ".")


def _results(doc: Doc, agg: dict) -> None:
    info, table = agg["info"], agg["table"]
    doc.h(2, "Classifier results (test part)")
    roles = {info["best_baseline"]: "best baseline", info["primary"]: "primary"}
    ratios = info.get("ratios", {})
    rows = []
    for cond in info["conditions"]:
        t = table[(table["condition"] == cond)]
        row = {"condition": cond, "role": roles.get(cond, "baseline" if cond in info["baselines"] else ""),
               "ratio": _f(ratios[cond], 2) if cond in ratios else "", "seeds": ""}
        for m, label in HEADLINE:
            r = t[(t["part"] == "test") & (t["metric"] == m)]
            if len(r):
                r = r.iloc[0]
                row["seeds"] = int(r["n"])
                row[label] = f"{_f(r['mean'])} ± {_f(r['std'])} [{_f(r['ci_lo'])}, {_f(r['ci_hi'])}]"
        v = t[(t["part"] == "val") & (t["metric"] == "macro_f1")]
        row["val macro-F1"] = _f(v.iloc[0]["mean"]) if len(v) else ""
        counts = info.get("train_counts", {}).get(cond, {})
        row["synthetic / real train images"] = ", ".join(
            f"{c} {counts[c].get('synthetic', 0)}/{counts[c].get('real', 0)}" for c in info.get("rare_classes", [])
            if c in counts)
        rows.append(row)
    doc.table(pd.DataFrame(rows), "mean ± std over seeds [95 % t-interval of the mean]; 'ratio' = the synthetic : real "
                                  "ratio asked for the rare classes, and the last column what the first seed's train "
                                  "set really held (fewer when not enough synthetic images survived the filter); the "
                                  "best baseline is picked by validation macro-F1")


def _condition_rows(doc: Doc, agg: dict, title: str, prose: str, row: Callable[[str], dict | None],
                    caption: str) -> None:
    """A section of one table with a row per condition (in the study's order; ``row`` returns None to leave one out)."""
    doc.h(3, title)
    doc.p(prose)
    rows = [r for r in map(row, agg["info"]["conditions"]) if r is not None]
    doc.table(pd.DataFrame(rows), caption)


def _decision(doc: Doc, agg: dict) -> None:
    """What the validation-fitted decision rule changed, per condition (only when the runs used one)."""
    table = agg["table"]
    taus = table[(table["part"] == "val") & (table["metric"] == "decision_tau")]
    if not len(taus):
        return

    def row(cond: str) -> dict | None:
        t, tau = table[table["condition"] == cond], taus[taus["condition"] == cond]
        if not len(tau):
            return None
        out = {"condition": cond, "tau": f"{_signed(tau.iloc[0]['mean'], 2)} ± {_f(tau.iloc[0]['std'], 2)}"}
        for m, label in HEADLINE[:4]:
            a = t[(t["part"] == "test_argmax") & (t["metric"] == m)]
            r = t[(t["part"] == "test") & (t["metric"] == m)]
            if len(a) and len(r):
                out[f"{label}: argmax -> rule"] = f"{_f(a.iloc[0]['mean'])} -> {_f(r.iloc[0]['mean'])}"
        return out

    _condition_rows(doc, agg, "The decision rule",
                    "Each classifier turns probabilities into a class with a prior shift: every class's "
                    "log-probability moves by -tau x log(its share of the real training images), with tau chosen per "
                    "run on VALIDATION macro-F1 (tau > 0 calls rare classes more often, tau < 0 less). Every number "
                    "above uses these decisions; AUCs do not depend on them. Below, test scores with plain argmax "
                    "beside the rule's.",
                    row, "mean over seeds; tau mean ± std")


def _ensembles(doc: Doc, agg: dict) -> None:
    """Each condition's seeds averaged into one classifier (only with >= 2 seeds)."""
    ens = agg.get("ensembles")
    if ens is None or not len(ens):
        return

    def row(cond: str) -> dict | None:
        e = ens[ens["condition"] == cond].set_index("metric")
        if not len(e):
            return None
        out = {"condition": cond, "seeds": int(e["n_seeds"].iloc[0]), "tau": _signed(float(e["tau"].iloc[0]), 2)}
        for m, label in HEADLINE:
            if m in e.index:
                r = e.loc[m]
                out[label] = f"{_f(r['value'])} [{_f(r['ci_lo'])}, {_f(r['ci_hi'])}]"
        return out

    _condition_rows(doc, agg, "Seed ensembles",
                    "Each condition's seeds averaged into one classifier (the mean of their probabilities, decisions "
                    "by the runs' rule refitted on the ensemble's validation probabilities), scored once on test: the "
                    "strongest model a recipe yields, for as many times the inference. The tables above judge one "
                    "training run; this one judges what a user would deploy.",
                    row, "test part; [95 % lesion-bootstrap interval]")
    comp = agg["info"].get("ensemble_comparison") or {}
    for m in ("macro_f1", "minority_f1", "minority_auc"):
        d = comp.get("metrics", {}).get(m)
        if d:
            doc.p(f"Ensemble of {comp['condition']} minus ensemble of {comp['reference']}, test {dict(HEADLINE)[m]}: "
                  f"{_signed(d['diff'])} (lesion bootstrap 95 % CI [{_signed(d['lo'])}, {_signed(d['hi'])}]).")


def _comparisons(doc: Doc, agg: dict) -> None:
    comp = agg["comparisons"]
    doc.h(3, f"Each condition minus the best baseline ({agg['info']['best_baseline']})")
    if not len(comp):
        doc.missing("comparisons (one condition only?)")
        return
    keep = comp[comp["metric"].isin(["macro_f1", "minority_f1", "balanced_accuracy"])]
    rows = [{"condition": r["condition"], "metric": dict(HEADLINE)[r["metric"]], "Δ": _signed(r["diff"]),
             "95 % CI over seeds (t)": f"[{_signed(r['diff_lo'])}, {_signed(r['diff_hi'])}]",
             "p (paired t)": _f(r["p"]),
             "95 % CI over test lesions (bootstrap)": f"[{_signed(r['boot_lo'])}, {_signed(r['boot_hi'])}]",
             "p (bootstrap)": _f(r["boot_p"]),
             "detectable (seeds / lesions)": f"{_f(r.get('detectable', math.nan))} / "
                                             f"{_f(r.get('boot_detectable', math.nan))}"} for _, r in keep.iterrows()]
    doc.table(pd.DataFrame(rows), f"paired by seed; the bootstrap resamples test lesions ({int(keep['n_lesions'].max())}"
                                  " of them) with replacement, the same draw for both conditions, "
                                  f"{agg['info'].get('n_boot')} replicates; detectable: the smallest true difference "
                                  "each test finds with 80 % power at α = 0.05")


def _criteria(doc: Doc, agg: dict) -> None:
    crit = agg["criteria"]
    doc.h(3, "The seed's success criteria")
    if not len(crit):
        doc.missing("criteria")
        return
    rows = [{"criterion": r["criterion"], "seed's start": _f(r["seed_baseline"], 2) if pd.notna(r["seed_baseline"])
             else "", "target / stretch": f"{r['direction']} {_f(r['target'], 2)} / {_f(r['stretch'], 2)}",
             "measured": _f(r["measured"]) if pd.notna(r["measured"]) else "",
             "95 % CI": f"[{_f(r['ci_lo'])}, {_f(r['ci_hi'])}]" if pd.notna(r["ci_lo"]) else "",
             "on": r["condition"], "status": r["status"], "note": r["note"]} for _, r in crit.iterrows()]
    doc.table(pd.DataFrame(rows))


def _bar_conditions(info: dict) -> list[str]:
    """The conditions of the per-class F1 figure: all but the copies the ratio sweep added (the swept condition itself
    stays), unless a copy is the primary or the best baseline. An aggregate.json that does not list the copies (an
    earlier release's) has them recognised by the name the sweep gives them."""
    ratios = info.get("ratios", {})
    copies = info.get("sweep_copies")
    if copies is None:
        copies = [c for c in ratios if any(c == ratio_name(b, ratios[c]) for b in info["conditions"])]
    keep = (info["primary"], info["best_baseline"])
    return [c for c in info["conditions"] if c not in copies or c in keep]


def _per_class_bars(doc: Doc, agg: dict) -> None:
    info, table = agg["info"], agg["table"]
    conds = _bar_conditions(info)
    t = table[table["part"] == "test"].set_index(["condition", "metric"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / max(len(conds), 1)
    x = np.arange(len(CLASSES))
    for i, cond in enumerate(conds):
        mean = np.array([t["mean"].get((cond, f"f1_{c}"), np.nan) for c in CLASSES])
        lo = np.array([t["ci_lo"].get((cond, f"f1_{c}"), np.nan) for c in CLASSES])
        hi = np.array([t["ci_hi"].get((cond, f"f1_{c}"), np.nan) for c in CLASSES])
        err = np.nan_to_num(np.stack([mean - np.clip(lo, 0, 1), np.clip(hi, 0, 1) - mean]))  # F1 lives in [0, 1]
        ax.bar(x + (i - (len(conds) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=cond,
               error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, [f"{c}{' *' if c in info.get('rare_classes', []) else ''}" for c in CLASSES])
    ax.set_ylabel("test F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=min(len(conds), 6), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title("per-class F1, mean over seeds with 95 % t-interval (* rare classes)", fontsize=9)
    doc.fig(_png(fig), "per_class_f1", "per-class test F1 of each condition (sweep copies left out)")


def _sweep(doc: Doc, agg: dict) -> None:
    info, table = agg["info"], agg["table"]
    ratios = info.get("ratios") or {}
    doc.h(3, "Synthetic : real ratio sweep")
    if len(ratios) < 2:
        doc.missing("a ratio sweep (fewer than two ratios in this study)")
        return
    order = sorted(ratios, key=ratios.get)
    t = table[table["part"] == "test"].set_index(["condition", "metric"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    pos = np.arange(len(order))
    for m, label in (("minority_f1", "minority F1"), ("macro_f1", "macro-F1"), ("balanced_accuracy", "balanced acc.")):
        mean = np.array([t["mean"].get((c, m), np.nan) for c in order])
        lo = np.array([t["ci_lo"].get((c, m), np.nan) for c in order])
        ax.errorbar(pos, mean, yerr=np.nan_to_num(mean - lo), marker="o", capsize=3, label=label)
    counts = info.get("train_counts", {})
    used = {c: sum(v.get("synthetic", 0) for k, v in counts.get(c, {}).items() if k in info.get("rare_classes", []))
            for c in order}
    ax.set_xticks(pos, [f"{ratios[c]:g}\n{c}\n{used[c]} syn." for c in order], fontsize=7)
    ax.set_xlabel("synthetic : real ratio asked for the rare classes (0 = no synthetic images); "
                  "below: synthetic images used (first seed)", fontsize=8)
    ax.set_ylabel("test score")
    ax.legend(fontsize=8)
    doc.fig(_png(fig), "ratio_sweep", "test scores against the synthetic:real ratio (mean over seeds, 95 % t-interval)")


def _confusions(doc: Doc, agg: dict) -> None:
    info = agg["info"]
    conf = info.get("confusion_norm", {})
    pair = [c for c in (info["best_baseline"], info["primary"]) if c in conf]
    doc.h(3, "Confusion matrices")
    if not pair:
        doc.missing("confusion matrices")
        return
    plt = _plt()
    fig, axes = plt.subplots(1, len(pair), figsize=(5.2 * len(pair), 4.6), squeeze=False)
    for ax, cond in zip(axes[0], pair):
        m = np.asarray(conf[cond])
        ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(CLASSES)):
            for j in range(len(CLASSES)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(CLASSES)), CLASSES, fontsize=8)
        ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{cond} (row-normalised, mean over seeds)", fontsize=9)
    doc.fig(_png(fig), "confusion", "test confusion matrices: best baseline (left) and primary condition (right)")


def _curves(doc: Doc, agg: dict) -> None:
    info = agg["info"]
    doc.h(3, "Training curves")
    conds = [c for c in dict.fromkeys([info["best_baseline"], info["primary"]]) if c in info.get("runs", {})]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    drawn = 0
    for k, cond in enumerate(conds):
        for seed, run in sorted(info["runs"][cond].items()):
            s = RunPaths(run).summary
            if not s.is_file():
                continue
            df = pd.read_csv(s)
            if "epoch" not in df:
                continue
            style = dict(color=f"C{k}", alpha=0.8, label=cond if seed == min(info["runs"][cond]) else None)
            if "train_loss" in df:
                axes[0].plot(df["epoch"], df["train_loss"], **style)
            if "val_macro_f1" in df:
                axes[1].plot(df["epoch"], df["val_macro_f1"], **style)
            drawn += 1
    if not drawn:
        plt.close(fig)
        doc.missing("summary.csv of the classifier runs")
        return
    axes[0].set_title("train loss", fontsize=9)
    axes[1].set_title("validation macro-F1 (the early-stopping criterion)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    doc.fig(_png(fig), "training_curves", "per-epoch training loss and validation macro-F1, one line per seed")


def _provenance(doc: Doc, paths: StudyPaths, split: dict | None, info: dict) -> None:
    doc.h(2, "Provenance")
    prov = _json(paths.root / "provenance.json") or {}
    timings = _json(paths.timings) or {}
    gen = _json(paths.generator / "generator.json") if _current(paths, info, "generator") else None
    if timings:
        rows = [{"stage": s, "units": v["units"], "wall time (s)": _f(v["wall_s"], 1),
                 "elapsed (s)": _f(v.get("elapsed_s", v["wall_s"]), 1)}
                for s, v in timings.get("stages", {}).items()]
        rows += [{"stage": s, "units": "", "wall time (s)": _f(v, 1), "elapsed (s)": _f(v, 1)}
                 for s, v in timings.get("other", {}).items()]
        rows.append({"stage": "total", "units": "", "wall time (s)": "", "elapsed (s)": _f(timings.get("total_s"), 1)})
        doc.table(pd.DataFrame(rows), "wall time per stage, summed over its units (resumed units count every "
                                      "session); elapsed differs where units ran side by side (study.workers)")
    device = prov.get("device", {})
    facts = {"date": prov.get("date"), "device": ", ".join(device.get("gpu", [])) or
             f"CPU ({device.get('cpu')}, {device.get('cpu_count')} cores, torch threads {device.get('torch_threads')})",
             "platform": device.get("platform"),
             "torch CPU kernels": device.get("torch_cpu_capability", "not recorded"),
             "split fingerprint": (split or {}).get("fingerprint"),
             "generator": f"{gen.get('kind')} trained on split {gen.get('split_fingerprint', '')[:16]}..."
             if gen else "none"}
    facts.update(prov.get("versions", {}))
    doc.table(pd.DataFrame([{"item": k, "value": str(v)} for k, v in facts.items()]))
    if paths.config.is_file():
        doc.pre(paths.config.read_text(), "study config (config.yaml)")
    if gen:
        doc.pre(json.dumps(gen, indent=1), "generator.json (its sampling block is the one it was trained with)")
    drawn = _json(paths.samples / "samples.json") if _current(paths, info, "samples") else None
    if drawn:
        doc.pre(json.dumps(drawn, indent=1), "samples.json (the settings the study's samples were drawn with)")


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------

def build_report(study: str | Path) -> Path:
    """Write ``<study>/report/report.html`` (self-contained) and ``report.md`` (+ figures/); returns the HTML path."""
    paths = StudyPaths(study)
    agg = load_aggregate(paths.root)
    info = agg["info"]
    doc = Doc(paths.report_html.parent / "figures")
    name = paths.root.name
    cfg_text = paths.config.read_text() if paths.config.is_file() else ""
    for line in cfg_text.splitlines():
        if line.startswith("name:"):
            name = line.split(":", 1)[1].strip() or name
    doc.h(1, f"dermsynth study: {name}")
    doc.p(NOTICE, "notice")
    doc.p(f"Study folder: {paths.root.resolve()}. Primary condition: {info['primary']}; rare classes: "
          f"{', '.join(info.get('rare_classes', []))}; seeds per condition: "
          f"{max((len(v) for v in info['seeds'].values()), default=0)}.")
    _answer(doc, agg)
    _criteria(doc, agg)
    split = _data(doc, paths)
    _grids(doc, paths, info.get("rare_classes", []), info)
    _quality(doc, paths, info)
    _filter(doc, paths, info)
    _results(doc, agg)
    _decision(doc, agg)
    _ensembles(doc, agg)
    _comparisons(doc, agg)
    _per_class_bars(doc, agg)
    _sweep(doc, agg)
    _confusions(doc, agg)
    _curves(doc, agg)
    _provenance(doc, paths, split, info)
    atomic_write_text(paths.report_md, doc.markdown())
    return atomic_write_text(paths.report_html, doc.html(f"dermsynth study {name}"))


__all__ = ["build_report", "NOTICE"]
