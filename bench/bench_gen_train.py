"""Training throughput of the from-scratch generator: dermsynth's step against a plain diffusers loop, same run.

    python bench/bench_gen_train.py --size tiny --image-size 16 --batch 4 --steps 2 --warmup 1 --device cpu  # smoke
    python bench/bench_gen_train.py                                  # GPU: base64, 64 px, batch 128, 30 timed steps
    python bench/bench_gen_train.py --compile                        # + a torch.compile row (compiles in the warm-up)

Every row trains the same network (``build_unet(--size, --image-size)``, the same initial weights, rebuilt per row)
on the same batch: images uniform in [-1, 1] and random class labels, made once on the device (speed does not depend
on the pixel values). Each row: ``--warmup`` untimed steps, then ``--steps`` timed steps in a few blocks, each block
between ``torch.cuda.synchronize()`` calls; img/s = batch * steps / total seconds. Peak GPU memory per row counts
everything the row allocates (weights, gradients, AdamW state, EMA copy, activations); the counter is reset between
rows and the previous row's objects are freed first.

Rows:
- plain diffusers loop: the body of diffusers' ``train_unconditional.py`` with class labels (10 % dropped to the null
  class): fp32, NCHW, ``torch.optim.AdamW`` with its default implementation, the example's cosine LR schedule, MSE on
  epsilon, grad-norm clip 1.0, ``EMAModel.step`` every step; plain ``loss.backward()``, no accelerate.
- dermsynth step: ``dermsynth.generate.scratch_train.train_step``, the trainer's own step (with
  ``GenTrainConfig``/``GenModelConfig`` defaults), set up as ``train_scratch`` does: the model and optimiser through
  ``Accelerator.prepare``, channels_last weights and input on CUDA, the forward under ``autocast_for(device, "auto")``
  (bf16 on CUDA, fp32 on CPU), loss in fp32 (optionally min-SNR weighted), ``acc.backward``, ``acc.clip_grad_norm_``,
  linear LR warm-up, the same (default, not fused) AdamW, ``EMAModel.step``, the per-quartile loss sums. Label dropout
  and timesteps are drawn from a CPU generator and copied to the device, noise from a device generator, as there.
- dermsynth full step: the same plus the trainer's own ``draw_batch`` (class-weighted draw from a uint8 image tensor
  on the device, dihedral augmentation): what one training step of ``train_scratch`` costs, data included.
- dermsynth compiled (``--compile``): the dermsynth step with the prepared model wrapped in ``torch.compile``, as
  ``train.compile=true`` does. Compilation happens in the warm-up steps and is not timed.
TF32 flags are PyTorch's defaults (cuDNN convolutions may use TF32 in the fp32 row; matmuls do not) and are reported.
Prints a table and one JSON line; ``--out`` also writes the JSON to a file.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from dermsynth.generate.config import GenConfig, GenModelConfig, GenTrainConfig
from dermsynth.generate.models import NULL_CLASS, UNET_SIZES, build_unet, count_parameters
from dermsynth.generate.samplers import train_scheduler
from dermsynth.generate.scratch_train import add_quartile_losses, class_weights, draw_batch, train_rngs, train_step
from dermsynth.io import atomic_write_json

Step = Callable[[], torch.Tensor]  # one optimisation step; returns the (detached) loss


# ----------------------------------------------------------------------------------------------------------------------
# The two step functions
# ----------------------------------------------------------------------------------------------------------------------

def plain_step(unet: Any, sched: Any, x0: torch.Tensor, y: torch.Tensor) -> Step:
    """diffusers' train_unconditional loop body with class labels: fp32, NCHW, default AdamW, EMA every step."""
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_scheduler("cosine", opt, num_warmup_steps=500, num_training_steps=100_000)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    T = sched.config.num_train_timesteps

    def step() -> torch.Tensor:
        unet.train()
        noise = torch.randn(x0.shape, device=x0.device)
        ts = torch.randint(0, T, (x0.shape[0],), device=x0.device).long()
        labels = torch.where(torch.rand(y.shape, device=y.device) < 0.1, torch.full_like(y, NULL_CLASS), y)
        xt = sched.add_noise(x0, noise, ts)
        pred = unet(xt, ts, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad()
        ema.step(unet.parameters())
        return loss.detach()

    return step


def dermsynth_step(acc: Accelerator, unet: Any, sched: Any, m: GenModelConfig, t: GenTrainConfig,
                   batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]], compile: bool) -> Step:
    """The trainer's own step (scratch_train.train_step) with its set-up: accelerate, channels_last, AdamW, EMA."""
    device = acc.device
    on_gpu = device.type == "cuda"
    unet.to(device)
    if on_gpu and t.channels_last:
        unet.to(memory_format=torch.channels_last)
    ema = EMAModel(unet.parameters(), decay=t.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    rngs = train_rngs(t.seed, 0, device)
    model, opt = acc.prepare(unet, opt)
    forward = torch.compile(model) if compile else model
    cfg = GenConfig(model=m, train=t)
    q_sum = torch.zeros(4, device=device, dtype=torch.float64)
    q_cnt = torch.zeros(4, device=device, dtype=torch.float64)
    done = 0

    def step() -> torch.Tensor:
        nonlocal done
        model.train()
        x0, y = batch(rngs["data"])
        per_sample, ts, _, _ = train_step(acc, model, forward, opt, ema, unet, sched, cfg, x0, y, rngs, done)
        add_quartile_losses(q_sum, q_cnt, per_sample, ts, m.num_train_timesteps)
        done += 1
        return per_sample.mean()

    return step


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Step, warmup: int, steps: int, blocks: int, device: torch.device) -> tuple[list[float], list[int],
                                                                                          float]:
    """Warm-up (compilation, cuDNN autotune, allocator), then ``steps`` steps in ``blocks`` synchronised blocks."""
    for _ in range(warmup):
        step()
    _sync(device)
    sizes = [steps // blocks + (i < steps % blocks) for i in range(blocks)]
    times = []
    for k in sizes:
        t0 = time.perf_counter()
        for _ in range(k):
            loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, sizes, float(loss)


def run_row(name: str, settings: str, make: Callable[[], Step], a: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    """Build one row's model/optimiser/EMA, time it, report, and let it all go before the next row."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make()
    times, sizes, loss = _time(step, a.warmup, a.steps, min(a.blocks, a.steps), device)
    total = sum(times)
    row = {"path": name, "settings": settings, "steps": a.steps, "s_per_step": total / a.steps,
           "img_per_s": a.batch * a.steps / total,
           "block_img_per_s": [a.batch * k / s for k, s in zip(sizes, times)],
           "median_block_img_per_s": statistics.median(a.batch * k / s for k, s in zip(sizes, times)),
           "last_loss": loss}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base64", choices=sorted(UNET_SIZES))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per row before timing")
    p.add_argument("--blocks", type=int, default=3, help="timed blocks per row (synchronised at each end)")
    p.add_argument("--snr-gamma", type=float, default=0.0, help="dermsynth rows: min-SNR-gamma weighting (0 = off)")
    p.add_argument("--no-data-row", action="store_true", help="skip the dermsynth row that includes draw_batch")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row (slow warm-up)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.blocks < 1 or a.batch < 1:
        p.error("--steps, --blocks and --batch must be >= 1 and --warmup >= 0")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    on_gpu = device.type == "cuda"
    acc = Accelerator(cpu=not on_gpu)  # the trainer's own setup: no accelerate mixed precision, autocast in the loop
    if acc.device.type != device.type:
        raise SystemExit(f"accelerate chose {acc.device}, expected {device}")
    device = acc.device

    m, t = GenModelConfig(size=a.size), GenTrainConfig(snr_gamma=a.snr_gamma)
    sched = train_scheduler(m.prediction_type, m.beta_schedule, m.num_train_timesteps)
    torch.manual_seed(0)
    first = build_unet(a.size, a.image_size)
    init, n_params = first.state_dict(), count_parameters(first)  # every row starts from these weights
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand((a.batch, 3, a.image_size, a.image_size), generator=gen, device=device) * 2 - 1
    y = torch.randint(0, NULL_CLASS, (a.batch,), generator=gen, device=device)
    # a small "train set" for the full-step row: uint8 NHWC on the device, as the trainer keeps its cache on GPU
    pool = torch.randint(0, 256, (max(4 * a.batch, 256), a.image_size, a.image_size, 3), generator=gen,
                         device=device, dtype=torch.uint8)
    pool_labels = torch.arange(len(pool)) % NULL_CLASS
    pool_weights = class_weights(pool_labels, t.balance_power)

    def fresh_unet() -> Any:
        unet = build_unet(a.size, a.image_size)
        unet.load_state_dict(init)
        return unet.to(device)

    def fixed_batch(_: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return x0, y

    def drawn_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return draw_batch(pool, pool_labels, pool_weights, a.batch, g, t.augment, device)

    ours = ("bf16 autocast, channels_last" if on_gpu else "fp32") + ", accelerate, AdamW default, EMA"
    rows = [run_row("plain diffusers loop", "fp32, NCHW, AdamW default, EMA", lambda: plain_step(
        fresh_unet(), sched, x0, y), a, device)]
    rows.append(run_row("dermsynth step", ours, lambda: dermsynth_step(acc, fresh_unet(), sched, m, t, fixed_batch,
                                                                       False), a, device))
    acc.free_memory()
    if not a.no_data_row:
        rows.append(run_row("dermsynth full step", ours + ", + draw_batch/augment", lambda: dermsynth_step(
            acc, fresh_unet(), sched, m, t, drawn_batch, False), a, device))
        acc.free_memory()
    if a.compile:
        rows.append(run_row("dermsynth compiled", ours + ", torch.compile", lambda: dermsynth_step(
            acc, fresh_unet(), sched, m, t, fixed_batch, True), a, device))
        acc.free_memory()

    base = rows[0]["img_per_s"]
    for r in rows:
        r["ratio"] = r["img_per_s"] / base
    device_name = torch.cuda.get_device_name(device) if on_gpu else platform.processor() or "cpu"
    print(f"device {device_name}, threads {torch.get_num_threads()}, torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, network {a.size} {a.image_size}px ({n_params / 1e6:.2f} M params), batch "
          f"{a.batch}, {a.warmup} warm-up + {a.steps} timed steps per row")
    print()
    print("| path | settings | s/step | img/s | ratio | peak GiB | last loss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
        print(f"| {r['path']} | {r['settings']} | {r['s_per_step']:.4f} | {r['img_per_s']:.1f} | {r['ratio']:.2f}x "
              f"| {mem} | {r['last_loss']:.4f} |")
    print()
    result = {"bench": "gen_train", "device": device_name, "torch": torch.__version__,
              "diffusers": diffusers.__version__, "network": a.size, "image_size": a.image_size,
              "parameters": n_params, "batch": a.batch, "warmup": a.warmup, "steps": a.steps,
              "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
              "rows": rows, "ratio": rows[1]["ratio"]}
    if a.out:
        atomic_write_json(a.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
