"""Benchmark the SD-1.5 path with random weights of the true SD-1.5 architecture (no real weights needed).

Measures, in one run on one device:
1. LoRA + token training: seconds per optimiser step and peak GPU memory at 512 px (dermsynth's own trainer, bf16
   frozen weights, fp32 adapters), with and without gradient checkpointing;
2. generation images/s: diffusers' ``StableDiffusionPipeline`` with default settings (fp32, its default scheduler,
   LoRA loaded unfused) and the same in fp16, against dermsynth's path (fp16, LoRA fused, DPM-Solver++, batched
   guidance, channels_last, SDPA; optionally torch.compile), same steps, batch, guidance and resolution;
3. the UNet step time with guidance alone (the floor generation cannot beat).

Random weights give the true compute and memory cost, not image quality. GPU only for real numbers;
``--tiny`` runs the same code on tiny configs on CPU in seconds (a smoke test of the script).

    python bench/bench_sd15.py                    # GPU, SD-1.5 configs
    python bench/bench_sd15.py --compile          # + torch.compile of the UNet for dermsynth's path
    python bench/bench_sd15.py --tiny             # CPU smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dermsynth.generate.sd15.config import SDConfig
from dermsynth.generate.sd15.random_base import random_components
from dermsynth.generate.sd15.sample import attach_trained, build_pipeline, sample_images
from dermsynth.generate.sd15.train import SDLoraTrainer, class_prompt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds per call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------------------------
# 1. training
# ----------------------------------------------------------------------------------------------------------------------

def bench_training(a: argparse.Namespace, device: torch.device, ckpt: Path) -> list[dict]:
    sd = SDConfig(lora_rank=a.rank, lora_alpha=float(a.rank), resolution=a.res, batch_size=a.train_batch,
                  warmup_steps=0, gradient_checkpointing=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    trainer = SDLoraTrainer(random_components(a.size), sd, device, dtype)
    latent = a.res // (2 ** (len(trainer.vae.config.block_out_channels) - 1))
    params = torch.randn(a.train_batch, 8, latent, latent)  # VAE posterior (mean, logvar) of a batch
    prompts = [class_prompt(sd, c) for c in (["df", "vasc", "mel"] * a.train_batch)[:a.train_batch]]
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            trainer.unet.enable_gradient_checkpointing()
        else:
            trainer.unet.disable_gradient_checkpointing()
        reset_peak(device)
        s = timed(lambda: trainer.step([(params, prompts)]), device, a.train_repeats, a.warmup)
        rows.append({"what": "lora_train_step", "gradient_checkpointing": checkpointing, "batch": a.train_batch,
                     "res": a.res, "rank": a.rank, "dtype": str(dtype), "s_per_step": s,
                     "img_per_s": a.train_batch / s, "peak_gib": peak_gib(device)})
        print(rows[-1], flush=True)
    trainer.save(ckpt, 0, {})  # the adapters the generation benchmark loads
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 2. generation
# ----------------------------------------------------------------------------------------------------------------------

def bench_generation(a: argparse.Namespace, device: torch.device, ckpt: Path) -> list[dict]:
    sd = SDConfig(compile=a.compile, resolution=a.res)
    classes = ["df", "vasc", "mel"]
    prompt, neg, n = class_prompt(sd, "mel"), sd.negative_prompt, a.gen_batch
    fp16 = torch.float16 if device.type == "cuda" else torch.float32
    base = random_components(a.size)
    rows = []

    def record(what: str, s: float, **extra: Any) -> None:
        rows.append({"what": what, "batch": n, "steps": a.steps, "res": a.res, "s_per_batch": s, "img_per_s": n / s,
                     "peak_gib": peak_gib(device), **extra})
        print(rows[-1], flush=True)

    # dermsynth's path first (what `dermsynth generate` runs), so that a time limit cuts the fp16 default row, not
    # this one: the goal's ratio needs only this row and the fp32 default after it
    for compiled in ([False, True] if a.compile else [False]):
        sd_run = SDConfig(compile=compiled, resolution=a.res)
        pipe = attach_trained(copy.deepcopy(base), sd_run, ckpt, classes, "dpmpp", device, fp16)
        reset_peak(device)
        seeds = list(range(n))
        try:
            s = timed(lambda: sample_images(pipe, prompt, neg, seeds, a.steps, sd.guidance, a.res), device,
                      a.gen_repeats, a.warmup + (2 if compiled else 0))
        except Exception as e:  # a compile failure must not lose the other numbers
            print(f"dermsynth path (compile={compiled}) failed: {type(e).__name__}: {e}", flush=True)
            continue
        record("dermsynth_compile" if compiled else "dermsynth", s, scheduler="DPMSolverMultistepScheduler",
               dtype=str(fp16), fused_lora=True, channels_last=device.type == "cuda")
        del pipe

    # diffusers' default pipeline (as a user would run it: default dtype and scheduler, LoRA and tokens loaded)
    for label, dtype in (("diffusers_default_fp32", torch.float32), ("diffusers_default_fp16", fp16)):
        if label.endswith("fp16") and dtype == torch.float32:
            continue
        from diffusers import StableDiffusionPipeline

        parts = copy.deepcopy(base)
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.load_lora_weights(str(ckpt), weight_name="pytorch_lora_weights.safetensors")
        pipe.load_textual_inversion([str(ckpt / "embeddings" / f"{c}.safetensors") for c in classes])
        pipe.to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        reset_peak(device)

        def run_default() -> None:
            pipe(prompt, negative_prompt=neg, num_images_per_prompt=n, num_inference_steps=a.steps,
                 guidance_scale=sd.guidance, height=a.res, width=a.res, output_type="np")

        record(label, timed(run_default, device, a.gen_repeats, a.warmup), scheduler=type(pipe.scheduler).__name__,
               dtype=str(dtype))
        del pipe, parts

    # the UNet alone, guided batch (2n), fp16: the floor
    pipe = build_pipeline(copy.deepcopy(base), "dpmpp").to(device, fp16)
    pipe.unet.to(memory_format=torch.channels_last)
    lat = a.res // (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    x = torch.randn(2 * n, 4, lat, lat, device=device, dtype=fp16).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2 * n, 77, pipe.text_encoder.config.hidden_size, device=device, dtype=fp16)
    t = torch.tensor(500, device=device)
    with torch.no_grad():
        s = timed(lambda: pipe.unet(x, t, encoder_hidden_states=emb), device, a.gen_repeats * 5, a.warmup)
    rows.append({"what": "unet_step_guided", "batch": n, "res": a.res, "s_per_unet_step": s,
                 "img_per_s_at_steps_before_decode": n / (s * a.steps)})
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU: checks the script runs, not a benchmark")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--res", type=int, default=None, help="image size (default 512; tiny 32)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--compile", action="store_true", help="also time dermsynth's path with torch.compile")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-repeats", type=int, default=10)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args()
    a.size = "tiny" if a.tiny else "sd15"
    a.res = a.res or (32 if a.tiny else 512)
    if a.tiny:
        a.train_batch, a.gen_batch, a.steps = min(a.train_batch, 2), min(a.gen_batch, 2), min(a.steps, 3)
        a.warmup, a.train_repeats, a.gen_repeats = 1, 2, 1
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.tiny else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what any fp32 user on Ampere+ gets with this flag
        torch.backends.cudnn.allow_tf32 = True
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "size": a.size,
            "torch": torch.__version__, "args": {k: str(v) for k, v in vars(a).items()}}
    print(info, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        ckpt.mkdir()
        if a.skip_train:
            a.train_repeats = 0
        rows = bench_training(a, device, ckpt) if not a.skip_train else []
        if a.skip_train:  # still need adapter files to load
            trainer = SDLoraTrainer(random_components(a.size), SDConfig(lora_rank=a.rank, lora_alpha=float(a.rank)),
                                    device, torch.float32)
            trainer.save(ckpt, 0, {})
            del trainer
        rows += bench_generation(a, device, ckpt)
    by = {r["what"]: r for r in rows}
    ours = by.get("dermsynth_compile", by["dermsynth"])["img_per_s"]
    summary = {f"speedup_vs_{k}": ours / by[k]["img_per_s"] for k in ("diffusers_default_fp32",
                                                                         "diffusers_default_fp16") if k in by}
    print(json.dumps(summary, indent=2))
    if a.out:
        a.out.write_text(json.dumps({"info": info, "rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
