"""Fine-tune Stable Diffusion 1.5 on some classes of a split's TRAIN part: LoRA adapters on the UNet attention and one
new token per class, learnt jointly, with class prompts such as "a dermoscopic image of <dermatofibroma>,
dermatofibroma".

Only the train part's images of the configured classes are read (the split fingerprint is recorded), the frozen
weights stay bit-identical, and what is saved is only what was trained. Every random draw of training (batch, view,
caption, latent sample, timestep, noise) comes from one CPU ``torch.Generator`` per process whose state is
checkpointed, so ``resume="latest"`` continues exactly where an uninterrupted run would be. Validation (fixed-seed
images per class and a denoising loss on validation-part images at fixed timesteps and noise) draws from its own
generators and never disturbs training.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dermsynth.config import ConfigError, read_saved, read_yaml, save_config, to_dict
from dermsynth.data.labels import CLASS_NAMES, parse_classes
from dermsynth.data.split import Split, load_split
from dermsynth.generate.sd15 import adapters
from dermsynth.generate.scratch_train import drop_checkpoints_after
from dermsynth.generate.sd15.config import SDConfig
from dermsynth.io import DataError, atomic_open, atomic_save_image, atomic_write_csv
from dermsynth.paths import RunPaths
from dermsynth.runlog import get_logger, run_log

log = get_logger("generate.sd15")

KIND = "sd15_lora"
STATE_FILE = "training_state.pt"
# settings that may change when a run is resumed (they do not alter what has been learnt so far)
RESUMABLE = {"steps", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "validate_every",
             "validation_per_class", "log_every", "sampler", "sample_steps", "guidance", "sample_batch_size",
             "sample_precision", "fuse_lora", "channels_last", "compile", "base", "base_config"}


# ----------------------------------------------------------------------------------------------------------------------
# Small pieces: device, precision, prompts, views
# ----------------------------------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("sd.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights (and of autocast); "auto" is bf16 on CUDA (fp16 without bf16) and fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def class_tokens(sd: SDConfig) -> dict[str, str]:
    """class -> its learnt token, in the configured class order."""
    return {c: sd.tokens.get(c, f"<{c}>") for c in parse_classes(sd.classes)}


def class_prompt(sd: SDConfig, cls: str, template: str | None = None) -> str:
    return (template or sd.prompt).format(token=class_tokens(sd)[cls], name=CLASS_NAMES[cls].split(" / ")[0])


def check_prompts(sd: SDConfig) -> None:
    for t in [sd.prompt, *sd.captions]:
        if "{token}" not in t:
            raise ConfigError(f"prompt template {t!r} lacks {{token}}: the class token would never be learnt")
        try:
            t.format(token="", name="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"prompt template {t!r}: only {{token}} and {{name}} may be used ({e})") from e


def n_views(augment: str) -> int:
    return {"dihedral": 8, "hflip": 2, "none": 1}[augment]


def view(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` of NCHW images: k % 4 quarter turns, mirrored when k >= 4 (the 8 symmetries of a square)."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x


# ----------------------------------------------------------------------------------------------------------------------
# The trainer: frozen base + adapters + token rows, one optimiser step at a time
# ----------------------------------------------------------------------------------------------------------------------

class SDLoraTrainer:
    """Holds the models, the optimiser and the training generator; ``step`` is one optimiser step."""

    def __init__(self, parts: dict[str, Any], sd: SDConfig, device: torch.device, dtype: torch.dtype,
                 rank: int = 0, world: int = 1):
        self.sd, self.device, self.dtype, self.rank, self.world = sd, device, dtype, rank, world
        self.tokens = class_tokens(sd)
        self.tokenizer, self.text_encoder = parts["tokenizer"], parts["text_encoder"]
        self.vae, self.unet, self.scheduler = parts["vae"], parts["unet"], parts["scheduler"]
        for m in (self.text_encoder, self.vae, self.unet):
            m.requires_grad_(False)
            if m.dtype != dtype:
                m.to(dtype=dtype)
        words = [sd.init_words.get(c, CLASS_NAMES[c].split()[0]) for c in self.tokens]
        with torch.random.fork_rng(devices=[]):  # on CPU, so the adapters' random init depends on sd.seed only
            torch.default_generator.manual_seed(sd.seed)
            self.rows = adapters.add_tokens(self.tokenizer, self.text_encoder, list(self.tokens.values()), words)
            adapters.add_lora(self.unet, self.text_encoder, sd.lora_rank, sd.lora_alpha, sd.target_modules,
                              sd.text_encoder_lora)
        for m in (self.text_encoder, self.vae, self.unet, self.rows):
            m.to(device)  # dtypes kept: frozen in ``dtype``, trainable in fp32
        if sd.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        groups = adapters.trainable(self.unet, self.text_encoder, self.rows)
        self.params = [p for g in groups.values() for p in g]
        lrs = {"unet_lora": sd.lr_unet, "tokens": sd.lr_tokens, "text_lora": sd.lr_text_encoder}
        decay = {"unet_lora": sd.weight_decay, "tokens": 0.0, "text_lora": sd.weight_decay}
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": lrs[k], "weight_decay": decay[k]} for k, ps in groups.items() if ps])
        warm = sd.warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        # every random draw of training; each process has its own stream (its own images), rank 0 = single process
        self.gen = torch.Generator().manual_seed(sd.seed + 1_000_003 * rank)
        self.scaling = float(self.vae.config.scaling_factor)
        self.prediction = self.scheduler.config.prediction_type

    # --- pieces of a step -------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def denoise_loss(self, params: torch.Tensor, prompts: list[str], t: torch.Tensor, noise: torch.Tensor,
                     eps: torch.Tensor) -> torch.Tensor:
        """Per-image MSE of the UNet's prediction; ``params`` are VAE posterior parameters (mean, logvar)."""
        mean, logvar = params.to(self.device, torch.float32).chunk(2, dim=1)
        x0 = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(self.device)) * self.scaling
        t, noise = t.to(self.device), noise.to(self.device)
        xt = self.scheduler.add_noise(x0, noise, t)
        target = noise if self.prediction == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        with self.autocast():
            cond = self.text_encoder(self.token_ids(prompts))[0]
            pred = self.unet(xt, t, cond).sample
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """min-SNR-gamma: weight = min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction)."""
        if self.sd.min_snr_gamma <= 0:
            return torch.ones(len(t), device=self.device)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t.to(self.device))
        clipped = snr.clamp(max=self.sd.min_snr_gamma)
        return clipped / snr if self.prediction == "epsilon" else clipped / (snr + 1)

    def step(self, micro_batches: list[tuple[torch.Tensor, list[str]]]) -> float:
        """One optimiser step over ``micro_batches`` of (posterior params, prompts); returns the mean loss."""
        self.unet.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for params, prompts in micro_batches:
            n = len(prompts)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=self.gen)
            noise = torch.randn((n, params.shape[1] // 2, *params.shape[2:]), generator=self.gen)
            eps = torch.randn(noise.shape, generator=self.gen)
            loss = (self.denoise_loss(params, prompts, t, noise, eps) * self.snr_weight(t)).mean()
            self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.item() / len(micro_batches)
        if self.world > 1:
            total = self.all_reduce_mean(total)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.sd.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        return total

    def all_reduce_mean(self, loss: float) -> float:
        """Average the gradients (and the loss) over processes in one flat all-reduce; every process then takes the
        same optimiser step, so the adapters stay identical without wrapping the models in DDP."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.flatten().float() for g in grads] + [torch.tensor([loss], device=self.device)])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
        return float(flat[-1])

    # --- state ------------------------------------------------------------------------------------------------------
    def save_rng(self, folder: Path) -> None:
        """This process's random streams (each process writes its own file into the checkpoint folder)."""
        rng = {"gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        with atomic_open(folder / f"rng_rank{self.rank}.pt", "wb") as f:
            torch.save(rng, f)

    def save(self, folder: Path, step: int, extra: dict) -> None:
        """Adapters + optimiser state (identical on every process: written by rank 0 only)."""
        adapters.save_adapters(folder, self.unet, self.text_encoder, self.rows, self.tokens)
        state = {"step": step, "world_size": self.world, "optimizer": self.optimizer.state_dict(),
                 "lr_schedule": self.lr_schedule.state_dict(), "scaler": self.scaler.state_dict(), **extra}
        with atomic_open(folder / STATE_FILE, "wb") as f:
            torch.save(state, f)

    def load(self, folder: Path) -> dict:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        if int(state.get("world_size", 1)) != self.world:
            raise ConfigError(f"{folder} was written by {state.get('world_size')} process(es); resume it with the "
                              f"same number (now {self.world}) so that every random stream continues exactly")
        adapters.load_adapters(folder, self.unet, self.text_encoder, self.rows, self.tokens)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        rng = torch.load(folder / f"rng_rank{self.rank}.pt", map_location="cpu", weights_only=True)
        self.gen.set_state(rng["gen"])
        torch.set_rng_state(rng["torch_rng"])
        if rng["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda_rng"])
        return state


# ----------------------------------------------------------------------------------------------------------------------
# Data: images of the classes, cached VAE posteriors
# ----------------------------------------------------------------------------------------------------------------------

def class_rows(split: Split, part: str, classes: list[str], limit: int | None = None) -> pd.DataFrame:
    """Rows of ``part`` with a label in ``classes``; with ``limit``, an even share per class (first in split order)."""
    df = split.part(part)
    df = df[df["label"].isin(classes)].reset_index(drop=True)
    if limit is not None:
        per = max(1, limit // max(1, len(classes)))
        df = df.groupby("label", sort=False).head(per).reset_index(drop=True)
    return df


@torch.no_grad()
def encode(vae: Any, images: np.ndarray, views: int, device: torch.device, dtype: torch.dtype,
           batch: int = 8) -> torch.Tensor:
    """VAE posterior parameters (N, V, 2C, h, w) of uint8 NHWC ``images`` in each of ``views`` orientations."""
    out = []
    for i in tqdm(range(0, len(images), batch), desc="encoding latents", leave=False, disable=len(images) <= batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        per_view = [vae.encode(view(x, k).to(device, dtype)).latent_dist.parameters.float().cpu()
                    for k in range(views)]
        out.append(torch.stack(per_view, dim=1))
    return torch.cat(out)


class LatentSource:
    """Posterior parameters of (image, view) pairs: from a cache built once, or encoded on demand."""

    def __init__(self, vae: Any, images: np.ndarray, views: int, device: torch.device, dtype: torch.dtype,
                 cache: bool):
        self.vae, self.images, self.views, self.device, self.dtype = vae, images, views, device, dtype
        self.cached = encode(vae, images, views, device, dtype) if cache else None

    def get(self, idx: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[idx, views]
        out = []
        for i, k in zip(idx.tolist(), views.tolist()):
            x = torch.from_numpy(np.ascontiguousarray(self.images[i:i + 1])).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                out.append(self.vae.encode(view(x, k).to(self.device, self.dtype)).latent_dist.parameters.float().cpu())
        return torch.cat(out)


def draw_batch(trainer: SDLoraTrainer, source: LatentSource, labels: list[str], weights: torch.Tensor, n: int
               ) -> tuple[torch.Tensor, list[str]]:
    """``n`` (image, view, caption) draws from the training generator, weighted by class balance."""
    sd, gen = trainer.sd, trainer.gen
    idx = torch.multinomial(weights, n, replacement=True, generator=gen)
    views = torch.randint(0, source.views, (n,), generator=gen)
    templates = [sd.prompt, *sd.captions] if sd.captions else [sd.prompt]
    pick = torch.randint(0, len(templates), (n,), generator=gen).tolist()
    prompts = [class_prompt(sd, labels[i], templates[j]) for i, j in zip(idx.tolist(), pick)]
    return source.get(idx, views), prompts


# ----------------------------------------------------------------------------------------------------------------------
# Validation: held-out denoising loss and fixed-seed images
# ----------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_loss(trainer: SDLoraTrainer, means: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """Plain MSE on validation-part images at fixed timesteps with fixed noise (the same at every evaluation), overall
    and per class: if it rises while the training loss falls, the adapters are memorising the train images."""
    sd = trainer.sd
    if len(means) == 0:
        return {}
    gen = torch.Generator().manual_seed(sd.seed + 1)
    params = torch.cat([means, torch.full_like(means, -30.0)], dim=1)  # logvar -30: the posterior mean itself
    prompts = [class_prompt(sd, c) for c in labels]
    losses = torch.zeros(len(means))
    trainer.unet.eval()
    for t in sd.heldout_timesteps:
        noise = torch.randn((len(means), *means.shape[1:]), generator=gen)
        for i in range(0, len(means), sd.batch_size):
            sl = slice(i, i + sd.batch_size)
            tt = torch.full((len(prompts[sl]),), int(t), dtype=torch.long)
            losses[sl] += trainer.denoise_loss(params[sl], prompts[sl], tt, noise[sl], torch.zeros_like(noise[sl])
                                               ).cpu() / len(sd.heldout_timesteps)
    out = {"heldout_loss": float(losses.mean())}
    for c in dict.fromkeys(labels):
        out[f"heldout_{c}"] = float(losses[[lab == c for lab in labels]].mean())
    return out


@torch.no_grad()
def validation_grid(trainer: SDLoraTrainer, path: Path) -> Path:
    """One row per class of ``validation_per_class`` images from fixed seeds, sampled like ``generate`` does."""
    from dermsynth.generate.sd15.sample import build_pipeline, sample_images

    sd = trainer.sd
    pipe = build_pipeline({"tokenizer": trainer.tokenizer, "text_encoder": trainer.text_encoder, "vae": trainer.vae,
                           "unet": trainer.unet, "scheduler": trainer.scheduler}, sd.sampler)
    trainer.unet.eval()
    rows = []
    for c in trainer.tokens:
        seeds = list(range(sd.validation_per_class))
        with trainer.autocast():
            imgs = sample_images(pipe, class_prompt(sd, c), sd.negative_prompt, seeds, sd.sample_steps, sd.guidance,
                                 sd.resolution)
        rows.append(np.concatenate(list(imgs), axis=1))
    return atomic_save_image(path, np.concatenate(rows, axis=0))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------

def checkpoints(run: RunPaths) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders of an interrupted save are ignored)."""
    if not run.checkpoints.is_dir():
        return []
    done = [p for p in run.checkpoints.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(run: RunPaths, trainer: SDLoraTrainer, step: int, extra: dict, keep: int, state: Any) -> Path:
    """Write into a temp folder, rename it into place (a crash leaves no half checkpoint), drop the oldest.

    ``state`` is accelerate's PartialState: every process adds its random streams, the main one the rest."""
    final = run.checkpoint(step)
    tmp = run.checkpoints / f".{final.name}.tmp"
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    state.wait_for_everyone()
    trainer.save_rng(tmp)
    state.wait_for_everyone()
    if state.is_main_process:
        trainer.save(tmp, step, extra)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(run)[:-max(1, keep)]:
            shutil.rmtree(old)
    state.wait_for_everyone()
    return final


def _resume_point(run: RunPaths, resume: str | Path | None) -> Path | None:
    found = checkpoints(run)
    if resume is None:
        if found:
            raise ConfigError(f"{run.root} already holds checkpoints ({found[-1].name}); pass --resume latest to "
                              "continue it or choose a new --out folder")
        return None
    if str(resume) == "latest":
        return found[-1] if found else None
    for path in (Path(resume), run.checkpoints / str(resume)):  # a folder, or a step_XXXXXXXX name of this run
        if (path / STATE_FILE).is_file():
            return path
    raise ConfigError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); "
                      f"available: {[p.name for p in found]}")


def _check_resume_split(run: RunPaths, ckpt: Path, split: Split) -> None:
    """A resumed run must learn from the split it started on: the same data.split path is not enough, the file may
    have been remade with other lesions in the train part (and this split's test lesions then in the generator)."""
    from dermsynth.generate.provenance import GENERATOR_JSON, read_generator_info

    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    was = state.get("split_fingerprint")
    if was is None and (run.root / GENERATOR_JSON).is_file():  # checkpoints saved before they kept the fingerprint
        was = read_generator_info(run.root).get("split_fingerprint")
    if was is not None and was != split.fingerprint:
        raise DataError(f"cannot resume {ckpt}: it was trained on a split with fingerprint {str(was)[:12]}..., but "
                        f"data.split {split.path} now has fingerprint {split.fingerprint[:12]}... (remade?); resume "
                        f"it with the split it was trained on or start a new run folder")


def _check_resume_config(run: RunPaths, cfg: Any) -> None:
    """A resumed run must learn the same thing: only the RESUMABLE settings may differ from the saved config."""
    if not run.config.is_file():
        return
    saved = read_yaml(run.config)
    new = to_dict(cfg)
    # read through the dataclass: a field the saved run does not know (added in a later release) takes its default
    was = to_dict(read_saved(type(cfg), saved, run.config))["sd"]
    diff = [k for k in set(new["sd"]) | set(was) if k not in RESUMABLE and new["sd"].get(k) != was.get(k)]
    if saved.get("data", {}).get("split") != new["data"]["split"]:
        diff.append("data.split")
    if diff:
        raise ConfigError(f"cannot resume {run.root}: setting(s) {sorted(diff)} differ from its config.yaml; "
                          "start a new run folder to change them")


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------

def _provenance(run: RunPaths, cfg: Any, split: Split, parts: dict, train_df: pd.DataFrame, step: int,
                world: int) -> None:
    from dermsynth.generate.provenance import generator_info, write_generator_info

    sd = cfg.sd
    classes = parse_classes(sd.classes)
    write_generator_info(run.root, generator_info(
        KIND, split, classes, sd.resolution, base=parts["base"], tokens=class_tokens(sd), prompt=sd.prompt,
        negative_prompt=sd.negative_prompt, train_images={c: int((train_df["label"] == c).sum()) for c in classes},
        steps_done=step, world_size=world))


def _any_process(flag: bool, trainer: SDLoraTrainer) -> bool:
    """True on every process if ``flag`` is true on any (decisions from wall clocks must agree)."""
    if trainer.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=trainer.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _check_in_sync(trainer: SDLoraTrainer) -> None:
    """All processes must end with the same adapters (they take identical steps on all-reduced gradients)."""
    if trainer.world == 1:
        return
    import torch.distributed as dist

    checksum = torch.stack([p.detach().double().sum() for p in trainer.params]).to(trainer.device)
    gathered = [torch.zeros_like(checksum) for _ in range(trainer.world)]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("processes ended with different adapters: the gradient all-reduce desynchronised")


def train_sd_lora(cfg: Any, out: str | Path, resume: str | Path | None = None) -> Path:
    """Train LoRA + class tokens per ``cfg.sd`` on ``cfg.data.split``'s train part; returns the run folder.

    Under ``accelerate launch`` every process trains on its own batches (``sd.batch_size`` each) and gradients are
    averaged; the main process alone writes logs, validation and checkpoints.
    """
    from accelerate import PartialState

    from dermsynth.data.cache import build_cache
    from dermsynth.generate.sd15.weights import load_components, resolve_base

    sd: SDConfig = cfg.sd
    run = RunPaths(Path(out))
    classes = parse_classes(sd.classes)
    check_prompts(sd)
    resolve_base(sd)  # no weights: say what to download before anything is written
    if not cfg.data.split:
        raise ConfigError("data.split is empty: point it at a split.json (dermsynth data split)")
    start_from = _resume_point(run, resume)
    if start_from is not None:
        _check_resume_config(run, cfg)
    state = PartialState(cpu=sd.device == "cpu" or not torch.cuda.is_available())  # cpu: gloo process group
    main, world = state.is_main_process, state.num_processes
    with run_log(run.root) if main else contextlib.nullcontext():
        split = load_split(cfg.data.split)
        if start_from is not None:
            _check_resume_split(run, start_from, split)
        state.wait_for_everyone()  # everyone has read the old config before the main process rewrites it
        if main:
            save_config(cfg, run.config)
        train_df = class_rows(split, "train", classes)
        missing = [c for c in classes if not (train_df["label"] == c).any()]
        if missing:
            raise DataError(f"{split.path}: the train part has no images of class(es) {missing}; "
                            "drop them from sd.classes or use another split")
        held_df = class_rows(split, "val", classes, limit=sd.heldout_images)
        device = state.device if world > 1 and sd.device != "cpu" else pick_device(sd.device)
        dtype = pick_dtype(sd.mixed_precision, device)
        parts = load_components(sd, dtype)
        trainer = SDLoraTrainer(parts, sd, device, dtype, state.process_index, world)
        step, wall_before = 0, 0.0
        if start_from is not None:
            saved = trainer.load(start_from)
            step, wall_before = int(saved["step"]), float(saved["wall_s"])
            log.info("resumed from %s at step %d", start_from, step)
            if main:
                drop_checkpoints_after(checkpoints(run), step, run.root)
        if main:
            _provenance(run, cfg, split, parts, train_df, step, world)
        log.info("SD-1.5 LoRA: %d train images of %s (%s), %d held-out, %d process(es) x batch %d x %d accumulated, "
                 "%s %s, base %s", len(train_df), classes, {c: int((train_df['label'] == c).sum()) for c in classes},
                 len(held_df), world, sd.batch_size, sd.grad_accumulation, device, dtype, parts["base"])

        with state.main_process_first():  # one process builds the image cache, the others then read it
            images = build_cache(train_df, sd.resolution).take(train_df["image_id"])
            held_images = (build_cache(held_df, sd.resolution).take(held_df["image_id"]) if main and len(held_df)
                           else None)
        source = LatentSource(trainer.vae, images, n_views(sd.augment), device, dtype, sd.cache_latents)
        labels = train_df["label"].tolist()
        counts = train_df["label"].value_counts()
        weights = torch.tensor([float(counts[c]) ** -sd.balance_power for c in labels], dtype=torch.float64)
        held_means = (encode(trainer.vae, held_images, 1, device, dtype)[:, 0].chunk(2, dim=1)[0]
                      if held_images is not None else torch.zeros(0))
        held_labels = held_df["label"].tolist()

        rows = (pd.read_csv(run.summary).query("step <= @step").to_dict("records")
                if start_from is not None and run.summary.is_file() else [])
        losses: list[float] = []
        t0 = last_ckpt = time.monotonic()
        saved_step = step if start_from is not None else -1

        def evaluate(step: int) -> None:
            if main:  # the others go on to the next step and wait for it in its all-reduce
                row = {"step": step, "train_loss": float(np.mean(losses)) if losses else math.nan,
                       **heldout_loss(trainer, held_means, held_labels),
                       "lr_unet": trainer.optimizer.param_groups[0]["lr"],
                       "wall_s": wall_before + time.monotonic() - t0}
                validation_grid(trainer, run.validation / f"step_{step:08d}.png")
                rows.append(row)
                atomic_write_csv(run.summary, pd.DataFrame(rows))
                log.info("step %d: %s", step, {k: round(v, 5) for k, v in row.items() if isinstance(v, float)})
            losses.clear()

        def checkpoint(step: int) -> None:
            nonlocal last_ckpt, saved_step
            save_checkpoint(run, trainer, step, {"wall_s": wall_before + time.monotonic() - t0,
                                                 "split_fingerprint": split.fingerprint}, sd.keep_checkpoints, state)
            if main:
                _provenance(run, cfg, split, parts, train_df, step, world)
            last_ckpt, saved_step = time.monotonic(), step

        bar = tqdm(total=sd.steps, initial=step, desc="sd15 lora", leave=False, disable=not main)
        while step < sd.steps:
            micro = [draw_batch(trainer, source, labels, weights, sd.batch_size) for _ in range(sd.grad_accumulation)]
            losses.append(trainer.step(micro))
            step += 1
            bar.update(1)
            if sd.log_every and step % sd.log_every == 0:
                log.info("step %d loss %.5f", step, float(np.mean(losses[-sd.log_every:])))
            if sd.validate_every and step % sd.validate_every == 0 and step < sd.steps:
                evaluate(step)
            overdue = sd.checkpoint_minutes > 0 and time.monotonic() - last_ckpt > 60 * sd.checkpoint_minutes
            timed = _any_process(overdue, trainer)
            if step < sd.steps and ((sd.checkpoint_every and step % sd.checkpoint_every == 0) or timed):
                checkpoint(step)
        bar.close()
        _check_in_sync(trainer)
        if not rows or rows[-1]["step"] != step:
            evaluate(step)
        if saved_step != step:
            checkpoint(step)
    return run.root


__all__ = ["train_sd_lora", "SDLoraTrainer", "checkpoints", "class_prompt", "class_tokens", "KIND"]
