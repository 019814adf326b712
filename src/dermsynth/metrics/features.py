"""Feature extractors for image-quality metrics, behind one registry.

Every extractor maps uint8 (N, H, W, 3) images to float32 (N, D) features and has a ``name`` (used in every metric
name: ``FD_lite0``, ``KID_lite0``; "FID" only for ``inception``) and a ``version`` string that changes whenever its
outputs would change (weights, input size, preprocessing), so cached features are never reused across them.

- ``lite0``: ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``, weights from its package), global-pooled
  1280-d features; the offline default. It knows ImageNet, not skin, like Inception, but it is always available.
- ``inception``: the standard FID Inception-v3 (torch-fidelity's port of the TF graph, 2048-d pool features) from a
  local weight file; downloaded only when the machine is online and downloads are allowed.
- ``dinov2``: a timm DINOv2 ViT from a local weight file (room for a self-supervised extractor).
- ``dummy``: a fixed random projection of 16x16 thumbnails; fast and deterministic, for tests only.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dermsynth.io import DataError, sha256_file
from dermsynth.paths import cache_root
from dermsynth.pretrained import WeightsNotFoundError, lite0_package_file, load_lite0_imagenet, load_state_file

# The FID Inception weights file name as torch-fidelity (and pytorch-fid derived tools) publish it.
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


class Extractor(Protocol):
    name: str
    version: str
    dim: int  # output width; the last ``n_logits`` columns are class logits (Inception Score), not features
    n_logits: int

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


@dataclass
class ExtractorSpec:
    """What to build: the registry name plus the knobs that some extractors use."""

    name: str = "lite0"
    input_size: int = 224  # images are resized to this before the network (lite0, dinov2)
    weights: str = ""  # local weight file (inception, dinov2); "" = the default location / env variable
    device: str = "cpu"
    batch_size: int = 64


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "DERMSYNTH_OFFLINE"))


# ----------------------------------------------------------------------------------------------------------------------
# A torch module run in batches over uint8 images
# ----------------------------------------------------------------------------------------------------------------------

class _TorchExtractor:
    """Runs ``net`` over uint8 NHWC images in batches; ``prep`` turns a uint8 NCHW batch into the net's input."""

    def __init__(self, name: str, version: str, dim: int, net: torch.nn.Module,
                 prep: Callable[[torch.Tensor], torch.Tensor], device: torch.device, batch_size: int,
                 n_logits: int = 0) -> None:
        self.name, self.version, self.dim, self.n_logits = name, version, dim, n_logits
        self.net, self.prep, self.device, self.batch_size = net.eval().to(device), prep, device, batch_size

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        _check_images(images)
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.array(images[i:i + self.batch_size])).permute(0, 3, 1, 2)  # copy: memmaps are read-only
            feats = self.net(self.prep(x.to(self.device)))
            out[i:i + len(x)] = feats.reshape(len(x), -1).float().cpu().numpy()
        return out


def weights_stamp(path: str | Path) -> str:
    """A short content hash of a weight file, for extractor versions: two different files of one architecture (even
    of one size) must never share a feature cache."""
    st = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)[:16]


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, hashed once per process for as long as its size and mtime hold (weight files run to
    ~100 MB, and an extractor may be built several times in one run)."""
    return sha256_file(path)


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"feature extractors take uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")


def _resize_norm(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if x.shape[-1] != size or x.shape[-2] != size:
            # bilinear with antialias: a 600 px image shrunk to 224 px must not alias, a 64 px one is simply upsampled
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - m.to(x.device)) / s.to(x.device)

    return prep


# ----------------------------------------------------------------------------------------------------------------------
# The extractors
# ----------------------------------------------------------------------------------------------------------------------

def _lite0(spec: ExtractorSpec) -> Extractor:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)  # num_classes=0: pooled 1280-d
    state = {k: v for k, v in load_lite0_imagenet().items() if not k.startswith("classifier.")}
    net.load_state_dict(state, strict=True)
    # the package file's hash: a package release that ships other weights must not reuse old features
    stamp = weights_stamp(lite0_package_file())
    return _TorchExtractor("lite0", f"lite0-imagenet-{stamp}-pool1280-s{spec.input_size}-v1", 1280, net,
                           _resize_norm(spec.input_size, (0.5,) * 3, (0.5,) * 3), _device(spec.device), spec.batch_size)


def inception_weights_path(weights: str = "") -> Path:
    """Where the FID Inception weights are looked for: the given path, $DERMSYNTH_INCEPTION_WEIGHTS, or the cache."""
    if weights:
        return Path(weights)
    env = os.environ.get("DERMSYNTH_INCEPTION_WEIGHTS", "")
    return Path(env) if env else cache_root() / "weights" / INCEPTION_FILE


def _inception(spec: ExtractorSpec) -> Extractor:
    path = inception_weights_path(spec.weights)
    if not path.is_file():
        if _offline() or spec.weights:
            raise WeightsNotFoundError(
                f"FID Inception weights not found at {path}. Provide the file {INCEPTION_FILE} (from {INCEPTION_URL}) "
                f"there, or point to it with --set features.weights=PATH or $DERMSYNTH_INCEPTION_WEIGHTS; "
                f"or use the offline extractor 'lite0' (--set features.name=lite0)")
        _download(INCEPTION_URL, path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise WeightsNotFoundError("the 'inception' extractor needs the package torch-fidelity "
                                   "(pip install torch-fidelity); or use 'lite0'") from e

    class _Pool(torch.nn.Module):
        """torch-fidelity's port of the TF FID graph; it resizes to 299 px itself and takes uint8 input."""

        def __init__(self) -> None:
            super().__init__()
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(path))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pool, logits = self.net(x)
            return torch.cat([pool, logits], dim=1)  # the logits ride along for the Inception Score

    # any file can be pointed to (features.weights, $DERMSYNTH_INCEPTION_WEIGHTS): its hash keys the feature cache
    version = f"fid-inception-2015-12-05-{weights_stamp(path)}-pool2048+logits1008-v1"
    return _TorchExtractor("inception", version, 2048 + 1008, _Pool(), lambda x: x, _device(spec.device),
                           spec.batch_size, n_logits=1008)


