"""The classifier's config: data (split, resolution, synthetic mixing), model (timm name, weights), train, eval.

YAML recipes in ``configs/clf_*.yaml`` set these; ``--set train.lr=3e-4`` overrides; the resolved config is saved as
``<run>/config.yaml`` and is all that ``predict_images`` needs besides the best checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dermsynth.classify.decision import DEFAULT_TAUS
from dermsynth.config import ConfigError


@dataclass
class DataConfig:
    split: str = ""  # path of split.json (or its folder); required
    image_size: int = 128
    synthetic: str | None = None  # manifest of synthetic images (source="synthetic"); joins the train part only
    synthetic_required: bool = False  # hybrid recipes: refuse to run (silently real-only) without data.synthetic
    # n_synthetic = ratio * n_real for each class listed (capped by what exists); other classes stay real only.
    # ratio 1.0 = a 50 % real / 50 % synthetic train set for those classes.
    synthetic_classes: list[str] = field(default_factory=lambda: ["df", "vasc", "mel"])
    synthetic_ratio: float = 1.0
    synthetic_ratio_per_class: dict[str, float] = field(default_factory=dict)  # overrides synthetic_ratio per class
    # Each epoch draws its synthetic images afresh from all that exist of a class: still round(ratio * n_real) of
    # them, so every epoch's real:synthetic mix is the same as without it; false: one draw for the whole run. Why:
    # with oversampling, a rare class's few synthetic images are each seen dozens of times, so a classifier can learn
    # them one by one; a fresh draw shows it more different ones, each less often, at the same share.
    synthetic_redraw: bool = False
    cache_dir: str | None = None  # preprocessed uint8 cache (default: dermsynth.paths.cache_root()/images)
    gpu_resident_max_gb: float = 16.0  # keep the uint8 images on the GPU when they fit under this


@dataclass
class ModelConfig:
    name: str = "efficientnet_b0"  # any timm model name (documented: efficientnet_b0, resnet50, tf_efficientnet_lite0)
    # "none" (random init) | "lite0" (ImageNet Lite0 from the installed Python package) | a local weight file | "hub"
    pretrained: str = "none"
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class AugmentConfig:
    flips: bool = True  # random flips and 90-degree rotations (dermoscopy has no "up")
    color_jitter: float = 0.1  # per-image brightness / contrast / saturation factor in [1 - j, 1 + j]; 0 = off
    scale_min: float = 1.0  # random zoom-in crops keeping >= this fraction of the side; 1.0 = off
    randaugment: bool = False  # torchvision v2 RandAugment on top (the "RandAugment" baseline)
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    # Resolution matching: with probability lowres_prob an image is resampled down to lowres_size px and back up.
    # Why: synthetic images made at 64 px and upsampled for a 128 px classifier are softer than real photos, and
    # only the rare classes have them, so sharpness alone could tell the classifier "rare". Softening a share of all
    # images removes that shortcut. 0 = off.
    lowres_size: int = 0
    lowres_prob: float = 0.5


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine decays to lr * this
    patience: int = 10  # early stopping: epochs without a better val macro-F1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss: Literal["ce", "weighted_ce", "focal"] = "ce"
    focal_gamma: float = 2.0
    focal_alpha: str | list[float] = "none"  # "none" | "balanced" (inverse class frequency) | 7 values
    label_smoothing: float = 0.0
    sampler: Literal["plain", "oversample"] = "plain"
    oversample_power: float = 1.0  # sample weight 1 / n_class ** power (1 = every class equally likely)
    # The last N epochs draw real images only (same epoch length, same sampler), after the earlier epochs learned
    # from real + synthetic ones. Why: at CPU size the classifier tied the synthetic look to the classes that had
    # synthetic images and lost recall on their real lesions; a real-only finish lets the features learned from the
    # synthetic images stay while the decision is refitted to real photos. When early stopping fires before these
    # epochs, the run skips ahead to them (the learning-rate schedule where they would have begun). 0 = off.
    real_only_last_epochs: int = 0
    # Each synthetic image's term in the loss is scaled by this (a real image's by 1); the sampler still draws them
    # as often. Why: the classifier learnt the synthetic look as a class cue; a weight below 1 keeps the synthetic
    # images' variety in every batch while they pull the decision less than real photos. 1 = off.
    synthetic_loss_weight: float = 1.0
    # Exponential moving average of the weights (timm's ModelEmaV3, with its warm-up so that the average forgets the
    # starting weights within the first few hundred steps of a short fine-tune); validation, the best epoch and every
    # score use the averaged weights. Why: one recipe's test macro-F1 moved by up to 0.054 between seeds on the GPU,
    # which hides the gains this study looks for; an average over the last steps is less at the mercy of where the
    # last step landed. 0 = off.
    ema_decay: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    checkpoint_every: int = 1  # epochs
    checkpoint_minutes: float = 10.0  # also mid-epoch after this much time; <= 0 turns it off
    keep_checkpoints: int = 1
    keep_final_state: bool = False  # keep the last training-state checkpoint after the run finished (best is kept)
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the model on CUDA
    # cuDNN autotuning for each new input shape (CUDA only). On an H200 each Lite0 run spent ~35 s in its first epoch
    # against ~4.5 s in later ones; autotuning is the likely cause (not profiled): false trades it for cuDNN's
    # heuristic choice of kernels.
    cudnn_benchmark: bool = True


@dataclass
class EvalConfig:
    rare_classes: list[str] = field(default_factory=lambda: ["df", "vasc", "mel"])
    extra_test: dict[str, str] = field(default_factory=dict)  # name -> manifest path (e.g. isic2018: .../manifest.csv)
    n_boot: int = 1000  # lesion-level bootstrap replicates for the final val/test CIs
    batch_size: int = 256
    # average the 8 flips/rotations when scoring the best epoch (val, test, extra sets; predict_images too); the
    # per-epoch validation that picks the best epoch stays plain, 8x cheaper
    tta: bool = False
    # The decision rule (dermsynth.classify.decision): "argmax", or "prior_shift": each class's log-probability moves
    # by -tau * log(prior of the real training images), one tau from decision_taus chosen on VALIDATION macro-F1.
    # Metrics, predictions.csv's pred column and the study's comparisons use the decisions; AUCs do not change.
    decision: Literal["argmax", "prior_shift"] = "argmax"
    decision_taus: list[float] = field(default_factory=lambda: list(DEFAULT_TAUS))


@dataclass
class ClfConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def check_train(tc: TrainConfig) -> None:
    """Refuse training settings that cannot run, before any work: a study checks every condition up front."""
    if tc.epochs < 1 or tc.batch_size < 2:
        raise ConfigError(f"train.epochs must be >= 1 and train.batch_size >= 2, got {tc.epochs}, {tc.batch_size}")
    if not 0 <= tc.real_only_last_epochs < tc.epochs:
        raise ConfigError(f"train.real_only_last_epochs must be in [0, train.epochs - 1] = [0, {tc.epochs - 1}] so "
                          f"that some epochs see the synthetic images, got {tc.real_only_last_epochs}")
    if not 0 <= tc.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 = no weight averaging; 0.99-0.999 are usual), got "
                          f"{tc.ema_decay}")
    if not tc.synthetic_loss_weight > 0:
        raise ConfigError(f"train.synthetic_loss_weight must be > 0 (1 = a synthetic image counts as a real one; "
                          f"leave synthetic images out with data.synthetic unset), got {tc.synthetic_loss_weight}")
