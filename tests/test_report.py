"""The report builds from a finished study: self-contained HTML with its tables and images, and a Markdown twin."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import write_manifest
from dermsynth.data.split import SplitConfig, make_split
from dermsynth.experiments.aggregate import aggregate, load_aggregate
from dermsynth.experiments.report import NOTICE, build_report
from dermsynth.io import atomic_save_image
from dermsynth.paths import StudyPaths
from test_aggregate import make_fake_study


def _study_files(root: Path) -> None:
    """Split, samples, filter and quality outputs in the formats the stages write."""
    paths = StudyPaths(root)
    rng = np.random.default_rng(0)
    rows = []
    for c in CLASSES:
        for j in range(8):
            p = paths.data / "images" / f"{c}{j}.png"
            atomic_save_image(p, rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            rows.append({"image_id": f"{c}{j}", "group_id": f"L{c}{j}", "label": c, "path": str(p), "source": "toy"})
    write_manifest(pd.DataFrame(rows), paths.manifest)
    make_split(paths.manifest, paths.split.parent, SplitConfig(seed=0))

    syn = []
    for c in ("df", "vasc", "mel"):
        for i in range(6):
            p = paths.samples / "images" / c / f"s_{c}_{i}.png"
            atomic_save_image(p, np.full((16, 16, 3), 40 * i, np.uint8))
            syn.append({"image_id": f"s_{c}_{i}", "group_id": f"s_{c}_{i}", "label": c, "path": str(p),
                        "source": "synthetic"})
    syn = pd.DataFrame(syn)
    write_manifest(syn, paths.samples / "manifest.csv")
    write_manifest(syn.iloc[::2], paths.filtered / "manifest.csv")
    syn.iloc[1::2].assign(reasons="outside_real_manifold").to_csv(paths.filtered / "rejected.csv", index=False)
    (paths.filtered / "filter.json").write_text(json.dumps({
        "per_class": {c: {"in": 6, "kept": 3, "rejected": 3, "by_reason": {"outside_real_manifold": 3,
                                                                           "low_class_prob": 0, "copy_of_train": 0}}
                      for c in ("df", "vasc", "mel")},
        "checks": {"realism": "inside the class's real train k-NN manifold, k=5"}}))
    group = {"N": 4, "synthetic": {"FD_lite0": 50.0, "FD_lite0_std": 2.0, "KID_lite0": 0.06, "KID_lite0_std": 0.01,
                                   "precision_lite0": 0.4},
             "floor": {"FD_lite0": 20.0, "KID_lite0": 0.02, "precision_lite0": 0.7}}
    memo = {"copies": {"df": 1, "vasc": 0, "mel": 0}, "n": {"df": 6, "vasc": 6, "mel": 6},
            "copy_rate": {"df": 1 / 6, "vasc": 0.0, "mel": 0.0}, "cosine_threshold": 0.93, "ssim_threshold": 0.9,
            "calibration": {"source": "same-lesion pairs", "n_pairs": 12}, "real_test_flag_rate": {"flag_rate": 0.01}}
    q = {"extractor": "lite0", "reference": "test", "floor": "real train", "repeats": 20,
         "groups": {"df": group, "vasc": group, "pooled": {**group, "N": 12}, "mel": {"N": 1, "skipped": "N=1"}},
         "memorisation": memo}
    (paths.quality / "samples").mkdir(parents=True)
    (paths.quality / "samples" / "quality.json").write_text(json.dumps(q))
    atomic_save_image(paths.quality / "samples" / "closest_pairs.png", np.zeros((20, 40, 3), np.uint8))
    (paths.root / "config.yaml").write_text("name: fake_study\nseeds: [0, 1, 2]\n")
    (paths.root / "provenance.json").write_text(json.dumps({"date": "2026-01-01T00:00:00", "versions": {
        "torch": "2.x"}, "device": {"cpu": "x86_64", "cpu_count": 2, "torch_threads": 1, "platform": "Linux"}}))
    (paths.timings).write_text(json.dumps({"stages": {"classifiers": {"wall_s": 12.5, "units": 12}},
                                           "other": {"aggregate": 0.5}, "total_s": 13.0}))


def test_report_holds_tables_and_embedded_images(tmp_path):
    runs = make_fake_study(tmp_path)
    _study_files(tmp_path)
    quality = json.loads((tmp_path / "quality" / "samples" / "quality.json").read_text())
    aggregate(tmp_path, runs, baselines=["real_only", "oversampling", "focal"], primary="hybrid", n_boot=200,
              ratios={"focal": 0.0, "hybrid": 1.0, "oversampling": 2.0}, quality=quality)
    out = build_report(tmp_path)
    assert out == StudyPaths(tmp_path).report_html
    page = out.read_text()

    # self-contained: every image is a data URI, nothing is fetched from elsewhere
    imgs = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(imgs) >= 8 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "http://" not in page and "https://" not in page
    for name in ("grid_df", "grid_vasc", "grid_mel", "closest_pairs", "per_class_f1", "ratio_sweep", "confusion",
                 "training_curves"):
        assert f"alt='{name}'" in page, name

    # the tables carry the study's numbers and choices
    assert NOTICE in page and "fake_study" in page
    assert "Best baseline, chosen on the VALIDATION part (never test): focal" in page
    assert "hybrid minus focal, test minority AUC: +0.120" in page  # (0.10 + 0.13 + 0.13) / 3, as minority F1
    # beside each answer, the gains these seeds and lesions could have shown
    assert "Smallest true difference detectable with 80 % power:" in page and "over these 3 seeds" in page
    assert "detectable (seeds / lesions)" in page
    assert "0.720 ± 0.020" in page  # hybrid test macro-F1 mean ± std
    assert "not measurable here" in page and "FD_lite0" in page and "met (stretch)" in page
    assert "50.0000 ± 2.0000 | 20.0000 (x2.5)" in page  # FD_lite0 beside its floor
    assert "1 / 6" in page and "outside real manifold" in page
    assert "df 10/10, vasc 10/10, mel 10/10" in page and "df 0/10" in page  # synthetic / real train images
    assert "N=1" in page  # a skipped quality group is said to be skipped
    assert "12.5" in page and "fingerprint" in page

    md = StudyPaths(tmp_path).report_md.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(imgs) and all((out.parent / link).is_file() for link in links)
    assert "| condition | role |" in md and "not measurable here" in md


def test_report_shows_what_the_decision_rule_changed(tmp_path):
    runs = make_fake_study(tmp_path)
    _study_files(tmp_path)
    for cond, by_seed in runs.items():
        for seed, run in by_seed.items():
            m = json.loads((run / "metrics.json").read_text())
            argmax = {p: {k: m[p][k] - 0.05 for k in ("macro_f1", "minority_f1", "balanced_accuracy", "accuracy")}
                      for p in ("val", "test")}
            m["decision"] = {"rule": "prior_shift", "tau": 0.25 * seed, "argmax": argmax}
            (run / "metrics.json").write_text(json.dumps(m))
    aggregate(tmp_path, runs, baselines=["real_only", "oversampling", "focal"], primary="hybrid", n_boot=50)
    table = load_aggregate(tmp_path)["table"].set_index(["condition", "part", "metric"])
    assert table.loc[("hybrid", "val", "decision_tau"), "mean"] == 0.25  # seeds 0, 1, 2
    assert table.loc[("hybrid", "test_argmax", "macro_f1"), "mean"] == pytest.approx(
        table.loc[("hybrid", "test", "macro_f1"), "mean"] - 0.05)
    page = build_report(tmp_path).read_text()
    assert "The decision rule" in page and "+0.25 ± 0.25" in page and "0.670 -&gt; 0.720" in page


def test_report_of_a_study_without_synthetic_images_says_what_is_missing(tmp_path):
    runs = make_fake_study(tmp_path, with_predictions=False)
    runs = {c: r for c, r in runs.items() if c != "hybrid"}
    aggregate(tmp_path, runs, baselines=["real_only", "focal"], primary="oversampling")
    page = build_report(tmp_path).read_text()
    assert "Not available: synthetic samples" in page and "Not available: filter.json" in page
    assert "Not available: a ratio sweep" in page
    assert "oversampling minus focal" in page


def test_verdict_with_one_seed_does_not_claim_seed_noise():
    """With one seed there is no interval over seeds: the verdict rests on the lesion bootstrap alone and says so."""
    import pandas as pd

    from dermsynth.experiments.report import _verdict

    nan = float("nan")
    one_seed = pd.Series({"diff_lo": nan, "diff_hi": nan, "boot_lo": -0.14, "boot_hi": -0.06})
    assert _verdict(one_seed).startswith("worse on this test part (lesion bootstrap); one seed")
    three_seeds = pd.Series({"diff_lo": -0.3, "diff_hi": 0.1, "boot_lo": -0.14, "boot_hi": -0.06})
    assert _verdict(three_seeds) == "worse on this test part, but within the seed-to-seed noise"


def test_report_leaves_out_folders_of_units_the_study_no_longer_plans(tmp_path):
    """Folders of units that a changed config no longer plans stay on disk: their numbers must not read as this
    study's. aggregate.json lists the planned units and their hashes; the report shows a folder only for those."""
    runs = make_fake_study(tmp_path)
    _study_files(tmp_path)
    paths = StudyPaths(tmp_path)
    (paths.generator / "generator.json").parent.mkdir(parents=True)
    (paths.generator / "generator.json").write_text(json.dumps({"kind": "scratch_left_over"}))
    real = {c: r for c, r in runs.items() if c != "hybrid"}
    aggregate(tmp_path, real, baselines=["real_only", "focal"], primary="oversampling", n_boot=20,
              units={"data": "h0", "split": "h1"})  # a real-only config: no generator, samples, filter or quality
    page = build_report(tmp_path).read_text()
    assert "alt='grid_df'" not in page and "closest_pairs" not in page
    assert "50.0000 ± 2.0000" not in page and "outside real manifold" not in page and "1 / 6" not in page
    assert "scratch_left_over" not in page
    for folder in (paths.samples, paths.quality / "samples", paths.filtered):
        assert f"{folder} is left over from another configuration" in page

    # planned and done with the recorded hash: shown; done under another hash (redone since): still left out
    for unit, h in (("samples", "hs"), ("filter", "other")):
        paths.unit_state(unit).parent.mkdir(parents=True, exist_ok=True)
        paths.unit_state(unit).write_text(json.dumps({"unit": unit, "hash": h, "status": "done"}))
    aggregate(tmp_path, runs, baselines=["real_only", "focal"], primary="hybrid", n_boot=20,
              units={"samples": "hs", "filter": "hf"})
    page = build_report(tmp_path).read_text()
    assert "alt='grid_df'" in page and "the filter kept and rejected" not in page
    assert f"{paths.filtered} is left over from another configuration" in page


