"""Batched augmentation on tensors (on the GPU when the images live there), never per-image PIL.

Input is a uint8 NCHW batch straight from the cache; output is a float batch in [0, 1]. Each image draws its own
parameters: a random element of the dihedral group (flips and 90-degree rotations: dermoscopy has no "up"), an
optional zoom-in crop, brightness / contrast / saturation factors, and optionally a resampling to a lower resolution
and back (so that softness does not single out upsampled synthetic images). RandAugment (torchvision v2) is the one
per-image loop, because its op choice is per call; it stays on tensors.

Random parameters come from a CPU ``torch.Generator`` that the training loop seeds per step, so a resumed run draws the
same augmentations; RandAugment draws from torch's global RNG, which the loop also seeds per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dermsynth.classify.config import AugmentConfig
from dermsynth.device import to_device

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)


def dihedral(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per image, one of the 8 flips/rotations of the square: optional transpose, then optional h- and v-flip.
    ``u``: (B, 3) uniform numbers on x's device."""
    bits = (u.T < 0.5).reshape(3, -1, 1, 1, 1)
    x = torch.where(bits[0], x.transpose(-1, -2), x)
    x = torch.where(bits[1], x.flip(-1), x)
    return torch.where(bits[2], x.flip(-2), x)


def zoom(x: torch.Tensor, scale_min: float, u: torch.Tensor) -> torch.Tensor:
    """Per image, a random square crop of side s in [scale_min, 1] (of the image side) resized back, via one
    grid_sample. ``u``: (B, 3) uniform numbers (scale, x shift, y shift)."""
    b = x.shape[0]
    s = scale_min + (1 - scale_min) * u[:, 0]
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = s, s
    theta[:, 0, 2], theta[:, 1, 2] = (2 * u[:, 1] - 1) * (1 - s), (2 * u[:, 2] - 1) * (1 - s)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, u: torch.Tensor) -> torch.Tensor:
    """Per image brightness, contrast and saturation factors in [1 - strength, 1 + strength] (x float in [0, 1]).
    ``u``: (B, 3) uniform numbers."""
    b = x.shape[0]
    f = (1 + strength * (2 * u.to(x.dtype) - 1)).view(b, 3, 1, 1, 1)
    luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = x * f[:, 0]
    mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * f[:, 1] + mean
    gray = (x * luma).sum(1, keepdim=True)
    x = (x - gray) * f[:, 2] + gray
    return x.clamp_(0, 1)


def lowres(x: torch.Tensor, size: int, u: torch.Tensor, prob: float) -> torch.Tensor:
    """Per image with probability ``prob`` (``u``: (B,) uniform numbers): resample down to ``size`` px (bicubic,
    antialiased) and back up (bicubic), as an image made at ``size`` px and resized to x's size would look."""
    sel = (u < prob).nonzero().squeeze(1)
    if len(sel) == 0 or size >= x.shape[-1]:
        return x
    h, w = x.shape[-2:]
    small = F.interpolate(x[sel], size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x.clone()
    x[sel] = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp_(0, 1)
    return x


def randaugment_per_image(x: torch.Tensor, ops: int, magnitude: int) -> torch.Tensor:
    """torchvision v2 RandAugment called once per image (uint8 NCHW in and out): the reference for :func:`randaugment`."""
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=ops, magnitude=magnitude)
    return torch.stack([ra(img) for img in x])


def randaugment(x: torch.Tensor, ops: int, magnitude: int) -> torch.Tensor:
    """torchvision v2 RandAugment with one independent draw per image (uint8 NCHW in and out), applied op by op.

    Each image draws, for each of its ``ops`` slots, an op uniformly from torchvision's RandAugment space and, for a
    signed op, its sign with probability 1/2, exactly as ``v2.RandAugment`` does per call. The images that drew the
    same (op, sign) then go through torchvision's own op code in one batched call, which is the same as one call per
    image (every op has a fixed magnitude and acts on each image separately). Why: with one RandAugment call per image (3 transform calls
    each), the RandAugment baseline trained at 140-220 img/s on an H200, 7-12x slower than the other conditions;
    this makes at most (ops in the space x 2 signs) calls per slot. Draws come from torch's global RNG (seeded per step).
    """
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=ops, magnitude=magnitude)
    space = getattr(ra, "_AUGMENTATION_SPACE", None)
    apply = getattr(ra, "_apply_image_or_video_transform", None)
    if space is None or apply is None:  # torchvision moved its internals: the per-image loop, same distribution
        return randaugment_per_image(x, ops, magnitude)
    names = list(space)
    n, (h, w) = x.shape[0], x.shape[-2:]
    x = x.clone()
    for _ in range(ops):
        op = torch.randint(len(names), (n,))
        negative = torch.rand(n) <= 0.5
        for k in op.unique().tolist():
            magnitudes, signed = space[names[k]]
            mags = magnitudes(ra.num_magnitude_bins, h, w)
            mag = 0.0 if mags is None else float(mags[magnitude])
            for neg in ((False, True) if signed and mags is not None else (None,)):
                sel = op == k if neg is None else (op == k) & (negative == neg)
                idx = sel.nonzero().squeeze(1)
                if len(idx):
                    idx = to_device(idx, x.device)
                    x[idx] = apply(x[idx], names[k], -mag if neg else mag, interpolation=ra.interpolation,
                                   fill=ra._fill)
    return x


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """uint8 NCHW -> augmented float NCHW in [0, 1]. All per-image random numbers are drawn at once from ``gen``
    (CPU) and moved to the device in one non-blocking copy."""
    u = to_device(torch.rand(x.shape[0], 9, generator=gen), x.device)
    if cfg.randaugment:
        x = randaugment(x, cfg.randaugment_ops, cfg.randaugment_magnitude)
    if cfg.flips:
        x = dihedral(x, u[:, 0:3])
    x = x.float().div_(255)
    if cfg.lowres_size > 0:  # drawn only when on, so runs without it keep their random stream
        x = lowres(x, cfg.lowres_size, to_device(torch.rand(x.shape[0], generator=gen), x.device), cfg.lowres_prob)
    if cfg.scale_min < 1.0:
        x = zoom(x, cfg.scale_min, u[:, 3:6])
    if cfg.color_jitter > 0:
        x = color_jitter(x, cfg.color_jitter, u[:, 6:9])
    return x


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel, x float NCHW in [0, 1]."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of a batch (test-time augmentation)."""
    views = []
    for t in (x, x.transpose(-1, -2)):
        views += [t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]
    return views
