"""Pooled units (study.workers > 1): independent units run in separate processes, their state and timings are
recorded as for serial units, and one failure does not lose the others' results."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from dermsynth.experiments.study import plan
from dermsynth.experiments.units import Unit, UnitRunner
from tests_support_jobs import write_pid


def _units(root: Path, fail: str = "") -> list[Unit]:
    units = [Unit("prep", "prep", root / "prep", {}, lambda resume: write_pid(str(root / "prep"), resume=resume),
                  done_file="pid.txt")]
    for name in ("a", "b", "c"):
        out = root / "runs" / name
        args = (str(out), name == fail)
        units.append(Unit(f"clf/{name}", "classifiers", out, {"n": name},
                          lambda resume, a=args: write_pid(*a, resume=resume), upstream=["prep"],
                          done_file="pid.txt", job=(write_pid, args)))
    return units


def test_pooled_units_run_in_other_processes_and_are_recorded(tmp_path):
    runner = UnitRunner(tmp_path, _units(tmp_path))
    runner.run_all(workers=2)
    pids = {n: int((tmp_path / "runs" / n / "pid.txt").read_text()) for n in "abc"}
    assert int((tmp_path / "prep" / "pid.txt").read_text()) == os.getpid()  # a unit without a job runs here
    assert os.getpid() not in pids.values() and len(set(pids.values())) >= 2  # two workers shared the three
    assert all(runner.is_done(u) for u in runner.units)
    t = json.loads((tmp_path / "timings.json").read_text())
    st = t["stages"]["classifiers"]
    assert st["units"] == 3 and 0 < st["elapsed_s"]
    assert t["total_s"] == pytest.approx(st["elapsed_s"] + t["stages"]["prep"]["wall_s"])
    # a rerun finds everything done and runs nothing
    UnitRunner(tmp_path, _units(tmp_path, fail="a")).run_all(workers=2)


def test_one_failing_pooled_unit_keeps_the_others_and_names_itself(tmp_path):
    runner = UnitRunner(tmp_path, _units(tmp_path, fail="b"))
    with pytest.raises(RuntimeError, match="1 of 3 pooled units failed; first: clf/b"):
        runner.run_all(workers=3)
    done = {u.name for u in runner.units if runner.is_done(u)}
    assert done == {"prep", "clf/a", "clf/c"}
    assert json.loads((tmp_path / "units" / "clf__b.json").read_text())["status"] == "running"  # resumed on rerun


def test_a_stage_that_mixes_waves_and_units_run_alone_counts_both_in_its_elapsed_time(tmp_path):
    """elapsed_s replaces a pooled stage's summed wall time, so it must also hold the time of the stage's units that
    ran one at a time (before or after a wave): else timings.json undercounts the stage."""
    def job(name: str, upstream: tuple[str, ...] = ()) -> Unit:
        args = (str(tmp_path / "runs" / name),)
        return Unit(f"clf/{name}", "classifiers", tmp_path / "runs" / name, {"n": name},
                    lambda resume, a=args: write_pid(*a, resume=resume), upstream=list(upstream),
                    done_file="pid.txt", job=(write_pid, args))

    UnitRunner(tmp_path, [job("d")]).run_all(workers=1)  # on its own, before any wave of the stage
    UnitRunner(tmp_path, [job("d"), job("a"), job("b")]).run_all(workers=2)  # a and b: one wave
    t = json.loads((tmp_path / "timings.json").read_text())
    wave = t["elapsed"]["classifiers"]
    assert t["stages"]["classifiers"]["elapsed_s"] == pytest.approx(wave + t["units"]["clf/d"])
    # c needs a, so it runs on its own after the wave
    UnitRunner(tmp_path, [job("d"), job("a"), job("b"), job("c", ("clf/a",))]).run_all(workers=2)
    t = json.loads((tmp_path / "timings.json").read_text())
    st = t["stages"]["classifiers"]
    assert t["elapsed"]["classifiers"] == wave and st["units"] == 4
    assert st["elapsed_s"] == pytest.approx(wave + t["units"]["clf/d"] + t["units"]["clf/c"])
    assert t["total_s"] == pytest.approx(st["elapsed_s"])


def test_study_units_carry_picklable_jobs(tmp_path):
    from dermsynth.config import load_config
    from dermsynth.experiments.config import StudyConfig

    cfg = load_config(StudyConfig, Path(__file__).resolve().parents[1] / "configs" / "study_tiny.yaml", ["workers=3"])
    units, _, _ = plan(cfg, tmp_path)
    pooled = [u.name for u in units if u.job is not None]
    assert "generator" in pooled and "reference" in pooled and any(n.startswith("classifier/") for n in pooled)
    names = [u.name for u in units]
    # the reference classifier sits right after the generator, then the real-only classifiers: one wave
    assert names.index("reference") == names.index("generator") + 1
    real = [n for n in names if n.startswith("classifier/real/")]
    assert len(real) == len(cfg.seeds) and names[names.index("reference") + 1:names.index("samples")] == real
    assert all(names.index(n) > names.index("quality/samples") for n in names if n.startswith("classifier/hybrid"))
    # one worker, or early_baselines off: the classifiers keep their seed-major order after the quality stage
    for over in (["workers=1"], ["workers=3", "early_baselines=false"]):
        serial = [u.name for u in plan(load_config(StudyConfig, Path(__file__).resolve().parents[1] / "configs" /
                                                   "study_tiny.yaml", over), tmp_path)[0]]
        assert serial[serial.index("reference") + 1] == "samples"
        clf = [n for n in serial if n.startswith("classifier/")]
        assert serial[-len(clf):] == clf and clf[0].endswith("seed0") and clf[-1].endswith(f"seed{cfg.seeds[-1]}")
    for u in units:
        if u.job is not None:
            pickle.dumps(u.job)


@pytest.mark.slow
def test_tiny_study_with_workers_runs_baselines_beside_the_generator(tmp_path):
    """The whole tiny study with two worker processes: the real-only classifier starts in the generator's wave,
    before the samples exist, and the study finishes with its report."""
    from dermsynth.config import load_config
    from dermsynth.experiments.config import StudyConfig
    from dermsynth.experiments.study import run_study
    from dermsynth.paths import StudyPaths

    cfg = load_config(StudyConfig, Path(__file__).resolve().parents[1] / "configs" / "study_tiny.yaml",
                      ["workers=2", "seeds=[0]", "sweep.ratios=[]", "primary_from=[]"])
    run_study(cfg, tmp_path)
    paths = StudyPaths(tmp_path)
    state = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "units").glob("*.json")}
    assert all(s["status"] == "done" for s in state.values())
    assert state["classifier__real__seed0"]["started"] <= state["samples"]["started"]
    assert state["classifier__hybrid__seed0"]["started"] >= state["filter"]["finished"]
    assert paths.report_html.is_file()
    timings = json.loads(paths.timings.read_text())
    assert timings["stages"]["classifiers"]["units"] == 3 and "elapsed_s" in timings["stages"]["generator"]
