"""Every path of the run tree, in one place.

A *run* is one stage's output folder (a classifier, a generator, a samples folder, a quality or filter result):

    <run>/config.yaml   resolved config          <run>/log.txt        log
    <run>/summary.csv   one row per epoch/eval   <run>/metrics.json   final metrics
    <run>/checkpoints/  atomic, rotated          <run>/predictions.csv (test), <run>/val_predictions.csv

A *study* is a folder of runs laid out by :class:`StudyPaths`. Nothing else in the package builds these names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def cache_root() -> Path:
    """Where preprocessed image arrays and feature matrices are cached (``DERMSYNTH_CACHE`` overrides)."""
    env = os.environ.get("DERMSYNTH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dermsynth"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def summary(self) -> Path:
        return self.root / "summary.csv"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def val_predictions(self) -> Path:
        """A classifier's class probabilities on the validation part (for decisions that may only look at val)."""
        return self.root / "val_predictions.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best"

    @property
    def train_set(self) -> Path:
        """A classifier run's training samples with their provenance (source real/synthetic)."""
        return self.root / "train_set.csv"

    def extra_predictions(self, name: str) -> Path:
        """A classifier run's predictions on an extra test set (eval.extra_test ``name``)."""
        return self.root / f"predictions_{name}.csv"

    @property
    def samples_root(self) -> Path:
        return self.root / "samples"

    @property
    def validation(self) -> Path:
        return self.root / "validation"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"


@dataclass(frozen=True)
class DatasetPaths:
    """A prepared dataset: ``<root>/manifest.csv`` (+ images for the toy set)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return Path(self.root) / "manifest.csv"

    @property
    def images(self) -> Path:
        return Path(self.root) / "images"


@dataclass(frozen=True)
class StudyPaths:
    """The layout of one study folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.csv"

    @property
    def split(self) -> Path:
        return self.root / "split" / "split.json"

    @property
    def generator(self) -> Path:
        return self.root / "generator"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def filtered(self) -> Path:
        return self.root / "filter"

    @property
    def quality(self) -> Path:
        return self.root / "quality"

    @property
    def reference_classifier(self) -> Path:
        return self.root / "classifiers" / "_filter_reference"

    def classifier(self, condition: str, seed: int) -> Path:
        return self.root / "classifiers" / condition / f"seed{seed}"

    @property
    def aggregate(self) -> Path:
        return self.root / "aggregate"

    @property
    def report_html(self) -> Path:
        return self.root / "report" / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report" / "report.md"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    def unit_state(self, name: str) -> Path:
        """The state record of the study unit ``name`` (e.g. "quality/samples": what made it, and whether it is done)."""
        return self.root / "units" / (name.replace("/", "__") + ".json")


def split_path(out: Path) -> Path:
    """``dermsynth data split --out DIR`` writes ``DIR/split.json``."""
    return Path(out) / "split.json"
