"""``dermsynth generate`` for an SD-1.5 LoRA run: the base pipeline + the run's LoRA and class tokens (loaded with
diffusers' own loaders), DPM-Solver++, batched classifier-free guidance, fp16 on GPU, into the shared samples folder.

The sampling loop is short and visible rather than ``StableDiffusionPipeline.__call__``, for three reasons: each
image's initial latent comes from its own seeded generator (so any image is regenerable from its manifest row), the
prompt embeddings of a class are computed once, and nothing runs that we do not need (safety checker, callbacks, a
PIL round trip). The speed comes from fp16, the LoRA fused into the UNet weights (no adapter overhead per layer),
channels_last, PyTorch SDPA attention and, optionally, torch.compile.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dermsynth.config import ConfigError, load_config
from dermsynth.data.labels import parse_classes
from dermsynth.generate import samples as S
from dermsynth.generate.provenance import read_generator_info
from dermsynth.generate.sd15 import adapters
from dermsynth.generate.sd15.config import SDConfig
from dermsynth.io import DataError
from dermsynth.paths import RunPaths
from dermsynth.runlog import get_logger, run_log

log = get_logger("generate.sd15")

SAMPLERS = ("dpmpp", "ddim", "pndm")


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline pieces
# ----------------------------------------------------------------------------------------------------------------------

def make_sampler(name: str, config: Any) -> Any:
    """A sampling scheduler on the base's noise schedule: DPM-Solver++ 2M, DDIM, or PNDM (the SD-1.5 default)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "pndm":
        return PNDMScheduler.from_config(config)
    raise ConfigError(f"unknown SD sampler {name!r}; choose one of {list(SAMPLERS)}")


def build_pipeline(parts: dict[str, Any], sampler: str) -> Any:
    """A ``StableDiffusionPipeline`` around given components, with ``sampler`` and no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"], unet=parts["unet"],
        scheduler=make_sampler(sampler, parts["scheduler"].config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def initial_latents(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """One latent per seed, each from its own CPU generator: an image depends on its seed, not on its batch mates."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def encode_prompt(pipe: Any, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


