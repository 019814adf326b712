"""The built-in toy set: procedural dermoscopy-like images, made by numpy, in HAM10000's class proportions.

Why it exists: the demo and the tests need a data set that ships with the code (no download, no licence), has the
same *structure* as HAM10000 (7 classes, heavy imbalance, 1-3 photos per lesion so grouped splits matter) and is hard
enough that a classifier does not reach 100 %. Every picture is rendered from a small set of per-lesion parameters:

    skin (tone, mottling, grain) -> lesion (shape, melanin, blood, white and blue-grey layers, patterns)
    -> hairs -> per-photo pose (rotation, shift, zoom) and light (exposure, white balance, gradient) -> vignette

Colours come from a simple absorption model: skin colour times exp(-(melanin * k_mel + blood * k_hb)), then white
(scale, scar, regression) and blue-grey (dermal pigment) layers blended on top. Everything about a lesion lives in
"skin coordinates"; each photo maps its pixels into that frame, so the photos of one lesion show the same lesion.

Class traits (each drawn per lesion from ranges that overlap between similar classes; a fraction of lesions are
"atypical" and borrow part of their look from a confusable class, so the task has a Bayes error above zero):
    nv     round/oval, smooth border, even brown, faint network or globules
    mel    larger, asymmetric, ragged border, several colours (dark brown/black, blue-grey, red, white regression)
    bkl    tan/light brown, sharp "stuck-on" border, waxy sheen, cerebriform fissures, milia and comedo-like dots
    bcc    pink/pearly translucent, ill-defined, thin red branching (arborising) vessels, sometimes blue-grey nests
    akiec  red, scaly (rough white-yellow scale patches), ill-defined, sometimes light-brown pigment
    df     small, brown peripheral ring (delicate network) around a pale/white scar-like centre
    vasc   small, sharp, red/purple round clods (lacunae) separated by pale septa
"""
from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.fft
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from dermsynth.config import ConfigError, save_config, to_dict
from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import write_manifest
from dermsynth.io import atomic_write_json
from dermsynth.paths import DatasetPaths
from dermsynth.runlog import get_logger, run_log

# Bump when the rendering changes: a toy folder made by another version is regenerated, never silently reused.
TOY_VERSION = 1

# HAM10000 images per class (10,015 in all): the default class proportions.
HAM10000_COUNTS: dict[str, int] = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142,
                                   "df": 115}


@dataclass
class ToyConfig:
    n_images: int = 2000
    size: int = 64  # pixels per side; any size from 16 up works (content is resolution-independent)
    seed: int = 0
    images_per_lesion: tuple[int, int] = (1, 3)
    extra_view_p: float = 0.3  # chance of each photo beyond the first (0.3 -> ~1.4 photos per lesion, as HAM10000)
    min_lesions_per_class: int = 5  # floor so tiny sets still reach every split part (and 5 folds)
    class_counts: dict[str, int] = field(default_factory=lambda: dict(HAM10000_COUNTS))  # proportions; 0 drops a class
    atypical_p: float = 0.15  # lesions that borrow part of their look from a confusable class
    hair_p: float = 0.35
    vignette_p: float = 0.3


# ----------------------------------------------------------------------------------------------------------------------
# The plan: how many images and lesions of each class
# ----------------------------------------------------------------------------------------------------------------------

def _check(cfg: ToyConfig) -> None:
    lo, hi = cfg.images_per_lesion
    if cfg.n_images < 1 or cfg.size < 16 or cfg.seed < 0:
        raise ConfigError(f"toy: need n_images >= 1, size >= 16, seed >= 0; got {cfg.n_images}, {cfg.size}, {cfg.seed}")
    if not 1 <= lo <= hi:
        raise ConfigError(f"toy: images_per_lesion must be (lo, hi) with 1 <= lo <= hi, got {cfg.images_per_lesion}")
    unknown = [c for c in cfg.class_counts if c not in CLASSES]
    if unknown or any(v < 0 for v in cfg.class_counts.values()) or sum(cfg.class_counts.values()) <= 0:
        raise ConfigError(f"toy: class_counts needs non-negative counts for {list(CLASSES)}, got {cfg.class_counts}")
    for name in ("extra_view_p", "atypical_p", "hair_p", "vignette_p"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"toy: {name} must be in [0, 1], got {getattr(cfg, name)}")
    classes = [c for c in CLASSES if cfg.class_counts.get(c, 0) > 0]
    need = len(classes) * max(cfg.min_lesions_per_class, 1)
    if cfg.n_images < need:
        raise ConfigError(f"toy: n_images={cfg.n_images} is too small for {len(classes)} classes x "
                          f"min_lesions_per_class={cfg.min_lesions_per_class}; use n_images >= {need}")


