"""Epoch orders, oversampling weights, sharding, and batched augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dermsynth.classify.augment import (augment_batch, color_jitter, dihedral, dihedral_views, lowres, randaugment,
                                       zoom)
from dermsynth.classify.config import AugmentConfig
from dermsynth.classify.sampling import epoch_order, epoch_rows, oversample_weights, shard_batches

LABELS = np.array([5] * 80 + [4] * 12 + [2] * 5 + [3] * 2 + [6] * 1)


def test_oversample_weights_give_each_class_equal_mass():
    w = oversample_weights(LABELS)
    assert w.sum() == pytest.approx(1.0)
    mass = {c: w[LABELS == c].sum() for c in np.unique(LABELS)}
    assert all(m == pytest.approx(1 / 5) for m in mass.values())
    assert w[LABELS == 6][0] == pytest.approx(80 * w[LABELS == 5][0])  # the single vasc image: 80x a nevus
    half = oversample_weights(LABELS, power=0.5)
    assert half[LABELS == 6][0] / half[LABELS == 5][0] == pytest.approx(np.sqrt(80))
    assert np.allclose(oversample_weights(LABELS, power=0.0), 1 / len(LABELS))


def test_epoch_orders():
    a = epoch_order(LABELS, epoch=3, seed=0)
    assert sorted(a) == list(range(len(LABELS)))
    assert np.array_equal(a, epoch_order(LABELS, epoch=3, seed=0))
    assert not np.array_equal(a, epoch_order(LABELS, epoch=4, seed=0))
    assert not np.array_equal(a, epoch_order(LABELS, epoch=3, seed=1))
    long = epoch_order(LABELS, epoch=3, seed=0, n=250)  # more draws than rows: successive permutations
    assert np.array_equal(long[:len(LABELS)], a) and sorted(long[100:200]) == list(range(100))
    assert sorted(np.bincount(long, minlength=100)) == [2] * 50 + [3] * 50  # every row twice, half of them thrice
    assert len(epoch_order(LABELS, 3, 0, "oversample", n=250)) == 250
    draws = np.concatenate([epoch_order(LABELS, e, 0, "oversample") for e in range(60)])
    freq = np.bincount(LABELS[draws], minlength=7)[[2, 3, 4, 5, 6]] / len(draws)
    assert np.allclose(freq, 0.2, atol=0.02)


def test_epoch_rows_redraw_each_class_quota_from_its_pool():
    labels = np.array([5] * 30 + [2] * 4 + [6] * 3 + [2] * 12 + [6] * 9 + [5] * 6)
    syn = np.array([False] * 37 + [True] * 27)  # 12 df, 9 vasc, 6 nv synthetic rows after 37 real ones
    assert np.array_equal(epoch_rows(labels, syn, {}, 0, 0), np.arange(64))  # no quota: every row, as before
    quota = {2: 4, 6: 3, 5: 6}
    picks = [epoch_rows(labels, syn, quota, e, 7) for e in range(40)]
    for rows in picks:
        assert np.all(np.diff(rows) > 0) and set(range(37)) <= set(rows)  # ascending; every real row, every epoch
        assert len(rows) == 37 + 13 and {k: (labels[rows][syn[rows]] == k).sum() for k in quota} == quota
    assert np.array_equal(picks[3], epoch_rows(labels, syn, quota, 3, 7))  # a function of (seed, epoch) only
    assert not np.array_equal(picks[3], epoch_rows(labels, syn, quota, 3, 8))
    seen = np.zeros(64, dtype=int)
    for rows in picks:
        seen[rows] += 1
    df_pool = np.flatnonzero(syn & (labels == 2))
    assert (seen[df_pool] > 0).all() and 0.2 < seen[df_pool].mean() / 40 < 0.47  # each df image in ~1/3 of epochs
    assert (seen[syn & (labels == 5)] == 40).all()  # a quota as large as its pool takes it whole
    with pytest.raises(ValueError, match="pool of 9"):
        epoch_rows(labels, syn, {6: 10}, 0, 0)


def test_shards_are_disjoint_equal_and_full_batches():
    order = np.random.default_rng(0).permutation(100)
    one = shard_batches(order, 16)
    assert len(one) == 6 and all(len(b) == 16 for b in one)
    r0, r1 = shard_batches(order, 16, 0, 2), shard_batches(order, 16, 1, 2)
    assert len(r0) == len(r1) == 3
    assert not set(np.concatenate(r0)) & set(np.concatenate(r1))
    assert len(shard_batches(order[:10], 16)[0]) == 10  # fewer rows than a batch: one smaller batch
    with pytest.raises(ValueError):
        shard_batches(order[:3], 16, 0, 2)


def _images(n: int = 6, s: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _u(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))


def test_dihedral_gives_each_image_one_of_eight_views_and_is_seeded():
    x = _images()
    out = dihedral(x, _u(len(x), 1))
    seen = set()
    for i in range(len(x)):
        views = dihedral_views(x[i:i + 1])
        match = [k for k, v in enumerate(views) if torch.equal(v[0], out[i])]
        assert match
        seen.add(match[0])
    assert torch.equal(out, dihedral(x, _u(len(x), 1)))
    many = dihedral(x[:1].expand(64, -1, -1, -1), _u(64, 2))
    kinds = {next(k for k, v in enumerate(dihedral_views(x[:1])) if torch.equal(v[0], m)) for m in many}
    assert len(kinds) == 8


def test_color_jitter_and_zoom():
    x = _images().float() / 255
    assert torch.allclose(color_jitter(x.clone(), 0.0, _u(len(x), 0)), x)
    j = color_jitter(x.clone(), 0.3, _u(len(x), 0))
    assert j.min() >= 0 and j.max() <= 1 and not torch.allclose(j, x)
    assert torch.allclose(zoom(x, 1.0, _u(len(x), 0)), x, atol=1e-5)
    z = zoom(x, 0.5, _u(len(x), 0))
    assert z.shape == x.shape and not torch.allclose(z, x)


def test_lowres_softens_the_drawn_images_like_an_upsampled_small_image():
    import torch.nn.functional as F

    x = _images(6, 32).float() / 255
    u = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7])
    y = lowres(x, 8, u, prob=0.5)
    drawn = u < 0.5
    assert torch.equal(y[~drawn], x[~drawn]) and y.shape == x.shape and 0 <= y.min() and y.max() <= 1

    def detail(t: torch.Tensor) -> torch.Tensor:  # mean absolute difference of neighbouring pixels, per image
        return (t[..., 1:, :] - t[..., :-1, :]).abs().mean((1, 2, 3)) + (t[..., 1:] - t[..., :-1]).abs().mean((1, 2, 3))

    assert (detail(y[drawn]) < 0.5 * detail(x[drawn])).all()
    # an image that really was made at 8 px and upsampled (as a synthetic one is) keeps its look: softening it again
    # changes it far less than it changes a sharp image
    made = F.interpolate(F.interpolate(x, size=(8, 8), mode="area"), size=(32, 32), mode="bicubic").clamp(0, 1)
    again = lowres(made, 8, torch.zeros(6), prob=1.0)
    assert (again - made).abs().mean() < 0.25 * (y[drawn] - x[drawn]).abs().mean()
    assert torch.equal(lowres(x, 32, torch.zeros(6), prob=1.0), x)  # not lower than the image: nothing to do


def test_augment_batch_pipeline():
    x = _images(4, 16)
    cfg = AugmentConfig(flips=True, color_jitter=0.1, scale_min=0.8, randaugment=True)
    torch.manual_seed(0)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    b = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32 and a.shape == (4, 3, 16, 16) and torch.equal(a, b)
    off = AugmentConfig(flips=False, color_jitter=0.0, scale_min=1.0, randaugment=False)
    assert torch.equal(augment_batch(x, off, torch.Generator()), x.float() / 255)
    # lowres draws its own numbers after the others: turning it on leaves the other draws of a step as they were
    soft = AugmentConfig(flips=True, color_jitter=0.1, lowres_size=8, lowres_prob=0.0)
    plain = AugmentConfig(flips=True, color_jitter=0.1)
    assert torch.equal(augment_batch(x, soft, torch.Generator().manual_seed(3)),
                       augment_batch(x, plain, torch.Generator().manual_seed(3)))


def test_batched_randaugment_is_one_torchvision_draw_per_image():
    """Each image gets its own (op, sign) draw per slot, and the grouped calls give exactly what applying that op to
    the image alone gives (torchvision's op code, its magnitudes)."""
    from torchvision.transforms import v2

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (24, 3, 16, 16), dtype=np.uint8))
    torch.manual_seed(5)
    got = randaugment(x, 2, 9)
    ra = v2.RandAugment(num_ops=2, magnitude=9)
    names, (h, w) = list(ra._AUGMENTATION_SPACE), x.shape[-2:]
    torch.manual_seed(5)  # replay the same draws, then apply them one image at a time
    draws = [(torch.randint(len(names), (len(x),)), torch.rand(len(x)) <= 0.5) for _ in range(2)]
    want, ops_seen = [], set()
    for i in range(len(x)):
        img = x[i:i + 1]
        for op, negative in draws:
            fn, signed = ra._AUGMENTATION_SPACE[names[op[i]]]
            mags = fn(ra.num_magnitude_bins, h, w)
            mag = 0.0 if mags is None else float(mags[9]) * (-1 if signed and negative[i] else 1)
            img = ra._apply_image_or_video_transform(img, names[op[i]], mag, interpolation=ra.interpolation,
                                                     fill=ra._fill)
            ops_seen.add(names[op[i]])
        want.append(img)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, torch.cat(want))
    assert len(ops_seen) >= 8  # the images really drew different ops
    assert not torch.equal(got, x)
