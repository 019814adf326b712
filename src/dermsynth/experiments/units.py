"""Units of work of a study: skip what is done, resume what was interrupted, redo what a config change invalidated.

Every unit (the split, the generator, one classifier seed, ...) has a hash of its own config *and of its upstream
units' hashes*, so a change anywhere reruns exactly the units downstream of it. Its state lives in
``<study>/units/<name>.json``:

    status "running"  written before the stage starts: after a kill the stage is called again with resume=True
    status "done"     written after the stage returned and its completion file exists: skipped on rerun

A unit whose recorded hash differs from the current one is stale: its output folder is deleted and it starts fresh.
The hash covers only the config fields that differ from their defaults (``changed_fields``): a release that adds a
field whose default keeps the old behaviour leaves finished units valid. A release that changes what a stage
computes at an unchanged config (a new default, a corrected method) raises that stage's entry in STAGE_VERSIONS:
the version is hashed, so the stage's finished units and every unit downstream of them rerun. Since scheme 3 the keys
of every mapping are hashed in sorted order, so a config that writes two keys of a mapping field
(``generation.per_class_of``, ``split.train_keep_of``, ``classifier.data.synthetic_ratio_per_class``) the other way
round is the same config. Since scheme 4 a from-scratch generator's sampling settings (generator.sample) are hashed
in the samples unit, not in the generator unit: changing how the study samples redraws the samples without
retraining the generator. States written under an older scheme (1 hashed every field, 2 kept the order of mappings,
3 hashed the sampling settings with the generator) are carried over once when their hash matches that scheme's,
unless their stage has a version their scheme did not hash (1 and 2: it changed since) or an upstream unit was not
carried over, so an upgrade redoes exactly the units whose results it changes.
Wall time per unit accumulates over resumes; ``timings.json`` sums it per stage.

Units that carry a ``job`` (a picklable function and its arguments; the study gives every classifier unit one) may
run ``workers`` at a time in separate processes: one small classifier leaves a large GPU mostly idle, so several side
by side finish a grid of seeds and conditions in a fraction of the time (on an H200, six EfficientNet-Lite0 runs at
128 px side by side each trained at 1,500-1,750 img/s after their first epoch, and took 182 s together; BENCHMARKS.md).
``timings.json`` then also records each such stage's elapsed time (``elapsed_s``: the waves' wall-clock time plus the
time of its units that ran on their own), which ``total_s`` counts instead of the sum of its units' overlapping times.
"""
from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from dermsynth.config import changed_fields, config_hash, to_dict
from dermsynth.io import atomic_write_json
from dermsynth.paths import StudyPaths
from dermsynth.runlog import get_logger

log = get_logger("experiments.units")


@dataclass
class Unit:
    """One resumable step: ``run(resume)`` writes into ``out``; ``done_file`` (relative to ``out``) marks success."""

    name: str  # unique, e.g. "generator" or "classifier/hybrid/seed0"
    stage: str  # what timings.json groups by
    out: Path | None  # the unit's output folder (deleted when the unit is stale); None = writes nothing of its own
    config: Any  # what the unit's result depends on besides its upstream units (a dataclass or plain dict)
    run: Callable[[bool], Any]
    upstream: list[str] = field(default_factory=list)
    done_file: str | None = None
    hash: str = ""
    # (function, args): the same work as ``run``, callable in another process as function(*args, resume=...)
    job: tuple[Callable[..., Any], tuple] | None = None
    # what earlier hash schemes hashed in place of ``config``, where that differs: {scheme: config} covers that
    # scheme and the earlier ones without an entry of their own (e.g. {2: a, 3: b}: schemes 1-2 hashed a, 3 hashed b;
    # later ones ``config``). Lets carry_over recognise the records of earlier releases
    legacy_config: dict[int, Any] | None = None