def image_quota(cfg: ToyConfig) -> dict[str, int]:
    """Images per class: proportional (largest remainder), each class at least ``min_lesions_per_class`` images."""
    classes = [c for c in CLASSES if cfg.class_counts.get(c, 0) > 0]
    w = np.array([cfg.class_counts[c] for c in classes], dtype=float)
    raw = cfg.n_images * w / w.sum()
    quota = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - quota), kind="stable")[: cfg.n_images - quota.sum()]:
        quota[i] += 1
    floor = max(cfg.min_lesions_per_class, 1)
    # Raise the small classes to the floor and take the difference from the largest ones, keeping n_images exact.
    deficit = int(np.maximum(floor - quota, 0).sum())
    quota = np.maximum(quota, floor)
    while deficit > 0:
        i = int(np.argmax(quota))
        quota[i] -= 1
        deficit -= 1
    return {c: int(q) for c, q in zip(classes, quota)}


def plan_lesions(cfg: ToyConfig) -> list[tuple[str, int]]:
    """(label, number of photos) per lesion, in a seeded random order so ids say nothing about the class."""
    rng = np.random.default_rng([cfg.seed, 7_000_001])
    lo, hi = cfg.images_per_lesion
    floor = max(cfg.min_lesions_per_class, 1)
    lesions: list[tuple[str, int]] = []
    for label, quota in image_quota(cfg).items():
        views: list[int] = []
        while sum(views) < quota:
            n = lo
            while n < hi and rng.random() < cfg.extra_view_p:
                n += 1
            views.append(min(n, quota - sum(views)))
        while len(views) < floor:  # split multi-photo lesions until the class has enough lesions
            i = int(np.argmax(views))
            views[i] -= 1
            views.append(1)
        lesions += [(label, v) for v in views]
    order = rng.permutation(len(lesions))
    return [lesions[i] for i in order]


# ----------------------------------------------------------------------------------------------------------------------
# Noise fields and geometry
# ----------------------------------------------------------------------------------------------------------------------

# Noise fields tile skin coordinates periodically. Smooth fields tile [-2, 2)^2 on a coarse grid: the image spans
# [-1, 1]^2 at zoom 1 and at most ~[-1.9, 1.9]^2 after rotation, zoom-out and shift, so their period never shows.
# Textures need a fine grid but no long period (the lesion is < 1.4 units wide), so they tile [-1, 1)^2: together
# 4x cheaper than one fine grid over the whole frame.
# name -> (grid, half-period in skin units, feature size in skin units, roughness exponent)
FIELD_SPECS: dict[str, tuple[int, float, float, float]] = {
    "warp": (40, 2.0, 0.60, 3.0),  # low-frequency border shape
    "pig": (40, 2.0, 0.25, 2.5),  # pigment variation
    "patch_a": (40, 2.0, 0.22, 2.5),  # dark/black areas
    "patch_b": (40, 2.0, 0.22, 2.5),  # blue-grey, red, scale and regression patches
    "mottle": (40, 2.0, 0.70, 3.0),  # skin mottling
    "rough": (64, 1.0, 0.10, 2.0),  # ragged border
    "fine": (64, 1.0, 0.05, 1.5),  # scales
    "net": (64, 1.0, 0.035, 1.0),  # pigment network (its zero-crossings are the lines)
    "grain": (64, 1.0, 0.06, 1.5),  # skin grain
}


