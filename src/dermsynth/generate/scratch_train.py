"""Train the from-scratch class-conditional pixel diffusion model on the TRAIN part of a split.

One linear function, :func:`train_scratch`, in the spirit of DiT's ``train.py``: data -> model -> loop -> checkpoints.
Every random draw (batch indices, augmentation, label dropout, timesteps, noise) comes from generators owned by the
loop and saved in each checkpoint, so ``resume="latest"`` continues exactly where an uninterrupted run would be.
Validation grids use their own fixed seeds and never touch the training generators.

Run folder:
    config.yaml  generator.json  log.txt  summary.csv (loss per timestep quartile every log_every steps)
    checkpoints/step_XXXXXXXX/{model,ema}.safetensors optimizer.pt rng_rank<r>.pt unet_config.json state.json
    validation/step_XXXXXXXX.png (EMA weights, fixed seeds, one row per class)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tqdm.auto import tqdm

from dermsynth import __version__
from dermsynth.config import ConfigError, read_saved, save_config, to_dict
from dermsynth.data.cache import build_cache
from dermsynth.data.labels import CLASSES, parse_classes
from dermsynth.data.split import load_split
from dermsynth.device import to_device
from dermsynth.generate.config import GenConfig
from dermsynth.generate.models import NULL_CLASS, build_unet, count_parameters, unet_from_config
from dermsynth.generate.provenance import generator_info, read_generator_info, write_generator_info
from dermsynth.generate.samplers import autocast_for, make_scheduler, sample, to_uint8, train_scheduler
from dermsynth.generate.samples import image_seed
from dermsynth.io import DataError, atomic_open, atomic_save_image, atomic_write_csv, atomic_write_json
from dermsynth.paths import RunPaths
from dermsynth.runlog import get_logger, run_log

STATE_JSON = "state.json"  # written last: a checkpoint folder without it is incomplete


# ----------------------------------------------------------------------------------------------------------------------
# Data: the train part as one uint8 tensor, class-balanced draws, dihedral augmentation
# ----------------------------------------------------------------------------------------------------------------------

def train_rows(split_path: str, classes: list[str]) -> tuple[Any, pd.DataFrame, list[str]]:
    """The split and its TRAIN rows of the requested classes (all present classes when ``classes`` is empty)."""
    if not split_path:
        raise ConfigError("data.split: the generator needs a split.json (make one with `dermsynth data split`)")
    split = load_split(split_path)
    df = split.part("train")
    wanted = parse_classes(classes) if classes else [c for c in CLASSES if (df["label"] == c).any()]
    absent = [c for c in wanted if not (df["label"] == c).any()]
    if absent:
        raise DataError(f"{split.path}: the train part has no images of class(es) {absent}; drop them from "
                        f"data.classes")
    return split, df[df["label"].isin(wanted)].reset_index(drop=True), wanted


def class_weights(labels: torch.Tensor, power: float) -> torch.Tensor:
    """Per-image sampling weight count(class) ** -power (0.5: each class drawn in proportion to sqrt of its count)."""
    counts = torch.bincount(labels, minlength=NULL_CLASS).double()
    return counts[labels].pow(-power)


def draw_batch(images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, n: int, rng: torch.Generator,
               augment: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A weighted draw with replacement -> (x in [-1, 1], NCHW fp32 on device; class indices)."""
    # every host -> device copy goes through to_device (pinned, non-blocking): a plain .to(cuda) waits for the GPU
    # to finish its queue, so each step would stall several times
    idx = torch.multinomial(weights, n, replacement=True, generator=rng)
    x = to_device(images[to_device(idx, images.device)], device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if augment:
        # the 8 symmetries of the square: a flip then 0-3 quarter turns (lesion photos have no "up")
        flip = torch.rand(n, generator=rng) < 0.5
        turns = torch.randint(0, 4, (n,), generator=rng)
        x = torch.where(to_device(flip, device)[:, None, None, None], x.flip(3), x)
        for k in (1, 2, 3):
            sel = (turns == k).nonzero().squeeze(1)
            if len(sel):
                sel = to_device(sel, device)
                x[sel] = torch.rot90(x[sel], k, dims=(2, 3))
    return x, to_device(labels[idx], device)


def train_rngs(seed: int, rank: int, device: torch.device | str = "cpu") -> dict[str, torch.Generator]:
    """The loop's random streams: "data" (batches, augmentation, label dropout, timesteps; CPU) and "noise" (the
    diffusion noise, on ``device``), each seeded from a hash of (seed, rank, stream name) so that no two streams or
    ranks share a seed (arithmetic seeds such as seed * k + rank coincide at seed 0, and on CPU the noise would then
    replay the uniforms that drew the batch)."""
    def stream(name: str) -> int:
        digest = hashlib.sha256(f"dermsynth-train:{seed}:{rank}:{name}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    return {"data": torch.Generator().manual_seed(stream("data")),
            "noise": torch.Generator(device=device).manual_seed(stream("noise"))}


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic folders, rotation, latest
# ----------------------------------------------------------------------------------------------------------------------

def list_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = RunPaths(run).checkpoints
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_JSON).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def resolve_checkpoint(run: str | Path, which: str | Path = "latest") -> Path:
    """``latest`` / ``ema`` -> the newest complete checkpoint; else a folder path or a ``step_XXXXXXXX`` name."""
    if str(which) in ("latest", "ema", "raw"):
        ckpts = list_checkpoints(run)
        if not ckpts:
            raise DataError(f"{run}: no complete checkpoint in {RunPaths(run).checkpoints}; train first")
        return ckpts[-1]
    p = Path(which)
    for cand in (p, RunPaths(run).checkpoints / str(which)):
        if (cand / STATE_JSON).is_file():
            return cand
    raise DataError(f"checkpoint {which!r} not found (or incomplete) for run {run}; use 'latest' or one of "
                    f"{[c.name for c in list_checkpoints(run)]}")


