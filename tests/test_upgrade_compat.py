"""A release that adds config fields keeps finished and interrupted work valid: unit hashes cover only non-default
fields and ignore the order of mapping keys (and a study recorded under an older scheme, which hashed every field or
kept mapping order, is carried over instead of rerun), and a classifier or generator run saved before a field existed
still resumes."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dermsynth.classify.config import ClfConfig
from dermsynth.classify.train import _check_run_folder
from dermsynth.config import ConfigError, changed_fields, load_config, to_dict
from dermsynth.experiments.config import StudyConfig
from dermsynth.experiments.study import plan
from dermsynth.experiments.units import Unit, UnitRunner, unit_hash
from dermsynth.paths import RunPaths


@dataclass
class _Inner:
    lr: float = 1e-3
    tags: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class _Old:
    steps: int = 10
    inner: _Inner = field(default_factory=_Inner)


@dataclass
class _New(_Old):  # a later release: one more field whose default keeps the old behaviour
    new_knob: int = 0


def _unit(cfg: object, run=lambda resume: None, out: Path | None = None) -> Unit:
    return Unit("u", "stage", out, cfg, run)


def test_changed_fields_keeps_only_what_differs_from_the_defaults():
    assert changed_fields(_Old()) == {}
    assert changed_fields(_Old(inner=_Inner(tags=["a", "b"]))) == {"inner": {"tags": ["a", "b"]}}
    assert changed_fields({"clf": _Old(steps=3), "synthetic": "filtered"}) == {"clf": {"steps": 3},
                                                                              "synthetic": "filtered"}


def test_a_new_field_at_its_default_leaves_the_hash_alone():
    assert unit_hash(_unit(_Old(steps=3)), {}) == unit_hash(_unit(_New(steps=3)), {})
    assert unit_hash(_unit(_Old(steps=3)), {}) != unit_hash(_unit(_New(steps=3, new_knob=1)), {})
    assert unit_hash(_unit(_Old(steps=3)), {}) != unit_hash(_unit(_Old(steps=4)), {})
    # the first scheme hashed every field: there the new field changed the hash
    assert unit_hash(_unit(_Old()), {}, scheme=1) != unit_hash(_unit(_New()), {}, scheme=1)


def _record(runner: UnitRunner, u: Unit, h: str) -> None:
    runner.state_path(u).parent.mkdir(parents=True, exist_ok=True)
    runner.state_path(u).write_text(json.dumps({"unit": u.name, "stage": u.stage, "hash": h, "status": "done",
                                                "wall_s": 1.0}))


@pytest.mark.parametrize("scheme", [1, 2])
def test_a_study_recorded_under_an_older_scheme_is_carried_over_not_rerun(tmp_path, scheme):
    ran = []
    up = Unit("up", "stage", None, {"b": _Old(steps=2), "a": {"y": 1, "x": 2}}, lambda resume: ran.append("up"))
    down = Unit("down", "stage", None, {"clf": _Old(), "k": 1}, lambda resume: ran.append("down"), upstream=["up"])
    runner = UnitRunner(tmp_path, [up, down])
    old = {}
    for u in (up, down):
        old[u.name] = unit_hash(u, old, scheme=scheme)
        _record(runner, u, old[u.name])
    assert not runner.is_done(up)  # the current hash differs from the recorded one ...
    runner.run_all()
    assert ran == []  # ... but the record is carried over: nothing reran
    assert json.loads(runner.state_path(down).read_text())["hash"] == down.hash
    assert runner.carry_over() == 0  # once


def test_mapping_keys_in_another_order_leave_the_hash_alone():
    a = _unit({"per_class_of": {"nv": 6, "bkl": 5}, "clf": _Old(steps=3), "order": [2, 1]})
    b = _unit({"order": [2, 1], "clf": _Old(steps=3), "per_class_of": {"bkl": 5, "nv": 6}})
    assert unit_hash(a, {}) == unit_hash(b, {})
    assert unit_hash(a, {}, scheme=2) != unit_hash(b, {}, scheme=2)  # the second scheme kept the order
    assert unit_hash(a, {}) != unit_hash(_unit({**a.config, "order": [1, 2]}), {})  # a list's order still counts


def _tiny(*overrides: str) -> StudyConfig:
    return load_config(StudyConfig, Path(__file__).resolve().parents[1] / "configs" / "study_tiny.yaml", overrides)


def test_a_study_config_with_mapping_keys_swapped_is_the_same_study(tmp_path):
    def hashes(*overrides: str) -> dict[str, str]:
        cfg = _tiny("generation.strength=0.5", *overrides)
        return {u.name: u.hash for u in UnitRunner(tmp_path, plan(cfg, tmp_path)[0]).units}

    ratios = "classifier.data.synthetic_ratio_per_class"
    one = hashes("generation.per_class_of={nv: 6, bkl: 5}", "split.train_keep_of={df: 0.5, mel: 0.6}",
                 "generation.init_from={df: nv, vasc: bkl}", f"{ratios}={{df: 1, mel: 2}}")
    other = hashes("generation.per_class_of={bkl: 5, nv: 6}", "split.train_keep_of={mel: 0.6, df: 0.5}",
                   "generation.init_from={vasc: bkl, df: nv}", f"{ratios}={{mel: 2, df: 1}}")
    assert one == other


def test_a_study_recorded_under_the_second_scheme_reruns_exactly_what_the_upgrade_changed(tmp_path):
    """Carried over: every unit whose results this release leaves as they were, including the samples of a study that
    draws classes that are not rare (the second scheme listed them in per_class_of's order, the third in class order).
    Rerun: the filter and quality units, whose copy rule was corrected (STAGE_VERSIONS), and everything downstream."""
    cfg = _tiny("generation.per_class_of={nv: 6, bkl: 5}")
    units = plan(cfg, tmp_path)[0]
    runner = UnitRunner(tmp_path, units)
    old: dict[str, str] = {}
    for u in units:
        if u.name == "samples":  # as the release before the third scheme planned it
            assert u.config["classes"] == ["df", "vasc", "mel", "bkl", "nv"]
            u = dataclasses.replace(u, config={"generation": cfg.generation,
                                               "classes": ["df", "vasc", "mel", "nv", "bkl"]}, legacy_config=None)
        old[u.name] = unit_hash(u, old, scheme=2)
        _record(runner, u, old[u.name])
    changed = {"filter", "quality/samples", "quality/filtered"}
    downstream: set[str] = set()
    for u in units:  # upstream first
        if set(u.upstream) & (changed | downstream):
            downstream.add(u.name)
    assert changed <= {u.name for u in units} and "classifier/hybrid/seed0" in downstream
    assert "classifier/hybrid_unfiltered/seed0" not in downstream  # unfiltered samples: unchanged, carried over
    assert runner.carry_over() == len(units) - len(changed | downstream)
    for u in units:
        assert (runner.state(u)["hash"] == u.hash) == (u.name not in changed | downstream), u.name
    assert runner.carry_over() == 0  # once


def _hashes(tmp_path: Path, *overrides: str) -> dict[str, str]:
    return {u.name: u.hash for u in UnitRunner(tmp_path, plan(_tiny(*overrides), tmp_path)[0]).units}


def test_changing_how_a_study_samples_redraws_the_samples_without_retraining(tmp_path):
    """generator.sample.* is hashed in the samples unit: it and its downstream rerun, the generator does not."""
    base = _hashes(tmp_path)
    for change in ("generator.sample.steps=7", "generator.sample.precision=bf16", "generator.sample.use_ema=false",
                   "generator.sample.clip_x0=false"):
        now = _hashes(tmp_path, change)
        assert now["generator"] == base["generator"], change
        assert now["samples"] != base["samples"] and now["filter"] != base["filter"], change
        assert now["classifier/real/seed0"] == base["classifier/real/seed0"], change
    assert _hashes(tmp_path, "generator.train.steps=31")["generator"] != base["generator"]
    # only the settings that take effect count: generation.steps overrides generator.sample.steps
    assert (_hashes(tmp_path, "generation.steps=5", "generator.sample.steps=7")["samples"]
            == _hashes(tmp_path, "generation.steps=5")["samples"] != base["samples"])
    # an SD-1.5 generator samples with generator.sd's settings: the block changes neither unit
    sd = _hashes(tmp_path, "generator.kind=sd15_lora")
    assert _hashes(tmp_path, "generator.kind=sd15_lora", "generator.sample.steps=7") == sd


def _record_third_scheme(runner: UnitRunner, cfg: StudyConfig, study: Path) -> dict[str, str]:
    """Record every unit of ``cfg``'s plan done, as the release of the third scheme hashed it (generator.sample with
    the generator, not with the samples); returns the recorded hashes."""
    old: dict[str, str] = {}
    for u in plan(cfg, study)[0]:
        if u.name == "generator":
            u = dataclasses.replace(u, config=dataclasses.replace(
                cfg.generator, data=dataclasses.replace(cfg.generator.data, split=None)), legacy_config=None)
        elif u.name == "samples":
            u = dataclasses.replace(u, config={"generation": cfg.generation, "classes": u.config["classes"]},
                                    legacy_config=None)
        old[u.name] = unit_hash(u, old, scheme=3)
        _record(runner, u, old[u.name])
    return old


def test_a_study_recorded_under_the_third_scheme_is_carried_over_whole(tmp_path):
    """The third scheme hashed generator.sample with the generator and not with the samples: a study recorded then
    (here with sampling settings that differ from the defaults) reruns nothing, filter and quality included."""
    cfg = _tiny("generator.sample.steps=7", "generation.per_class_of={nv: 6, bkl: 5}")
    units = plan(cfg, tmp_path)[0]
    runner = UnitRunner(tmp_path, units)
    _record_third_scheme(runner, cfg, tmp_path)
    assert not any(runner.state(u)["hash"] == u.hash for u in units)
    assert runner.carry_over() == len(units)
    assert all(runner.state(u)["hash"] == u.hash for u in units) and runner.carry_over() == 0


def test_a_third_scheme_study_opened_with_other_sampling_settings_keeps_its_generator(tmp_path):
    """The third scheme's generator record hashed the sampling block the generator was trained with: it is recognised
    through the generator folder's config.yaml, while the samples, drawn with the old block, rerun with their
    downstream."""
    from dermsynth.config import save_config
    from dermsynth.paths import StudyPaths

    was, now = _tiny("generator.sample.steps=7"), _tiny("generator.sample.steps=9")
    runner = UnitRunner(tmp_path, plan(now, tmp_path)[0])
    old = _record_third_scheme(runner, was, tmp_path)  # with steps 7
    save_config(was.generator, StudyPaths(tmp_path).generator / "config.yaml")  # as its training wrote it
    runner = UnitRunner(tmp_path, plan(now, tmp_path)[0])
    rerun = {"samples", "filter", "quality/samples", "quality/filtered"} | {
        f"classifier/{c}/seed{s}" for c in ("hybrid", "hybrid_unfiltered", "hybrid_r2") for s in (0, 1)}
    assert runner.carry_over() == len(runner.units) - len(rerun)
    assert {u.name for u in runner.units if runner.state(u)["hash"] != u.hash} == rerun
    # without the folder's config (nothing says what the generator was trained with) the generator reruns, as before
    (StudyPaths(tmp_path).generator / "config.yaml").unlink()
    for u in runner.units:
        _record(runner, u, old[u.name])
    assert "generator" not in {u.name for u in UnitRunner(tmp_path, plan(now, tmp_path)[0])._carried()}


def test_a_record_of_another_config_is_still_stale(tmp_path):
    ran = []
    u = Unit("up", "stage", None, _Old(steps=2), lambda resume: ran.append("up"))
    runner = UnitRunner(tmp_path, [u])
    _record(runner, u, unit_hash(Unit("up", "stage", None, _Old(steps=3), u.run), {}, scheme=1))
    runner.run_all()
    assert ran == ["up"]


def test_a_classifier_run_saved_before_a_field_existed_still_resumes(tmp_path):
    cfg = ClfConfig()
    cfg.data.split = "split.json"
    paths = RunPaths(tmp_path / "run")
    saved = to_dict(cfg)
    del saved["train"]["label_smoothing"]  # as if written by a release without this field
    paths.config.parent.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(yaml.safe_dump(saved))
    assert _check_run_folder(cfg, paths, resume=True) is False  # no metrics.json yet: resume, no error
    cfg.train.label_smoothing = 0.1  # a real change is still refused
    with pytest.raises(ConfigError, match="label_smoothing"):
        _check_run_folder(cfg, paths, resume=True)


def _drop(d: dict, part: str) -> tuple[dict, str]:
    """d without one key of d[part] (as a release without that field would have saved it), and the key."""
    key = sorted(d[part])[0]
    return {**d, part: {k: v for k, v in d[part].items() if k != key}}, key


def test_a_generator_checkpoint_saved_before_a_field_existed_still_resumes(tmp_path):
    from dermsynth.io import DataError
    from dermsynth.generate.config import GenConfig
    from dermsynth.generate.scratch_train import STATE_JSON, _check_resumable

    cfg = GenConfig()
    saved, key = _drop(to_dict(cfg), "model")
    (tmp_path / STATE_JSON).write_text(json.dumps({"split_fingerprint": "fp", "config": saved}))
    _check_resumable(tmp_path, tmp_path, cfg, "fp", "split.json")  # the missing field counts at its default
    setattr(cfg.model, key, "changed")
    with pytest.raises(DataError, match=f"model.{key}"):
        _check_resumable(tmp_path, tmp_path, cfg, "fp", "split.json")


def test_an_sd15_run_saved_before_a_field_existed_still_resumes(tmp_path):
    from dermsynth.generate.config import GenConfig
    from dermsynth.generate.sd15.train import RESUMABLE, _check_resume_config

    cfg = GenConfig()
    run = RunPaths(tmp_path)
    saved = to_dict(cfg)
    key = sorted(k for k in saved["sd"] if k not in RESUMABLE)[0]
    saved["sd"].pop(key)
    run.config.write_text(yaml.safe_dump(saved))
    _check_resume_config(run, cfg)
    setattr(cfg.sd, key, "changed")
    with pytest.raises(ConfigError, match=key):
        _check_resume_config(run, cfg)


def test_a_run_saved_with_a_field_this_release_lacks_is_refused_naming_the_file(tmp_path):
    """The other direction: a key the dataclass no longer has cannot be read at its default. Each resume check names
    the file that holds it."""
    from dermsynth.generate.config import GenConfig
    from dermsynth.generate.scratch_train import STATE_JSON, _check_resumable
    from dermsynth.generate.sd15.train import _check_resume_config

    cfg = GenConfig()
    saved = to_dict(cfg)
    saved["model"]["retired_knob"] = 1
    (tmp_path / STATE_JSON).write_text(json.dumps({"split_fingerprint": "fp", "config": saved}))
    with pytest.raises(ConfigError, match=rf"{STATE_JSON}: unknown config key\(s\) \['retired_knob'\] in 'model'.*"
                                          "start a new run"):
        _check_resumable(tmp_path, tmp_path, cfg, "fp", "split.json")
    run = RunPaths(tmp_path / "sd")
    run.config.parent.mkdir(parents=True)
    run.config.write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=f"{re.escape(str(run.config))}: unknown config key.*retired_knob"):
        _check_resume_config(run, cfg)
    clf = to_dict(ClfConfig())
    clf["train"]["retired_knob"] = 1
    paths = RunPaths(tmp_path / "clf")
    paths.config.parent.mkdir(parents=True)
    paths.config.write_text(yaml.safe_dump(clf))
    with pytest.raises(ConfigError, match=f"{re.escape(str(paths.config))}: unknown config key.*retired_knob"):
        _check_run_folder(ClfConfig(), paths, resume=True)
