"""Within-set diversity: mean pairwise LPIPS when its backbone weights are on disk, else mean pairwise MS-SSIM.

The two are not interchangeable, so the result always carries its metric's name and direction: LPIPS is a distance
(higher = more diverse), MS-SSIM a similarity (lower = more diverse). LPIPS needs torchvision's ImageNet AlexNet in
the torch hub cache; torchmetrics ships the LPIPS head itself. Nothing is downloaded here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# MS-SSIM's five scales with an 11 px window need images above (11 - 1) * 2^4 = 160 px; small images are upsampled.
MSSSIM_SIZE = 192


def lpips_weights_present() -> bool:
    """True when torchvision's AlexNet ImageNet weights sit in the torch hub cache (LPIPS then runs offline)."""
    from torchvision.models import AlexNet_Weights

    name = Path(AlexNet_Weights.DEFAULT.url).name
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def _pairs(n: int, n_pairs: int, seed: int) -> np.ndarray:
    """``n_pairs`` distinct unordered pairs of distinct images (all of them when there are fewer)."""
    total = n * (n - 1) // 2
    if total <= n_pairs:
        return np.stack(np.triu_indices(n, 1), 1)
    rng = np.random.default_rng(seed)
    picked: set[tuple[int, int]] = set()
    while len(picked) < n_pairs:
        a, b = rng.integers(0, n, 2)
        if a != b:
            picked.add((min(a, b), max(a, b)))
    return np.array(sorted(picked))


def _to_tensor(images: np.ndarray, size: int | None = None) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.inference_mode()
def pairwise_diversity(images: np.ndarray, n_pairs: int = 200, seed: int = 0, use_lpips: bool | None = None,
                       batch: int = 50) -> dict[str, float | str | bool]:
    """Mean over ``n_pairs`` random pairs of distinct images: {"metric", "value", "std", "higher_is_more_diverse"}."""
    if len(images) < 2:
        return {"metric": "none", "value": float("nan"), "std": float("nan"), "higher_is_more_diverse": True, "pairs": 0}
    use_lpips = lpips_weights_present() if use_lpips is None else use_lpips
    pairs = _pairs(len(images), n_pairs, seed)
    if use_lpips:
        from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity as lpips

        x = _to_tensor(images)
        vals = [lpips(x[pairs[i:i + batch, 0]], x[pairs[i:i + batch, 1]], net_type="alex", reduction="none",
                      normalize=True) for i in range(0, len(pairs), batch)]
        name, higher = "LPIPS_alex", True
    else:
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim

        x = _to_tensor(images, MSSSIM_SIZE)
        vals = [msssim(x[pairs[i:i + batch, 0]], x[pairs[i:i + batch, 1]], data_range=1.0, reduction="none")
                for i in range(0, len(pairs), batch)]
        name, higher = "MS-SSIM", False
    v = torch.cat([t.reshape(-1) for t in vals]).double().numpy()
    return {"metric": name, "value": float(v.mean()), "std": float(v.std()), "higher_is_more_diverse": higher,
            "pairs": int(len(v))}