def test_per_class_figure_leaves_out_only_the_sweep_copies():
    """The swept condition itself (hybrid) stays in the per-class F1 figure when the primary chosen on validation is
    one of its sweep copies; the other copies are left out, and so is nothing else."""
    from dermsynth.experiments.report import _bar_conditions

    info = {"conditions": ["real", "focal", "hybrid", "hybrid_unfiltered", "hybrid_r2", "hybrid_r5"],
            "ratios": {"focal": 0.0, "hybrid": 1.0, "hybrid_r2": 2.0, "hybrid_r5": 5.0},
            "primary": "hybrid_r2", "best_baseline": "real", "baselines": ["real", "focal"],
            "sweep_copies": ["hybrid_r2", "hybrid_r5"]}
    assert _bar_conditions(info) == ["real", "focal", "hybrid", "hybrid_unfiltered", "hybrid_r2"]
    # a condition the config names itself is no copy, whatever its name
    assert _bar_conditions({**info, "sweep_copies": ["hybrid_r2"]})[-1] == "hybrid_r5"
    # an aggregate.json without the list: the copies are known by the names the sweep gives them
    assert _bar_conditions({k: v for k, v in info.items() if k != "sweep_copies"}) == _bar_conditions(info)



def test_report_says_when_the_synthetic_images_were_drawn_afresh_each_epoch(tmp_path):
    runs = make_fake_study(tmp_path)
    _study_files(tmp_path)
    for run in runs["hybrid"].values():  # data.synthetic_redraw: 10 an epoch per class, from 40 kept
        m = json.loads((run / "metrics.json").read_text())
        for c in ("df", "vasc", "mel"):
            m["train_counts"][c]["synthetic_pool"] = 40
        (run / "metrics.json").write_text(json.dumps(m))
    aggregate(tmp_path, runs, baselines=["real_only", "oversampling", "focal"], primary="hybrid", n_boot=20,
              synthetic={"hybrid": "filtered"})
    page = build_report(tmp_path).read_text()
    assert ("hybrid trained on 30 synthetic beside 30 real images of the rare classes (df 10/10, vasc 10/10, mel "
            "10/10), each epoch drawing them afresh from 120 kept images") in page
