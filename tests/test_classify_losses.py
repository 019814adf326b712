"""Losses against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dermsynth.classify.config import TrainConfig
from dermsynth.classify.losses import FocalLoss, balanced_class_weights, build_loss
from dermsynth.config import ConfigError

LOGITS = [[2.0, 0.5, -1.0, 0.0, 0.3, 1.0, -0.5],
          [0.1, 0.2, 0.3, 3.0, -2.0, 0.0, 0.5],
          [-1.0, 0.0, 1.0, 0.0, 2.5, 0.5, 0.0]]
TARGET = [0, 3, 5]


def _hand_focal(gamma: float, alpha: list[float] | None) -> float:
    total = 0.0
    for row, t in zip(LOGITS, TARGET):
        p = math.exp(row[t]) / sum(math.exp(v) for v in row)
        a = alpha[t] if alpha else 1.0
        total += -a * (1 - p) ** gamma * math.log(p)
    return total / len(TARGET)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_hand_computation(gamma):
    alpha = [0.5, 1.0, 1.0, 4.0, 2.0, 0.25, 3.0]
    logits, target = torch.tensor(LOGITS), torch.tensor(TARGET)
    assert FocalLoss(gamma)(logits, target).item() == pytest.approx(_hand_focal(gamma, None), rel=1e-6)
    got = FocalLoss(gamma, torch.tensor(alpha))(logits, target).item()
    assert got == pytest.approx(_hand_focal(gamma, alpha), rel=1e-6)


def test_focal_gamma0_is_cross_entropy_and_down_weights_easy_examples():
    logits, target = torch.tensor(LOGITS), torch.tensor(TARGET)
    assert FocalLoss(0.0)(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    assert FocalLoss(2.0)(logits, target).item() < F.cross_entropy(logits, target).item()


def test_balanced_weights():
    w = balanced_class_weights(np.array([10, 20, 0, 5, 5, 100, 0]))
    assert w[2] == 0 and w[6] == 0
    totals = w * np.array([10, 20, 0, 5, 5, 100, 0])
    assert np.allclose(totals[[0, 1, 3, 4, 5]], totals[0])  # every present class carries the same total weight
    assert totals.sum() == pytest.approx(140)


def test_build_loss_variants():
    counts = np.array([10, 20, 30, 5, 40, 100, 5])
    logits, target = torch.tensor(LOGITS), torch.tensor(TARGET)
    ce = build_loss(TrainConfig(loss="ce"), counts)
    assert ce(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item())
    wce = build_loss(TrainConfig(loss="weighted_ce"), counts)
    w = balanced_class_weights(counts)
    per = F.cross_entropy(logits, target, reduction="none").numpy()
    assert wce(logits, target).item() == pytest.approx((w[TARGET] * per).sum() / w[TARGET].sum(), rel=1e-6)
    fb = build_loss(TrainConfig(loss="focal", focal_gamma=1.0, focal_alpha="balanced"), counts)
    assert fb(logits, target).item() == pytest.approx(_hand_focal(1.0, list(w)), rel=1e-6)
    fl = build_loss(TrainConfig(loss="focal", focal_alpha=[1, 2, 3, 4, 5, 6, 7]), counts)
    assert fl(logits, target).item() == pytest.approx(_hand_focal(2.0, [1, 2, 3, 4, 5, 6, 7]), rel=1e-6)
    with pytest.raises(ConfigError, match="7 values"):
        build_loss(TrainConfig(loss="focal", focal_alpha=[1.0, 2.0]), counts)
    with pytest.raises(ConfigError, match="focal_alpha"):
        build_loss(TrainConfig(loss="focal", focal_alpha="inverse"), counts)


@pytest.mark.parametrize("cfg", [TrainConfig(loss="ce"), TrainConfig(loss="ce", label_smoothing=0.1),
                                 TrainConfig(loss="weighted_ce"), TrainConfig(loss="weighted_ce", label_smoothing=0.1),
                                 TrainConfig(loss="focal", focal_alpha="balanced")])
def test_sample_weights_count_as_copies(cfg):
    """All-ones weights give the plain loss; weight 2 on a row equals that row twice; weight 0 equals it left out."""
    counts = np.array([10, 20, 30, 5, 40, 100, 5])
    loss = build_loss(cfg, counts)
    logits, target = torch.tensor(LOGITS), torch.tensor(TARGET)
    plain = loss(logits, target)
    assert loss(logits, target, torch.ones(3)).item() == pytest.approx(plain.item(), rel=1e-6)
    twice = loss(torch.cat([logits, logits[1:2]]), torch.cat([target, target[1:2]]))
    assert loss(logits, target, torch.tensor([1.0, 2.0, 1.0])).item() == pytest.approx(twice.item(), rel=1e-6)
    without = loss(logits[[0, 2]], target[[0, 2]])
    assert loss(logits, target, torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(without.item(), rel=1e-6)
    assert twice.item() != pytest.approx(plain.item(), rel=1e-3)  # the rows differ, so the check can fail
