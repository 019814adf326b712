"""Which training rows each epoch visits, and in what order: a plain shuffle or class-weighted oversampling.

The order of epoch ``e`` depends only on (seed, e), so a resumed run sees exactly the batches an uninterrupted one
would, and every DDP rank computes the same order and takes its own slice of it.
"""
from __future__ import annotations

import numpy as np
import torch

from dermsynth.data.labels import CLASSES


def oversample_weights(labels: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Per-sample weights 1 / n_class ** power, normalised to sum 1 (power 1: each class equally likely per draw)."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    w = 1.0 / counts[labels] ** power
    return w / w.sum()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_order(labels: np.ndarray, epoch: int, seed: int, sampler: str = "plain", power: float = 1.0,
                n: int | None = None) -> np.ndarray:
    """Indices into the training rows for one epoch (``n`` of them; default: the number of rows).

    plain: a permutation (successive permutations when ``n`` exceeds the rows). oversample: draws with replacement
    by :func:`oversample_weights`, as ``torch.utils.data.WeightedRandomSampler`` does.
    """
    g = epoch_generator(seed, epoch)
    m = len(labels)
    n = m if n is None else n
    if sampler == "plain":
        return torch.cat([torch.randperm(m, generator=g) for _ in range(-(-n // m))])[:n].numpy()
    if sampler == "oversample":
        w = torch.from_numpy(oversample_weights(labels, power))
        return torch.multinomial(w, n, replacement=True, generator=g).numpy()
    raise ValueError(f"unknown sampler {sampler!r}; use plain or oversample")


def epoch_rows(labels: np.ndarray, synthetic: np.ndarray, quota: dict[int, int], epoch: int, seed: int) -> np.ndarray:
    """The training rows epoch ``epoch`` draws from, ascending: all of them without a ``quota``; with one (class
    index -> n), every real row and a fresh pick of ``n`` of each such class's synthetic rows. The pick depends only
    on (seed, epoch), from a stream of its own, so a resumed run and every DDP rank pick the same rows."""
    if not quota:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, epoch, 0x5E1EC7])
    keep = ~synthetic
    for k, n in sorted(quota.items()):
        pool = np.flatnonzero(synthetic & (labels == k))
        if n > len(pool):
            raise ValueError(f"class {CLASSES[k]}: {n} synthetic images asked of a pool of {len(pool)}")
        keep[rng.choice(pool, size=n, replace=False)] = True
    return np.flatnonzero(keep)


def shard_batches(order: np.ndarray, batch_size: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """This rank's batches of an epoch: every rank gets the same number of full batches (a tail too small to give
    each rank a full batch is dropped; a BatchNorm batch of one would fail and skew statistics)."""
    per_step = batch_size * world
    n_steps = len(order) // per_step
    if n_steps == 0:  # tiny sets: one smaller batch per rank rather than none
        b = len(order) // world
        if b < 2:
            raise ValueError(f"{len(order)} training rows cannot make a batch of >= 2 on each of {world} process(es)")
        return [order[rank * b:(rank + 1) * b]]
    steps = order[:n_steps * per_step].reshape(n_steps, world, batch_size)
    return [steps[i, rank] for i in range(n_steps)]
