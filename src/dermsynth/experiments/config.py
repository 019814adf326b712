"""The study's config: the data source, every stage's config, and the grid of classifier conditions x seeds.

A study embeds each stage's own dataclass config (split, generator, filter, quality, classifier), so one YAML file
fixes a whole protocol and ``--set generator.train.steps=500`` reaches any stage. Classifier *conditions* are named
overrides of one base classifier config; the study fills in the paths (split, synthetic manifest) and the seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from dermsynth.classify.config import ClfConfig, check_train
from dermsynth.config import ConfigError, from_dict, to_dict
from dermsynth.data.labels import CLASSES, parse_classes
from dermsynth.data.split import SplitConfig
from dermsynth.data.toy import ToyConfig
from dermsynth.generate.config import GenConfig
from dermsynth.generate.samples import image_to_image
from dermsynth.metrics.filter import FilterConfig
from dermsynth.metrics.quality import QualityConfig


@dataclass
class DataSourceConfig:
    source: Literal["toy", "ham10000", "manifest"] = "toy"
    root: str = ""  # ham10000: the dataset folder (HAM10000_metadata.csv + image folders)
    manifest: str = ""  # manifest: an existing manifest.csv (used in place, not copied)
    toy: ToyConfig = field(default_factory=ToyConfig)


@dataclass
class GenerationConfig:
    """Arguments of :func:`dermsynth.generate.sample.generate` (None = the generator's own default)."""

    per_class: int = 800
    # per-class counts that replace per_class, e.g. {df: 200, vasc: 200}: a ratio-1 hybrid uses about as many kept
    # images of a class as it has real ones (HAM10000 train: df 80, vasc 102, mel 783), so drawing 800 of each
    # spends sampling, filter and quality time on images no classifier sees. A class that is not rare may be named
    # too: it is drawn as well, so that a recipe can give synthetic images to every class (data.synthetic_classes)
    # and "looks synthetic" stops being evidence for a rare class
    per_class_of: dict[str, int] = field(default_factory=dict)
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    batch_size: int | None = None
    checkpoint: str = "latest"
    # < 1: each synthetic image is a variation of a real train image of its class (image-to-image, this fraction of
    # the noise schedule re-run); 1: from pure noise. Why: at 32 px a linear classifier tells the from-noise samples
    # from real images (C2ST AUC 0.83-1.00), and images that keep a real lesion's layout may carry less of that look.
    strength: float = 1.0
    # with strength < 1: {target class: source class}, the target's images start from the source's real train images
    # (major-to-minor translation). Why: a generator given 18-80 images of a rare class makes few new lesions from
    # noise; started from the thousands of common-class images it keeps their layouts, skin, hair and framing and
    # paints the rare class into them. {} = each class from its own images.
    init_from: dict[str, str] = field(default_factory=dict)


# Short condition keys -> the ClfConfig field they set
SHORTCUTS: dict[str, str] = {
    "model": "model.name",
    "pretrained": "model.pretrained",
    "loss": "train.loss",
    "sampler": "train.sampler",
    "randaugment": "train.augment.randaugment",
    "ratio": "data.synthetic_ratio",
}


@dataclass
class Condition:
    """One classifier recipe of the grid, as overrides of the study's base classifier config."""

    name: str = ""
    synthetic: Literal["none", "filtered", "unfiltered"] = "none"  # which synthetic set joins the train part
    model: str | None = None  # -> model.name (timm)
    pretrained: str | None = None  # -> model.pretrained
    loss: str | None = None  # -> train.loss
    sampler: str | None = None  # -> train.sampler
    randaugment: bool | None = None  # -> train.augment.randaugment
    ratio: float | None = None  # -> data.synthetic_ratio (synthetic : real for the rare classes; 1.0 = 50/50)
    set: dict[str, Any] = field(default_factory=dict)  # any other dotted override, e.g. {"train.lr": 3e-4}


@dataclass
class SweepConfig:
    """The synthetic:real ratio sweep: copies of condition ``of`` at each ratio (``zero`` is its ratio-0 twin)."""

    of: str = "hybrid"
    ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 5.0])
    zero: str = "focal"  # the same recipe without synthetic images, drawn at ratio 0 on the curve ("" = none)


def _default_conditions() -> list[Condition]:
    return [
        Condition(name="real_resnet50", model="resnet50"),
        Condition(name="real_effnet", model="efficientnet_b0"),
        Condition(name="oversampling", model="efficientnet_b0", sampler="oversample"),
        Condition(name="randaugment", model="efficientnet_b0", randaugment=True),
        Condition(name="focal", model="efficientnet_b0", loss="focal"),
        Condition(name="hybrid", model="efficientnet_b0", loss="focal", synthetic="filtered", ratio=1.0),
        Condition(name="hybrid_unfiltered", model="efficientnet_b0", loss="focal", synthetic="unfiltered", ratio=1.0),
    ]


