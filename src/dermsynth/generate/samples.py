"""The samples folder every generator writes: names, per-image seeds, batches, shards, PNG provenance, manifest.

Shared by the from-scratch and the Stable Diffusion generators, so both produce the same folder:

    <gen_run>/samples/step00002000_dpmpp25_g2.0_s0/
        samples.json                      settings that made the folder (a rerun with other settings is refused)
        images/<class>/<image_id>.png     PNG with text metadata marking it AI-generated
        manifest.csv                      canonical manifest, source="synthetic", group_id = image_id

Seeds and batches are fixed functions of (base seed, class, index), so any image can be regenerated bit-identically
from its manifest row: image ``index`` of a class lies in batch ``index // batch_size`` of that class, and every batch
is always run full (seeds past ``per_class`` are computed and thrown away). This matters because CPU and GPU matrix
kernels round differently for different batch sizes; the same batch gives the same bits. Batches are the unit of
resumption (a batch with a missing image is rerun, only missing files are written) and of sharding across processes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from dermsynth import __version__
from dermsynth.config import ConfigError
from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import read_manifest, write_manifest
from dermsynth.io import DataError, atomic_save_image, atomic_write_json, read_json
from dermsynth.paths import RunPaths

SAMPLES_JSON = "samples.json"
METADATA_PREFIX = "dermsynth:"
# IPTC NewsCodes term for media made by a trained generative model (what C2PA / IPTC readers look for).
IPTC_TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
# Settings that define what is in a samples folder: resuming with any of them changed would mix two generators.
FIXED_SETTINGS = ("kind", "checkpoint_hash", "weights", "sampler", "steps", "guidance", "seed", "batch_size",
                  "image_size", "strength", "init_from", "precision", "clip_x0")
# Fixed settings added later: unset (None) in older folders, so they enter the image-id hash only when set, and the
# ids of a folder made before them stay the same. strength: image-to-image sampling (None = from pure noise);
# init_from: image-to-image from another class's real images ({target class: source class}; None = its own class).
LATER_SETTINGS = ("strength", "init_from")
# Fixed settings that samples.json has always recorded but the image-id hash never covered: checked when a folder is
# reopened (its missing images must be drawn as the others were), kept out of the hash so that no folder's ids change.
# precision: autocast of the sampling UNet ("auto", "no", "bf16", "fp16"); clip_x0: clamp of the predicted x0.
UNHASHED_SETTINGS = ("precision", "clip_x0")


# ----------------------------------------------------------------------------------------------------------------------
# Names and seeds
# ----------------------------------------------------------------------------------------------------------------------

def samples_dir_name(step: int, sampler: str, steps: int, guidance: float, seed: int, suffix: str = "") -> str:
    """``step00002000_dpmpp25_g2.0_s0`` (+ ``_<suffix>``, e.g. ``_raw`` for non-EMA weights)."""
    g = float(guidance)
    g_txt = f"{g:.1f}" if round(g, 1) == g else f"{g:g}"  # 2 -> "2.0", 1.75 -> "1.75"
    name = f"step{step:08d}_{sampler}{steps}_g{g_txt}_s{seed}"
    return f"{name}_{suffix}" if suffix else name


def image_seed(base_seed: int, label: str, index: int) -> int:
    """Per-image seed from (base seed, class, index): stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"dermsynth-sample:{base_seed}:{label}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def settings_tag(settings: dict[str, Any]) -> str:
    """Short hash of a folder's fixed settings, used in image ids so two folders never share an id."""
    canon = json.dumps({k: settings.get(k) for k in FIXED_SETTINGS if k not in UNHASHED_SETTINGS
                        and (k not in LATER_SETTINGS or settings.get(k) is not None)}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------------------------------
# The plan: batches of items
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleItem:
    label: str
    index: int
    seed: int
    image_id: str
    relpath: str  # relative to the samples folder


@dataclass(frozen=True)
class SampleBatch:
    """One fixed batch of one class: ``seeds`` always has batch_size entries; ``items`` are those kept (< per_class)."""

    label: str
    number: int
    seeds: tuple[int, ...]
    items: tuple[SampleItem, ...]


def init_order(base_seed: int, label: str, n: int) -> np.ndarray:
    """Image-to-image: image ``index`` of class ``label`` starts from real image ``order[index % n]`` of the class's
    ``n`` train images (sorted by id). A seeded permutation, cycled, so every real image is used before any twice."""
    return np.random.default_rng(image_seed(base_seed, label, -1)).permutation(n)


def init_label(settings: Mapping[str, Any], label: str) -> str:
    """The class whose real train images start the image-to-image runs of class ``label``: its own, unless the
    folder's ``init_from`` maps it to another (major-to-minor translation)."""
    return (settings.get("init_from") or {}).get(label, label)


def parse_init_from(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"df:nv,vasc:nv"`` (or a mapping) -> {target: source}, both checked against the class list."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, Mapping) else (p.split(":", 1) for p in str(text).split(",") if p.strip())
    out: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError(f"init_from: {text!r}: give TARGET:SOURCE pairs, e.g. df:nv,vasc:nv")
        target, source = (str(x).strip() for x in pair)
        bad = [c for c in (target, source) if c not in CLASSES]
        if bad or target == source:
            raise ConfigError(f"init_from: {target}:{source}: both must be classes ({', '.join(CLASSES)}) and differ")
        out[target] = source
    return dict(sorted(out.items()))


def image_to_image(strength: float, init_from: str | Mapping[str, str] | None, key: str = "") -> dict[str, str]:
    """Check a strength (in (0, 1]; 1 = from pure noise) and parse ``init_from``, which needs a strength < 1, since
    from pure noise no real image is used; returns {target: source}. ``key``: the config section in messages."""
    k = f"{key}." if key else ""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"{k}strength must be in (0, 1] (1 = from pure noise), got {strength}")
    pairs = parse_init_from(init_from)
    if pairs and strength == 1.0:
        raise ConfigError(f"{k}init_from {pairs} needs {k}strength < 1: from pure noise no real image is used")
    return pairs


def make_item(label: str, index: int, base_seed: int, tag: str) -> SampleItem:
    image_id = f"syn-{tag}-{label}-{index:06d}"
    return SampleItem(label, index, image_seed(base_seed, label, index), image_id, f"images/{label}/{image_id}.png")


def plan_batches(classes: Sequence[str], per_class: int, batch_size: int, base_seed: int, tag: str) -> list[SampleBatch]:
    """All batches for ``per_class`` images of each class, class by class, in index order."""
    if per_class < 0 or batch_size < 1:
        raise DataError(f"per_class must be >= 0 and batch_size >= 1, got {per_class} and {batch_size}")
    batches = []
    for label in classes:
        for number in range(-(-per_class // batch_size)):
            idx = range(number * batch_size, (number + 1) * batch_size)
            seeds = tuple(image_seed(base_seed, label, i) for i in idx)
            items = tuple(make_item(label, i, base_seed, tag) for i in idx if i < per_class)
            batches.append(SampleBatch(label, number, seeds, items))
    return batches


def shard(batches: Sequence[SampleBatch], rank: int, world: int) -> list[SampleBatch]:
    """Batches of process ``rank`` out of ``world``: round-robin, so every batch goes to exactly one process."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    return list(batches[rank::world])


def missing(batch: SampleBatch, folder: Path) -> list[SampleItem]:
    """Items of ``batch`` whose PNG is not there yet (PNGs are written atomically: present means complete)."""
    return [it for it in batch.items if not (folder / it.relpath).is_file()]


# ----------------------------------------------------------------------------------------------------------------------
# Folder settings
# ----------------------------------------------------------------------------------------------------------------------

def open_samples_folder(folder: str | Path, settings: dict[str, Any], write: bool = True) -> dict[str, Any]:
    """Check ``folder``'s samples.json against ``settings`` (refusing a mismatch) or create it; return the settings.

    A folder made with a different batch size keeps its own (so its images stay regenerable) unless the caller
    asked for one explicitly (``settings["batch_size"]`` not None), which is then refused if different.
    """
    folder = Path(folder)
    path = folder / SAMPLES_JSON
    if path.is_file():
        old = read_json(path, "samples settings", hint="delete the folder to start again")
        if settings.get("batch_size") is None:
            settings = {**settings, "batch_size": old.get("batch_size")}
        diff = {k: (old.get(k), settings.get(k)) for k in FIXED_SETTINGS if old.get(k) != settings.get(k)}
        if diff:
            detail = ", ".join(f"{k}: folder has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"{folder} was made with other settings ({detail}); use another --out folder or the "
                            f"folder's own settings")
        return {**settings, **{k: old[k] for k in FIXED_SETTINGS if k in old}}
    if settings.get("batch_size") is None:
        raise ValueError("settings need a batch_size for a new samples folder")
    if write:
        atomic_write_json(path, {**settings, "dermsynth_version": __version__})
    return settings


def read_samples_settings(folder: str | Path) -> dict[str, Any]:
    """The settings a samples folder was made with (its samples.json)."""
    return read_json(Path(folder) / SAMPLES_JSON, "samples settings",
                     f"{folder} is not a samples folder (no {SAMPLES_JSON}); make one with `dermsynth generate`")


def settings_like(folder: str | Path, gen_run: str | Path | None = None, sampler: str | None = None,
                  steps: int | None = None, guidance: float | None = None, batch_size: int | None = None,
                  checkpoint: str | None = None, strength: float | None = None,
                  init_from: Mapping[str, str] | str | None = None) -> dict[str, Any]:
    """The ``generate`` arguments that made ``folder``, each one given here (not None) taking its place.

    For drawing another set like an existing one (held-out images, more seeds). The seed is not copied: the same
    seed would draw the same images. The checkpoint is copied only for the same generator: the folder's checkpoint
    path, or (SD folders record only the step) the run's checkpoint of that step. The weights (from-scratch folders:
    "ema" or "raw") are the folder's too, unless ``checkpoint`` is "ema" or "raw" (then None: it decides), and so are
    its sampling precision and x0 clipping (None where it records none: the generator's own then).
    """
    s = read_samples_settings(folder)
    gen = Path(gen_run if gen_run is not None else s["generator"])
    own = checkpoint not in ("ema", "raw") and s.get("weights") in ("ema", "raw")  # SD folders record "lora"
    weights = s["weights"] if own else None
    if checkpoint is None and gen.resolve() == Path(s["generator"]).resolve():
        step = int(s.get("checkpoint_step", -1))
        checkpoint = s.get("checkpoint") or (str(RunPaths(gen).checkpoint(step)) if step >= 0 else None)
    return {"gen_run": gen, "sampler": sampler or s.get("sampler"), "steps": steps or s.get("steps"),
            "guidance": guidance if guidance is not None else s.get("guidance"),
            "batch_size": batch_size or s.get("batch_size"), "checkpoint": checkpoint or "latest", "weights": weights,
            "strength": strength if strength is not None else (s.get("strength") or 1.0),
            "init_from": init_from if init_from is not None else s.get("init_from"),
            "precision": s.get("precision"), "clip_x0": s.get("clip_x0")}


# ----------------------------------------------------------------------------------------------------------------------
# PNG provenance
# ----------------------------------------------------------------------------------------------------------------------

def png_metadata(item: SampleItem, settings: dict[str, Any], init_id: str | None = None) -> dict[str, str]:
    """Text chunks that mark an image as AI-generated and say exactly how to remake it (and, for image-to-image,
    which real image it started from)."""
    meta = {
        "Software": f"dermsynth {__version__}",
        "Description": f"AI-generated synthetic dermoscopy-like image of class '{item.label}'; not a real patient; "
                       f"research use only, not for diagnosis.",
        "ai_generated": "true",
        "DigitalSourceType": IPTC_TRAINED_ALGORITHMIC_MEDIA,
    }
    fields = {"generator": settings.get("generator"), "kind": settings.get("kind"),
              "checkpoint_hash": settings.get("checkpoint_hash"), "checkpoint_step": settings.get("checkpoint_step"),
              "weights": settings.get("weights"), "class": item.label, "index": item.index, "seed": item.seed,
              "base_seed": settings.get("seed"), "batch_size": settings.get("batch_size"),
              "sampler": settings.get("sampler"), "steps": settings.get("steps"), "guidance": settings.get("guidance"),
              "image_id": item.image_id}
    if settings.get("strength") is not None:
        fields.update({"strength": settings["strength"], "init_image_id": init_id,
                       "init_label": init_label(settings, item.label)})
    meta.update({METADATA_PREFIX + k: str(v) for k, v in fields.items()})
    return meta


def save_sample(folder: Path, item: SampleItem, image: np.ndarray, settings: dict[str, Any],
                init_id: str | None = None) -> Path:
    """Write one generated image (HxWx3 uint8) as a PNG with provenance, atomically."""
    return atomic_save_image(folder / item.relpath, np.asarray(image, dtype=np.uint8),
                             png_metadata(item, settings, init_id))


def read_png_metadata(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (empty dict if none)."""
    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}) or {})


