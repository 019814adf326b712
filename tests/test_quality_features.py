"""Feature extractor registry, the on-disk feature cache, and the Inception weights error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dermsynth.metrics.feature_cache import cached_features, feature_dir
from dermsynth.io import DataError
from dermsynth.metrics.features import (INCEPTION_FILE, DummyExtractor, ExtractorSpec, make_extractor, metric_name,
                                        weights_stamp)
from dermsynth.pretrained import WeightsNotFoundError, lite0_package_file


class Counting:
    """Wraps an extractor and counts the images it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.seen = inner, 0
        self.name, self.version, self.dim, self.n_logits = inner.name, inner.version, inner.dim, inner.n_logits

    def __call__(self, images):
        self.seen += len(images)
        return self.inner(images)


def _images(n, seed=0, size=24):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_dummy_extractor_is_deterministic_and_content_sensitive():
    x = _images(4)
    a, b = DummyExtractor()(x), DummyExtractor()(x)
    assert a.shape == (4, 64) and a.dtype == np.float32 and np.array_equal(a, b)
    y = x.copy()
    y[0, :12] = 0
    assert not np.allclose(DummyExtractor()(y)[0], a[0]) and np.allclose(DummyExtractor()(y)[1:], a[1:])


def test_feature_cache_reuses_and_invalidates(tmp_path):
    ext = Counting(DummyExtractor())
    x = _images(6)
    first = cached_features(x, ext, cache_dir=tmp_path, progress=False)
    assert ext.seen == 6
    again = cached_features(x, ext, cache_dir=tmp_path, progress=False)
    assert ext.seen == 6 and np.array_equal(first, again)  # nothing recomputed
    subset = cached_features(x[[4, 1, 1]], ext, cache_dir=tmp_path, progress=False)
    assert ext.seen == 6 and np.array_equal(subset, first[[4, 1, 1]])  # keyed per image, order kept
    changed = x.copy()
    changed[2, 3, 3] ^= 1  # one pixel of one image
    out = cached_features(changed, ext, cache_dir=tmp_path, progress=False)
    assert ext.seen == 7  # only the edited image
    assert np.array_equal(out[[0, 1, 3, 4, 5]], first[[0, 1, 3, 4, 5]])
    assert np.allclose(out[2], DummyExtractor()(changed[2:3])[0])


def test_feature_cache_is_separate_per_extractor_version(tmp_path):
    a = Counting(DummyExtractor())
    b = Counting(DummyExtractor())
    b.version = "dummy-other-version"
    cached_features(_images(3), a, cache_dir=tmp_path, progress=False)
    cached_features(_images(3), b, cache_dir=tmp_path, progress=False)
    assert b.seen == 3 and feature_dir(a, tmp_path) != feature_dir(b, tmp_path)


def test_feature_cache_ignores_an_unfinished_shard(tmp_path):
    ext = Counting(DummyExtractor())
    x = _images(2)
    cached_features(x, ext, cache_dir=tmp_path, progress=False)
    for meta in feature_dir(ext, tmp_path).glob("*.json"):
        meta.unlink()  # as if the run died between writing features and their index
    cached_features(x, ext, cache_dir=tmp_path, progress=False)
    assert ext.seen == 4


def test_missing_inception_weights_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DERMSYNTH_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(WeightsNotFoundError, match=INCEPTION_FILE) as e:
        make_extractor(ExtractorSpec("inception", weights=str(tmp_path / "nowhere.pth")))
    assert "nowhere.pth" in str(e.value) and "lite0" in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # default location, offline: no download is attempted
    with pytest.raises(WeightsNotFoundError, match=INCEPTION_FILE):
        make_extractor(ExtractorSpec("inception"))


def test_unknown_extractor_and_metric_names():
    with pytest.raises(ValueError, match="lite0"):
        make_extractor("resnet9000")
    assert metric_name("FD", "lite0") == "FD_lite0" and metric_name("KID", "lite0") == "KID_lite0"
    assert metric_name("FD", "inception") == "FID"


def test_lite0_extractor_pooled_features():
    ext = make_extractor(ExtractorSpec("lite0", input_size=32, batch_size=4))
    f = ext(_images(5, size=40))
    assert f.shape == (5, 1280) and np.isfinite(f).all() and f.std() > 0
    assert "s32" in ext.version  # the input size is part of the cache key
    assert weights_stamp(lite0_package_file()) in ext.version  # and so is the weight file's content


