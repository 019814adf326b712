"""Losses: cross-entropy, class-weighted cross-entropy, focal loss (Lin et al. 2017) with per-class alpha.

Each takes optional per-sample weights (``train.synthetic_loss_weight`` uses them to let a synthetic image count for
less than a real one). A sample of weight k counts as k copies of it: the weighted mean keeps each loss's own
normalisation, so all-ones weights give the plain loss and weight 2 equals a duplicated row (tested).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermsynth.classify.config import TrainConfig
from dermsynth.config import ConfigError
from dermsynth.data.labels import CLASSES


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """w_c = N / (K * n_c) for the K classes present (absent classes get 0): every class then carries equal total weight."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


class FocalLoss(nn.Module):
    """mean_i  -alpha_{y_i} (1 - p_{y_i})^gamma log p_{y_i}; gamma = 0 and alpha = 1 give plain cross-entropy."""

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", alpha if alpha is not None else torch.empty(0), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.alpha.numel():
            loss = loss * self.alpha[target]
        if sample_weight is None:
            return loss.mean()
        return (loss * sample_weight).sum() / sample_weight.sum()


class CrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` that also takes per-sample weights.

    Its mean with class weights w is sum_i w_{y_i} l_i / sum_i w_{y_i}; sample weights s make it
    sum_i s_i w_{y_i} l_i / sum_i s_i w_{y_i}.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        if sample_weight is None:
            return super().forward(logits, target)
        per = F.cross_entropy(logits, target, weight=self.weight, reduction="none",
                              label_smoothing=self.label_smoothing)
        norm = sample_weight if self.weight is None else sample_weight * self.weight[target]
        return (per * sample_weight).sum() / norm.sum()


def build_loss(cfg: TrainConfig, class_counts: np.ndarray) -> nn.Module:
    """The loss of ``cfg.loss``; class weights / alphas are computed from the *training* counts (real + synthetic)."""
    if cfg.loss == "ce":
        return CrossEntropy(label_smoothing=cfg.label_smoothing)
    if cfg.loss == "weighted_ce":
        w = torch.tensor(balanced_class_weights(class_counts), dtype=torch.float32)
        return CrossEntropy(weight=w, label_smoothing=cfg.label_smoothing)
    if cfg.loss == "focal":
        alpha = cfg.focal_alpha
        if isinstance(alpha, str):
            if alpha == "none":
                a = None
            elif alpha == "balanced":
                a = torch.tensor(balanced_class_weights(class_counts), dtype=torch.float32)
            else:
                raise ConfigError(f"train.focal_alpha: {alpha!r}; use none, balanced or {len(CLASSES)} numbers")
        else:
            if len(alpha) != len(CLASSES):
                raise ConfigError(f"train.focal_alpha needs {len(CLASSES)} values (order {list(CLASSES)}), got {len(alpha)}")
            a = torch.tensor(alpha, dtype=torch.float32)
        return FocalLoss(cfg.focal_gamma, a)
    raise ConfigError(f"train.loss: unknown {cfg.loss!r}")
