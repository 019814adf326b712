"""FD, KID, precision/recall/density/coverage, IS and C2ST as pure functions of feature matrices."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from dermsynth.metrics.distribution import (c2st_auc, frechet_distance, inception_score, kernel_distance, kid_subsets,
                                            prdc, realism_inside)


def _fd_reference(x, y):
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx + sy) - 2 * np.trace(linalg.sqrtm(sx @ sy).real)


def test_fd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(40, 8))
    assert abs(frechet_distance(x, x)) < 1e-8
    wide = np.random.default_rng(1).normal(size=(20, 100))  # N < D: the Gram-matrix path
    assert abs(frechet_distance(wide, wide)) < 1e-8


def test_fd_hand_computed_1d_and_2d():
    # 1-D: x = {0, 2}: mean 1, var 2; y = {1, 5}: mean 3, var 8 -> (1-3)^2 + 2 + 8 - 2 sqrt(2 * 8) = 6
    assert frechet_distance(np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])) == pytest.approx(6.0)
    # 2-D, diagonal covariances diag(1, 4) and diag(4, 1), means 0 and (3, 4):
    # 25 + (1 + 4) + (4 + 1) - 2 (sqrt(4) + sqrt(4)) = 27
    x = np.array([[1, 2], [-1, -2], [1, -2], [-1, 2]], float) * np.sqrt(3 / 4)  # cov diag(1, 4)
    y = np.array([[2, 1], [-2, -1], [2, -1], [-2, 1]], float) * np.sqrt(3 / 4) + [3, 4]  # cov diag(4, 1)
    assert frechet_distance(x, y) == pytest.approx(27.0)


@pytest.mark.parametrize("n,d", [(30, 5), (12, 40)])
def test_fd_matches_scipy_sqrtm_on_both_paths(n, d):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n + 3, d)) * 1.3 + 0.2
    assert frechet_distance(x, y) == pytest.approx(_fd_reference(x, y), rel=1e-6)


def test_kid_is_unbiased_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same = kid_subsets(a, b, subset_size=100, n_subsets=200, seed=1)
    # unbiased: the mean over subsets is ~0 (not the positive bias of the biased MMD estimate)
    assert abs(same.mean()) < 3 * same.std() / np.sqrt(len(same)) + 1e-3
    shifted, _ = kernel_distance(a, rng.normal(size=(300, 16)) + 0.5, subset_size=100, n_subsets=50)
    assert shifted > 10 * max(abs(same.mean()), same.std())
    self_mean, _ = kernel_distance(a, a, subset_size=100, n_subsets=50)
    assert abs(self_mean) < 0.05 * shifted


def _cloud(rng, n, center, scale=1.0):
    return rng.normal(size=(n, 2)) * scale + center


def test_prdc_on_constructed_clouds():
    rng = np.random.default_rng(0)
    real = _cloud(rng, 400, 0.0)
    same = prdc(real, _cloud(rng, 400, 0.0))
    assert same["precision"] > 0.9 and same["recall"] > 0.9 and same["coverage"] > 0.9
    assert 0.7 < same["density"] < 1.3
    far = prdc(real, _cloud(rng, 400, 50.0))
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    collapsed = prdc(real, _cloud(rng, 400, 0.0, scale=0.05))  # mode collapse: realistic but not diverse
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.2 and collapsed["coverage"] < 0.2
    half = prdc(real, np.concatenate([_cloud(rng, 200, 0.0), _cloud(rng, 200, 50.0)]))
    assert half["precision"] == pytest.approx(0.5, abs=0.06)


def test_realism_score_is_inside_exactly_when_at_least_one():
    rng = np.random.default_rng(0)
    real = _cloud(rng, 100, 0.0)
    fake = np.concatenate([real[:5] + 1e-3, _cloud(rng, 5, 30.0)])
    inside, score = realism_inside(real, fake, k=3)
    assert inside.tolist() == [True] * 5 + [False] * 5
    assert np.array_equal(inside, score >= 1.0)


def test_inception_score_bounds():
    assert inception_score(np.zeros((50, 10)))[0] == pytest.approx(1.0)  # every image the same uniform guess
    confident = np.eye(10)[np.arange(100) % 10] * 50.0  # sharp and evenly spread over 10 classes
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-3)


def test_equal_n_counts_follow_the_reference_proportions():
    from dermsynth.metrics.quality import equal_n_counts

    # per class: N = the test count when synthetic and train have more
    assert equal_n_counts({"df": 21}, {"df": 800}, {"df": 80}) == {"df": 21}
    # fewer synthetic than test: everything shrinks to the synthetic count
    assert equal_n_counts({"df": 21}, {"df": 10}, {"df": 80}) == {"df": 10}
    # pooled: drawn in the test part's proportions, limited by the scarcest set
    assert equal_n_counts({"df": 20, "mel": 160}, {"df": 800, "mel": 80}, {"df": 80, "mel": 780}) == {"df": 10, "mel": 80}
    assert equal_n_counts({"df": 20, "mel": 160}, {"df": 800, "mel": 800}, {"df": 80, "mel": 780}, max_n=90) == \
        {"df": 10, "mel": 80}


def test_c2st_is_chance_for_one_distribution_and_one_for_separable_sets():
    rng = np.random.default_rng(0)
    # one distribution, N << D (a rare class): the cross-validated AUC stays near chance, it does not overfit to 1
    same = [c2st_auc(rng.normal(size=(40, 300)), rng.normal(size=(40, 300)), seed=s) for s in range(10)]
    assert abs(np.mean(same) - 0.5) < 0.08
    # a shift along a few of many directions, as a generator's tell would be: clearly visible
    a, b = rng.normal(size=(200, 300)), rng.normal(size=(200, 300))
    b[:, :5] += 1.5
    shifted = c2st_auc(a, b)
    assert shifted > 0.9
    # a set against itself, row for row: no direction separates the labels, so every held-out score is a guess
    assert c2st_auc(a, a) < 0.6
    # which set plays "synthetic" does not matter (the folds differ, so not to the digit); a seed reproduces it
    assert c2st_auc(b, a) > 0.9
    assert c2st_auc(a, b, seed=3) == c2st_auc(a, b, seed=3)


def test_c2st_needs_two_rows_per_set():
    with pytest.raises(ValueError, match="at least 2 rows"):
        c2st_auc(np.zeros((1, 4)), np.ones((5, 4)))


def test_c2st_in_compare_leaves_the_other_numbers_as_they_were():
    """The C2ST draws its folds from a stream of its own: turning it on or off changes no FD / KID / PRDC value."""
    from dermsynth.metrics.quality import QualityConfig, compare

    rng = np.random.default_rng(0)
    src = {"df": rng.normal(size=(30, 16)) + 1.5, "mel": rng.normal(size=(40, 16)) + 1.5}
    ref = {"df": rng.normal(size=(30, 16)), "mel": rng.normal(size=(40, 16))}
    counts = {"df": 10, "mel": 20}
    on = compare(src, ref, counts, "x", QualityConfig(repeats=3), seed=7)
    off = compare(src, ref, counts, "x", QualityConfig(repeats=3, c2st_folds=0), seed=7)
    assert "C2ST_x" in on and "C2ST_x" not in off
    assert {m: v for m, v in on.items() if not m.startswith("C2ST")} == off
    assert on["C2ST_x"] > 0.9  # a shift of 1.5 in all 16 dimensions is plain at N = 30


def test_inception_score_is_compared_at_equal_n():
    """IS grows with the number of images it is computed on, so quality scores both sides on equal-N draws: two sets
    of one distribution agree there, while the larger set scored whole would look far "better"."""
    from dermsynth.metrics.quality import equal_n_inception_score

    rng = np.random.default_rng(0)
    a_logits, b_logits = rng.normal(size=(500, 10)) * 3, rng.normal(size=(40, 10)) * 3
    a = equal_n_inception_score({"df": a_logits}, {"df": 17}, 20, seed=0)[0]
    b = equal_n_inception_score({"df": b_logits}, {"df": 17}, 20, seed=1)[0]
    assert a == pytest.approx(b, rel=0.1)
    assert inception_score(a_logits)[0] > 2 * b  # all 500 scored whole, against 17 of 40 per draw