@dataclass
class StudyConfig:
    name: str = "study"
    data: DataSourceConfig = field(default_factory=DataSourceConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    rare_classes: list[str] = field(default_factory=lambda: ["df", "vasc", "mel"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    generator: GenConfig = field(default_factory=GenConfig)  # data.split is filled in by the study
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    quality_on: list[str] = field(default_factory=lambda: ["samples", "filtered"])  # which synthetic sets to measure
    classifier: ClfConfig = field(default_factory=ClfConfig)  # base of every condition (and the filter's reference)
    reference: dict[str, Any] = field(default_factory=dict)  # dotted overrides for the filter's real-only classifier
    conditions: list[Condition] = field(default_factory=_default_conditions)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    baselines: list[str] = field(default_factory=lambda: ["real_resnet50", "real_effnet", "oversampling",
                                                          "randaugment", "focal"])
    primary: str = "hybrid"  # the condition the success criteria are measured on
    # candidates for the primary (synthetic conditions): when set, the one with the best mean VALIDATION macro-F1
    # becomes the primary, so synthetic images can be tried on top of each cheap baseline's recipe without looking
    # at test; empty = ``primary`` as written
    primary_from: list[str] = field(default_factory=list)
    n_boot: int = 1000  # lesion-level bootstrap replicates for the paired comparisons
    report: bool = True  # build the HTML/Markdown report at the end
    # processes that train classifiers (and the generator beside the reference classifier) at the same time: 1 on
    # a CPU; 3-6 on one large GPU, where a single small classifier is launch-bound and leaves the GPU mostly idle
    workers: int = 1
    # with workers > 1: the real-only classifier runs start beside the generator (they need only the split), and
    # only the synthetic conditions wait for samples, filter and quality; false keeps them in the classifier stage
    early_baselines: bool = True


# ----------------------------------------------------------------------------------------------------------------------
# Resolving conditions
# ----------------------------------------------------------------------------------------------------------------------

def ratio_name(of: str, r: float) -> str:
    """The name of the sweep's copy of condition ``of`` at synthetic:real ratio ``r`` (e.g. hybrid_r2)."""
    return f"{of}_r{r:g}"


def expand_conditions(cfg: StudyConfig) -> tuple[list[Condition], dict[str, float]]:
    """The conditions to train, sweep copies included, and the sweep's condition -> ratio map.

    A sweep ratio equal to the swept condition's own ratio reuses that condition instead of training a twin.
    """
    conds = list(cfg.conditions)
    names = [c.name for c in conds]
    ratios: dict[str, float] = {}
    if cfg.sweep.ratios:
        if cfg.sweep.of not in names:
            raise ConfigError(f"sweep.of: {cfg.sweep.of!r} is not a condition; conditions: {names}")
        base = conds[names.index(cfg.sweep.of)]
        if base.synthetic == "none":
            raise ConfigError(f"sweep.of: condition {base.name!r} uses no synthetic images; nothing to sweep")
        own = base.ratio if base.ratio is not None else cfg.classifier.data.synthetic_ratio
        if cfg.sweep.zero:
            if cfg.sweep.zero not in names:
                raise ConfigError(f"sweep.zero: {cfg.sweep.zero!r} is not a condition; conditions: {names}")
            ratios[cfg.sweep.zero] = 0.0
        for r in cfg.sweep.ratios:
            if r <= 0:
                raise ConfigError(f"sweep.ratios: ratios must be > 0 (ratio 0 is sweep.zero), got {r}")
            if abs(r - own) < 1e-12:
                ratios[base.name] = float(r)
                continue
            name = ratio_name(base.name, r)
            if name not in names:
                conds.append(dataclasses.replace(base, name=name, ratio=float(r), set=dict(base.set)))
                names.append(name)
            ratios[name] = float(r)
    return conds, ratios


def filter_twins(conds: list[Condition]) -> dict[str, str]:
    """filtered condition -> its unfiltered twin: the same recipe (every field but the name) on the unfiltered set."""
    def recipe(c: Condition) -> dict:
        return {k: v for k, v in dataclasses.asdict(c).items() if k not in ("name", "synthetic")}
    return {f.name: u.name for f in conds if f.synthetic == "filtered"
            for u in conds if u.synthetic == "unfiltered" and recipe(u) == recipe(f)}


def condition_config(cfg: StudyConfig, cond: Condition) -> ClfConfig:
    """The base classifier config with ``cond``'s overrides (paths and seed are filled in by the study)."""
    data = to_dict(cfg.classifier)
    rare = parse_classes(cfg.rare_classes)
    data["eval"]["rare_classes"] = rare
    data["data"]["synthetic_classes"] = rare
    overrides = {SHORTCUTS[k]: getattr(cond, k) for k in SHORTCUTS if getattr(cond, k) is not None}
    overrides.update(cond.set)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"condition {cond.name!r}: {key!r} is not a classifier config key")
            node = node[p]
        node[parts[-1]] = value  # an unknown last key is caught by from_dict below, with the valid keys listed
    try:
        return from_dict(ClfConfig, data)
    except ConfigError as e:
        raise ConfigError(f"condition {cond.name!r}: {e}") from e


def reference_config(cfg: StudyConfig) -> ClfConfig:
    """The filter's real-only reference classifier: the base config plus ``reference`` overrides, no synthetic data."""
    return condition_config(cfg, Condition(name="_filter_reference", set=dict(cfg.reference)))


def drawn_classes(cfg: StudyConfig) -> dict[str, int]:
    """The samples stage's classes and counts: every rare class (in the order given), then any other class
    ``generation.per_class_of`` names, in class order (not the mapping's, which says nothing)."""
    rare = parse_classes(cfg.rare_classes)
    extra = {c: cfg.generation.per_class_of[c] for c in CLASSES if c in cfg.generation.per_class_of and c not in rare}
    return {c: cfg.generation.per_class_of.get(c, cfg.generation.per_class) for c in rare} | extra


def validate(cfg: StudyConfig) -> tuple[list[Condition], dict[str, float]]:
    """Check names and references between the study's parts; return the expanded conditions and sweep ratios."""
    parse_classes(cfg.rare_classes)
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds: need distinct seeds, got {cfg.seeds}")
    names = [c.name for c in cfg.conditions]
    bad = [n for n in names if not n or n.startswith("_") or "/" in n or n != n.strip()]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"conditions: names must be unique, non-empty, without '/' or a leading '_'; got {names}")
    if cfg.data.source == "ham10000" and not cfg.data.root:
        raise ConfigError("data.root: the HAM10000 folder is required when data.source is ham10000")
    if cfg.data.source == "manifest" and not cfg.data.manifest:
        raise ConfigError("data.manifest: a manifest.csv path is required when data.source is manifest")
    for b in cfg.baselines:
        if b not in names:
            raise ConfigError(f"baselines: {b!r} is not a condition; conditions: {names}")
        if next(c for c in cfg.conditions if c.name == b).synthetic != "none":
            raise ConfigError(f"baselines: {b!r} uses synthetic images; a baseline must be real-only")
    if cfg.workers < 1:
        raise ConfigError(f"workers: need at least 1, got {cfg.workers}")
    if not cfg.baselines:
        raise ConfigError("baselines: list at least one real-only condition to compare against")
    if cfg.primary not in names:
        raise ConfigError(f"primary: {cfg.primary!r} is not a condition; conditions: {names}")
    bad_counts = {c: n for c, n in cfg.generation.per_class_of.items() if c not in CLASSES or n < 1}
    if bad_counts:
        raise ConfigError(f"generation.per_class_of: {bad_counts}: keys must be classes ({list(CLASSES)}), "
                          f"counts >= 1")
    image_to_image(cfg.generation.strength, cfg.generation.init_from, "generation")
    unknown = sorted(set(cfg.quality_on) - {"samples", "filtered"})
    if unknown:
        raise ConfigError(f"quality_on: unknown set(s) {unknown}; use 'samples' and/or 'filtered'")
    conds, ratios = expand_conditions(cfg)
    by_name = {c.name: c for c in conds}
    for p in cfg.primary_from:  # sweep copies count: the ratio can be chosen on validation too
        if p not in by_name:
            raise ConfigError(f"primary_from: {p!r} is not a condition; conditions: {list(by_name)}")
        if by_name[p].synthetic == "none":
            raise ConfigError(f"primary_from: {p!r} uses no synthetic images; the primary is a synthetic recipe")
    for c in conds:
        ccfg = condition_config(cfg, c)  # every override must name a real classifier key and type-check
        try:
            check_train(ccfg.train)  # ... and leave a config that can train
        except ConfigError as e:
            raise ConfigError(f"condition {c.name!r}: {e}") from e
    return conds, ratios


__all__ = ["StudyConfig", "DataSourceConfig", "GenerationConfig", "Condition", "SweepConfig", "SHORTCUTS",
           "expand_conditions", "filter_twins", "condition_config", "reference_config", "validate"]
