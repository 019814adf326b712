"""Config of a generator run: which split it learns from, which network, how it trains, how it samples by default.

``kind`` picks the generator: "scratch" (a class-conditional pixel-space UNet trained here, :mod:`scratch_train`) or
"sd15_lora" (Stable Diffusion 1.5 fine-tuned with LoRA, :mod:`dermsynth.generate.sd15`, configured under ``sd``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dermsynth.generate.sd15.config import SDConfig


@dataclass
class GenDataConfig:
    split: str = ""  # path of split.json; only its TRAIN part is used
    image_size: int = 32  # working resolution in px (center crop + resize, cached)
    classes: list[str] = field(default_factory=list)  # classes to learn; empty = every class of the train part


@dataclass
class GenModelConfig:
    size: str = "tiny"  # key of dermsynth.generate.models.UNET_SIZES
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    beta_schedule: str = "squaredcos_cap_v2"  # cosine schedule (Nichol & Dhariwal)
    num_train_timesteps: int = 1000


@dataclass
class GenTrainConfig:
    steps: int = 2000
    batch_size: int = 64  # global batch: split evenly across processes
    lr: float = 2e-4
    warmup_steps: int = 100  # linear warm-up, then constant (so extending a run does not change its past)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # upper bound; diffusers' EMAModel warms up as (1 + n) / (10 + n)
    label_dropout: float = 0.1  # share of labels replaced by the null class (classifier-free guidance)
    balance_power: float = 0.5  # image weight = class count ** -power: 0 = natural, 0.5 = inverse sqrt, 1 = balanced
    augment: bool = True  # random flips and 90-degree rotations (dermoscopy has no canonical orientation)
    snr_gamma: float = 0.0  # > 0: min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain MSE
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "no", "bf16"] = "auto"  # autocast: auto = bf16 on CUDA, fp32 on CPU
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile through accelerate (inductor)
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 500  # fixed-seed grid per class in <run>/validation/ (0 = only at the end)
    validation_per_class: int = 6
    validation_steps: int = 20


@dataclass
class GenSampleConfig:
    sampler: Literal["ddim", "dpmpp"] = "dpmpp"
    steps: int = 25
    guidance: float = 2.0  # classifier-free guidance scale (1 = conditional only)
    batch_size: int = 64
    use_ema: bool = True
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    clip_x0: bool = True  # clamp the predicted clean image to [-1, 1] at each step (pixel space)


@dataclass
class GenConfig:
    kind: Literal["scratch", "sd15_lora"] = "scratch"
    data: GenDataConfig = field(default_factory=GenDataConfig)
    model: GenModelConfig = field(default_factory=GenModelConfig)
    train: GenTrainConfig = field(default_factory=GenTrainConfig)
    sample: GenSampleConfig = field(default_factory=GenSampleConfig)
    sd: SDConfig = field(default_factory=SDConfig)
