"""Noise schedules and the guided sampling loop of the from-scratch generator.

The schedules are diffusers' own (DDPM for training; DDIM and DPM-Solver++ for sampling) built from one saved config,
so training and sampling always agree on betas and prediction type. The loop is kept short and visible, as in
diffusers' DDPMPipeline, with four things added:
- classifier-free guidance with the conditional and unconditional halves in ONE batched forward pass;
- the initial noise of each image drawn from its own seeded ``torch.Generator``, so an image depends only on its seed
  (not on batch composition) and can be regenerated from its manifest row;
- bf16/fp16 autocast of the UNet on GPU, while the scheduler arithmetic stays in fp32;
- optionally, a start from a real image noised part of the way (image-to-image, ``strength`` < 1).
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from dermsynth.config import ConfigError
from dermsynth.generate.models import NULL_CLASS

SAMPLERS = ("ddim", "dpmpp")


def train_scheduler(prediction_type: str, beta_schedule: str = "squaredcos_cap_v2",
                    num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The forward (noising) process used in training; its config is saved in generator.json."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=False)


def make_scheduler(name: str, schedule: dict[str, Any], clip_x0: bool = True) -> Any:
    """A sampling scheduler on the training schedule: "ddim" (eta 0) or "dpmpp" (DPM-Solver++ 2M, deterministic)."""
    base = {k: schedule[k] for k in ("num_train_timesteps", "beta_schedule", "prediction_type")}
    if name == "ddim":
        # trailing spacing reaches t = T-1, which matters at few steps with the cosine schedule
        return DDIMScheduler(**base, clip_sample=clip_x0, clip_sample_range=1.0, set_alpha_to_one=True,
                             timestep_spacing="trailing")
    if name == "dpmpp":
        # thresholding at 1.0 with ratio 1.0 clamps the predicted x0 to [-1, 1], as DDIM's clip_sample does
        return DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2,
                                           thresholding=clip_x0, dynamic_thresholding_ratio=1.0, sample_max_value=1.0,
                                           timestep_spacing="trailing", lower_order_final=True)
    raise ConfigError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for the UNet forward: bf16 on CUDA under "auto"; fp32 on CPU (CPU bf16 is slower and not exact)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "no"
    if precision == "no":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """One (C, H, W) noise tensor per seed, each from its own CPU generator: the image depends on its seed only."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def first_step(steps: int, strength: float) -> int:
    """Index of the first of ``steps`` timesteps an image-to-image run takes: it denoises int(steps * strength) of
    them, as diffusers' img2img pipelines do. strength 1 = from pure noise (every step)."""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength must be in (0, 1], got {strength}")
    n = min(int(steps * strength), steps)
    if n < 1:
        raise ConfigError(f"strength {strength} with {steps} steps leaves no denoising step; raise either")
    return steps - n


@torch.no_grad()
def sample(unet: UNet2DModel, scheduler: Any, labels: Sequence[int], seeds: Sequence[int], steps: int,
           guidance: float, precision: str = "auto", init: torch.Tensor | None = None,
           strength: float = 1.0) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W, fp32 on CPU) for class indices ``labels``, one seed per image.

    guidance = 1 runs the conditional pass only; otherwise eps = uncond + guidance * (cond - uncond) with both halves
    in one batched forward. With ``init`` (N, 3, H, W in [-1, 1]) and strength < 1 each image starts from its init
    image noised to the level of step :func:`first_step` and is denoised from there (SDEdit, Meng et al. 2022): a
    variation of a real image rather than an image from nothing.
    """
    device = next(unet.parameters()).device
    size = unet.config.sample_size
    x = initial_noise(seeds, (unet.config.in_channels, size, size)).to(device)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    if init is None:
        x = x * scheduler.init_noise_sigma
    else:
        if init.shape != x.shape:
            raise ValueError(f"init images have shape {tuple(init.shape)}, the generator makes {tuple(x.shape)}")
        skip = first_step(steps, strength)
        timesteps = timesteps[skip:]
        if hasattr(scheduler, "set_begin_index"):  # multistep solvers index their sigmas from here
            scheduler.set_begin_index(skip)
        x = scheduler.add_noise(init.to(device, torch.float32), x, timesteps[:1].repeat(len(x)))
    cond = torch.as_tensor(list(labels), dtype=torch.long, device=device)
    guided = guidance != 1.0
    cls = torch.cat([cond, torch.full_like(cond, NULL_CLASS)]) if guided else cond
    channels_last = device.type == "cuda"
    for t in timesteps:
        inp = torch.cat([x, x]) if guided else x
        inp = scheduler.scale_model_input(inp, t)
        if channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, precision):
            out = unet(inp, t, class_labels=cls).sample.float()
        if guided:
            out_c, out_u = out.chunk(2)
            out = out_u + guidance * (out_c - out_u)
        x = scheduler.step(out, t, x).prev_sample
    return x.clamp(-1, 1).cpu()


def from_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """NHWC uint8 -> [-1, 1] NCHW float32: the inverse of :func:`to_uint8`, for init images."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> "torch.Tensor":
    """[-1, 1] NCHW float -> NHWC uint8, rounded to nearest (torch.round: an exact half goes to the even neighbour,
    as numpy's round does in diffusers' ``numpy_to_pil``)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
