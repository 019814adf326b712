"""Diversity: LPIPS only when its backbone weights are on disk, otherwise MS-SSIM, always named in the output."""
from __future__ import annotations

import numpy as np

from dermsynth.metrics import diversity
from dermsynth.metrics.diversity import _pairs, pairwise_diversity


def _smooth(rng, n, size=48):
    """Random smooth images (MS-SSIM of white noise is ~0 for any pair, which would test nothing)."""
    base = rng.integers(0, 256, (n, 6, 6, 3)).astype(np.uint8)
    return np.repeat(np.repeat(base, size // 6, 1), size // 6, 2)


def test_ms_ssim_fallback_is_named_and_orders_diversity(monkeypatch):
    monkeypatch.setattr(diversity, "lpips_weights_present", lambda: False)
    rng = np.random.default_rng(0)
    same = np.repeat(_smooth(rng, 1), 4, 0)
    d_same = pairwise_diversity(same, n_pairs=6)
    assert d_same["metric"] == "MS-SSIM" and d_same["higher_is_more_diverse"] is False
    assert d_same["value"] > 0.99 and d_same["pairs"] == 6  # 4 images: all 6 pairs
    d_varied = pairwise_diversity(_smooth(rng, 4), n_pairs=6)
    assert d_varied["value"] < d_same["value"] - 0.2


def test_pairs_are_distinct():
    p = _pairs(30, 50, seed=1)
    assert len(p) == 50 and (p[:, 0] < p[:, 1]).all() and len({tuple(x) for x in p.tolist()}) == 50
    assert _pairs(3, 50, seed=1).tolist() == [[0, 1], [0, 2], [1, 2]]