def drop_checkpoints_after(found: Sequence[Path], step: int, run: str | Path) -> list[Path]:
    """Delete the checkpoint folders (``step_XXXXXXXX``) of ``found`` past ``step``; returns them. Called when a run
    (scratch or SD) resumes from an older checkpoint: those belong to the abandoned continuation, and rotation keeps the
    highest steps, so left in place they would push out the new branch's checkpoints and stay ``latest``."""
    newer = [p for p in found if int(p.name.split("_")[1]) > step]
    if newer:
        get_logger("generate").warning("resuming %s from step %d: deleting the newer checkpoints %s of the run it "
                                       "replaces", run, step, [p.name for p in newer])
    for p in newer:
        shutil.rmtree(p)
    return newer


def _save_torch(obj: Any, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(acc: Accelerator, run: Path, step: int, unet: UNet2DModel, ema: EMAModel,
                    opt: torch.optim.Optimizer, rngs: dict[str, torch.Generator], cfg: GenConfig, keep: int,
                    extra: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_XXXXXXXX`` via a temp folder renamed into place, then drop all but the newest ``keep``.

    Every process saves its own RNG states (their data streams differ); the main process saves everything else.
    """
    paths = RunPaths(run)
    final, tmp = paths.checkpoint(step), paths.checkpoints / f".tmp_step_{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    _save_torch({k: g.get_state() for k, g in rngs.items()}, tmp / f"rng_rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        names = [n for n, _ in unet.named_parameters()]
        with atomic_open(tmp / "model.safetensors", "wb") as f:
            f.write(_safetensors_bytes({k: v for k, v in unet.state_dict().items()}))
        with atomic_open(tmp / "ema.safetensors", "wb") as f:
            f.write(_safetensors_bytes(dict(zip(names, ema.shadow_params))))
        _save_torch(opt.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "unet_config.json", dict(unet.config))
        ema_state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        atomic_write_json(tmp / STATE_JSON, {"step": step, "ema": ema_state, "world_size": acc.num_processes,
                                             "dermsynth_version": __version__, "config": to_dict(cfg),
                                             "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})
        if final.exists():  # rerunning a step after a resume from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def load_checkpoint(ckpt: Path, unet: UNet2DModel, ema: EMAModel, opt: torch.optim.Optimizer,
                    rngs: dict[str, torch.Generator], rank: int) -> int:
    """Restore model, EMA, optimiser and this process's RNG states; return the step."""
    state = json.loads((ckpt / STATE_JSON).read_text())
    unet.load_state_dict(load_file(ckpt / "model.safetensors", device=str(unet.device)))
    shadow = load_file(ckpt / "ema.safetensors", device=str(unet.device))
    ema.load_state_dict({**state["ema"], "shadow_params": [shadow[n] for n, _ in unet.named_parameters()]})
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=unet.device, weights_only=True))
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        for k, s in torch.load(rng_file, weights_only=True).items():
            rngs[k].set_state(s.cpu())  # CPU and CUDA generators both take a CPU byte tensor
    else:  # resumed on more processes than it was saved with: a fresh, distinct stream for this rank
        get_logger("generate").warning("%s has no RNG state for rank %d; reseeding it", ckpt, rank)
        for i, g in enumerate(rngs.values()):
            g.manual_seed(int(state["step"]) * 7919 + rank * 104729 + i)
    return int(state["step"])