@functools.lru_cache(maxsize=None)
def _spectrum(grid: int, extent: float, scales: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Amplitude filters (K, grid, grid//2+1): a smooth power law with a Gaussian cut-off, no DC, scaled so that
    filtered unit white noise has unit variance (Parseval), which spares a mean/std pass per lesion."""
    fy = np.fft.fftfreq(grid, d=2 * extent / grid)[:, None]  # cycles per skin unit
    fx = np.fft.fftfreq(grid, d=2 * extent / grid)[None, :]
    f = np.hypot(fx, fy)
    out = []
    for s, beta in scales:
        amp = (1.0 + (f * s * 2.0) ** 2) ** (-beta / 2) * np.exp(-(f * s) ** 2)
        amp[0, 0] = 0.0
        amp /= np.sqrt((amp**2).mean())
        out.append(amp[:, : grid // 2 + 1])
    return np.stack(out).astype(np.float32)


FieldSet = dict[tuple[int, float], tuple[list[str], np.ndarray]]


def smooth_fields(rng: np.random.Generator) -> FieldSet:
    """Periodic smooth random fields (zero mean, unit variance): white noise shaped in Fourier space, by grid."""
    out: FieldSet = {}
    for key in sorted({spec[:2] for spec in FIELD_SPECS.values()}):
        names = [n for n, spec in FIELD_SPECS.items() if spec[:2] == key]
        grid, extent = key
        spec = _spectrum(grid, extent, tuple(FIELD_SPECS[n][2:] for n in names))
        white = rng.standard_normal((len(names), grid, grid), dtype=np.float32)
        fld = scipy.fft.irfft2(scipy.fft.rfft2(white) * spec, s=(grid, grid)).astype(np.float32, copy=False)
        # one wrapped extra row and column: bilinear lookups then never need a modulo for the far neighbour
        out[key] = (names, np.pad(fld, ((0, 0), (0, 1), (0, 1)), mode="wrap"))
    return out


def sample_fields(fields: FieldSet, u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Bilinear, periodic lookup of every field at skin points (u, v): name -> (N,)."""
    out = {}
    for (grid, extent), (names, fld) in fields.items():
        gx = np.mod((u + extent) * (grid / (2 * extent)), grid)
        gy = np.mod((v + extent) * (grid / (2 * extent)), grid)
        x0, y0 = np.floor(gx), np.floor(gy)
        tx, ty = gx - x0, gy - y0
        i00 = (y0 * (grid + 1) + x0).astype(np.intp)
        # one gather of the four neighbours of every point for all fields at once: (K, 4, N)
        corners = np.take(fld.reshape(len(names), -1), np.stack([i00, i00 + 1, i00 + grid + 1, i00 + grid + 2]), axis=1)
        weights = np.stack([(1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty])
        out.update(zip(names, np.einsum("kcn,cn->kn", corners, weights)))
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def blobs(p: np.ndarray, centres: np.ndarray, radii: np.ndarray, soft: float = 0.2) -> np.ndarray:
    """Union of soft discs: max over discs of sigmoid((1 - |p - c| / r) / soft) -> (N,)."""
    if len(centres) == 0:
        return np.zeros(len(p), dtype=np.float32)
    # sigmoid is monotonic, so the max of the sigmoids is the sigmoid of the nearest disc: one tanh per pixel
    dx = p[:, 0, None] - centres[None, :, 0]
    dy = p[:, 1, None] - centres[None, :, 1]
    d2 = ((dx * dx + dy * dy) / (radii * radii)[None]).min(axis=1)
    return sigmoid((1.0 - np.sqrt(d2)) / soft)


def polyline_tree(rng: np.random.Generator, start: np.ndarray, heading: float, steps: int, step: float,
                  width: float, turn: float, branch_p: float, depth: int = 0) -> list[tuple]:
    """A random walk that branches (arborising vessels, hairs): list of (a, b, width) segments."""
    segs: list[tuple] = []
    p = start.copy()
    for _ in range(steps):
        heading += rng.normal(0.0, turn)
        q = p + step * np.array([np.cos(heading), np.sin(heading)])
        segs.append((p, q, width))
        if depth < 2 and rng.random() < branch_p:
            side = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
            segs += polyline_tree(rng, q, side, max(2, steps // 2), step * 0.8, width * 0.65, turn, branch_p * 0.6,
                                  depth + 1)
        p = q
        width *= 0.93
    return segs


def _segments(segs: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not segs:
        z = np.zeros((0, 2), np.float32)
        return z, z, np.zeros(0, np.float32)
    a = np.array([s[0] for s in segs], np.float32)
    b = np.array([s[1] for s in segs], np.float32)
    w = np.array([s[2] for s in segs], np.float32)
    return a, b, w


# ----------------------------------------------------------------------------------------------------------------------
# Per-class lesion parameters
# ----------------------------------------------------------------------------------------------------------------------

# Every lesion is a point in one flat parameter space; classes differ by the ranges they draw from. Absent = 0.
PARAM_DEFAULTS: dict[str, float] = {
    "R": 0.4, "aspect": 1.2, "asym": 0.05, "warp": 0.03, "rough": 0.0, "soft": 0.08,
    "pig": 1.0, "pig_var": 0.1, "pig_center": 0.2, "pig_side": 0.0, "pig_tint": 0.0,
    "net": 0.0, "globules": 0.0, "dots": 0.0,
    "dark": 0.0, "blue": 0.0, "regress": 0.0, "red": 0.0,
    "ery": 0.0, "pearly": 0.0, "vessels": 0.0, "nests": 0.0, "ulcer": 0.0,
    "scales": 0.0, "cereb": 0.0, "milia": 0.0, "comedo": 0.0, "waxy": 0.0,
    "scar": 0.0, "scar_r": 0.5, "clods": 0.0, "clod_hb": 0.0, "purple": 0.0, "septa": 0.0, "halo": 0.0,
}

# Which class an atypical lesion borrows from (similar-looking classes, as in the clinic).
CONFUSABLE: dict[str, tuple[str, ...]] = {
    "nv": ("mel", "bkl", "df"), "mel": ("nv", "bkl"), "bkl": ("nv", "mel"), "bcc": ("akiec", "mel"),
    "akiec": ("bcc", "bkl"), "df": ("nv", "bkl"), "vasc": ("bcc", "mel"),
}


def _maybe(rng: np.random.Generator, p: float, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi)) if rng.random() < p else 0.0


def class_params(label: str, rng: np.random.Generator) -> dict[str, float]:
    """Draw one lesion's look for class ``label``; ranges overlap on purpose between similar classes."""
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    p = dict(PARAM_DEFAULTS)
    if label == "nv":
        p.update(R=u(0.2, 0.5), aspect=u(1.0, 1.35), asym=u(0.0, 0.06), warp=u(0.0, 0.05), rough=u(0.0, 0.015),
                 soft=u(0.04, 0.14), pig=u(0.8, 2.1), pig_var=u(0.05, 0.22), pig_center=u(-0.1, 0.6),
                 pig_tint=u(0.0, 0.35), net=_maybe(rng, 0.55, 0.3, 0.7), globules=_maybe(rng, 0.3, 6, 18),
                 dark=_maybe(rng, 0.1, 0.2, 0.6))
    elif label == "mel":
        p.update(R=u(0.3, 0.66), aspect=u(1.0, 1.6), asym=u(0.07, 0.22), warp=u(0.05, 0.14), rough=u(0.02, 0.08),
                 soft=u(0.02, 0.16), pig=u(0.8, 1.9), pig_var=u(0.25, 0.6), pig_center=u(-0.2, 0.4),
                 pig_side=u(0.2, 0.8), pig_tint=u(0.0, 0.4), net=_maybe(rng, 0.4, 0.3, 0.8),
                 dots=_maybe(rng, 0.5, 6, 24), dark=_maybe(rng, 0.85, 0.6, 2.0), blue=_maybe(rng, 0.55, 0.2, 0.45),
                 regress=_maybe(rng, 0.4, 0.2, 0.55), red=_maybe(rng, 0.4, 0.3, 0.9))
    elif label == "bkl":
        p.update(R=u(0.25, 0.6), aspect=u(1.0, 1.6), asym=u(0.03, 0.12), warp=u(0.02, 0.08), rough=u(0.005, 0.03),
                 soft=u(0.015, 0.05), pig=u(0.45, 1.5), pig_var=u(0.15, 0.35), pig_center=u(-0.1, 0.2),
                 pig_tint=u(0.5, 1.0), cereb=_maybe(rng, 0.8, 0.3, 0.8), milia=_maybe(rng, 0.6, 2, 9),
                 comedo=_maybe(rng, 0.6, 2, 10), waxy=u(0.04, 0.16), dark=_maybe(rng, 0.15, 0.3, 0.8))
    elif label == "bcc":
        p.update(R=u(0.25, 0.6), aspect=u(1.0, 1.5), asym=u(0.03, 0.12), warp=u(0.03, 0.1), rough=u(0.0, 0.02),
                 soft=u(0.1, 0.28), pig=_maybe(rng, 0.25, 0.2, 0.6), pig_var=u(0.2, 0.5), ery=u(0.35, 0.7),
                 pearly=u(0.25, 0.5), vessels=u(3, 7), nests=_maybe(rng, 0.35, 2, 7), ulcer=_maybe(rng, 0.25, 0.5, 1.2))
    elif label == "akiec":
        p.update(R=u(0.3, 0.7), aspect=u(1.0, 1.6), asym=u(0.05, 0.15), warp=u(0.05, 0.12), rough=u(0.02, 0.05),
                 soft=u(0.12, 0.3), pig=_maybe(rng, 0.3, 0.2, 0.6), pig_var=u(0.2, 0.5), pig_tint=u(0.3, 0.8),
                 ery=u(0.5, 1.1), scales=u(0.3, 0.8), milia=_maybe(rng, 0.4, 4, 12), halo=u(0.0, 0.3))
    elif label == "df":
        p.update(R=u(0.18, 0.4), aspect=u(1.0, 1.3), asym=u(0.02, 0.08), warp=u(0.02, 0.06), rough=u(0.0, 0.02),
                 soft=u(0.08, 0.2), pig=u(0.7, 1.5), pig_var=u(0.1, 0.3), pig_center=u(-0.9, -0.5),
                 pig_tint=u(0.1, 0.5), net=u(0.4, 0.8), scar=u(0.35, 0.8), scar_r=u(0.3, 0.6), ery=u(0.1, 0.35))
    elif label == "vasc":
        p.update(R=u(0.15, 0.45), aspect=u(1.0, 1.4), asym=u(0.0, 0.06), warp=u(0.0, 0.05), rough=u(0.0, 0.01),
                 soft=u(0.02, 0.06), pig=0.0, ery=u(0.8, 1.5), clods=u(4, 14), clod_hb=u(0.4, 1.2),
                 purple=_maybe(rng, 0.35, 0.3, 1.5), septa=u(0.1, 0.3))
    else:
        raise ValueError(f"unknown class {label!r}")
    return p


def lesion_params(label: str, rng: np.random.Generator, atypical_p: float) -> tuple[dict[str, float], str]:
    """A lesion's parameters; an atypical one takes 30-60 % of its values from a confusable class."""
    p = class_params(label, rng)
    mimic = ""
    if rng.random() < atypical_p:
        mimic = str(rng.choice(CONFUSABLE[label]))
        other = class_params(mimic, rng)
        share = rng.uniform(0.3, 0.6)
        for k in p:
            if rng.random() < share:
                p[k] = other[k]
    return p, mimic


# ----------------------------------------------------------------------------------------------------------------------
# One lesion (everything fixed across its photos) and one photo (pose and light)
# ----------------------------------------------------------------------------------------------------------------------

K_MEL = np.array([0.60, 0.85, 1.20], np.float32)  # melanin absorption (R, G, B): brown, black when dense
K_TAN = np.array([0.38, 0.62, 1.20], np.float32)  # lighter, yellower pigment (waxy keratoses)
K_HB = np.array([0.10, 1.00, 0.55], np.float32)  # haemoglobin: red
K_PURPLE = np.array([0.55, 1.10, 0.35], np.float32)  # deoxygenated blood / thrombosis: purple-blue
BLUE_GREY = np.array([0.42, 0.49, 0.62], np.float32)  # blue-white veil, dermal pigment
WHITE = np.array([0.95, 0.92, 0.90], np.float32)
SCALE_WHITE = np.array([0.96, 0.93, 0.82], np.float32)


@dataclass
class Lesion:
    label: str
    params: dict[str, float]
    mimic: str
    fields: FieldSet
    skin: np.ndarray  # base skin colour (3,)
    skin_ery: float  # background redness
    shape_phase: np.ndarray  # phases of the 5 border harmonics
    shape_amp: np.ndarray  # amplitudes of the 5 border harmonics
    tilt: float  # long-axis angle
    side: np.ndarray  # unit vector of the darker side (asymmetric pigment)
    points: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (centres, radii) of dot/clod/nest/milia sets
    vessels: tuple[np.ndarray, np.ndarray, np.ndarray]
    hairs: tuple[np.ndarray, np.ndarray, np.ndarray]
    hair_colour: np.ndarray
    vignette: bool


@dataclass
class View:
    rotation: float  # radians
    zoom: float  # > 1 magnifies
    shift: np.ndarray  # skin-frame point at the image centre
    brightness: float
    white_balance: np.ndarray  # (3,)
    gradient: np.ndarray  # illumination slope in image coordinates (2,)
    vignette_r: float
    vignette_soft: float
    noise_seed: int


def _disc_points(rng: np.random.Generator, n: float, r_max: float, r_lo: float,
                 r_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` discs (centres, radii) spread uniformly over a disc of radius ``r_max``."""
    n = int(round(n))
    rad = r_max * np.sqrt(rng.uniform(0.0, 1.0, n))
    ang = rng.uniform(0.0, 2 * np.pi, n)
    centres = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1).astype(np.float32)
    return centres, rng.uniform(r_lo, r_hi, n).astype(np.float32)


def make_lesion(label: str, rng: np.random.Generator, cfg: ToyConfig) -> Lesion:
    """Draw everything that is the same in every photo of one lesion."""
    p, mimic = lesion_params(label, rng, cfg.atypical_p)
    R = p["R"]
    # Skin: light pink to tan to light brown (dermoscopy flattens tone; mostly Fitzpatrick I-IV as in HAM10000).
    tone = rng.beta(2.0, 3.0)
    light, mid, dark = np.array([0.95, 0.80, 0.78]), np.array([0.87, 0.65, 0.58]), np.array([0.72, 0.52, 0.42])
    skin = (light + (mid - light) * min(tone * 2, 1.0) + (dark - mid) * max(tone * 2 - 1, 0.0))
    skin = np.clip(skin * (1 + rng.normal(0, 0.03, 3)), 0, 1).astype(np.float32)

    amp = p["asym"] * rng.uniform(0.5, 1.0, 5) / np.arange(1, 6) ** 0.6
    ang = rng.uniform(0, 2 * np.pi)
    points = {
        "globules": _disc_points(rng, p["globules"], 0.8 * R, 0.05 * R, 0.1 * R),
        "dots": _disc_points(rng, p["dots"], 1.0 * R, 0.03 * R, 0.08 * R),
        "nests": _disc_points(rng, p["nests"], 0.7 * R, 0.08 * R, 0.2 * R),
        "milia": _disc_points(rng, p["milia"], 0.8 * R, 0.03 * R, 0.07 * R),
        "comedo": _disc_points(rng, p["comedo"], 0.8 * R, 0.03 * R, 0.07 * R),
        "clods": _disc_points(rng, p["clods"], 0.75 * R, 0.14 * R, 0.32 * R),
    }
    vsegs: list[tuple] = []
    for _ in range(int(round(p["vessels"]))):
        a0 = rng.uniform(0, 2 * np.pi)
        start = np.array([np.cos(a0), np.sin(a0)]) * R * rng.uniform(0.5, 1.0)
        vsegs += polyline_tree(rng, start, a0 + np.pi + rng.normal(0, 0.6), int(rng.integers(5, 10)), 0.1 * R,
                               rng.uniform(0.010, 0.018), 0.45, 0.35)
    hsegs: list[tuple] = []
    if rng.random() < cfg.hair_p:
        for _ in range(int(rng.integers(1, 8))):
            a0 = rng.uniform(0, 2 * np.pi)
            start = rng.uniform(-1.6, 1.6, 2)
            hsegs += polyline_tree(rng, start, a0, int(rng.integers(6, 14)), rng.uniform(0.1, 0.2),
                                   rng.uniform(0.008, 0.02), 0.08, 0.0)
    return Lesion(
        label=label, params=p, mimic=mimic, fields=smooth_fields(rng), skin=skin,
        skin_ery=float(rng.uniform(0.0, 0.35)), shape_phase=rng.uniform(0, 2 * np.pi, 5).astype(np.float32),
        shape_amp=amp.astype(np.float32), tilt=float(rng.uniform(0, np.pi)),
        side=np.array([np.cos(ang), np.sin(ang)], np.float32),
        points=points, vessels=_segments(vsegs), hairs=_segments(hsegs),
        hair_colour=(np.array([0.16, 0.11, 0.08]) * rng.uniform(0.4, 1.4)).astype(np.float32),
        vignette=bool(rng.random() < cfg.vignette_p),
    )


def make_view(lesion: Lesion, rng: np.random.Generator) -> View:
    """Pose and light of one photo; the zoom keeps the lesion (mostly) inside the frame."""
    zoom = float(rng.uniform(0.85, 1.25) * min(1.0, 0.8 / (lesion.params["R"] * 1.15)))
    return View(
        rotation=float(rng.uniform(0, 2 * np.pi)), zoom=zoom,
        shift=rng.uniform(-0.12, 0.12, 2).astype(np.float32),
        brightness=float(rng.uniform(0.85, 1.1)),
        white_balance=(1 + rng.normal(0, 0.035, 3)).astype(np.float32),
        gradient=rng.normal(0, 0.06, 2).astype(np.float32),
        vignette_r=float(rng.uniform(0.95, 1.3)), vignette_soft=float(rng.uniform(0.02, 0.08)),
        noise_seed=int(rng.integers(2**20)),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def image_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres of a size x size image in [-1, 1]^2, flattened row-major (cached, read-only)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    ix, iy = (g.ravel() for g in np.meshgrid(t, t))
    ix.flags.writeable = iy.flags.writeable = False
    return ix, iy


def line_coverage(segs: tuple[np.ndarray, np.ndarray, np.ndarray], view: View, size: int) -> np.ndarray | None:
    """Anti-aliased coverage (N,) of skin-frame line segments in the photo, drawn by PIL on a supersampled canvas.

    Drawing is C-fast, and a hair thinner than a pixel correctly comes out as a faint one-pixel line after the box
    downsampling.
    """
    a, b, w = segs
    if len(a) == 0:
        return None
    ss = 4 if size <= 128 else 2
    c, s = np.cos(view.rotation), np.sin(view.rotation)

    def to_px(q: np.ndarray) -> np.ndarray:  # inverse of the pose in render(): skin -> supersampled pixel coordinates
        d = (q - view.shift) * view.zoom
        return (np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1) + 1) * (size * ss / 2)

    pa, pb = to_px(a), to_px(b)
    widths = np.maximum(np.rint(w * view.zoom * size * ss), 1).astype(int)  # full width 2w skin units, in pixels
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for (x0, y0), (x1, y1), wd in zip(pa.tolist(), pb.tolist(), widths.tolist()):
        draw.line((x0, y0, x1, y1), fill=255, width=wd)
        if wd > 2:  # round joints, or thick curves show notches
            draw.ellipse((x1 - wd / 2, y1 - wd / 2, x1 + wd / 2, y1 + wd / 2), fill=255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32).ravel() / 255.0


def render(lesion: Lesion, view: View, size: int) -> np.ndarray:
    """One (size, size, 3) uint8 photo of ``lesion`` under ``view``."""
    p, R = lesion.params, lesion.params["R"]
    # Image pixel centres -> skin coordinates (rotate, unzoom, shift). Scalars stay Python floats on purpose: a
    # numpy float64 scalar would promote every float32 array it touches to float64 and double the cost.
    ix, iy = image_grid(size)
    c, s = math.cos(view.rotation), math.sin(view.rotation)
    u = (c * ix - s * iy) / view.zoom + view.shift[0]
    v = (s * ix + c * iy) / view.zoom + view.shift[1]
    pts = np.stack([u, v], axis=1)
    px = 2.0 / size / view.zoom  # one pixel in skin units (for anti-aliasing)
    F = sample_fields(lesion.fields, u, v)

    # --- lesion shape: ellipse, border harmonics, warped and roughened border ----------------------------------
    ct, st = math.cos(lesion.tilt), math.sin(lesion.tilt)
    a = math.sqrt(p["aspect"])
    ex, ey = (ct * u + st * v) / a, (-st * u + ct * v) * a
    rho = np.hypot(ex, ey)
    # border harmonics sum_k a_k cos(k theta + phi_k) = Re(sum_k a_k e^{i phi_k} z^k) with z = e^{i theta}
    z = (ex + 1j * ey).astype(np.complex64) / np.maximum(rho, 1e-6)
    coef = (lesion.shape_amp * np.exp(1j * lesion.shape_phase)).astype(np.complex64)
    zk, harm = z, np.zeros_like(rho)
    for ck in coef:
        harm += (ck * zk).real
        zk = zk * z
    r = rho / (R * (1 + harm)) + p["warp"] * F["warp"] + p["rough"] * F["rough"]
    inside = sigmoid((1.0 - r) / max(p["soft"], 0.8 * px / R))
    rc = np.clip(r, 0.0, 1.0)  # 0 centre .. 1 border

    # --- melanin (brown/black) ---------------------------------------------------------------------------------------
    side = (u * lesion.side[0] + v * lesion.side[1]) / R
    mel = p["pig"] * (1 + p["pig_var"] * F["pig"]) * (1 + p["pig_center"] * (1 - rc)) * (1 + p["pig_side"] * side)
    if p["net"] > 0:  # pigment network: thin lines along the zero-crossings of a band-limited field, fading outwards
        lines = np.exp(-(F["net"] / 0.35) ** 2)
        mel = mel * (1 + p["net"] * (lines - 0.3) * (1.3 - 0.6 * rc))
    if p["dark"] > 0:
        mel = mel + p["dark"] * sigmoid((F["patch_a"] - 0.4) * 4) * 1.2
    for name, depth in (("globules", 0.9), ("dots", 1.4), ("comedo", 1.3)):
        if len(lesion.points[name][0]):
            mel = mel + depth * blobs(pts, *lesion.points[name])
    if p["cereb"] > 0:  # cerebriform: broad dark fissures (zero-crossings of a mid-scale field), paler ridges between
        fissure = np.exp(-((F["rough"] + 0.3 * F["fine"]) / 0.5) ** 2)
        mel = mel * (1 + p["cereb"] * (fissure * 1.1 - 0.4))
    mel = np.clip(mel, 0, 4) * inside

    # --- blood (red), blue-grey, white -------------------------------------------------------------------------------
    hb = p["ery"] * (1 + 0.3 * F["pig"])
    if p["red"] > 0:
        hb = hb + p["red"] * sigmoid((-F["patch_b"] - 0.5) * 4)
    hb = hb * inside
    if p["halo"] > 0:
        hb = hb + p["halo"] * sigmoid((1.4 - r) / 0.15) * (1 - inside)
    vessels = line_coverage(lesion.vessels, view, size)
    if vessels is not None:
        hb = hb + 1.6 * vessels * inside
    purple = np.zeros_like(u)
    clods = np.zeros_like(u)
    if len(lesion.points["clods"][0]):
        clods = blobs(pts, *lesion.points["clods"], soft=0.12) * inside
        hb = hb + p["clod_hb"] * clods
        purple = p["purple"] * clods
    blue = np.zeros_like(u)
    if p["blue"] > 0:
        blue = p["blue"] * sigmoid((F["patch_b"] - 0.4) * 4) * (0.75 + 0.25 * F["fine"]) * (1 - rc * 0.5) * inside
    if len(lesion.points["nests"][0]):  # pigmented bcc: blue-grey ovoid nests (dermal pigment: dark and blue)
        nests = blobs(pts, *lesion.points["nests"])
        blue, mel = blue + 0.45 * nests, mel + 2.0 * nests
    white = (p["pearly"] * (0.6 + 0.4 * sigmoid(2 * F["fine"])) + p["waxy"] * (1 + F["fine"] * 0.5)) * inside
    if p["regress"] > 0:
        white = white + p["regress"] * sigmoid((F["patch_b"] - 0.6) * 5) * inside
    if p["scales"] > 0:
        white = white + p["scales"] * sigmoid((F["fine"] + 0.8 * F["patch_b"] - 0.5) * 3) * inside
    if p["scar"] > 0:
        white = white + p["scar"] * sigmoid((p["scar_r"] - r + 0.15 * F["rough"]) / 0.08) * inside
    if p["septa"] > 0:
        white = white + p["septa"] * (1 - clods) * inside
    if len(lesion.points["milia"][0]):
        white = white + 0.7 * blobs(pts, *lesion.points["milia"])
    if p["ulcer"] > 0:
        ulcer = p["ulcer"] * sigmoid((0.25 - r + 0.2 * F["rough"]) / 0.05)
        hb, mel = hb + 1.2 * ulcer, mel + 0.7 * ulcer

    # --- skin, absorption, layers ----------------------------------------------------------------------------------
    skin = lesion.skin[None] * (1 + 0.05 * F["mottle"] + 0.025 * F["grain"])[:, None]
    skin_hb = lesion.skin_ery * sigmoid(F["mottle"] * 2)
    absorb = mel[:, None] * ((1 - p["pig_tint"]) * K_MEL + p["pig_tint"] * K_TAN)[None]
    absorb = absorb + (hb + skin_hb)[:, None] * K_HB[None] + purple[:, None] * K_PURPLE[None]
    img = skin * np.exp(-absorb)
    bl = np.clip(blue, 0, 0.6)[:, None]
    img = img * (1 - bl) + BLUE_GREY[None] * bl
    wt = np.clip(white, 0, 0.9)[:, None]
    img = img * (1 - wt) + (SCALE_WHITE if p["scales"] > 0 else WHITE)[None] * wt

    # --- hairs, light, vignette, sensor noise ----------------------------------------------------------------------
    hair = line_coverage(lesion.hairs, view, size)
    if hair is not None:
        img = img * (1 - 0.9 * hair[:, None]) + lesion.hair_colour[None] * (0.9 * hair[:, None])
    light = view.brightness * (1 + ix * view.gradient[0] + iy * view.gradient[1])
    img = img * light[:, None] * view.white_balance[None]
    if lesion.vignette:
        lens = sigmoid((view.vignette_r - np.hypot(ix, iy)) / max(view.vignette_soft, 1.5 / size))
        img = img * (0.04 + 0.96 * lens[:, None])
    # sensor noise from a cheap per-pixel hash (a Generator per photo costs more than the whole noise)
    hashed = np.sin(ix.astype(np.float64) * 12.9898 + iy * 78.233 + view.noise_seed * 1e-4) * 43758.5453
    img = img + (0.035 * (hashed - np.floor(hashed) - 0.5)).astype(np.float32)[:, None]
    return (np.clip(img, 0, 1).reshape(size, size, 3) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# The data set on disk
# ----------------------------------------------------------------------------------------------------------------------

def _pose_row(view: View) -> dict[str, Any]:
    return {"rotation_deg": round(float(np.degrees(view.rotation)), 1), "zoom": round(view.zoom, 3),
            "shift_x": round(float(view.shift[0]), 3), "shift_y": round(float(view.shift[1]), 3),
            "brightness": round(view.brightness, 3)}


def render_toy(cfg: ToyConfig, images_dir: Path) -> pd.DataFrame:
    """Render every photo of the plan into ``images_dir``; return the manifest rows (paths absolute)."""
    rows = []
    k = 0
    plan = plan_lesions(cfg)
    for j, (label, n_views) in enumerate(tqdm(plan, desc="toy lesions", unit="lesion", leave=False)):
        # One generator per lesion: a lesion's look does not depend on how many draws came before it.
        rng = np.random.default_rng([cfg.seed, j])
        lesion = make_lesion(label, rng, cfg)
        for view_i in range(n_views):
            view = make_view(lesion, rng)
            image_id = f"toy_{k:06d}"
            path = images_dir / f"{image_id}.png"
            # A plain save is enough here: images_dir is a staging folder that make_toy swaps in only when complete.
            Image.fromarray(render(lesion, view, cfg.size)).save(path, format="PNG", compress_level=1)
            rows.append({"image_id": image_id, "group_id": f"toy_lesion_{j:05d}", "label": label, "path": str(path),
                         "source": "toy", "view": view_i, **_pose_row(view),
                         "lesion_radius": round(lesion.params["R"], 3), "hairs": bool(len(lesion.hairs[0])),
                         "vignette": lesion.vignette, "atypical_like": lesion.mimic})
            k += 1
    return pd.DataFrame(rows)


def _reusable(out: Path, info: dict) -> bool:
    paths = DatasetPaths(out)
    meta = out / "toy.json"
    if not (paths.manifest.is_file() and meta.is_file()):
        return False
    try:
        old = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    if old.get("version") != info["version"] or old.get("config") != info["config"]:
        return False
    return len(list(paths.images.glob("*.png"))) == old.get("n_images")


def make_toy(out: str | Path, cfg: ToyConfig | None = None) -> Path:
    """Write the toy set to ``out`` (images/<id>.png, manifest.csv, toy.json, config.yaml); return the manifest path.

    A folder already holding the same version and config is reused. Otherwise the images are rendered into a hidden
    staging folder and swapped in, and the manifest is written last: a crash leaves no manifest that points at
    missing or mismatched images.
    """
    cfg = cfg or ToyConfig()
    _check(cfg)
    out = Path(out)
    paths = DatasetPaths(out)
    info: dict[str, Any] = {"version": TOY_VERSION, "config": to_dict(cfg)}
    log = get_logger("data.toy")
    if _reusable(out, info):
        log.info("toy set in %s already matches the config; reused", out)
        return paths.manifest
    out.mkdir(parents=True, exist_ok=True)
    with run_log(out):
        t0 = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=".images.", dir=out))
        try:
            df = render_toy(cfg, staging)
            wall = time.perf_counter() - t0
            paths.manifest.unlink(missing_ok=True)  # from here until the new manifest lands, the folder is "not done"
            trash = Path(tempfile.mkdtemp(prefix=".images.old.", dir=out))
            if paths.images.exists():
                paths.images.rename(trash / "images")
            staging.rename(paths.images)
            shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # absolute: write_manifest reads a relative path as relative to the manifest's folder, not to the cwd
        df["path"] = [str(paths.images.absolute() / Path(p).name) for p in df["path"]]
        counts = {c: {"images": int((df["label"] == c).sum()), "lesions": int(df.loc[df["label"] == c, "group_id"]
                                                                            .nunique())} for c in CLASSES}
        info.update(n_images=len(df), n_lesions=int(df["group_id"].nunique()), counts=counts, wall_s=round(wall, 2),
                    images_per_s=round(len(df) / max(wall, 1e-9), 1))
        save_config(cfg, out / "config.yaml")
        atomic_write_json(out / "toy.json", info)
        write_manifest(df, paths.manifest)
        log.info("toy set: %d images of %d lesions at %d px in %.1f s (%.0f images/s) -> %s", len(df),
                 info["n_lesions"], cfg.size, wall, info["images_per_s"], paths.manifest)
    return paths.manifest


__all__ = ["ToyConfig", "make_toy", "image_quota", "plan_lesions", "make_lesion", "make_view", "render",
           "HAM10000_COUNTS", "TOY_VERSION"]