@pytest.fixture()
def tiny_dinov2(monkeypatch):
    """The dinov2 extractor's architecture cut to one block (milliseconds), and a builder of its weights."""
    import timm

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: create(name, **{"depth": 1, **kw}))

    def weights(seed: int, img_size: int = 28) -> dict:
        torch.manual_seed(seed)
        return timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=img_size).state_dict()

    return weights


def test_dinov2_cache_version_follows_the_weight_content(tiny_dinov2, tmp_path):
    """Two weight files of one architecture have one size; their features must still never share a cache."""
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tiny_dinov2(0), str(a))
    save_file(tiny_dinov2(1), str(b))
    assert a.stat().st_size == b.stat().st_size
    ea = make_extractor(ExtractorSpec("dinov2", input_size=28, weights=str(a)))
    eb = make_extractor(ExtractorSpec("dinov2", input_size=28, weights=str(b)))
    assert ea.version != eb.version and feature_dir(ea, tmp_path) != feature_dir(eb, tmp_path)
    saved = tiny_dinov2(0)
    assert all(torch.equal(v, saved[k]) for k, v in ea.net.state_dict().items())  # the file's weights, not random
    assert not np.allclose(ea(_images(2, size=28)), eb(_images(2, size=28)))


def test_dinov2_refuses_weights_that_do_not_fit_its_model(tiny_dinov2, tmp_path):
    """Prefixed keys or keys of another model: an error naming the file, never random weights."""
    from safetensors.torch import save_file

    state = tiny_dinov2(0)
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"backbone.{k}": v for k, v in state.items()}, str(prefixed))
    with pytest.raises(DataError, match=r"prefixed\.safetensors.*missing key") as e:
        make_extractor(ExtractorSpec("dinov2", input_size=28, weights=str(prefixed)))
    assert "unexpected, e.g. ['backbone." in str(e.value)  # the keys it did find are shown
    other = tmp_path / "other.safetensors"
    save_file({**state, "head.weight": torch.zeros(3, 384)}, str(other))
    with pytest.raises(DataError, match=r"other\.safetensors.*1 unexpected, e.g. \['head.weight'\]"):
        make_extractor(ExtractorSpec("dinov2", input_size=28, weights=str(other)))


def test_dinov2_loads_the_original_release_at_another_input_size(tiny_dinov2, tmp_path):
    """The released weights come with a mask token and position embeddings for another grid (518 px): the token is
    dropped and the embeddings resampled to the input size asked for, so every other weight is the file's own."""
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    state = tiny_dinov2(0, img_size=28)  # a 2x2 grid of 14 px patches
    release = tmp_path / "release.safetensors"
    save_file({**state, "mask_token": torch.zeros(1, 384)}, str(release))
    e = make_extractor(ExtractorSpec("dinov2", input_size=42, weights=str(release)))  # a 3x3 grid
    got = e.net.state_dict()
    assert got["pos_embed"].shape == (1, 1 + 9, 384)
    assert torch.allclose(got["pos_embed"], resample_abs_pos_embed(state["pos_embed"], (3, 3), num_prefix_tokens=1))
    assert all(torch.equal(v, state[k]) for k, v in got.items() if k != "pos_embed")
    assert e(_images(2, size=42)).shape == (2, 384)
    assert e.version.endswith(f"-pe-timm{timm.__version__}")  # resampled by this timm: its own cache
    assert "-pe-" not in make_extractor(ExtractorSpec("dinov2", input_size=28, weights=str(release))).version


def test_inception_cache_version_follows_the_weight_content(tmp_path, monkeypatch):
    """Any file can be named as the Inception weights: its content, not its name, keys the feature cache."""
    import sys
    import types

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = lambda *a, **kw: torch.nn.Identity()  # the graph itself is not under test
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    a, b = tmp_path / "a" / INCEPTION_FILE, tmp_path / "b" / INCEPTION_FILE
    for path, byte in ((a, b"\x01"), (b, b"\x02")):
        path.parent.mkdir()
        path.write_bytes(byte * 1000)
    va, vb = (make_extractor(ExtractorSpec("inception", weights=str(p))).version for p in (a, b))
    assert va != vb and weights_stamp(a) in va
