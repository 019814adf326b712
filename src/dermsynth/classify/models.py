"""One door to every classifier: ``timm.create_model`` plus the weights the config names, and the input normalisation
those weights expect. Nothing downloads unless ``model.pretrained`` is literally "hub".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
from torch import nn

from dermsynth.classify.config import ModelConfig
from dermsynth.config import ConfigError
from dermsynth.data.labels import CLASSES
from dermsynth.pretrained import load_lite0_imagenet, load_state_file
from dermsynth.runlog import get_logger

LITE0_NAMES = ("tf_efficientnet_lite0",)


@dataclass
class Normalize:
    """Per-channel mean/std in [0, 1] units, applied after uint8 -> float / 255."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _create(cfg: ModelConfig, num_classes: int, pretrained: bool = False) -> nn.Module:
    kwargs = dict(cfg.kwargs)
    if cfg.drop_rate:
        kwargs["drop_rate"] = cfg.drop_rate
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        return timm.create_model(cfg.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"model.name: {e}; see timm.list_models()") from e


def _load_file(model: nn.Module, path: Path) -> None:
    """Load a local state dict; a head of another shape (e.g. 1000 ImageNet classes) is dropped, nothing else may be."""
    state = load_state_file(path)
    own = model.state_dict()
    head = model.pretrained_cfg.get("classifier", "classifier")
    heads = head if isinstance(head, (list, tuple)) else [head]
    dropped = [k for k in state if any(k.startswith(h + ".") for h in heads) and k in own and state[k].shape != own[k].shape]
    for k in dropped:
        del state[k]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches outside the head
        raise ConfigError(f"model.pretrained: {path} does not fit {type(model).__name__}: {str(e)[:500]}") from e
    not_head = [k for k in missing if not any(k.startswith(h + ".") for h in heads)]
    if not_head or unexpected:
        raise ConfigError(f"model.pretrained: {path} does not fit {type(model).__name__}: missing "
                          f"{not_head[:5]}{'...' if len(not_head) > 5 else ''}, unexpected {list(unexpected)[:5]}")
    if dropped or missing:
        get_logger("classify").info("loaded %s; classifier head re-initialised for %d classes", path, len(CLASSES))


def build_model(cfg: ModelConfig, num_classes: int = len(CLASSES), load_weights: bool = True) -> tuple[nn.Module, Normalize]:
    """The timm model of ``cfg`` with a ``num_classes`` head, and its input normalisation.

    ``load_weights=False`` skips pretrained weights (the caller is about to load a trained checkpoint anyway).
    """
    source = cfg.pretrained.strip()
    log = get_logger("classify")
    if not load_weights or source.lower() == "none":
        model = _create(cfg, num_classes)
    elif source.lower() == "lite0":
        if cfg.name not in LITE0_NAMES:
            raise ConfigError(f"model.pretrained=lite0 holds weights for {LITE0_NAMES[0]}, not {cfg.name!r}; "
                              f"set model.name={LITE0_NAMES[0]} or another model.pretrained")
        model = _create(cfg, 1000)
        model.load_state_dict(load_lite0_imagenet(), strict=True)  # every key must map, or the mapping is wrong
        if num_classes != 1000:
            model.reset_classifier(num_classes)
        log.info("loaded ImageNet EfficientNet-Lite0 weights (%d-class head)", num_classes)
    elif source.lower() == "hub":
        log.warning("model.pretrained=hub: timm may download %s weights", cfg.name)
        model = _create(cfg, num_classes, pretrained=True)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained: {source!r} is neither none/lite0/hub nor an existing weight file")
        model = _create(cfg, num_classes)
        _load_file(model, path)
    pc = model.pretrained_cfg
    norm = Normalize(tuple(pc.get("mean", (0.485, 0.456, 0.406))), tuple(pc.get("std", (0.229, 0.224, 0.225))))
    return model, norm
