"""The from-scratch generator's network: a diffusers ``UNet2DModel`` with class embeddings, in a few named sizes.

The class embedding has ``len(CLASSES) + 1`` rows: row ``i`` is ``CLASSES[i]`` (the package-wide index order), the
last row is the *null* class used for classifier-free guidance (labels dropped during training, the unconditional
half of each guided sampling step).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import UNet2DModel

from dermsynth.config import ConfigError
from dermsynth.data.labels import CLASSES

N_CLASSES = len(CLASSES)
NULL_CLASS = N_CLASSES  # index of the reserved "no class" embedding


def _unet(channels: tuple[int, ...], attn: tuple[bool, ...], layers: int, groups: int, head_dim: int) -> dict[str, Any]:
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return dict(block_out_channels=channels, down_block_types=down, up_block_types=up, layers_per_block=layers,
                norm_num_groups=groups, attention_head_dim=head_dim)


# Name -> UNet2DModel arguments (the resolution is set at build time). Attention sits only at the coarse levels,
# where it is cheap and where the global layout of a lesion is decided.
UNET_SIZES: dict[str, dict[str, Any]] = {
    # unit tests: 8/16 channels, one attention level, ~40 k parameters
    "test": _unet((8, 16), (False, True), layers=1, groups=4, head_dim=8),
    # CPU demo at 32 px: trains to class-specific blobs in a minute or two on 2 cores
    "tiny": _unet((16, 32, 64), (False, False, True), layers=1, groups=8, head_dim=16),
    # real runs at 64 px: 26.6 M parameters, attention at 16 and 8 px
    "base64": _unet((64, 128, 256, 256), (False, False, True, True), layers=2, groups=32, head_dim=32),
    # real runs at 128 px: one more level, attention at 16 and 8 px
    "base128": _unet((64, 128, 128, 256, 256), (False, False, False, True, True), layers=2, groups=32, head_dim=32),
}


def unet_config(size: str, image_size: int) -> dict[str, Any]:
    """Full ``UNet2DModel`` config for a registry size at ``image_size`` px (checked: every level must divide)."""
    if size not in UNET_SIZES:
        raise ConfigError(f"unknown generator model size {size!r}; choose one of {sorted(UNET_SIZES)}")
    cfg = dict(UNET_SIZES[size])
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if image_size % factor:
        raise ConfigError(f"model size {size!r} halves the image {len(cfg['block_out_channels']) - 1} time(s) and "
                          f"needs an image size divisible by {factor}; got {image_size}")
    cfg.update(sample_size=image_size, in_channels=3, out_channels=3, num_class_embeds=N_CLASSES + 1,
               class_embed_type=None)
    return cfg


def build_unet(size: str, image_size: int) -> UNet2DModel:
    """A freshly initialised class-conditional UNet of a registry size."""
    return UNet2DModel(**unet_config(size, image_size))


def unet_from_config(config: dict[str, Any]) -> UNet2DModel:
    """Rebuild a UNet from the config saved beside its weights (checkpoints are self-describing)."""
    return UNet2DModel.from_config(config)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def load_unet(checkpoint: Path, weights: str = "ema", device: str | Any = "cpu") -> UNet2DModel:
    """A UNet from a checkpoint folder (``unet_config.json`` + ``ema.safetensors`` or ``model.safetensors``)."""
    import json

    import torch
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    unet = unet_from_config(json.loads((checkpoint / "unet_config.json").read_text()))
    unet.load_state_dict(load_file(checkpoint / weights_file(weights)))
    unet.to(device).eval()
    if torch.device(device).type == "cuda":
        unet.to(memory_format=torch.channels_last)
    return unet


def weights_file(weights: str) -> str:
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw', got {weights!r}")
    return "ema.safetensors" if weights == "ema" else "model.safetensors"