# ----------------------------------------------------------------------------------------------------------------------
# Validation grid and summary
# ----------------------------------------------------------------------------------------------------------------------

def validation_grid(unet: UNet2DModel, schedule: dict[str, Any], classes: list[str], per_class: int, sampler: str,
                    steps: int, guidance: float, seed: int) -> np.ndarray:
    """One row per class of fixed-seed samples (same seeds at every step, so grids are comparable over time)."""
    labels = [CLASSES.index(c) for c in classes for _ in range(per_class)]
    seeds = [image_seed(seed, c, i) for c in classes for i in range(per_class)]
    imgs = to_uint8(sample(unet, make_scheduler(sampler, schedule), labels, seeds, steps, guidance))
    zoom = max(1, 64 // imgs.shape[1])  # small images are enlarged (nearest neighbour) so a person can judge them
    imgs = imgs.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2).numpy()
    s = imgs.shape[1]
    pad, margin = 2, 44
    grid = np.full((len(classes) * (s + pad) + pad, margin + per_class * (s + pad) + pad, 3), 255, np.uint8)
    for k, img in enumerate(imgs):
        r, c = divmod(k, per_class)
        y, x = pad + r * (s + pad), margin + pad + c * (s + pad)
        grid[y:y + s, x:x + s] = img
    im = Image.fromarray(grid)
    draw = ImageDraw.Draw(im)
    for r, c in enumerate(classes):
        draw.text((3, pad + r * (s + pad) + s // 2 - 5), c, fill=(0, 0, 0))
    return np.asarray(im)


def _summary_rows(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    df = pd.read_csv(path)
    return df[df["step"] <= upto].to_dict("records")


# ----------------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------------

def _accelerator(cfg: GenConfig) -> Accelerator:
    t = cfg.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    cpu = t.device == "cpu" or not torch.cuda.is_available()
    if cpu and t.precision == "bf16":
        raise ConfigError("train.precision=bf16 needs CUDA; use auto or no on CPU")
    # Autocast is applied in the loop (samplers.autocast_for), not through accelerate's mixed_precision: accelerate
    # fixes that flag once per process, which would break a later stage of the same process asking for another.
    return Accelerator(cpu=cpu)


def _check_resumable(out: Path, ckpt: Path, cfg: GenConfig, fingerprint: str, split_path: str) -> None:
    """A resumed run must keep its split, network, objective and data: anything else is a new run."""
    saved = json.loads((ckpt / STATE_JSON).read_text())
    if saved.get("split_fingerprint") != fingerprint:
        raise DataError(f"{out} was trained on split {read_generator_info(out).get('split')}, not {split_path}; "
                        f"resume it with its own split or train a new run")
    now = to_dict(cfg)
    # read through the dataclass: a field the saved run does not know (added in a later release) takes its default
    was = to_dict(read_saved(type(cfg), saved["config"], ckpt / STATE_JSON))
    changed = [f"model.{k}" for k in now["model"] if was["model"].get(k) != now["model"][k]]
    changed += [f"data.{k}" for k in ("image_size", "classes") if was["data"].get(k) != now["data"][k]]
    if changed:
        raise DataError(f"cannot resume {ckpt}: {changed} differ from the run's own config ({out}/config.yaml); "
                        f"keep them or train a new run")


def train_step(acc: Accelerator, model: torch.nn.Module, forward: Any, opt: torch.optim.Optimizer, ema: EMAModel,
               unet: UNet2DModel, noise_sched: Any, cfg: GenConfig, x0: torch.Tensor, y: torch.Tensor,
               rngs: dict[str, torch.Generator], step: int) -> tuple[torch.Tensor, torch.Tensor, float, Any]:
    """One optimisation step on a batch (x0 in [-1, 1], class indices): label dropout to the null class, noising at
    random timesteps, the MSE loss in fp32 (min-SNR weighted if asked), clipping, linear warm-up, AdamW, EMA.

    ``model`` is the accelerate-prepared UNet and ``forward`` the callable used for the forward pass (the model, or
    its compiled wrapper). Returns (per-sample loss, timesteps, learning rate, gradient norm)."""
    t, device = cfg.train, x0.device
    n, T = x0.shape[0], cfg.model.num_train_timesteps
    drop = to_device(torch.rand(n, generator=rngs["data"]), device) < t.label_dropout
    y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
    ts = to_device(torch.randint(0, T, (n,), generator=rngs["data"]), device)
    noise = torch.randn(x0.shape, generator=rngs["noise"], device=device)
    xt = noise_sched.add_noise(x0, noise, ts)
    target = noise if cfg.model.prediction_type == "epsilon" else noise_sched.get_velocity(x0, noise, ts)
    if device.type == "cuda" and t.channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last)
    with autocast_for(device, t.precision):  # bf16 on CUDA under "auto"; the loss is taken in fp32
        pred = forward(xt, ts, class_labels=y).sample
    per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if t.snr_gamma > 0:  # min-SNR-gamma: stop the easy low-noise steps from dominating the gradient
        alphas = to_device(noise_sched.alphas_cumprod, device)[ts]
        snr = alphas / (1 - alphas)
        w = snr.clamp(max=t.snr_gamma) / (snr if cfg.model.prediction_type == "epsilon" else snr + 1)
        loss = (per_sample * w).mean()
    else:
        loss = per_sample.mean()
    acc.backward(loss)
    grad_norm = acc.clip_grad_norm_(model.parameters(), t.grad_clip)
    lr = t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps))
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.step(unet.parameters())
    return per_sample.detach(), ts, lr, grad_norm


