"""The study runner on the tiny toy config: every stage really runs; kills mid-stage resume; finished units are
skipped; a config change reruns exactly the units downstream of it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import PIL
import pytest
import torch

import dermsynth.experiments.study as study_mod
import dermsynth.generate.scratch_train as scratch_train
from dermsynth.cli import main as cli_main
from dermsynth.config import ConfigError, load_config
from dermsynth.experiments.config import StudyConfig, drawn_classes, expand_conditions, validate
from dermsynth.experiments.study import plan, preview_study, run_study
from dermsynth.experiments.units import UnitRunner
from dermsynth.paths import StudyPaths

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "study_tiny.yaml"


def tiny(*overrides: str) -> StudyConfig:
    return load_config(StudyConfig, TINY, list(overrides))


class Interrupt(KeyboardInterrupt):
    """Stands in for Ctrl-C / a kill in the middle of a stage."""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The tiny study, killed once in the middle of the generator and once in the middle of a classifier, then rerun
    to the end. Returns the study folder."""
    out = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    real_save, real_train = scratch_train.save_checkpoint, study_mod.train_classifier

    def save_then_die(*args, **kwargs):  # the generator dies right after its step-10 checkpoint
        path = real_save(*args, **kwargs)
        if args[2] == 10:
            raise Interrupt("killed after the generator's step-10 checkpoint")
        return path

    def train_then_die(cfg, run, resume=False, **kw):  # the first hybrid classifier dies in its second epoch
        if Path(run).parts[-2:] == ("hybrid", "seed0") and not resume:
            def hook(epoch, step, global_step):
                if epoch == 1 and step == 1:
                    raise Interrupt("killed in epoch 2")
            return real_train(cfg, run, resume=resume, on_step=hook)
        return real_train(cfg, run, resume=resume, **kw)

    mp.setattr(scratch_train, "save_checkpoint", save_then_die)
    mp.setattr(study_mod, "train_classifier", train_then_die)
    for _ in range(2):  # killed in the generator, then in the classifier
        with pytest.raises(Interrupt):
            run_study(tiny(), out)
    mp.undo()
    run_study(tiny(), out)
    return out


def _log(study: Path) -> str:
    return (study / "log.txt").read_text()