# ----------------------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------------------

def manifest_rows(items: Iterable[SampleItem], folder: Path, settings: dict[str, Any],
                  init_ids: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One manifest row per item; image-to-image folders add ``strength``, ``init_image_id`` (its real image) and
    ``init_label`` (that image's class)."""
    rows = [{
        "image_id": it.image_id, "group_id": it.image_id, "label": it.label, "path": str((folder / it.relpath).resolve()),
        "source": "synthetic", "seed": it.seed, "base_seed": settings["seed"], "index": it.index,
        "batch_size": settings["batch_size"], "generator": settings["generator"],
        "checkpoint_hash": settings["checkpoint_hash"], "checkpoint_step": settings.get("checkpoint_step"),
        "weights": settings.get("weights"), "guidance": settings["guidance"], "sampler": settings["sampler"],
        "steps": settings["steps"],
    } for it in items]
    if settings.get("strength") is not None:
        for row in rows:
            row.update(strength=settings["strength"], init_image_id=(init_ids or {})[row["image_id"]],
                       init_label=init_label(settings, row["label"]))
    return pd.DataFrame(rows)


def write_samples_manifest(folder: str | Path, batches: Sequence[SampleBatch], settings: dict[str, Any],
                           init_ids: Mapping[str, str] | None = None) -> Path:
    """manifest.csv over every image of ``batches`` plus rows of an earlier manifest here (other classes/counts).

    Every listed image must exist: a missing one means a shard did not finish, and is an error, not a silent gap.
    """
    folder = Path(folder)
    items = [it for b in batches for it in b.items]
    absent = [it.relpath for it in items if not (folder / it.relpath).is_file()]
    if absent:
        raise DataError(f"{folder}: {len(absent)} planned image(s) missing, e.g. {absent[:3]}; rerun the same "
                        f"`dermsynth generate` command to finish them")
    df = manifest_rows(items, folder, settings, init_ids)
    old_path = folder / "manifest.csv"
    if old_path.is_file():
        old = read_manifest(old_path)
        keep = old[~old["image_id"].isin(set(df["image_id"])) & old["path"].map(lambda p: Path(p).is_file())]
        df = pd.concat([keep, df], ignore_index=True) if len(keep) else df
    df = df.sort_values(["label", "index"], kind="stable").reset_index(drop=True)
    return write_manifest(df, old_path)


@dataclass
class SamplePlan:
    """Everything one ``generate`` call will do, computed identically on every process."""

    folder: Path
    settings: dict[str, Any]
    batches: list[SampleBatch] = field(default_factory=list)
