"""Sampling speed of dermsynth's path against a plain diffusers loop, same network, same run.

    python bench/bench_sampling.py --size tiny --image-size 32 --batch 32            # CPU
    python bench/bench_sampling.py --size base64 --image-size 64 --batch 256 --compile  # GPU

Plain loop (what one writes following diffusers' DDPMPipeline, with classifier-free guidance added): fp32, DDIM 50
steps, the conditional and unconditional passes as two forward calls. dermsynth: DPM-Solver++ (default 25 steps),
both halves in one batched call, bf16 autocast and channels_last on GPU, optional torch.compile. A middle row runs
dermsynth's loop at the plain loop's sampler and steps, to separate the per-step gains from the step-count gain.
The weights are random (or a trained run's checkpoint with --gen): speed does not depend on their values.
Prints a table and one JSON line; quality at the chosen steps is measured separately (dermsynth quality).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dermsynth.generate.models import NULL_CLASS, build_unet, load_unet
from dermsynth.generate.samplers import initial_noise, make_scheduler, sample, train_scheduler


@torch.no_grad()
def plain_loop(unet, scheduler, labels: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """Textbook guided sampling: fp32, two forward passes per step."""
    x = noise.to(labels.device)
    null = torch.full_like(labels, NULL_CLASS)
    scheduler.set_timesteps(steps, device=labels.device)
    for t in scheduler.timesteps:
        cond = unet(x, t, class_labels=labels).sample
        uncond = unet(x, t, class_labels=null).sample
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (compilation, cuDNN autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--gen", type=Path, help="a checkpoint folder to load instead of random weights")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--plain-steps", type=int, default=50)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="dpmpp")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="also write the result JSON here")
    a = p.parse_args()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    torch.manual_seed(0)
    schedule = dict(train_scheduler("epsilon").config)
    if a.gen:
        unet_plain, unet_ours = load_unet(a.gen, "ema", device), load_unet(a.gen, "ema", device)
    else:
        unet_plain = build_unet(a.size, a.image_size).to(device).eval()
        unet_ours = build_unet(a.size, a.image_size).to(device).eval()
        unet_ours.load_state_dict(unet_plain.state_dict())
    unet_plain.to(memory_format=torch.contiguous_format)
    if device.type == "cuda":
        unet_ours.to(memory_format=torch.channels_last)
    if a.compile:
        unet_ours = torch.compile(unet_ours)
    size = unet_plain.config.sample_size
    labels = torch.arange(a.batch, device=device) % NULL_CLASS
    seeds = list(range(a.batch))
    noise = initial_noise(seeds, (3, size, size))

    def run_plain():
        plain_loop(unet_plain, make_scheduler("ddim", schedule), labels, noise, a.plain_steps, a.guidance)

    def run_ours_same():
        sample(unet_ours, make_scheduler("ddim", schedule), labels.tolist(), seeds, a.plain_steps, a.guidance)

    def run_ours():
        sample(unet_ours, make_scheduler(a.sampler, schedule), labels.tolist(), seeds, a.steps, a.guidance)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device_name}, threads {torch.get_num_threads()}, network {a.gen or a.size} "
          f"{size}px, batch {a.batch}, guidance {a.guidance}")
    print(f"{'path':24s} {'settings':44s} {'s/batch':>9s} {'img/s':>9s} {'ratio':>7s}", flush=True)
    bf16 = ", bf16" if device.type == "cuda" else ""
    todo = [("plain diffusers loop", f"ddim {a.plain_steps}, fp32, 2 passes", run_plain),
            ("dermsynth, same steps", f"ddim {a.plain_steps}, batched guidance{bf16}", run_ours_same),
            ("dermsynth", f"{a.sampler} {a.steps}, batched guidance{bf16}" + (", compiled" if a.compile else ""),
             run_ours)]
    rows = []
    for name, settings, fn in todo:  # each row printed as soon as it is measured: a cut-off run keeps what it has
        if device.type == "cuda":  # each row's own peak (the weights of both networks stay resident throughout)
            torch.cuda.reset_peak_memory_stats()
        sec = _time(fn, a.repeats, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append((name, settings, sec, peak))
        print(f"{name:24s} {settings:44s} {sec:9.3f} {a.batch / sec:9.1f} {rows[0][2] / sec:7.2f}x"
              + (f"  peak {peak:.2f} GiB" if peak is not None else ""), flush=True)
    result = {"device": device_name, "network": str(a.gen or a.size), "image_size": size, "batch": a.batch,
              "rows": [{"path": n, "settings": s, "s_per_batch": sec, "img_per_s": a.batch / sec, "peak_mem_gib": pk}
                       for n, s, sec, pk in rows],
              "ratio": rows[-1][2] and rows[0][2] / rows[-1][2]}
    if device.type == "cuda":
        result["peak_mem_gib"] = max(r[3] for r in rows)
    print(json.dumps(result))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
