"""From-scratch generator parts without a training run: UNet, guidance, EMA, data draws, seeds, folders, provenance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dermsynth.config import ConfigError, load_config
from dermsynth.data.labels import CLASSES
from dermsynth.generate.config import GenConfig
from dermsynth.generate.models import NULL_CLASS, UNET_SIZES, build_unet, count_parameters, unet_config
from dermsynth.generate.sample import regenerate
from dermsynth.generate.samplers import (first_step, from_uint8, initial_noise, make_scheduler, sample, to_uint8,
                                         train_scheduler)
from dermsynth.generate.samples import (image_seed, init_order, make_item, open_samples_folder, plan_batches,
                                        png_metadata, read_png_metadata, samples_dir_name, save_sample, settings_like,
                                        settings_tag, shard)
from dermsynth.generate.scratch_train import class_weights, draw_batch, train_rngs
from dermsynth.io import DataError


def _random_unet(seed: int = 0, size: int = 16):
    """The 'test' UNet with every weight randomised (diffusers zero-inits nothing we rely on, but be sure)."""
    torch.manual_seed(seed)
    unet = build_unet("test", size).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------

def test_tiny_unet_forward_backward_reaches_every_parameter():
    unet = build_unet("test", 16)
    assert UNET_SIZES["test"]["block_out_channels"] == (8, 16)
    assert count_parameters(unet) < 100_000
    assert unet.class_embedding.num_embeddings == len(CLASSES) + 1 == NULL_CLASS + 1
    x = torch.randn(4, 3, 16, 16)
    out = unet(x, torch.tensor([1, 10, 500, 999]), class_labels=torch.tensor([0, 3, 6, NULL_CLASS])).sample
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    no_grad = [n for n, p in unet.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_size_registry_refuses_unknown_size_and_bad_resolution():
    with pytest.raises(ConfigError, match="unknown generator model size"):
        unet_config("huge", 32)
    with pytest.raises(ConfigError, match="divisible by 8"):
        unet_config("base64", 36)  # three halvings need a multiple of 8
    assert unet_config("base64", 64)["num_class_embeds"] == 8


def test_null_label_changes_the_prediction():
    unet = _random_unet()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([300])
    with torch.no_grad():
        cond = unet(x, t, class_labels=torch.tensor([3])).sample
        null = unet(x, t, class_labels=torch.tensor([NULL_CLASS])).sample
        other = unet(x, t, class_labels=torch.tensor([6])).sample
    assert not torch.allclose(cond, null) and not torch.allclose(cond, other)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------

def _manual_guided(unet, scheduler, label: int, seed: int, steps: int, g: float) -> torch.Tensor:
    """The textbook loop: separate conditional and unconditional passes, eps = u + g (c - u)."""
    x = initial_noise([seed], (3, 16, 16))
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        c = unet(x, t, class_labels=torch.tensor([label])).sample
        u = unet(x, t, class_labels=torch.tensor([NULL_CLASS])).sample
        x = scheduler.step(u + g * (c - u), t, x).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("name", ["ddim", "dpmpp"])
def test_batched_guidance_matches_separate_passes(name):
    unet = _random_unet()
    sched_cfg = dict(train_scheduler("epsilon").config)
    with torch.no_grad():
        ref = _manual_guided(unet, make_scheduler(name, sched_cfg), 4, 123, 4, 3.0)
    got = sample(unet, make_scheduler(name, sched_cfg), [4], [123], 4, 3.0)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # guidance matters: scale 1 (conditional only) gives another image
    plain = sample(unet, make_scheduler(name, sched_cfg), [4], [123], 4, 1.0)
    assert not torch.allclose(plain, got, atol=1e-3)


def test_sampling_is_seeded_per_image():
    unet = _random_unet()
    sched_cfg = dict(train_scheduler("v_prediction").config)
    a = sample(unet, make_scheduler("ddim", sched_cfg), [0, 1], [7, 8], 3, 2.0)
    b = sample(unet, make_scheduler("ddim", sched_cfg), [0, 1], [7, 8], 3, 2.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    u8 = to_uint8(a)
    assert u8.dtype == torch.uint8 and u8.shape == (2, 16, 16, 3)


def test_first_step_of_image_to_image():
    assert first_step(25, 1.0) == 0 and first_step(25, 0.5) == 13 and first_step(10, 0.3) == 7  # int(steps * s) run
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="strength must be in"):
            first_step(10, bad)
    with pytest.raises(ConfigError, match="no denoising step"):
        first_step(3, 0.2)


def test_image_to_image_ddim_matches_the_sdedit_formula():
    """DDIM from a real image: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at the first kept step, then the usual
    guided steps; written out by hand here against diffusers' DDIM step."""
    unet = _random_unet()
    sched_cfg = dict(train_scheduler("epsilon").config)
    init = torch.rand(2, 3, 16, 16) * 2 - 1
    got = sample(unet, make_scheduler("ddim", sched_cfg), [4, 1], [5, 6], 8, 2.0, init=init, strength=0.5)
    ref_s = make_scheduler("ddim", sched_cfg)
    ref_s.set_timesteps(8)
    ts = ref_s.timesteps[4:]
    abar = ref_s.alphas_cumprod[ts[0]]
    x = abar.sqrt() * init + (1 - abar).sqrt() * initial_noise([5, 6], (3, 16, 16))
    with torch.no_grad():
        for t in ts:
            c = unet(x, t, class_labels=torch.tensor([4, 1])).sample
            u = unet(x, t, class_labels=torch.tensor([NULL_CLASS, NULL_CLASS])).sample
            x = ref_s.step(u + 2.0 * (c - u), t, x).prev_sample
    torch.testing.assert_close(got, x.clamp(-1, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["ddim", "dpmpp"])
def test_image_to_image_stays_near_its_init_at_low_strength(name):
    unet = _random_unet()
    sched_cfg = dict(train_scheduler("epsilon").config)
    init = from_uint8(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    assert torch.equal(to_uint8(init), torch.as_tensor(to_uint8(init)))  # from_uint8 inverts to_uint8 exactly
    out = {s: sample(unet, make_scheduler(name, sched_cfg), [3, 3], [1, 2], 20, 2.0, init=init, strength=s)
           for s in (0.1, 0.5, 1.0)}
    free = sample(unet, make_scheduler(name, sched_cfg), [3, 3], [1, 2], 20, 2.0)
    dist = {s: (x - init).abs().mean().item() for s, x in {**out, "free": free}.items()}
    # the less noise is added, the more of the real image is kept; strength 1 starts at the last timestep, where
    # the cosine schedule keeps sqrt(2.4e-9) of the signal: about the image from pure noise
    assert dist[0.1] < 0.25 * dist["free"] and dist[0.1] < dist[0.5] < dist["free"]
    assert (out[1.0] - free).abs().mean() < 0.01 * dist["free"]
    with pytest.raises(ValueError, match="init images have shape"):
        sample(unet, make_scheduler(name, sched_cfg), [3], [1], 4, 2.0, init=init, strength=0.5)


def test_unknown_sampler_is_refused():
    with pytest.raises(ConfigError, match="unknown sampler"):
        make_scheduler("euler", dict(train_scheduler("epsilon").config))


# ----------------------------------------------------------------------------------------------------------------------
# EMA and data draws
# ----------------------------------------------------------------------------------------------------------------------

def test_ema_moves_shadow_weights_toward_the_model_by_the_decay():
    from diffusers.training_utils import EMAModel

    unet = build_unet("test", 16)
    ema = EMAModel(unet.parameters(), decay=0.999)
    before = [s.clone() for s in ema.shadow_params]
    for _ in range(3):  # the first update is a copy (decay 0); then (1 + n) / (10 + n)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(1.0)
        ema.step(unet.parameters())
    d = ema.cur_decay_value
    assert 0 < d < 0.999
    for s, b, p in zip(ema.shadow_params, before, unet.parameters()):
        assert not torch.equal(s, b) and not torch.equal(s, p)
        assert torch.all(s < p)  # the average lags behind weights that keep rising


def test_class_weights_are_inverse_square_root():
    labels = torch.tensor([0] * 100 + [3] * 4 + [6] * 25)
    w = class_weights(labels, 0.5)
    share = {c: float(w[labels == c].sum() / w.sum()) for c in (0, 3, 6)}
    expected = {0: 10 / 17, 3: 2 / 17, 6: 5 / 17}  # proportional to sqrt(count)
    assert share == pytest.approx(expected)
    assert float(class_weights(labels, 1.0)[labels == 3].sum() / class_weights(labels, 1.0).sum()) == pytest.approx(1 / 3)


def test_draw_batch_augments_with_the_square_symmetries():
    rng = torch.Generator().manual_seed(0)
    img = torch.arange(4 * 4 * 3, dtype=torch.uint8).reshape(1, 4, 4, 3) * 3
    x, y = draw_batch(img, torch.tensor([5]), torch.ones(1), 64, rng, True, torch.device("cpu"))
    base = img.permute(0, 3, 1, 2).float().div(127.5).sub(1)[0]
    variants = [torch.rot90(v, k, dims=(1, 2)) for v in (base, base.flip(2)) for k in range(4)]
    seen = {next(i for i, v in enumerate(variants) if torch.equal(v, xi)) for xi in x}
    assert len(seen) == 8  # all eight dihedral variants show up in 64 draws, and nothing else
    assert torch.all(y == 5) and x.min() >= -1 and x.max() <= 1


def test_training_streams_are_independent_at_every_seed_and_rank():
    """Data and noise streams never share a seed (seed * k + rank did at seed 0), and the same seed repeats them."""
    streams = [train_rngs(seed, rank) for seed in (0, 1) for rank in (0, 1)]
    seeds = [g.initial_seed() for r in streams for g in r.values()]
    assert len(set(seeds)) == len(seeds) == 8
    r = train_rngs(0, 0)
    assert not torch.equal(torch.rand(8, generator=r["data"]), torch.rand(8, generator=r["noise"]))
    again = train_rngs(0, 0)
    assert [g.initial_seed() for g in again.values()] == seeds[:2]


# ----------------------------------------------------------------------------------------------------------------------
# Seeds, batches, shards, folders, PNG metadata
# ----------------------------------------------------------------------------------------------------------------------

def test_image_seed_is_stable_and_distinct():
    assert image_seed(0, "df", 5) == image_seed(0, "df", 5)
    seeds = {image_seed(s, c, i) for s in (0, 1) for c in ("df", "mel") for i in range(50)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**63 for s in seeds)


def test_batches_are_full_and_independent_of_per_class():
    small = plan_batches(["df"], 5, 4, 0, "tag")
    big = plan_batches(["df"], 9, 4, 0, "tag")
    assert [len(b.seeds) for b in small] == [4, 4]  # the last batch is padded with the seeds of indices 5..7
    assert [len(b.items) for b in small] == [4, 1]
    assert small[1].seeds == big[1].seeds  # asking for more later keeps each image's batch identical


@pytest.mark.parametrize("world", [2, 3])
def test_shards_cover_every_index_exactly_once(world):
    batches = plan_batches(["df", "vasc", "mel"], 11, 4, 0, "tag")
    seen = [it.image_id for r in range(world) for b in shard(batches, r, world) for it in b.items]
    assert len(seen) == len(set(seen)) == 33


def test_init_order_uses_every_real_image_before_any_twice():
    order = init_order(3, "df", 7)
    assert sorted(order) == list(range(7)) and np.array_equal(order, init_order(3, "df", 7))
    assert not np.array_equal(order, init_order(3, "vasc", 7))  # each class its own order


def test_strength_enters_the_image_ids_only_when_set():
    s = {"kind": "scratch", "checkpoint_hash": "abc", "weights": "ema", "sampler": "ddim", "steps": 10,
         "guidance": 2.0, "seed": 0, "batch_size": 8, "image_size": 32}
    # a folder made before image-to-image existed keeps its ids: strength None hashes as if the key were absent
    assert settings_tag({**s, "strength": None}) == settings_tag(s) == "f57bb3e2"  # the tag of the release before
    assert settings_tag({**s, "strength": 0.5}) not in (settings_tag(s), settings_tag({**s, "strength": 0.6}))
    assert settings_tag({**s, "strength": 0.5, "init_from": None}) == settings_tag({**s, "strength": 0.5})
    assert settings_tag({**s, "strength": 0.5, "init_from": {"df": "nv"}}) != settings_tag({**s, "strength": 0.5})
    # precision and clip_x0 were always recorded but never hashed: checked on reopening, ids unchanged
    assert settings_tag({**s, "precision": "bf16", "clip_x0": False}) == "f57bb3e2"


def test_samples_dir_name():
    assert samples_dir_name(2000, "dpmpp", 25, 2.0, 0) == "step00002000_dpmpp25_g2.0_s0"
    assert samples_dir_name(5, "ddim", 50, 1.75, 3, "raw") == "step00000005_ddim50_g1.75_s3_raw"


def test_samples_folder_refuses_other_settings(tmp_path):
    s = {"kind": "scratch", "checkpoint_hash": "abc", "weights": "ema", "sampler": "ddim", "steps": 10,
         "guidance": 2.0, "seed": 0, "batch_size": 8, "image_size": 32}
    open_samples_folder(tmp_path, s)
    assert open_samples_folder(tmp_path, {**s, "batch_size": None})["batch_size"] == 8  # resume keeps its batch size
    with pytest.raises(DataError, match="guidance"):
        open_samples_folder(tmp_path, {**s, "guidance": 3.0})
    with pytest.raises(DataError, match="batch_size"):
        open_samples_folder(tmp_path, {**s, "batch_size": 16})
    open_samples_folder(tmp_path / "p", {**s, "precision": "auto", "clip_x0": True})
    for k, v in (("precision", "bf16"), ("clip_x0", False)):
        with pytest.raises(DataError, match=k):
            open_samples_folder(tmp_path / "p", {**s, "precision": "auto", "clip_x0": True, k: v})


def test_settings_like_keeps_an_sd_folders_checkpoint_by_its_step(tmp_path):
    """An SD samples folder records the checkpoint's step, not its path: --like must still use those weights, not the
    run's latest; another generator gets its own latest."""
    gen = tmp_path / "sd_run"
    s = {"generator": str(gen), "kind": "sd15_lora", "checkpoint_step": 500, "sampler": "dpmpp", "steps": 25,
         "guidance": 7.5, "seed": 0, "batch_size": 4}
    open_samples_folder(tmp_path / "samples", s)
    got = settings_like(tmp_path / "samples")
    assert got["checkpoint"] == str(gen / "checkpoints" / "step_00000500") and got["strength"] == 1.0
    assert (got["sampler"], got["steps"], got["guidance"], got["batch_size"]) == ("dpmpp", 25, 7.5, 4)
    assert settings_like(tmp_path / "samples", gen_run=tmp_path / "other")["checkpoint"] == "latest"
    assert settings_like(tmp_path / "samples", checkpoint="step_00000100")["checkpoint"] == "step_00000100"


def test_regenerate_of_an_sd_image_says_how_to_redraw_it(tmp_path):
    (tmp_path / "generator.json").write_text(json.dumps({"kind": "sd15_lora"}))
    row = {"generator": str(tmp_path), "image_id": "syn-0123abcd-df-000000", "checkpoint_hash": "0123456789abcdef"}
    with pytest.raises(ConfigError, match="implemented for from-scratch.*'sd15_lora' run.*rerun the `dermsynth "
                                          "generate` command"):
        regenerate(row)


def test_png_metadata_round_trip(tmp_path):
    item = make_item("vasc", 3, 7, "tag")
    settings = {"generator": "/runs/gen", "kind": "scratch", "checkpoint_hash": "0123", "seed": 7, "batch_size": 4,
                "sampler": "dpmpp", "steps": 25, "guidance": 2.0}
    img = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    path = save_sample(tmp_path, item, img, settings)
    meta = read_png_metadata(path)
    assert meta == png_metadata(item, settings)
    assert meta["ai_generated"] == "true" and "AI-generated" in meta["Description"]
    assert meta["dermsynth:seed"] == str(item.seed) and meta["dermsynth:class"] == "vasc"
    assert meta["dermsynth:checkpoint_hash"] == "0123" and meta["dermsynth:generator"] == "/runs/gen"
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), img)


def test_config_files_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for name, size in (("gen_tiny.yaml", "tiny"), ("gen_64.yaml", "base64"), ("gen_128.yaml", "base128")):
        cfg = load_config(GenConfig, root / name)
        assert cfg.kind == "scratch" and cfg.model.size == size
        unet_config(cfg.model.size, cfg.data.image_size)  # resolution fits the network
