"""generator.json: what a generator run learnt from, and the check that later stages use it on the same split.

A generator trained on a split's train part has seen those lesions; evaluating its images (or classifiers fed with
them) on another split could put its training lesions in the test part. So every generator run records the split's
fingerprint; the classifier, quality and filter stages call :func:`check_manifest_split` on the synthetic
manifest they read, and :func:`check_split_fingerprint` checks a generator run directly.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dermsynth import __version__
from dermsynth.data.split import Split, load_split
from dermsynth.io import DataError, atomic_write_json, read_json
from dermsynth.runlog import get_logger

GENERATOR_JSON = "generator.json"


def generator_info(kind: str, split: Split, classes: list[str], image_size: int, **extra: Any) -> dict[str, Any]:
    """The common fields of generator.json (each generator adds its own via ``extra``)."""
    return {
        "kind": kind,
        "split": str(Path(split.path).resolve()),
        "split_fingerprint": split.fingerprint,
        "classes": list(classes),
        "image_size": int(image_size),
        "dermsynth_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def write_generator_info(run: str | Path, info: dict[str, Any]) -> Path:
    for key in ("kind", "split", "split_fingerprint", "classes", "image_size"):
        if key not in info:
            raise ValueError(f"generator.json needs {key!r}")
    return atomic_write_json(Path(run) / GENERATOR_JSON, info)


def read_generator_info(run: str | Path) -> dict[str, Any]:
    """generator.json of a run; a clear error when ``run`` is not a generator run."""
    return read_json(Path(run) / GENERATOR_JSON, "generator info",
                     f"{run} is not a generator run (no {GENERATOR_JSON}); train one with `dermsynth train-gen`")


def _fingerprint_of(split: Split | str | Path) -> tuple[str, str]:
    if isinstance(split, Split):
        return split.fingerprint, str(split.path)
    return load_split(split).fingerprint, str(split)


def check_split_fingerprint(gen_run: str | Path, split: Split | str | Path) -> None:
    """Raise DataError unless generator run ``gen_run`` was trained on ``split`` (split.json, its folder, or a Split)."""
    info = read_generator_info(gen_run)
    fp, where = _fingerprint_of(split)
    if info.get("split_fingerprint") != fp:
        raise DataError(f"generator {gen_run} was trained on split {info.get('split')} "
                        f"(fingerprint {str(info.get('split_fingerprint'))[:12]}...), not on {where} "
                        f"(fingerprint {fp[:12]}...): its training lesions may sit in this split's test part. "
                        f"Train a generator on this split (`dermsynth train-gen --set data.split={where}`)")


def check_samples_split(samples: str | Path, split: Split | str | Path) -> None:
    """Same check for a samples folder, through the fingerprint its samples.json copied from the generator."""
    settings = read_json(Path(samples) / "samples.json", "samples settings",
                         f"{samples} is not a samples folder (no samples.json); make one with `dermsynth generate`")
    fp, where = _fingerprint_of(split)
    if settings.get("split_fingerprint") != fp:
        raise DataError(f"samples {samples} come from a generator trained on split {settings.get('split')}, not on "
                        f"{where}: its training lesions may sit in this split's test part; generate from a generator "
                        f"trained on this split")


def check_manifest_split(syn: Any, split: Split, where: str) -> None:
    """For every generator run a synthetic manifest names (its ``generator`` column), its split fingerprint must be
    ``split``'s: a generator that saw this split's test lesions would leak them into whatever uses its images.
    Generators not present on this machine are logged as unverifiable rather than refused."""
    log = get_logger("provenance")
    if "generator" not in syn.columns:
        log.warning("%s has no 'generator' column: cannot verify the generator's split", where)
        return
    for gen in syn["generator"].dropna().astype(str).unique():
        info_path = Path(gen) / GENERATOR_JSON
        if not info_path.is_file():
            log.warning("%s: generator %s not found here; its split cannot be verified", where, gen)
            continue
        fp = read_json(info_path, "generator info").get("split_fingerprint")
        if fp is not None and fp != split.fingerprint:
            raise DataError(f"{where}: generator {gen} was trained on another split (fingerprint {fp[:12]}... vs "
                            f"{split.fingerprint[:12]}... of {split.path}); train a generator on this split's train part")