def test_every_stage_ran_and_the_report_was_built(finished):
    paths = StudyPaths(finished)
    for f in (paths.manifest, paths.split, paths.generator / "generator.json", paths.samples / "manifest.csv",
              paths.reference_classifier / "metrics.json", paths.filtered / "filter.json",
              paths.quality / "samples" / "quality.json", paths.quality / "filtered" / "quality.json",
              paths.aggregate / "table.csv", paths.report_html, paths.report_md, paths.timings):
        assert f.is_file(), f
    samples = pd.read_csv(paths.samples / "manifest.csv")
    assert samples["label"].value_counts().to_dict() == {"mel": 8, "vasc": 8, "df": 4}  # generation.per_class_of
    drawn = json.loads((paths.samples / "samples.json").read_text())
    assert (drawn["sampler"], drawn["steps"], drawn["batch_size"]) == ("ddim", 3, 8)  # generator.sample, generation
    assert "samples.json (the settings the study's samples were drawn with)" in paths.report_md.read_text()

    # the hybrid runs really trained on synthetic images: the filtered set, or the raw samples for "unfiltered"
    hyb = json.loads((paths.classifier("hybrid", 1) / "metrics.json").read_text())
    unf = json.loads((paths.classifier("hybrid_unfiltered", 1) / "metrics.json").read_text())
    real = json.loads((paths.classifier("real", 1) / "metrics.json").read_text())
    used = lambda m: sum(v["synthetic"] for v in m["train_counts"].values())  # noqa: E731
    assert used(hyb) > 0 and used(unf) > 0 and used(real) == 0
    assert hyb["decision"]["rule"] == "prior_shift" and "argmax" in hyb["decision"]  # study_tiny's eval.decision
    assert pd.read_csv(paths.classifier("hybrid_r2", 0) / "train_set.csv")["source"].eq("synthetic").sum() > used(hyb) / 2

    table = pd.read_csv(paths.aggregate / "table.csv")
    test_f1 = table[(table["part"] == "test") & (table["metric"] == "macro_f1")]
    assert set(test_f1["condition"]) == {"real", "hybrid", "hybrid_unfiltered", "hybrid_r2"}
    assert (test_f1["n"] == 2).all()
    info = json.loads((paths.aggregate / "aggregate.json").read_text())
    assert info["best_baseline"] == "real" and info["ratios"] == {"real": 0.0, "hybrid": 1.0, "hybrid_r2": 2.0}
    assert info["sweep_copies"] == ["hybrid_r2"]  # the per-class figure leaves out only these (and keeps the primary)
    # the primary is the primary_from candidate with the best mean VALIDATION macro-F1, read back from table.csv
    val_f1 = table[(table["part"] == "val") & (table["metric"] == "macro_f1")].set_index("condition")["mean"]
    assert info["primary_val_macro_f1"] == pytest.approx({c: val_f1[c] for c in ("hybrid", "hybrid_r2")})
    assert info["primary"] == max(("hybrid", "hybrid_r2"), key=lambda c: (val_f1[c], c == "hybrid"))
    # what the filter buys is read only between recipes that differ in the filter alone (not hybrid_r2)
    assert info["filter_twins"] == {"hybrid": "hybrid_unfiltered"}

    timings = json.loads(paths.timings.read_text())
    assert {"data", "split", "generator", "samples", "reference classifier", "filter", "quality",
            "classifiers"} <= set(timings["stages"]) and timings["stages"]["classifiers"]["units"] == 8
    page = paths.report_html.read_text()
    assert "hybrid_unfiltered" in page and page.count("data:image/png;base64,") >= 8
    assert "The decision rule" in page and "Seed ensembles" in page
    ens = pd.read_csv(paths.aggregate / "ensembles.csv")
    assert set(ens["condition"]) == {"real", "hybrid", "hybrid_unfiltered", "hybrid_r2"} and (ens["n_seeds"] == 2).all()
    # what a rerun elsewhere needs to compare with: versions (pillow resamples the images) and the CPU's kernels
    prov = json.loads((paths.root / "provenance.json").read_text())
    assert prov["versions"]["pillow"] == PIL.__version__
    assert prov["device"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert prov["device"]["cpu"] and len(prov["history"]) >= 3  # one entry per invocation: two were killed


def test_eval_levers_bench_reproduces_each_runs_own_decisions(finished, tmp_path, capsys):
    """bench/eval_levers.py rescoring from the checkpoints gives the runs' own argmax and rule scores back."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("eval_levers", REPO / "bench" / "eval_levers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "levers.json"
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["eval_levers.py", str(finished), "--device", "cpu", "--n-boot", "20", "--out", str(out)])
    try:
        mod.main()
    finally:
        mp.undo()
    res = json.loads(out.read_text())
    info = json.loads((StudyPaths(finished).aggregate / "aggregate.json").read_text())
    for cond, by_seed in info["runs"].items():
        for seed, run in by_seed.items():
            m = json.loads((Path(run) / "metrics.json").read_text())
            r = res["scores"][cond][seed]
            assert r["tau"]["rule"] == m["decision"]["tau"]
            assert r["scores"]["rule"]["macro_f1"] == pytest.approx(m["test"]["macro_f1"], abs=1e-6)
            assert r["scores"]["argmax"]["macro_f1"] == pytest.approx(m["decision"]["argmax"]["test"]["macro_f1"],
                                                                      abs=1e-6)
            assert r["scores"]["tta+argmax"]["minority_auc"] != r["scores"]["argmax"]["minority_auc"]
    assert set(res["comparisons"]) == {"argmax", "rule", "tta+argmax", "tta+rule"}
    assert "minus" in capsys.readouterr().out


def test_study_summary_prints_the_rule_and_the_ensembles(finished):
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_summary", REPO / "bench" / "study_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.summary(finished)
    ens = pd.read_csv(StudyPaths(finished).aggregate / "ensembles.csv").set_index(["condition", "metric"])
    assert "decision rule (prior shift" in text and "seed ensembles" in text
    assert f"macro_f1 {ens.loc[('hybrid', 'macro_f1'), 'value']:.3f}" in text
    assert "ensemble hybrid" in text or "ensemble hybrid_r2" in text  # the primary's minus the best baseline's


def test_a_kill_mid_stage_resumes_that_stage_from_its_checkpoint(finished):
    log = _log(finished)
    assert "resuming generator" in log and "resumed from" in log and "step_00000010" in log
    gen_log = (StudyPaths(finished).generator / "log.txt").read_text()
    assert "resumed from" in gen_log
    clf_log = (StudyPaths(finished).classifier("hybrid", 0) / "log.txt").read_text()
    assert "resumed from" in clf_log and "epoch 1" in clf_log
    # units finished before each kill were not redone
    assert log.count("running data") == 1 and log.count("running generator") == 1
    state = json.loads((finished / "units" / "generator.json").read_text())
    assert state["status"] == "done" and state["wall_s"] > 0


def test_a_finished_study_is_skipped_on_rerun(finished, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a finished unit was run again")

    for name in ("train_classifier", "train_generator", "generate", "run_filter", "run_quality", "make_toy",
                 "make_split"):
        monkeypatch.setattr(study_mod, name, refuse)
    before = (finished / "aggregate" / "table.csv").read_text()
    assert run_study(tiny(), finished) == StudyPaths(finished).report_html
    assert (finished / "aggregate" / "table.csv").read_text() == before


def _stale(study: Path, cfg: StudyConfig) -> set[str]:
    units, _, _ = plan(cfg, study)
    runner = UnitRunner(study, units)
    return {u.name for u in units if not runner.is_done(u)}


def test_quality_pools_only_the_rare_classes_when_other_classes_are_drawn(tmp_path):
    """An every-class draw must not turn the quality stage's pooled row into a pool of all seven classes; a rare-only
    draw keeps the config (and so the unit hashes) it had."""
    def quality_cfg(*overrides: str):
        units, _, _ = plan(tiny(*overrides), tmp_path)
        return {u.name: u for u in units}["quality/filtered"].config

    assert quality_cfg().pooled_classes == []
    assert quality_cfg("generation.per_class_of={df: 4, nv: 6}").pooled_classes == ["df", "vasc", "mel"]
    assert quality_cfg("generation.per_class_of={nv: 6}", "quality.pooled_classes=[df, nv]").pooled_classes == [
        "df", "nv"]


def test_a_config_change_invalidates_exactly_its_downstream_units(finished, tmp_path, monkeypatch):
    assert _stale(finished, tiny()) == set()
    hybrids = {f"classifier/{c}/seed{s}" for c in ("hybrid", "hybrid_unfiltered", "hybrid_r2") for s in (0, 1)}
    # more synthetic images: samples and everything made from them, not the generator or the real-only runs
    assert _stale(finished, tiny("generation.per_class=6")) == {
        "samples", "filter", "quality/samples", "quality/filtered"} | hybrids
    assert _stale(finished, tiny("generation.strength=0.5")) == {  # image-to-image samples: the same downstream
        "samples", "filter", "quality/samples", "quality/filtered"} | hybrids
    # the filter's thresholds: the filtered set and what uses it, not the unfiltered runs
    assert _stale(finished, tiny("filter.min_class_prob=0.1")) == {
        "filter", "quality/filtered"} | {h for h in hybrids if "unfiltered" not in h}
    # the base classifier: every classifier, the filter (its reference classifier changed) and the filtered set
    assert _stale(finished, tiny("classifier.train.lr=0.001")) == {
        "reference", "filter", "quality/filtered"} | hybrids | {"classifier/real/seed0", "classifier/real/seed1"}
    # a third seed adds units and invalidates nothing
    assert _stale(finished, tiny("seeds=[0,1,2]")) == {f"classifier/{c}/seed2" for c in
                                                       ("real", "hybrid", "hybrid_unfiltered", "hybrid_r2")}

    # and a real rerun after a change runs only the stale units (here: the two quality units)
    study = tmp_path / "copy"
    shutil.copytree(finished, study)
    called = []
    real_quality = study_mod.run_quality

    def spy(samples, split, cfg, out):
        called.append(Path(out).name)
        return real_quality(samples, split, cfg, out=out)

    def refuse(*a, **k):
        raise AssertionError("a unit that did not depend on the change was rerun")

    monkeypatch.setattr(study_mod, "run_quality", spy)
    for name in ("train_classifier", "train_generator", "generate", "run_filter"):
        monkeypatch.setattr(study_mod, name, refuse)
    (study / "quality" / "samples" / "stale_marker").write_text("x")
    run_study(tiny("quality.repeats=3"), study)
    assert sorted(called) == ["filtered", "samples"]
    assert not (study / "quality" / "samples" / "stale_marker").exists()  # the stale folder was cleared first
    assert json.loads((study / "quality" / "samples" / "quality.json").read_text())["repeats"] == 3


def test_a_sampling_change_redraws_the_samples_and_keeps_the_generator(finished):
    hybrids = {f"classifier/{c}/seed{s}" for c in ("hybrid", "hybrid_unfiltered", "hybrid_r2") for s in (0, 1)}
    assert _stale(finished, tiny("generator.sample.steps=4")) == {
        "samples", "filter", "quality/samples", "quality/filtered"} | hybrids


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_a_dry_run_says_what_a_run_would_do_and_changes_nothing(finished, tmp_path, capsys):
    before = _snapshot(finished)
    preview = preview_study(tiny("generator.sample.steps=4"), finished)
    assert _snapshot(finished) == before
    assert preview.changed == {"generator.sample.steps": (3, 4)}
    rows = {r["unit"]: r for r in preview.units}
    assert [r["unit"] for r in preview.units] == [u.name for u in plan(tiny(), finished)[0]]  # run order
    assert {n for n, r in rows.items() if r["action"] == "rerun"} == _stale(finished, tiny("generator.sample.steps=4"))
    assert rows["generator"]["action"] == rows["classifier/real/seed0"]["action"] == "skip"
    samples = rows["samples"]
    assert samples["deletes"] == str(StudyPaths(finished).samples) and samples["wall_s"] > 0
    assert "config changed" in samples["why"] and rows["filter"]["why"] == "upstream samples reruns"
    text = str(preview)
    assert "generator.sample.steps: 3 -> 4" in text and f"deletes {StudyPaths(finished).samples}" in text
    assert text.splitlines()[-1] == f"{len(rows) - len(_stale(finished, tiny('generator.sample.steps=4')))} to skip, " \
                                    f"{len(_stale(finished, tiny('generator.sample.steps=4')))} to rerun"
    assert cli_main(["study", "-c", str(TINY), "--out", str(finished), "--dry-run",
                     "--set", "generator.sample.steps=4"]) == 0
    assert capsys.readouterr().out.strip() == text and _snapshot(finished) == before
    fresh = preview_study(tiny(), tmp_path / "new")
    assert fresh.changed is None and {r["action"] for r in fresh.units} == {"run"}
    assert not (tmp_path / "new").exists()
    other = tmp_path / "other"  # a config saved by a release with a key this one lacks: a run would not read it
    other.mkdir()
    (other / "config.yaml").write_text((finished / "config.yaml").read_text() + "retired_knob: 1\n")
    odd = preview_study(tiny(), other)
    assert odd.changed is None and "retired_knob" in odd.unreadable and "cannot be compared" in str(odd)


def test_folders_of_units_a_changed_config_no_longer_plans_are_not_reported(finished, tmp_path, monkeypatch):
    """Folders of units the config stops planning stay on disk; criteria.csv and the report must not present another
    configuration's samples, filter or quality as this study's (the same goes for a copied study folder)."""
    study = tmp_path / "copy"
    shutil.copytree(finished, study)

    def refuse(*a, **k):
        raise AssertionError("a finished unit was run again")

    for name in ("train_classifier", "train_generator", "generate", "run_filter", "run_quality"):
        monkeypatch.setattr(study_mod, name, refuse)
    paths = StudyPaths(study)
    # quality_on without the raw samples: their quality.json stays, but is no FID of this configuration
    run_study(tiny("quality_on=[filtered]"), study)
    fid = pd.read_csv(paths.aggregate / "criteria.csv").set_index("metric").loc["fid"]
    assert fid["status"] == "not measurable here" and fid["note"].startswith("no quality.json of the generated samples")
    assert "quality_on must list samples" in fid["note"]
    page = paths.report_html.read_text()
    assert "Quality of the images the filter kept" in page and "Quality of all generated images" not in page
    assert f"{paths.quality / 'samples'} is left over from another configuration" in page

    # real-only conditions: no generator, samples, filter or quality in this study any more
    run_study(tiny("conditions=[{name: real}]", "sweep.ratios=[]", "primary=real", "primary_from=[]"), study)
    info = json.loads((paths.aggregate / "aggregate.json").read_text())
    assert set(info["units"]) == {"data", "split", "classifier/real/seed0", "classifier/real/seed1"}
    page = paths.report_html.read_text()
    assert "alt='grid_df'" not in page and "Quality of the images the filter kept" not in page
    for folder in (paths.samples, paths.filtered, paths.quality / "filtered"):
        assert f"{folder} is left over from another configuration" in page


def test_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match="baselines.*synthetic"):
        validate(tiny("baselines=[hybrid]"))
    with pytest.raises(ConfigError, match="primary"):
        validate(tiny("primary=nope"))
    with pytest.raises(ConfigError, match="primary_from: 'real' uses no synthetic"):
        validate(tiny("primary_from=[hybrid, real]"))
    with pytest.raises(ConfigError, match="primary_from: 'hybrid_r5' is not a condition"):
        validate(tiny("primary_from=[hybrid_r5]"))
    with pytest.raises(ConfigError, match="generation.per_class_of.*'xyz'"):
        validate(tiny("generation.per_class_of={xyz: 10}"))
    with pytest.raises(ConfigError, match="generation.per_class_of.*'nv': 0"):
        validate(tiny("generation.per_class_of={nv: 0}"))
    with pytest.raises(ConfigError, match="generation.strength must be in"):
        validate(tiny("generation.strength=0"))
    with pytest.raises(ConfigError, match="needs generation.strength < 1"):
        validate(tiny("generation.init_from={df: nv}"))
    with pytest.raises(ConfigError, match="init_from"):
        validate(tiny("generation.strength=0.5", "generation.init_from={df: df}"))
    # a class that is not rare is drawn too, so that a recipe can give every class synthetic images
    assert drawn_classes(tiny("generation.per_class_of={df: 4, nv: 3}")) == {"df": 4, "vasc": 8, "mel": 8, "nv": 3}
    with pytest.raises(ConfigError, match="condition 'real'.*unknown"):
        validate(tiny("conditions=[{name: real, set: {train.nope: 1}}]", "sweep.ratios=[]", "primary=real",
                      "primary_from=[]"))
    with pytest.raises(ConfigError, match="condition 'real'.*real_only_last_epochs"):  # caught before any work
        validate(tiny("conditions=[{name: real, set: {train.real_only_last_epochs: 9}}]", "sweep.ratios=[]",
                      "primary=real", "primary_from=[]"))
    conds, ratios = expand_conditions(load_config(StudyConfig, REPO / "configs" / "ham10000.yaml"))
    assert [c.name for c in conds][-4:] == ["hybrid_r0.25", "hybrid_r0.5", "hybrid_r2", "hybrid_r5"]
    assert ratios == {"focal": 0.0, "hybrid_r0.25": 0.25, "hybrid_r0.5": 0.5, "hybrid": 1.0, "hybrid_r2": 2.0,
                      "hybrid_r5": 5.0}


def test_demo_runs_the_demo_config_through_the_real_study(monkeypatch, tmp_path):
    from dermsynth.experiments.demo import DEMO_CONFIG, run_demo

    seen = {}
    monkeypatch.setattr(study_mod, "run_study", lambda cfg, out: seen.update(cfg=cfg, out=out) or Path(out) / "r.html")
    assert run_demo(tmp_path) == tmp_path / "r.html"
    cfg = seen["cfg"]
    assert DEMO_CONFIG == REPO / "configs" / "demo.yaml" and seen["out"] == tmp_path
    assert cfg.name == "demo" and cfg.data.source == "toy" and len(cfg.seeds) == 3
    conds, ratios = validate(cfg)
    assert {"hybrid", "hybrid_unfiltered"} <= {c.name for c in conds} and ratios["focal"] == 0.0


def test_the_summary_script_reads_a_finished_study(finished):
    """bench/study_summary.py (what a GPU round prints last) reads every table a study writes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_summary", REPO / "bench" / "study_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.summary(finished)
    assert "elapsed per stage" in text and "filter kept" in text and "test metrics" in text
    assert "hybrid - " in text and "real" in text
    assert "primary chosen on val" in text and "rare-class ranking" in text
    assert text.count("minority AUC") >= 5  # one line per condition (4) and the primary minus the others
    table = pd.read_csv(StudyPaths(finished).aggregate / "table.csv").set_index(["condition", "part", "metric"])
    recall = text[text.index("recall / precision"):].splitlines()[1:]
    line = next(ln for ln in recall if ln.split()[0] == "hybrid")
    assert (f"mel {table.loc[('hybrid', 'test', 'recall_mel'), 'mean']:.2f} / "
            f"{table.loc[('hybrid', 'test', 'precision_mel'), 'mean']:.2f}") in line
    # the ratio sweep, in ratio order, with the synthetic images each run really used (ratio 0 uses none)
    sweep = text[text.index("ratio sweep"):].splitlines()[1:4]
    assert [ln.split()[2] for ln in sweep] == ["real", "hybrid", "hybrid_r2"]
    assert "synthetic/real none" in sweep[0]
    used = json.loads(StudyPaths(finished).classifier("hybrid_r2", 0).joinpath("metrics.json").read_text())
    assert "df {used}/{real}".format(**used["synthetic"]["per_class"]["df"]) in sweep[2]


def test_the_softness_shortcut_check_scores_sharp_soft_and_synthetic_images(finished):
    """bench/softness_shortcut.py on the tiny study's runs: soft images differ; 'soft' at full size changes nothing;
    a synthetic set is scored like the others; the counts follow from the probabilities by hand."""
    import importlib.util

    import numpy as np

    from dermsynth.data.cache import build_cache
    from dermsynth.data.labels import CLASSES
    from dermsynth.data.manifest import read_manifest
    from dermsynth.data.split import load_split

    spec = importlib.util.spec_from_file_location("softness_shortcut", REPO / "bench" / "softness_shortcut.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    paths = StudyPaths(finished)
    split = load_split(paths.split)
    test = split.part("test")
    sharp = build_cache(split.manifest, 16).take(test["image_id"])
    labels = np.array([CLASSES.index(c) for c in test["label"]])
    soft = mod.soften(sharp, 8)
    assert soft.shape == sharp.shape and soft.dtype == np.uint8 and not np.array_equal(soft, sharp)
    assert np.array_equal(mod.soften(sharp, 16), sharp)
    syn = read_manifest(paths.samples / "manifest.csv")
    syn_set = mod.image_set(syn, 16)
    test_images, test_labels = mod.image_set(split.manifest, 16, test)
    assert np.array_equal(test_images, sharp) and np.array_equal(test_labels, labels)
    run = paths.classifier("hybrid", 0)
    r = mod.shortcut(run, {"sharp": (sharp, labels), "soft": (soft, labels), "synthetic": syn_set},
                     ["df", "vasc", "mel"])
    for part in ("sharp", "soft"):
        assert 0 <= r[part]["common_called_rare"] <= 1 and 0 <= r[part]["common_mean_p_rare"] <= 1
    assert set(r["synthetic"]["rare_recall"]) == set(syn["label"]) & {"df", "vasc", "mel"}
    same = mod.shortcut(run, {"sharp": (sharp, labels), "soft": (sharp, labels)}, ["df", "vasc", "mel"])
    assert same["sharp"] == same["soft"]
    # by hand: akiec (0) called df (3) once of twice, nv (5) never; df recalled once of once
    p = np.full((4, 7), 0.01)
    p[[0, 1, 2, 3], [3, 0, 5, 3]] = 0.9
    got = mod.rare_calls(p / p.sum(1, keepdims=True), np.array([0, 0, 5, 3]), [3, 4, 6])
    assert got["common_n"] == 3 and got["common_called_rare"] == 1 / 3
    assert got["called_rare_by_class"] == {"akiec": {"df": 0.5, "mel": 0.0, "vasc": 0.0},
                                           "nv": {"df": 0.0, "mel": 0.0, "vasc": 0.0}}
    assert got["rare_recall"] == {"df": 1.0}
    assert abs(got["common_mean_p_rare"] - (0.92 + 0.03 + 0.03) / 0.96 / 3) < 1e-9


def test_the_summary_script_pairs_two_conditions(finished):
    """--pair A:B: a condition against itself differs by exactly 0; across folders the syntax FOLDER::A:B reads A
    there; an unknown condition is refused with the conditions that exist."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_summary", REPO / "bench" / "study_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    same = mod.pair_lines(finished, "hybrid:hybrid", n_boot=50)
    assert same[0].startswith("hybrid - hybrid, test, 2 seeds paired")
    assert all(ln.split()[1:] == ["+0.000", "[+0.000,", "+0.000]"] for ln in same[1:]) and len(same) == 6
    lines = mod.pair_lines(finished, f"{finished}::hybrid:real", n_boot=50)
    macro = next(ln for ln in lines if ln.split()[0] == "macro_f1")
    table = pd.read_csv(StudyPaths(finished).aggregate / "table.csv").set_index(["condition", "part", "metric"])
    diff = table.loc[("hybrid", "test", "macro_f1"), "mean"] - table.loc[("real", "test", "macro_f1"), "mean"]
    assert float(macro.split()[1]) == pytest.approx(diff, abs=1.5e-3)  # the observed difference is the seeds' mean
    with pytest.raises(SystemExit, match="no finished runs of condition 'nope'.*'hybrid'"):
        mod.pair_lines(finished, "nope:real")