def add_quartile_losses(q_sum: torch.Tensor, q_cnt: torch.Tensor, per_sample: torch.Tensor, ts: torch.Tensor,
                        T: int) -> None:
    """Accumulate the loss per timestep quartile on the device (read back only when logged: no sync per step)."""
    q = (ts * 4 // T).clamp(max=3)
    q_sum.index_add_(0, q, per_sample.double())
    q_cnt.index_add_(0, q, torch.ones_like(per_sample, dtype=torch.float64))


def train_scratch(cfg: GenConfig, out: str | Path, resume: str | Path | None = None) -> Path:
    """Train (or resume) a from-scratch generator in run folder ``out``; returns ``out``."""
    out = Path(out)
    paths, t = RunPaths(out), cfg.train
    acc = _accelerator(cfg)
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} must divide evenly over {world} processes")
    per_proc = t.batch_size // world
    with run_log(out) if acc.is_main_process else contextlib.nullcontext():
        log = get_logger("generate")

        # --- data: the TRAIN part only, cached at the working resolution -------------------------------------------
        split, df, classes = train_rows(cfg.data.split, cfg.data.classes)
        size = cfg.data.image_size
        with acc.main_process_first():  # one process builds the cache, the others then reuse it
            cache = build_cache(df, size, progress=acc.is_main_process)
        on_gpu = device.type == "cuda"
        images = torch.from_numpy(cache.take(df["image_id"]))  # (N, S, S, 3) uint8
        images = images.to(device) if on_gpu else images
        labels = torch.tensor([CLASSES.index(c) for c in df["label"]], dtype=torch.long)
        weights = class_weights(labels, t.balance_power)

        # --- provenance: a resumed run must see the same split ------------------------------------------------------
        ckpt = None
        if resume is not None:
            ckpts = list_checkpoints(out)
            if str(resume) == "latest":
                ckpt = ckpts[-1] if ckpts else None
                if ckpt is None:
                    log.info("resume=latest but %s has no checkpoint yet: starting from step 0", out)
            else:
                ckpt = resolve_checkpoint(out, resume)
        elif list_checkpoints(out):
            raise DataError(f"{out} already holds checkpoints; pass --resume latest to continue it, or use a new --out")
        if ckpt is not None:
            _check_resumable(out, ckpt, cfg, split.fingerprint, str(split.path))
        noise_sched = train_scheduler(cfg.model.prediction_type, cfg.model.beta_schedule, cfg.model.num_train_timesteps)
        schedule = dict(noise_sched.config)

        # --- model, EMA, optimiser ----------------------------------------------------------------------------------
        with torch.random.fork_rng(devices=[]):  # identical init on every process, global RNG left untouched
            torch.manual_seed(t.seed)
            unet = build_unet(cfg.model.size, size)
        unet.to(device)
        if on_gpu and t.channels_last:
            unet.to(memory_format=torch.channels_last)
        ema = EMAModel(unet.parameters(), decay=t.ema_decay)
        opt = torch.optim.AdamW(unet.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        rngs = train_rngs(t.seed, rank, device)
        start = load_checkpoint(ckpt, unet, ema, opt, rngs, rank) if ckpt is not None else 0
        if ckpt is not None:
            log.info("resumed from %s (step %d)", ckpt, start)
            if acc.is_main_process:
                drop_checkpoints_after(list_checkpoints(out), start, out)
        if acc.is_main_process:
            save_config(cfg, paths.config)
            write_generator_info(out, generator_info(
                "scratch", split, classes, size, model_size=cfg.model.size, unet_config=dict(unet.config),
                schedule=schedule, sampling=to_dict(cfg.sample), train_images=len(df),
                train_counts={c: int((df["label"] == c).sum()) for c in classes},
                parameters=count_parameters(unet)))
        model, opt = acc.prepare(unet, opt)
        forward = torch.compile(model) if t.compile else model
        log.info("scratch generator: %s UNet, %.2f M parameters, %d px, %d train images of %s, %d process(es) x "
                 "batch %d, device %s, precision %s", cfg.model.size, count_parameters(unet) / 1e6, size, len(df),
                 classes, world, per_proc, device, t.precision if t.precision != "auto" else
                 ("bf16" if on_gpu else "fp32"))

        # --- loop ----------------------------------------------------------------------------------------------------
        rows = _summary_rows(paths.summary, start) if acc.is_main_process else []
        q_sum = torch.zeros(4, device=device, dtype=torch.float64)
        q_cnt = torch.zeros(4, device=device, dtype=torch.float64)
        T = cfg.model.num_train_timesteps
        t0, last_t, last_step, grad_norm = time.perf_counter(), time.perf_counter(), start, float("nan")
        cpu0 = time.process_time()  # CPU seconds: a load-independent cost measure on a shared machine
        bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc="train-gen",
                   disable=not acc.is_main_process, leave=False)
        for step in bar:
            model.train()
            x0, y = draw_batch(images, labels, weights, per_proc, rngs["data"], t.augment, device)
            per_sample, ts, lr, grad_norm = train_step(acc, model, forward, opt, ema, unet, noise_sched, cfg, x0, y,
                                                       rngs, step)
            add_quartile_losses(q_sum, q_cnt, per_sample, ts, T)
            done = step + 1

            if done % t.log_every == 0 or done == t.steps:
                sums, cnts = acc.reduce(q_sum, "sum"), acc.reduce(q_cnt, "sum")
                now = time.perf_counter()
                row = {"step": done, "lr": lr, "loss": float(sums.sum() / cnts.sum().clamp(min=1)),
                       **{f"loss_q{i + 1}": float(sums[i] / cnts[i]) if cnts[i] > 0 else float("nan")
                          for i in range(4)},
                       "grad_norm": float(grad_norm), "ema_decay": float(ema.cur_decay_value or 0.0),
                       "img_per_s": (done - last_step) * t.batch_size / max(now - last_t, 1e-9),
                       "wall_s": now - t0, "cpu_s": time.process_time() - cpu0}
                if on_gpu:
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                q_sum.zero_()
                q_cnt.zero_()
                last_t, last_step = now, done
                if acc.is_main_process:
                    rows.append(row)
                    atomic_write_csv(paths.summary, pd.DataFrame(rows))
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    log.info("step %d loss %.4f (q1-q4 %s) %.0f img/s", done, row["loss"],
                             " ".join(f"{row[f'loss_q{i + 1}']:.3f}" for i in range(4)), row["img_per_s"])
            pause = time.perf_counter()
            if done % t.checkpoint_every == 0 or done == t.steps:
                save_checkpoint(acc, out, done, unet, ema, opt, rngs, cfg, t.keep_checkpoints,
                                {"split_fingerprint": split.fingerprint})
            if acc.is_main_process and ((t.validate_every and done % t.validate_every == 0) or done == t.steps):
                val = unet_from_config(dict(unet.config)).to(device).eval()
                ema.copy_to(val.parameters())
                grid = validation_grid(val, schedule, classes, t.validation_per_class, cfg.sample.sampler,
                                       t.validation_steps, cfg.sample.guidance, t.seed)
                atomic_save_image(paths.validation / f"step_{done:08d}.png", grid)
                del val
            last_t += time.perf_counter() - pause  # img/s counts training time only
        bar.close()

        # --- the processes must end with the same weights: DDP desync is a silent bug, so check it --------------------
        checksum = torch.stack([p.detach().double().sum() for p in unet.parameters()]).sum().reshape(1)
        gathered = acc.gather(checksum)
        in_sync = bool(torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=0))
        if not in_sync:
            raise RuntimeError(f"processes ended with different weights ({gathered.tolist()}): DDP desynchronised")
        if acc.is_main_process:
            info = read_generator_info(out)
            info.update(trained_steps=t.steps, world_size=world, ranks_in_sync=in_sync,
                        wall_s=time.perf_counter() - t0)
            write_generator_info(out, info)
            log.info("generator trained: %d steps in %.0f s -> %s", t.steps, time.perf_counter() - t0, out)
    acc.wait_for_everyone()
    acc.end_training()
    return out
