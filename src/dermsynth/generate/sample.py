"""``dermsynth generate``: sample a generator run into a samples folder (see :mod:`dermsynth.generate.samples`).

The generator's kind (generator.json) picks the path: "scratch" is handled here, "sd15_lora" by
:func:`dermsynth.generate.sd15.sample.generate_sd` with the same arguments. Under ``accelerate launch`` every
process takes its round-robin share of the batches; the main process writes the manifest once all are done.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dermsynth.config import ConfigError
from dermsynth.data.cache import CachedImages, build_cache
from dermsynth.data.labels import CLASSES, parse_classes
from dermsynth.generate.models import load_unet, weights_file
from dermsynth.generate.provenance import check_split_fingerprint, read_generator_info
from dermsynth.generate.samplers import SAMPLERS, first_step, from_uint8, make_scheduler, sample, to_uint8
from dermsynth.generate.samples import (SAMPLES_JSON, SampleBatch, SampleItem, SamplePlan, image_seed, init_label,
                                        image_to_image, init_order, missing, open_samples_folder, plan_batches,
                                        samples_dir_name, save_sample, settings_like, settings_tag, shard,
                                        write_samples_manifest)
from dermsynth.generate.scratch_train import STATE_JSON, list_checkpoints, resolve_checkpoint, train_rows
from dermsynth.io import DataError, read_json, sha256_file
from dermsynth.paths import RunPaths
from dermsynth.runlog import get_logger, run_log


def generate(gen_run: str | Path | None, classes: str | list[str] = "df,vasc,mel", per_class: int = 800,
             out: str | Path | None = None, sampler: str | None = None, steps: int | None = None,
             guidance: float | None = None, seed: int | None = None, batch_size: int | None = None,
             checkpoint: str | None = None, strength: float | None = None, like: str | Path | None = None,
             init_from: Mapping[str, str] | str | None = None, sampling: Mapping[str, Any] | None = None) -> Path:
    """Write ``per_class`` images of each class (resuming: existing images are kept); returns the samples folder.

    ``like``: a samples folder whose generator, checkpoint, weights (EMA or raw), sampler, steps, guidance, batch size
    and strength are the defaults (see :func:`settings_like`); it needs an explicit ``seed``. Otherwise unset settings
    come from the generator's own sampling config, seed 0, the latest checkpoint, strength 1.

    strength < 1 makes each image a variation of one of the class's real TRAIN images (image-to-image: the real image
    noised to that fraction of the schedule, then denoised); 1 samples from pure noise. ``init_from`` ("df:nv,vasc:nv"
    or a mapping) starts a class's image-to-image runs from another class's real train images instead, conditioned
    on the class drawn (major-to-minor translation: the rare class borrows the layouts, skin and framing of a
    common one).

    ``sampling`` (from-scratch generators): a sampling block (the keys of ``generator.sample``: sampler, steps,
    guidance, batch_size, use_ema, precision, clip_x0) to use in place of the one generator.json recorded at training
    time; the study passes its current ``generator.sample``, so that changing how it samples does not retrain.
    """
    weights = None  # from the checkpoint argument and the generator's sampling.use_ema, unless drawing like a folder
    if like is not None:
        if seed is None:
            raise ConfigError(f"drawing like {like} needs a seed (--seed): its own seed would draw the same images")
        a = settings_like(like, gen_run, sampler, steps, guidance, batch_size, checkpoint, strength, init_from)
        gen_run, sampler, steps, guidance = a["gen_run"], a["sampler"], a["steps"], a["guidance"]
        batch_size, checkpoint, strength, init_from = a["batch_size"], a["checkpoint"], a["strength"], a["init_from"]
        weights = a["weights"]
        # the folder's precision and x0 clipping, not the generator's block (what its latest training wrote)
        sampling = {**(sampling or {}), **{k: a[k] for k in ("precision", "clip_x0") if a[k] is not None}}
    if gen_run is None:
        raise ConfigError("generate needs a generator run (--gen) or a samples folder to draw like (--like)")
    seed, checkpoint = seed or 0, checkpoint or "latest"
    strength = 1.0 if strength is None else strength
    init_from = image_to_image(strength, init_from)
    gen_run = Path(gen_run)
    info = read_generator_info(gen_run)
    if strength != 1.0 and info.get("kind") != "scratch":
        raise ConfigError(f"strength {strength}: image-to-image sampling is built for the from-scratch generator "
                          f"only; {gen_run} is a {info.get('kind')!r} run")
    if info.get("kind") == "sd15_lora":
        from dermsynth.generate.sd15.sample import generate_sd

        if sampling is not None:
            raise ConfigError(f"{gen_run} is an SD-1.5 run: its sampling settings are generator.sd's (sampler, "
                              f"sample_steps, guidance, ...), not a sampling block")

        return generate_sd(gen_run, classes=classes, per_class=per_class, out=out, sampler=sampler, steps=steps,
                           guidance=guidance, seed=seed, batch_size=batch_size, checkpoint=checkpoint)
    if info.get("kind") != "scratch":
        raise DataError(f"{gen_run}/generator.json: unknown generator kind {info.get('kind')!r}")
    from accelerate import PartialState

    state = PartialState()
    plan = plan_scratch(gen_run, info, classes, per_class, out, sampler, steps, guidance, seed, batch_size,
                        checkpoint, strength, write=state.is_main_process, init_from=init_from, weights=weights,
                        sampling=sampling)
    if state.num_processes > 1:  # the others read the samples.json the main process just wrote
        state.wait_for_everyone()
        plan = plan_scratch(gen_run, info, classes, per_class, out, sampler, steps, guidance, seed, batch_size,
                            checkpoint, strength, write=False, init_from=init_from, weights=weights,
                            sampling=sampling)
    with run_log(plan.folder) if state.is_main_process else contextlib.nullcontext():
        run_shard(plan, state.process_index, state.num_processes, state.device)
        state.wait_for_everyone()
        if state.is_main_process:
            write_samples_manifest(plan.folder, plan.batches, plan.settings, init_ids(plan))
            get_logger("generate").info("samples ready: %s", plan.folder)
    state.wait_for_everyone()
    return plan.folder


def plan_scratch(gen_run: Path, info: Mapping[str, Any], classes: str | list[str], per_class: int,
                 out: str | Path | None, sampler: str | None, steps: int | None, guidance: float | None, seed: int,
                 batch_size: int | None, checkpoint: str, strength: float = 1.0, write: bool = True,
                 init_from: Mapping[str, str] | None = None, weights: str | None = None,
                 sampling: Mapping[str, Any] | None = None) -> SamplePlan:
    """Resolve defaults, checkpoint and folder; check (or create) the folder's samples.json; list the batches.

    ``weights``: "ema" or "raw"; None = raw when ``checkpoint`` is "raw" or the generator samples without EMA.
    ``sampling``: entries that replace those of the generator's recorded sampling block."""
    wanted = parse_classes(classes)
    unknown = [c for c in wanted if c not in info["classes"]]
    if unknown:
        raise DataError(f"generator {gen_run} was not trained on class(es) {unknown}; it knows {info['classes']}")
    defaults = {**info.get("sampling", {}), **(sampling or {})}
    sampler = sampler or defaults.get("sampler", "dpmpp")
    if sampler not in SAMPLERS:
        raise DataError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    steps = int(steps or defaults.get("steps", 25))
    guidance = float(guidance if guidance is not None else defaults.get("guidance", 2.0))
    if strength != 1.0:
        first_step(steps, strength)  # refuses a strength that leaves no step, before anything is written
    if weights is None:
        weights = "raw" if checkpoint == "raw" or not defaults.get("use_ema", True) else "ema"
    ckpt = resolve_checkpoint(gen_run, checkpoint)
    step = int(json.loads((ckpt / STATE_JSON).read_text())["step"])
    settings: dict[str, Any] = {
        "generator": str(gen_run.resolve()), "kind": "scratch", "checkpoint": str(ckpt.resolve()),
        "checkpoint_step": step, "checkpoint_hash": sha256_file(ckpt / weights_file(weights))[:16],
        "weights": weights, "sampler": sampler, "steps": steps, "guidance": guidance, "seed": int(seed),
        "batch_size": batch_size, "image_size": int(info["image_size"]),
        "precision": defaults.get("precision", "auto"), "clip_x0": bool(defaults.get("clip_x0", True)),
        "split": info.get("split"), "split_fingerprint": info.get("split_fingerprint"),
        "strength": float(strength) if strength != 1.0 else None, "init_from": dict(init_from) if init_from else None,
    }
    suffix = "_".join(([] if weights == "ema" else ["raw"]) + ([] if strength == 1.0 else [f"img{strength:g}"])
                      + [f"from-{t}.{s}" for t, s in (init_from or {}).items()])
    name = samples_dir_name(step, sampler, steps, guidance, seed, suffix)
    folder = Path(out) if out is not None else RunPaths(gen_run).samples_root / name
    if settings["batch_size"] is None and not (folder / "samples.json").is_file():
        settings["batch_size"] = int(defaults.get("batch_size", 64))
    settings = open_samples_folder(folder, settings, write=write)
    batches = plan_batches(wanted, per_class, int(settings["batch_size"]), int(seed), settings_tag(settings))
    return SamplePlan(folder=folder, settings=settings, batches=batches)