def _download(url: str, path: Path) -> None:
    """Online only: fetch one weight file atomically into the cache."""
    from torch.hub import download_url_to_file

    path.parent.mkdir(parents=True, exist_ok=True)
    download_url_to_file(url, str(path), progress=True)


def _dinov2(spec: ExtractorSpec) -> Extractor:
    import timm

    if not spec.weights:
        raise WeightsNotFoundError("the 'dinov2' extractor needs a local weight file of timm "
                                   "vit_small_patch14_dinov2 (--set features.weights=PATH)")
    from timm.models.vision_transformer import checkpoint_filter_fn

    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=spec.input_size)
    # timm's own checkpoint filter: it renames the original DINOv2 release's keys (mask_token dropped) and resamples
    # position embeddings saved for another input size (the released weights are for 518 px) to this grid
    state = load_state_file(spec.weights)
    pos = state.get("pos_embed")
    resampled = pos is not None and tuple(pos.shape) != tuple(net.pos_embed.shape)
    _load_exactly(net, checkpoint_filter_fn(state, net), spec.weights)
    stamp = weights_stamp(spec.weights)  # the content, not the size: same-architecture files are all one size
    # resampled position embeddings are timm's interpolation's: another timm may compute other features
    version = f"dinov2-vits14-{stamp}-s{spec.input_size}-v1" + (f"-pe-timm{timm.__version__}" if resampled else "")
    return _TorchExtractor("dinov2", version, net.num_features, net,
                           _resize_norm(spec.input_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                           _device(spec.device), spec.batch_size)


def _load_exactly(net: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load every weight of ``net`` from ``state`` or raise: a partial load would leave random weights behind and
    the features would silently mean nothing."""
    want = net.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    reshaped = sorted(k for k in set(want) & set(state) if want[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise DataError(
            f"{path}: not a state dict of timm {type(net).__name__} as built here "
            f"({len(missing)} missing key(s), e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}; "
            f"{len(reshaped)} of another shape, e.g. "
            f"{[f'{k} {tuple(state[k].shape)} != {tuple(want[k].shape)}' for k in reshaped[:2]]}). Save the model's "
            f"own state_dict() without key prefixes")
    net.load_state_dict(state, strict=True)


class DummyExtractor:
    """A fixed random projection of mean-centred 16x16 thumbnails: deterministic, content-sensitive, milliseconds.
    Tests only. Centring removes the shared skin tone that would otherwise make every pair cosine-similar."""

    name, version, dim, n_logits = "dummy", "dummy-thumb16-centred-proj64-v2", 64, 0

    def __init__(self) -> None:
        self.proj = np.random.default_rng(0).standard_normal((16 * 16 * 3, self.dim)).astype(np.float32) / 28.0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        _check_images(images)
        x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255.0
        thumbs = F.adaptive_avg_pool2d(x, 16).reshape(len(images), -1).numpy()
        return (thumbs - thumbs.mean(1, keepdims=True)) @ self.proj


EXTRACTORS: dict[str, Callable[[ExtractorSpec], Extractor]] = {
    "lite0": _lite0,
    "inception": _inception,
    "dinov2": _dinov2,
    "dummy": lambda spec: DummyExtractor(),
}


def make_extractor(spec: ExtractorSpec | str | None = None) -> Extractor:
    """Build the extractor named in ``spec`` (unknown names raise with the list of known ones)."""
    spec = ExtractorSpec(name=spec) if isinstance(spec, str) else (spec or ExtractorSpec())
    if spec.name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {spec.name!r}; known: {sorted(EXTRACTORS)}")
    return EXTRACTORS[spec.name](spec)


def metric_name(metric: str, extractor: str) -> str:
    """``FD`` + ``inception`` -> ``FID``; otherwise ``FD_lite0``, ``KID_lite0``: the extractor is always named."""
    if extractor == "inception" and metric in ("FD", "KID", "IS"):
        return {"FD": "FID", "KID": "KID", "IS": "IS"}[metric]
    return f"{metric}_{extractor}"