def _run_job(fn: Callable[..., Any], args: tuple, resume: bool, threads: int) -> float:
    """Worker-process side of a pooled unit: run it with a fair share of the CPU threads; returns its wall time."""
    # N workers x all cores each would oversubscribe the CPU (the job's unpickling usually imported torch already)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    fn(*args, resume=resume)
    return time.perf_counter() - t0


HASH_SCHEME = 4
# Stages whose results a release changed at an unchanged config; the version enters the hash (scheme 3 on).
# filter and quality 2: the copy rule's threshold is calibrated on the audit's own statistic, the best match over the
# flips/rotations (it was calibrated on single views and called too many new lesions copies; BENCHMARKS.md)
STAGE_VERSIONS: dict[str, int] = {"filter": 2, "quality": 2}


def _sorted_keys(obj: Any) -> Any:
    """``obj`` with the keys of every mapping in sorted order, recursively; lists keep their order (it can matter)."""
    if isinstance(obj, dict):
        return {k: _sorted_keys(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, list):
        return [_sorted_keys(x) for x in obj]
    return obj


def _config_of(unit: Unit, scheme: int) -> Any:
    """What ``scheme`` hashed of the unit: its ``legacy_config`` entry for that scheme or the next later one, else
    ``config``."""
    later = sorted(k for k in (unit.legacy_config or {}) if k >= scheme)
    return unit.legacy_config[later[0]] if later else unit.config


def unit_hash(unit: Unit, upstream_hashes: dict[str, str], scheme: int = HASH_SCHEME) -> str:
    """The unit's config (its non-default fields) and its upstream units' hashes.

    Older schemes, kept to recognise records written by earlier releases: 1 hashed every field, 2 hashed mappings in
    insertion order (so two keys written the other way round changed the hash), 3 hashed a from-scratch generator's
    sampling settings in the generator unit (so changing them retrained it; 4 hashes them in the samples unit). Each
    hashes its ``legacy_config`` entry where the unit has one.
    """
    config = _config_of(unit, scheme)
    payload = {"stage": unit.stage, "config": to_dict(config) if scheme == 1 else changed_fields(config),
               "upstream": {u: upstream_hashes[u] for u in sorted(unit.upstream)}}
    if scheme == 1:
        return config_hash(payload)
    if scheme == 2:
        return config_hash({"scheme": scheme, **payload})
    if unit.stage in STAGE_VERSIONS:
        payload["version"] = STAGE_VERSIONS[unit.stage]
    return config_hash(_sorted_keys({"scheme": scheme, **payload}))


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class UnitRunner:
    """Runs a list of units in order (upstream first), with a progress bar and a time-left estimate."""

    def __init__(self, study: str | Path, units: list[Unit]):
        self.paths = StudyPaths(study)
        self.units = units
        hashes: dict[str, str] = {}
        # each older scheme's hashes, chained through that scheme's upstream hashes, as an earlier release recorded them
        self._older: dict[int, dict[str, str]] = {s: {} for s in range(1, HASH_SCHEME)}
        for u in units:
            missing = [x for x in u.upstream if x not in hashes]
            if missing:
                raise ValueError(f"unit {u.name!r} depends on {missing}, which do not come before it")
            u.hash = hashes[u.name] = unit_hash(u, hashes)
            for scheme, older in self._older.items():
                older[u.name] = unit_hash(u, older, scheme=scheme)

    def _carried(self) -> list[Unit]:
        """The units whose records carry_over would re-record (nothing is written here)."""
        out, current = [], set()
        for u in self.units:  # upstream first
            st = self.state(u)
            older = {h[u.name] for s, h in self._older.items() if s >= 3 or u.stage not in STAGE_VERSIONS}
            if st.get("hash") == u.hash:
                current.add(u.name)
            elif st and st.get("hash") in older and all(x in current for x in u.upstream):
                current.add(u.name)
                out.append(u)
        return out

    def carry_over(self) -> int:
        """Re-record states written under an older hash scheme whose config is unchanged; returns how many. A unit of
        a versioned stage recorded under a scheme that did not hash the version (1, 2: the stage changed since) is not
        carried over, nor is any unit downstream of one that was not: both rerun."""
        carried = self._carried()
        for u in carried:
            atomic_write_json(self.state_path(u), {**self.state(u), "hash": u.hash})
        if carried:
            log.info("%d unit record(s) carried over to the current config hash", len(carried))
        return len(carried)

    def preview(self) -> list[dict[str, Any]]:
        """What run_all would do to each unit, in run order, without writing or deleting anything: one dict per unit
        with ``unit``, ``stage``, ``action`` ("skip", "resume", "rerun", "run") and ``why``; a rerun also gives the
        folder it deletes and the wall seconds its record had spent (``deletes``, ``wall_s``)."""
        carried = {u.name for u in self._carried()}
        rows, redo = [], set()
        for u in self.units:
            st = self.state(u)
            row: dict[str, Any] = {"unit": u.name, "stage": u.stage}
            if st.get("hash") == u.hash or u.name in carried:
                earlier = " (recorded by an earlier release)" if u.name in carried else ""
                if st.get("status") == "done" and self._finished(u):
                    row.update(action="skip", why="done with this config" + earlier)
                else:
                    row.update(action="resume", why="interrupted" + earlier)
            elif st or (u.out is not None and u.out.exists()):
                up = [x for x in u.upstream if x in redo]
                why = (f"upstream {', '.join(up)} reruns" if st and up else
                       "its config changed (or a release changed its stage)" if st else
                       "its folder has no record of what made it")
                row.update(action="rerun", why=why, deletes=str(u.out) if u.out is not None and u.out.exists() else None,
                           wall_s=float(st.get("wall_s", 0.0)))
            else:
                row.update(action="run", why="new")
            if row["action"] in ("rerun", "run"):
                redo.add(u.name)
            rows.append(row)
        return rows

    # ---- state ---------------------------------------------------------------------------------------------------

    def state_path(self, unit: Unit) -> Path:
        return self.paths.unit_state(unit.name)

    def state(self, unit: Unit) -> dict:
        p = self.state_path(unit)
        try:
            return json.loads(p.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    @staticmethod
    def _finished(unit: Unit) -> bool:
        """The unit's completion file exists (or it has none)."""
        return unit.done_file is None or (unit.out is not None and (unit.out / unit.done_file).is_file())

    def is_done(self, unit: Unit) -> bool:
        st = self.state(unit)
        return st.get("hash") == unit.hash and st.get("status") == "done" and self._finished(unit)

    def _write_state(self, unit: Unit, **kv: Any) -> None:
        atomic_write_json(self.state_path(unit), {"unit": unit.name, "stage": unit.stage, "hash": unit.hash,
                                                  "upstream": unit.upstream, **kv})

    def _prepare(self, unit: Unit) -> tuple[bool, float]:
        """Decide fresh start vs resume; a stale unit's folder is deleted. Returns (resume, wall time so far)."""
        st = self.state(unit)
        if st.get("hash") == unit.hash:
            return True, float(st.get("wall_s", 0.0))  # interrupted (or completion file lost): the stage resumes
        if unit.out is not None and unit.out.exists():
            root = self.paths.root.resolve()
            if root not in unit.out.resolve().parents:
                raise ValueError(f"refusing to delete {unit.out}: it is outside the study folder {root}")
            why = "its config changed" if st else "it has no record of what made it"
            log.info("%s: %s, deleting %s and starting over", unit.name, why, unit.out)
            shutil.rmtree(unit.out)
        return False, 0.0

    # ---- running -------------------------------------------------------------------------------------------------

    def _eta(self, todo: list[Unit]) -> str:
        per_stage: dict[str, list[float]] = {}
        for u in self.units:
            st = self.state(u)
            if st.get("status") == "done" and st.get("hash") == u.hash:
                per_stage.setdefault(u.stage, []).append(float(st.get("wall_s", 0.0)))
        known, unknown = 0.0, 0
        for u in todo:
            if per_stage.get(u.stage):
                known += sum(per_stage[u.stage]) / len(per_stage[u.stage])
            else:
                unknown += 1
        if not unknown:
            return f"~{_fmt_s(known)} left"
        # a stage's first unit gives the estimate for the rest of that stage
        return f"~{_fmt_s(known)} left + {unknown} unit(s) of stages not yet timed" if known else "time left: not yet known"

    def _start(self, u: Unit) -> tuple[bool, float, str]:
        resume, before = self._prepare(u)
        started = dt.datetime.now().isoformat(timespec="seconds")
        self._write_state(u, status="running", started=started, wall_s=before)
        return resume, before, started

    def _finish(self, u: Unit, started: str, wall: float, timings: bool = True) -> None:
        if u.done_file is not None and not (u.out / u.done_file).is_file():
            raise RuntimeError(f"{u.name}: the stage returned but {u.out / u.done_file} is missing")
        self._write_state(u, status="done", started=started, wall_s=wall,
                          finished=dt.datetime.now().isoformat(timespec="seconds"))
        if timings:
            self.write_timings()

    def _run_one(self, u: Unit, spent: dict[str, float]) -> float:
        resume, before, started = self._start(u)
        t0 = time.perf_counter()
        try:
            u.run(resume)
        finally:
            # time spent counts even when the stage fails or is interrupted: the next run resumes it
            took = time.perf_counter() - t0
            wall = before + took
            spent[u.stage] = spent.get(u.stage, 0.0) + took
            if self.state(u).get("status") == "running":
                self._write_state(u, status="running", started=started, wall_s=wall)
            # a stage can mix waves and units run on their own (e.g. the one unit left after a wave): its elapsed
            # time must count both, so the time of a unit run on its own is recorded too
            self.write_timings(alone={u.stage: took})
        self._finish(u, started, wall, timings=False)  # timings.json already counts this unit's wall time
        return wall

    def _run_wave(self, wave: list[Unit], workers: int, spent: dict[str, float], bar: tqdm) -> None:
        """Run independent pooled units ``workers`` at a time; the others finish even when one fails."""
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked; spawn works everywhere
        errors: list[tuple[Unit, BaseException]] = []
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            running: dict[Future, tuple[Unit, float, str]] = {}
            for u in wave:
                resume, before, started = self._start(u)
                fn, args = u.job
                running[pool.submit(_run_job, fn, args, resume, threads)] = (u, before, started)
            log.info("%d units in %d worker processes (%d CPU threads each)", len(wave), workers, threads)
            pending = set(running)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    u, before, started = running[f]
                    try:
                        wall = before + f.result()
                        self._finish(u, started, wall)
                    except BaseException as e:  # noqa: BLE001 - reported below, after the other units finish
                        log.error("%s failed: %r", u.name, e)
                        errors.append((u, e))
                        continue
                    bar.update(1)
                    log.info("%s done in %s", u.name, _fmt_s(wall))
        # the wave's wall time, shared among its stages in proportion to their units' own times, so that the
        # stages' elapsed times add up to the time that actually passed
        wave_wall = time.perf_counter() - t0
        own = {u.stage: 0.0 for u in wave}
        for u in wave:
            own[u.stage] += float(self.state(u).get("wall_s", 0.0)) or 1e-9
        share = {k: wave_wall * v / sum(own.values()) for k, v in own.items()}
        for k, v in share.items():
            spent[k] = spent.get(k, 0.0) + v
        self.write_timings(elapsed=share)
        if errors:
            u, e = errors[0]
            raise RuntimeError(f"{len(errors)} of {len(wave)} pooled units failed; first: {u.name}: {e!r} "
                               f"(see {u.out}/log.txt); finished units are kept, rerun to resume") from e

    def run_all(self, workers: int = 1) -> dict[str, float]:
        """Run every unit not yet done; returns this invocation's wall time per stage.

        With ``workers`` > 1, consecutive units that carry a ``job`` and do not depend on each other run in that
        many processes at once.
        """
        self.carry_over()
        todo = [u for u in self.units if not self.is_done(u)]
        skipped = len(self.units) - len(todo)
        if skipped:
            log.info("%d of %d units already done with the same config: skipped", skipped, len(self.units))
        spent: dict[str, float] = {}
        bar = tqdm(total=len(self.units), initial=skipped, unit="unit", dynamic_ncols=True, position=0,
                   bar_format="{desc} {n_fmt}/{total_fmt} units [{elapsed}{postfix}]")
        try:
            i = 0
            while i < len(todo):
                u = todo[i]
                if workers > 1 and u.job is not None:
                    wave: list[Unit] = []
                    while (i < len(todo) and todo[i].job is not None
                           and not {w.name for w in wave} & set(todo[i].upstream)):
                        wave.append(todo[i])
                        i += 1
                    if len(wave) > 1:
                        bar.set_description_str(f"{u.stage}: {len(wave)} units, {workers} at a time")
                        bar.set_postfix_str(self._eta(todo[i - len(wave):]))
                        self._run_wave(wave, workers, spent, bar)
                        continue
                    i -= 1
                eta = self._eta(todo[i:])
                bar.set_description_str(f"{u.stage}: {u.name}")
                bar.set_postfix_str(eta)
                log.info("[%d/%d] %s %s (%s)", skipped + i + 1, len(self.units),
                         "resuming" if self.state(u).get("hash") == u.hash else "running", u.name, eta)
                wall = self._run_one(u, spent)
                bar.update(1)
                log.info("%s done in %s", u.name, _fmt_s(wall))
                i += 1
        finally:
            bar.close()
        return spent

    def write_timings(self, extra: dict[str, float] | None = None, elapsed: dict[str, float] | None = None,
                      alone: dict[str, float] | None = None) -> Path:
        """timings.json: wall seconds per stage (summed over its units, resumes included) and per unit.

        ``elapsed`` records a stage's wall-clock time when its units ran side by side, ``alone`` the time of a unit
        run on its own: a stage that ran a wave gets ``elapsed_s`` (its waves' time plus its units run on their own),
        which ``total_s`` counts instead of the sum of its units' (overlapping) times.
        """
        units = {u.name: float(self.state(u).get("wall_s", 0.0)) for u in self.units
                 if self.state(u).get("hash") == u.hash}
        stages: dict[str, dict[str, float]] = {}
        for u in self.units:
            if u.name in units:
                s = stages.setdefault(u.stage, {"wall_s": 0.0, "units": 0})
                s["wall_s"] += units[u.name]
                s["units"] += 1
        old: dict = {}
        if self.paths.timings.is_file():
            try:
                old = json.loads(self.paths.timings.read_text())
            except json.JSONDecodeError:
                old = {}
        other = {**old.get("other", {}), **(extra or {})}
        par, solo = old.get("elapsed", {}), old.get("alone", {})
        for k, v in (elapsed or {}).items():
            par[k] = par.get(k, 0.0) + v
        for k, v in (alone or {}).items():
            solo[k] = solo.get(k, 0.0) + v
        for k, v in par.items():
            if k in stages:
                stages[k]["elapsed_s"] = v + solo.get(k, 0.0)
        total = sum(s.get("elapsed_s", s["wall_s"]) for s in stages.values()) + sum(other.values())
        return atomic_write_json(self.paths.timings, {"stages": stages, "other": other, "elapsed": par,
                                                      "alone": solo, "total_s": total, "units": units})


__all__ = ["Unit", "UnitRunner", "unit_hash"]
