"""Inference: class probabilities of uint8 images, from a model in memory or from a finished run folder."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermsynth.classify.augment import dihedral_views, normalize
from dermsynth.classify.config import ClfConfig
from dermsynth.classify.models import Normalize, build_model
from dermsynth.config import load_config
from dermsynth.data.labels import CLASSES
from dermsynth.io import DataError
from dermsynth.paths import RunPaths

BEST_WEIGHTS = "model.safetensors"
BEST_META = "meta.json"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op elsewhere (CPU runs stay fp32 and deterministic)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_probs(model: nn.Module, images: torch.Tensor, norm: Normalize, device: torch.device, batch_size: int = 256,
                  amp: bool = True, channels_last: bool = True, tta: bool = False) -> torch.Tensor:
    """Softmax probabilities (N, K) float32 on ``device`` of uint8 NHWC ``images`` (on any device)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        x = normalize(x, norm.mean, norm.std)
        views = dihedral_views(x) if tta else [x]
        p = None
        for v in views:
            if channels_last and device.type == "cuda":
                v = v.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                probs = model(v).float().softmax(1)
            p = probs if p is None else p + probs
        out.append(p / len(views))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(CLASSES), device=device)


def load_classifier(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Normalize, ClfConfig, dict]:
    """The best model of a finished (or running) classifier run, its normalisation, config and best-epoch meta."""
    paths = RunPaths(run_dir)
    weights = paths.best / BEST_WEIGHTS
    if not paths.config.is_file() or not weights.is_file():
        raise DataError(f"{run_dir}: not a classifier run with a best checkpoint (need {paths.config} and {weights}); "
                        f"train one with dermsynth train-clf")
    from safetensors.torch import load_file

    cfg = load_config(ClfConfig, paths.config)
    model, norm = build_model(cfg.model, load_weights=False)  # the checkpoint overwrites every weight
    model.load_state_dict(load_file(str(weights)), strict=True)
    meta = json.loads((paths.best / BEST_META).read_text()) if (paths.best / BEST_META).is_file() else {}
    return model.to(device).eval(), norm, cfg, meta


def predict_images(run_dir: str | Path, images_uint8_nhwc: np.ndarray, device: str = "auto",
                   batch_size: int = 256) -> np.ndarray:
    """(N, 7) class probabilities (CLASSES order) of square uint8 RGB images, by the run's best checkpoint.

    Images of another size are resized (antialiased bilinear) to the run's ``data.image_size``.
    """
    x = np.asarray(images_uint8_nhwc)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8 or x.shape[1] != x.shape[2]:
        raise DataError(f"predict_images expects square uint8 images (N, S, S, 3), got {x.dtype} {x.shape}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, norm, cfg, _ = load_classifier(run_dir, dev)
    t = torch.from_numpy(np.require(x, requirements=["C", "W"]))  # a read-only (memory-mapped) cache is copied
    size = cfg.data.image_size
    if x.shape[1] != size:
        t = F.interpolate(t.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    probs = predict_probs(model, t, norm, dev, batch_size=batch_size, amp=cfg.train.amp,
                          channels_last=cfg.train.channels_last, tta=cfg.eval.tta)
    return probs.cpu().numpy().astype(np.float32).reshape(len(x), -1)
