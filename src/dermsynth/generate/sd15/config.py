"""Config of the Stable Diffusion 1.5 LoRA + textual-inversion generator (``GenConfig.sd``).

With ``kind: sd15_lora`` only ``data.split`` is read from the rest of :class:`GenConfig`; everything else that the
SD path uses (classes, resolution, training, sampling defaults) lives here, because its sensible values differ from
those of the small from-scratch model (e.g. 512 px, learning rates for adapters, guidance 7.5).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


def _default_tokens() -> dict[str, str]:
    return {"mel": "<melanoma>", "df": "<dermatofibroma>", "vasc": "<vascular>"}


def _default_init_words() -> dict[str, str]:
    return {"mel": "melanoma", "df": "dermatofibroma", "vasc": "vascular", "nv": "nevus", "bcc": "carcinoma",
            "akiec": "keratosis", "bkl": "keratosis"}


@dataclass
class SDConfig:
    # --- base weights ---------------------------------------------------------------------------------------------
    # local diffusers folder | local single-file .safetensors/.ckpt | hub id (online only); "" = the default folder
    base: str = ""
    base_config: str = ""  # single-file base only: a local diffusers-format folder with the component configs/tokenizer
    # --- what to learn --------------------------------------------------------------------------------------------
    classes: list[str] = field(default_factory=lambda: ["df", "vasc", "mel"])
    tokens: dict[str, str] = field(default_factory=_default_tokens)  # class -> new token; missing classes get <code>
    init_words: dict[str, str] = field(default_factory=_default_init_words)  # new token starts at this word's embedding
    prompt: str = "a dermoscopic image of {token}, {name}"  # {token}: the learnt token, {name}: the class's plain name
    captions: list[str] = field(default_factory=list)  # optional varied templates; one is drawn per training image
    negative_prompt: str = "text, watermark, ruler, hair, blurry, low quality"
    # --- LoRA -----------------------------------------------------------------------------------------------------
    lora_rank: int = 8
    lora_alpha: float = 8.0  # scale = alpha / rank
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_lora: bool = False  # also LoRA on the CLIP attention (q/k/v/out_proj)
    # --- optimisation ---------------------------------------------------------------------------------------------
    lr_unet: float = 1e-4
    lr_tokens: float = 5e-4
    lr_text_encoder: float = 5e-5
    weight_decay: float = 1e-2  # on LoRA matrices only, never on the token rows
    warmup_steps: int = 100  # linear warm-up, then constant (extending a run does not change its past)
    max_grad_norm: float = 1.0
    steps: int = 3000  # optimiser steps
    resolution: int = 512
    batch_size: int = 4  # per optimiser step and process, before gradient accumulation
    grad_accumulation: int = 1
    balance_power: float = 1.0  # image weight = class count ** -power: 1 = every class equally often
    augment: Literal["dihedral", "hflip", "none"] = "dihedral"  # flips/90-degree rotations (no canonical orientation)
    min_snr_gamma: float = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023); 0 = plain MSE
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # frozen weights in this dtype; trained ones fp32
    gradient_checkpointing: bool = True
    cache_latents: bool = True  # encode each image (and augmented view) once with the VAE
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # --- checkpoints, validation ----------------------------------------------------------------------------------
    checkpoint_every: int = 500  # steps
    checkpoint_minutes: float = 20.0  # also after this much wall time (short-lived notebook sessions); 0 = off
    keep_checkpoints: int = 3
    validate_every: int = 500  # steps; fixed-seed images per class + held-out denoising loss; 0 = only at the end
    validation_per_class: int = 4
    heldout_images: int = 48  # validation-part images of the classes (at most), for the held-out loss
    heldout_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    log_every: int = 50
    # --- sampling defaults ----------------------------------------------------------------------------------------
    sampler: Literal["dpmpp", "ddim", "pndm"] = "dpmpp"
    sample_steps: int = 25
    guidance: float = 7.5
    sample_batch_size: int = 16
    sample_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    fuse_lora: bool = True  # merge the LoRA into the UNet weights for sampling (no per-layer adapter overhead)
    channels_last: bool = True
    compile: bool = False  # torch.compile the UNet for sampling (pays off for hundreds of images)