def generator_train_rows(gen_run: str | Path, info: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The rows generator run ``gen_run`` learnt from (its split's TRAIN part, its classes), for image-to-image
    sources; the split must still be the one it was trained on. ``info``: its generator.json, when already read."""
    info = read_generator_info(gen_run) if info is None else info
    split, df, _ = train_rows(str(info["split"]), list(info["classes"]))
    check_split_fingerprint(gen_run, split)
    return df


def init_sources(df: pd.DataFrame, label: str, base_seed: int, source: str | None = None) -> list[str]:
    """Ids of the train images that class ``label``'s image-to-image runs start from (those of class ``source``,
    by default ``label`` itself) in :func:`init_order`: image i of the class starts from [i % n]."""
    source = source or label
    ids = sorted(df.loc[df["label"] == source, "image_id"])
    if not ids:
        raise DataError(f"the generator's train part has no {source} image to start image-to-image sampling from")
    return [ids[i] for i in init_order(base_seed, label, len(ids))]


def class_sources(df: pd.DataFrame, settings: Mapping[str, Any], batches: list[SampleBatch]) -> dict[str, list[str]]:
    """init_sources of every class in ``batches``, from the class the folder's settings start it from."""
    return {label: init_sources(df, label, int(settings["seed"]), init_label(settings, label))
            for label in {b.label for b in batches}}


def init_map(sources: Mapping[str, list[str]], batches: list[SampleBatch]) -> dict[str, str]:
    """image_id -> the real image it starts from, for every item of ``batches`` (``sources``: init_sources per class)."""
    return {it.image_id: sources[b.label][it.index % len(sources[b.label])] for b in batches for it in b.items}


def init_ids(plan: SamplePlan) -> dict[str, str] | None:
    """image_id -> the real image it started from (image-to-image folders; None otherwise)."""
    if plan.settings.get("strength") is None:
        return None
    df = generator_train_rows(plan.settings["generator"])
    return init_map(class_sources(df, plan.settings, plan.batches), plan.batches)


def init_batch(cache: CachedImages, ids: list[str], batch: SampleBatch) -> torch.Tensor:
    """The init images of every seed of ``batch`` (the batch always runs full), in [-1, 1] NCHW."""
    first = batch.number * len(batch.seeds)
    return from_uint8(cache.take([ids[i % len(ids)] for i in range(first, first + len(batch.seeds))]))


def run_shard(plan: SamplePlan, rank: int, world: int, device: Any = "cpu") -> list[SampleItem]:
    """Generate the missing images of this process's share of the batches; return the items it wrote."""
    todo = [(b, m) for b in shard(plan.batches, rank, world) if (m := missing(b, plan.folder))]
    written: list[SampleItem] = []
    if not todo:
        return written
    s = plan.settings
    t0 = time.perf_counter()
    unet = load_unet(Path(s["checkpoint"]), s["weights"], device)
    info = read_generator_info(s["generator"])
    scheduler = make_scheduler(s["sampler"], info["schedule"], s["clip_x0"])
    strength = s.get("strength")
    if strength is not None:  # the generator's own train cache: built when it trained, reused here
        df = generator_train_rows(s["generator"], info)
        cache = build_cache(df, int(info["image_size"]), progress=False)
        sources = class_sources(df, s, [b for b, _ in todo])
        init_of = init_map(sources, [b for b, _ in todo])
    spent = {"load": time.perf_counter() - t0, "sample": 0.0, "write": 0.0}  # where a slow stage spends its time
    for batch, miss in tqdm(todo, desc=f"generate[{rank}]", leave=False, disable=rank != 0 and world > 1):
        t0 = time.perf_counter()
        labels = [CLASSES.index(batch.label)] * len(batch.seeds)
        init = None if strength is None else init_batch(cache, sources[batch.label], batch)
        images = to_uint8(sample(unet, scheduler, labels, batch.seeds, s["steps"], s["guidance"], s["precision"],
                                 init, strength or 1.0))
        t1 = time.perf_counter()
        first = batch.number * len(batch.seeds)
        for item in miss:
            save_sample(plan.folder, item, images[item.index - first].numpy(), s,
                        None if strength is None else init_of[item.image_id])
            written.append(item)
        spent["sample"] += t1 - t0
        spent["write"] += time.perf_counter() - t1
    get_logger("generate").info(
        "process %d: %d images (%d batches): model load %.1f s, sampling %.1f s (%.0f img/s, batches of %d), "
        "PNG writing %.1f s", rank, len(written), len(todo), spent["load"], spent["sample"],
        sum(len(b.seeds) for b, _ in todo) / max(spent["sample"], 1e-9), int(s["batch_size"]), spent["write"])
    return written


def drawn_with(row: Mapping[str, Any], info: Mapping[str, Any]) -> tuple[str, bool]:
    """(precision, clip_x0) that the image of manifest ``row`` was drawn with: its samples folder's (the samples.json
    above images/<class>/), not the generator's sampling block, which a resumed training run rewrites. Where the folder
    is gone or does not record them, the generator's values (those a folder would have recorded) stand in."""
    path = Path(str(row.get("path", ""))).parents[2] / SAMPLES_JSON if row.get("path") else None
    folder = read_json(path, "samples settings") if path is not None and path.is_file() else {}
    if str(folder.get("checkpoint_hash")) != str(row.get("checkpoint_hash")):
        get_logger("generate").warning("%s: no samples.json of its own folder above %s (absent, or made with another "
                                       "checkpoint); regenerating with the generator's sampling settings",
                                       row.get("image_id"), row.get("path"))
        folder = {}
    defaults = info.get("sampling", {})
    precision = folder.get("precision", defaults.get("precision", "auto"))
    return str(precision), bool(folder.get("clip_x0", defaults.get("clip_x0", True)))


def regenerate(row: Mapping[str, Any], device: str = "cpu") -> np.ndarray:
    """Remake one image (HxWx3 uint8) from its manifest row: same checkpoint (by hash), seeds, batch, precision and
    x0 clipping. From-scratch runs only (an SD folder remakes its missing images when its command is rerun)."""
    gen_run = Path(str(row["generator"]))
    info = read_generator_info(gen_run)
    if info.get("kind") != "scratch":
        raise ConfigError(
            f"{row.get('image_id')}: regenerating a single image is implemented for from-scratch ('scratch') "
            f"generator runs; {gen_run} is a {info.get('kind')!r} run. To redraw images of an SD samples folder, "
            f"delete their PNGs and rerun the `dermsynth generate` command that made the folder (same --gen, "
            f"--classes, --per-class, --seed and --out): a folder remakes its missing images from their seeds")
    weights = str(row.get("weights", "ema"))
    want = str(row["checkpoint_hash"])
    ckpt = next((c for c in reversed(list_checkpoints(gen_run))
                 if sha256_file(c / weights_file(weights))[:16] == want), None)
    if ckpt is None:
        raise DataError(f"no checkpoint of {gen_run} has weights hash {want}: it was rotated away or the run changed")
    label, index, bs, base = str(row["label"]), int(row["index"]), int(row["batch_size"]), int(row["base_seed"])
    number = index // bs
    seeds = [image_seed(base, label, i) for i in range(number * bs, (number + 1) * bs)]
    if seeds[index - number * bs] != int(row["seed"]):
        raise DataError(f"manifest row of {row.get('image_id')}: seed {row['seed']} does not follow from base seed "
                        f"{base}, class {label}, index {index}")
    strength = row.get("strength")
    init = None
    if strength is not None and not pd.isna(strength):  # image-to-image: the same real images for the whole batch
        df = generator_train_rows(gen_run, info)
        source = row.get("init_label")
        source = label if source is None or pd.isna(source) else str(source)
        init = init_batch(build_cache(df, int(info["image_size"]), progress=False),
                          init_sources(df, label, base, source), SampleBatch(label, number, tuple(seeds), ()))
    precision, clip_x0 = drawn_with(row, info)
    unet = load_unet(ckpt, weights, device)
    scheduler = make_scheduler(str(row["sampler"]), info["schedule"], clip_x0)
    images = sample(unet, scheduler, [CLASSES.index(label)] * bs, seeds, int(row["steps"]), float(row["guidance"]),
                    precision, init, 1.0 if init is None else float(strength))
    return to_uint8(images)[index - number * bs].numpy()