@torch.no_grad()
def sample_latents(pipe: Any, prompt: str, negative: str, seeds: Sequence[int], steps: int, guidance: float,
                   size: int, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Denoised latents (N, 4, size/8, size/8) for one prompt; conditional and unconditional halves in one batch."""
    unet, scheduler = pipe.unet, pipe.scheduler
    device, dtype = unet.device, unet.dtype
    n, guided = len(seeds), guidance > 1.0
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if latents is None:
        latents = initial_latents(seeds, (unet.config.in_channels, size // factor, size // factor))
    emb = encode_prompt(pipe, prompt).expand(n, -1, -1)
    if guided:
        emb = torch.cat([encode_prompt(pipe, negative).expand(n, -1, -1), emb])
    emb = emb.to(dtype)
    scheduler.set_timesteps(steps, device=device)
    x = latents.to(device, torch.float32) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        if device.type == "cuda":
            inp = inp.contiguous(memory_format=torch.channels_last)
        out = unet(inp.to(dtype), t, encoder_hidden_states=emb).sample.float()
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample  # the solver's arithmetic stays in fp32
    return x


@torch.no_grad()
def decode(pipe: Any, latents: torch.Tensor) -> np.ndarray:
    """Latents -> (N, H, W, 3) uint8."""
    vae = pipe.vae
    x = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample.float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_images(pipe: Any, prompt: str, negative: str, seeds: Sequence[int], steps: int, guidance: float,
                  size: int) -> np.ndarray:
    """(len(seeds), size, size, 3) uint8 images of ``prompt``."""
    return decode(pipe, sample_latents(pipe, prompt, negative, seeds, steps, guidance, size))


def sample_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def speed_up(pipe: Any, sd: SDConfig, device: torch.device) -> Any:
    """channels_last and (optionally) torch.compile for the UNet; SDPA attention is diffusers' default already."""
    if device.type == "cuda" and sd.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if sd.compile:
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    return pipe


def attach_trained(parts: dict[str, Any], sd: SDConfig, ckpt: Path, classes: list[str], sampler: str,
                   device: torch.device, dtype: torch.dtype) -> Any:
    """A pipeline of base ``parts`` + the checkpoint's LoRA and token embeddings, loaded with diffusers'
    ``load_lora_weights`` and ``load_textual_inversion`` (what any diffusers user would do with these files)."""
    pipe = build_pipeline(parts, sampler)
    pipe.load_lora_weights(str(ckpt), weight_name=adapters.LORA_FILE)
    pipe.load_textual_inversion([str(f) for f in adapters.embedding_files(ckpt, classes)])
    if sd.fuse_lora:
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    return speed_up(pipe, sd, device)


def load_trained_pipeline(sd: SDConfig, base: str, ckpt: Path, classes: list[str], sampler: str,
                          device: torch.device, dtype: torch.dtype) -> Any:
    """:func:`attach_trained` on the base weights at ``base`` (path or hub id)."""
    from dermsynth.generate.sd15.weights import load_components

    return attach_trained(load_components(dataclasses.replace(sd, base=base), dtype), sd, ckpt, classes, sampler,
                          device, dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints of a run
# ----------------------------------------------------------------------------------------------------------------------

def pick_checkpoint(run: RunPaths, checkpoint: str | Path) -> Path:
    from dermsynth.generate.sd15.train import checkpoints

    found = checkpoints(run)
    if str(checkpoint) == "latest":
        if not found:
            raise DataError(f"{run.root} has no checkpoint yet; train it with `dermsynth train-gen`")
        return found[-1]
    if str(checkpoint) == "ema":
        raise ConfigError("SD LoRA runs keep no EMA weights; use --checkpoint latest or a checkpoint folder")
    path = Path(checkpoint)
    path = path if path.is_dir() else run.checkpoints / str(checkpoint)
    if not (path / adapters.LORA_FILE).is_file():
        raise DataError(f"--checkpoint {checkpoint}: no LoRA checkpoint there; available: {[p.name for p in found]}")
    return path


def checkpoint_hash(ckpt: Path, classes: list[str]) -> str:
    """SHA-256 over the files that define the generator (LoRA + each token embedding), first 16 hex digits."""
    h = hashlib.sha256()
    for f in [ckpt / adapters.LORA_FILE, *adapters.embedding_files(ckpt, classes)]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def folder_checkpoint_hash(folder: Path, ckpt: Path, trained: list[str]) -> str:
    """The checkpoint hash of a samples folder of ``ckpt``: over the embeddings of every class the run learnt
    (``trained``), so that one folder can take more classes later. A folder started before (hashed over the classes
    its first call asked for, those of its recorded prompts) keeps its own hash when those files still give it, so
    its image ids stay the same."""
    new = checkpoint_hash(ckpt, trained)
    if not (folder / S.SAMPLES_JSON).is_file():
        return new
    old = S.read_samples_settings(folder)
    first = list(old.get("prompts") or {})
    if (old.get("checkpoint_hash") != new and first and set(first) <= set(trained)
            and old.get("checkpoint_hash") == checkpoint_hash(ckpt, first)):
        return old["checkpoint_hash"]
    return new


# ----------------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------------

def generate_sd(gen_run: str | Path, classes: str | Sequence[str] = "df,vasc,mel", per_class: int = 800,
                out: str | Path | None = None, sampler: str | None = None, steps: int | None = None,
                guidance: float | None = None, seed: int = 0, batch_size: int | None = None,
                checkpoint: str | Path = "latest") -> Path:
    """Sample ``per_class`` images of each class from an SD LoRA run into a samples folder; returns the folder.

    Rerunning the same command completes an interrupted folder (existing images are kept); under
    ``accelerate launch`` each process takes every world-th batch.
    """
    from dermsynth.generate.config import GenConfig
    from dermsynth.generate.sd15.train import KIND, class_prompt, pick_device

    run = RunPaths(Path(gen_run))
    info = read_generator_info(run.root)
    if info.get("kind") != KIND:
        raise DataError(f"{gen_run} is a {info.get('kind')!r} generator, not {KIND!r}")
    sd = load_config(GenConfig, run.config).sd
    classes = parse_classes(classes)
    unknown = [c for c in classes if c not in info["classes"]]
    if unknown:
        raise DataError(f"{gen_run} learnt classes {info['classes']}, not {unknown}")
    ckpt = pick_checkpoint(run, checkpoint)
    step = int(ckpt.name.split("_")[-1]) if ckpt.name.startswith("step_") else -1
    sampler = sampler or sd.sampler
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown SD sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    steps = int(steps or sd.sample_steps)
    guidance = float(sd.guidance if guidance is None else guidance)
    folder = Path(out) if out else run.samples_root / S.samples_dir_name(step, sampler, steps, guidance, seed)
    if batch_size is None and not (folder / S.SAMPLES_JSON).is_file():
        batch_size = sd.sample_batch_size
    wanted = {
        "generator": str(run.root.resolve()), "kind": KIND,
        "checkpoint_hash": folder_checkpoint_hash(folder, ckpt, list(info["classes"])),
        "checkpoint_step": step, "weights": "lora", "sampler": sampler, "steps": steps, "guidance": guidance,
        "seed": seed, "batch_size": batch_size, "image_size": sd.resolution, "split": info["split"],
        "split_fingerprint": info["split_fingerprint"], "base": info.get("base"),
        "prompts": {c: class_prompt(sd, c) for c in classes}, "negative_prompt": sd.negative_prompt}
    from accelerate import PartialState

    state = PartialState(cpu=sd.device == "cpu" or not torch.cuda.is_available())
    settings = S.open_samples_folder(folder, wanted, write=state.is_main_process)
    if state.num_processes > 1:  # the others read the samples.json the main process just wrote
        state.wait_for_everyone()
        settings = S.open_samples_folder(folder, wanted, write=False)
    batches = S.plan_batches(classes, per_class, settings["batch_size"], seed, S.settings_tag(settings))
    todo = [b for b in S.shard(batches, state.process_index, state.num_processes) if S.missing(b, folder)]
    with run_log(folder) if state.is_main_process else contextlib.nullcontext():
        if todo:
            device = state.device if state.num_processes > 1 else pick_device(sd.device)
            pipe = load_trained_pipeline(sd, info.get("base", sd.base), ckpt, classes, sampler, device,
                                         sample_dtype(sd.sample_precision, device))
            for batch in tqdm(todo, desc="sd15 generate", leave=False):
                images = sample_images(pipe, class_prompt(sd, batch.label), sd.negative_prompt, batch.seeds, steps,
                                       guidance, sd.resolution)
                for item in S.missing(batch, folder):
                    S.save_sample(folder, item, images[item.index - batch.number * settings["batch_size"]], settings)
        state.wait_for_everyone()
        if state.is_main_process:
            S.write_samples_manifest(folder, batches, settings)
            log.info("%s: %d images of %s from %s", folder, per_class * len(classes), classes, ckpt)
    state.wait_for_everyone()
    return folder
