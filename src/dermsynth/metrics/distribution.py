"""Distribution metrics as pure functions of two feature matrices: FD, KID, precision/recall/density/coverage, IS,
and the classifier two-sample test (C2ST).

Why closed forms here rather than torchmetrics' FrechetInceptionDistance / KernelInceptionDistance: those metrics
take *images* through ``update`` and own the feature pass, while dermsynth computes features once, caches them on disk
and reuses them across classes, subsets, the real-vs-real floor, the filter and the memorisation audit. A metric that
is a function of two matrices is also what makes equal-N subsampling and hand-checkable tests simple. The formulas
are short and standard (Heusel et al. 2017; Binkowski et al. 2018; Naeem et al. 2020; Salimans et al. 2016) and are
tested against hand computations; scipy supplies the eigen-decompositions and scikit-learn the C2ST's classifier.

Higher-is-better flags for every metric are in :data:`HIGHER_IS_BETTER`.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg

HIGHER_IS_BETTER = {"FD": False, "KID": False, "precision": True, "recall": True, "density": True,
                    "coverage": True, "IS": True, "C2ST": False}


# ----------------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------------

def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + tr(S_x + S_y - 2 (S_x S_y)^1/2) between Gaussians fitted to the rows of ``x`` and ``y``.

    tr (S_x S_y)^1/2 is the sum of square roots of the eigenvalues of S_x S_y. With centred data X, Y those non-zero
    eigenvalues are the squared singular values of X Y^T / sqrt((n-1)(m-1)), so when N < D (every rare class) the
    trace is the nuclear norm of an N x M matrix: exact, real-valued, and fast. Otherwise it is computed from the
    symmetric PSD matrix S_x^1/2 S_y S_x^1/2, which has the same spectrum.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"FD needs at least 2 rows per set, got {len(x)} and {len(y)}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc, yc = x - mu_x, y - mu_y
    n, m, d = len(x), len(y), x.shape[1]
    tr_x, tr_y = (xc ** 2).sum() / (n - 1), (yc ** 2).sum() / (m - 1)
    if min(n, m) < d:
        tr_covmean = linalg.svdvals(xc @ yc.T).sum() / np.sqrt((n - 1) * (m - 1))
    else:
        s_x, s_y = xc.T @ xc / (n - 1), yc.T @ yc / (m - 1)
        r = _sqrt_psd(s_x)
        tr_covmean = np.sqrt(np.clip(linalg.eigvalsh(r @ s_y @ r), 0, None)).sum()
    return float(((mu_x - mu_y) ** 2).sum() + tr_x + tr_y - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------------------------------
# Kernel distance
# ----------------------------------------------------------------------------------------------------------------------

def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (KID's kernel)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid_subsets(x: np.ndarray, y: np.ndarray, subset_size: int = 1000, n_subsets: int = 100,
                seed: int = 0) -> np.ndarray:
    """Unbiased MMD^2 on ``n_subsets`` random subsets of ``subset_size`` rows drawn from each set (no replacement)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 rows per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    return np.array([mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
                     for _ in range(n_subsets)])


def kernel_distance(x: np.ndarray, y: np.ndarray, subset_size: int = 1000, n_subsets: int = 100,
                    seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over subsets of the unbiased MMD^2 (can be slightly negative when the sets match)."""
    v = kid_subsets(x, y, subset_size, n_subsets, seed)
    return float(v.mean()), float(v.std())


# ----------------------------------------------------------------------------------------------------------------------
# Precision / recall / density / coverage (Naeem et al. 2020; P/R as in Kynkaanniemi et al. 2019)
# ----------------------------------------------------------------------------------------------------------------------

def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0, None))


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest other row (the radius of its ball in the k-NN manifold)."""
    if len(x) <= k:
        raise ValueError(f"a k-NN manifold with k={k} needs more than {k} points, got {len(x)}")
    d = _dist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """precision: fake inside the real manifold; recall: real inside the fake manifold; density: mean number of real
    balls holding each fake, / k; coverage: real points whose ball holds at least one fake."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    d = _dist(real, fake)  # (n_real, n_fake)
    inside = d <= r_real[:, None]
    return {
        "precision": float(inside.any(0).mean()),
        "recall": float((d <= r_fake[None, :]).any(1).mean()),
        "density": float(inside.sum(0).mean() / k),
        "coverage": float((d.min(1) <= r_real).mean()),
    }


def realism_inside(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per fake row: inside the real k-NN manifold (bool) and the realism score max_r radius_r / d(r, fake)
    (Kynkaanniemi et al. 2019; >= 1 exactly when inside)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    radii = knn_radii(real, k)
    d = _dist(real, fake)
    score = (radii[:, None] / np.maximum(d, 1e-12)).max(0)
    return score >= 1.0, score


# ----------------------------------------------------------------------------------------------------------------------
# Classifier two-sample test (Lopez-Paz & Oquab 2017)
# ----------------------------------------------------------------------------------------------------------------------

def c2st_scores(x: np.ndarray, y: np.ndarray, folds: int = 5, c: float = 0.01, seed: int = 0) -> np.ndarray:
    """Held-out scores of a logistic regression that tells rows of ``x`` (label 1) from rows of ``y`` (label 0).

    Returns one decision value per row of ``x`` then ``y`` (higher: more like ``x``), each from a model fitted
    without that row (stratified k-fold, ``min(folds, len(x), len(y))`` folds). Features are standardised inside
    each fold; ``c`` is the inverse L2 penalty (strong, for N << D).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = min(folds, len(x), len(y))
    if k < 2:
        raise ValueError(f"C2ST needs at least 2 rows per set and 2 folds, got {len(x)} and {len(y)} rows, "
                         f"{folds} folds")
    feats = np.concatenate([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    target = np.r_[np.ones(len(x)), np.zeros(len(y))]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    return cross_val_predict(model, feats, target, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                             method="decision_function")


def c2st_auc(x: np.ndarray, y: np.ndarray, folds: int = 5, c: float = 0.01, seed: int = 0) -> float:
    """Classifier two-sample test: the ROC AUC of :func:`c2st_scores` (held-out, so no fit to the rows it scores).

    0.5: the sets cannot be told apart; 1: a linear read-out of the features separates them. Why it is here: a
    classifier trained on real + synthetic images can learn "looks synthetic" as evidence for the classes that have
    synthetic images; this measures how visible that look is, per class, where FD and KID only say how far apart the
    sets are.
    """
    return c2st_auc_of(c2st_scores(x, y, folds, c, seed), len(x))


def c2st_auc_of(scores: np.ndarray, n_x: int) -> float:
    """The ROC AUC of :func:`c2st_scores` output whose first ``n_x`` rows are the ``x`` set."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(n_x), np.zeros(len(scores) - n_x)], scores))


# ----------------------------------------------------------------------------------------------------------------------
# Inception Score (only meaningful on Inception's ImageNet logits)
# ----------------------------------------------------------------------------------------------------------------------

def inception_score(logits: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` chunks of a random permutation."""
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p = p[np.random.default_rng(seed).permutation(len(p))]
    scores = []
    for chunk in np.array_split(p, min(splits, len(p))):
        py = chunk.mean(0, keepdims=True)
        kl = (chunk * (np.log(chunk + 1e-12) - np.log(py + 1e-12))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
