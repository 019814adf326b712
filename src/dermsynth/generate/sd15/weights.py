"""Stable Diffusion 1.5 base weights from local files (or a hub id when online), with an error that says what to do.

dermsynth never fetches these weights on its own: the user downloads them once and points ``sd.base`` at them.
Three forms are read: a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), a
single-file checkpoint (.safetensors/.ckpt) together with a local diffusers folder for the configs and tokenizer
(``sd.base_config``), or a hub id, which only works online or from the local hub cache.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dermsynth.generate.sd15.config import SDConfig
from dermsynth.paths import cache_root
from dermsynth.pretrained import WeightsNotFoundError

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHT_GLOBS = {"unet": "diffusion_pytorch_model*", "vae": "diffusion_pytorch_model*", "text_encoder": "model*"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_base_dir() -> Path:
    """Where an empty ``sd.base`` looks for the diffusers-format SD-1.5 folder."""
    return cache_root() / "models" / "stable-diffusion-v1-5"


def how_to_get_weights(where: str) -> str:
    """The instructions every missing-weights error carries."""
    default = default_base_dir()
    return (
        f"Stable Diffusion 1.5 weights not found: {where}.\n"
        "dermsynth never downloads model weights by itself. Get them once (licence: CreativeML OpenRAIL-M) and "
        "point sd.base at them:\n"
        f"  1. diffusers folder (recommended, ~4.3 GB): hf download {SD15_HUB_ID} --include 'model_index.json' "
        "'*/config.json' 'scheduler/*' 'tokenizer/*' 'unet/diffusion_pytorch_model.safetensors' "
        "'vae/diffusion_pytorch_model.safetensors' 'text_encoder/model.safetensors' "
        f"--local-dir {default}\n"
        f"     then leave sd.base empty (that folder is the default) or pass --set sd.base=<folder>;\n"
        "  2. single file: --set sd.base=<v1-5-pruned-emaonly.safetensors> --set sd.base_config=<a diffusers folder "
        "with model_index.json, */config.json, scheduler/ and tokenizer/ (no weights needed)>;\n"
        f"  3. online only: --set sd.base={SD15_HUB_ID} (a hub id, downloaded into the hub cache)."
    )


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise WeightsNotFoundError(how_to_get_weights(f"no folder {folder}"))
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    missing += [f"{c}/ weights" for c, g in _WEIGHT_GLOBS.items()
                if (folder / c).is_dir() and not any((folder / c).glob(g))]
    if missing:
        raise WeightsNotFoundError(how_to_get_weights(f"{folder} lacks {', '.join(missing)}"))


def resolve_base(sd: SDConfig) -> tuple[str, str]:
    """``(form, location)``: form is "folder", "single_file" or "hub"; local paths come back absolute."""
    raw = sd.base.strip()
    if not raw:
        folder = default_base_dir()
        _check_folder(folder)
        return "folder", str(folder.resolve())
    path = Path(raw).expanduser()
    if path.is_dir():
        _check_folder(path)
        return "folder", str(path.resolve())
    if path.is_file():
        if not sd.base_config or not Path(sd.base_config).expanduser().is_dir():
            raise WeightsNotFoundError(how_to_get_weights(
                f"single-file checkpoint {path} needs sd.base_config, a local diffusers folder with the configs and "
                f"tokenizer (got {sd.base_config!r})"))
        return "single_file", str(path.resolve())
    looks_local = raw.startswith((".", "/", "~")) or path.suffix in (".safetensors", ".ckpt", ".bin")
    if looks_local or not _HUB_ID.match(raw):
        raise WeightsNotFoundError(how_to_get_weights(f"sd.base={raw!r} is not an existing file or folder"))
    return "hub", raw


def load_components(sd: SDConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Tokenizer, text encoder, VAE, UNet (in ``dtype``) and the training noise scheduler of the configured base.

    Also returns ``base`` (the resolved location) for provenance.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    form, where = resolve_base(sd)
    if form == "single_file":
        pipe = StableDiffusionPipeline.from_single_file(
            where, config=str(Path(sd.base_config).expanduser().resolve()), local_files_only=True, torch_dtype=dtype,
            safety_checker=None, requires_safety_checker=False)
        parts = {c: getattr(pipe, c) for c in COMPONENTS}
        parts["scheduler"] = DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        parts = _load_folder_or_hub(form, where, dtype)
    for name in ("text_encoder", "vae", "unet"):
        parts[name].requires_grad_(False).eval()
    return {**parts, "base": where}


def _load_folder_or_hub(form: str, where: str, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw: dict[str, Any] = {"local_files_only": form == "folder"}
    try:
        parts = {
            "tokenizer": CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(where, subfolder="text_encoder", dtype=dtype, **kw),
            "vae": AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype, **kw),
            "unet": UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype, **kw),
            "scheduler": DDPMScheduler.from_pretrained(where, subfolder="scheduler", **kw),
        }
    except (OSError, ValueError) as e:
        if form == "hub":
            raise WeightsNotFoundError(how_to_get_weights(f"hub id {where!r} could not be loaded ({e})")) from e
        raise
    return parts
