"""Linear probes: does a feature matrix predict binary labels (e.g. poster features -> genres)?

Pure torch/numpy. A probe is one L2-regularised logistic regression per label column, fitted on
standardised features, scored with out-of-fold predictions from k-fold cross-validation and ROC-AUC
(0.5 = chance, 1 = perfect ranking).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (n,) for binary `labels` (n,).

    Computed as the Mann-Whitney statistic: the probability that a random positive outscores a random
    negative, ties counting one half (average ranks). Raises ValueError unless both classes occur.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length.")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs both classes; got {n_pos} positives and {n_neg} negatives.")
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks (n,) of `values` (n,), tied values sharing the mean of their ranks."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1          # rank of the first element of each tie group
    return (first_rank + (counts - 1) / 2.0)[inverse]


def kfold_test_indices(n: int, n_folds: int, seed: int = 0) -> list[np.ndarray]:
    """Random partition of range(n) into `n_folds` test folds of near-equal size (each sorted)."""
    if not 2 <= n_folds <= n:
        raise ValueError(f"need 2 <= n_folds <= n, got n_folds={n_folds}, n={n}.")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(fold) for fold in np.array_split(order, n_folds)]


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale both (n, D) matrices with the training mean/std; constant columns get std 1."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, l2: float,
                            max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """One independent logistic regression per label column, fitted jointly with full-batch L-BFGS.

    x: (n, D) float, y: (n, G) {0, 1}. Minimises, per column g, mean_i BCE(x_i w_g + b_g, y_ig)
    + l2 * ||w_g||^2 (bias not penalised). Returns weight (D, G) and bias (G,).
    """
    x, y = x.double(), y.double()
    weight = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    # Start the bias at the log-odds of each label, the optimum of the intercept-only model.
    prior = y.mean(dim=0).clamp(1e-6, 1 - 1e-6)
    bias = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = x @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0).sum()
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated probe outcome.

    auc:          (G,) ROC-AUC of the out-of-fold scores per label column (NaN if a column has one class).
    n_positive:   (G,) positives per column.
    oof_scores:   (n, G) logit of each row from the model that did not see it.
    """

    auc: np.ndarray
    n_positive: np.ndarray
    oof_scores: np.ndarray


def cross_validated_probe(features: np.ndarray, labels: np.ndarray, n_folds: int = 5, l2: float = 1e-2,
                          seed: int = 0, max_iter: int = 100) -> ProbeResult:
    """k-fold linear probe from `features` (n, D) to binary `labels` (n, G).

    Each fold's model is fitted on the other folds (features standardised with their statistics); AUC is
    computed once per column over all out-of-fold scores, so rare labels need not appear in every fold.
    """
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels).astype(bool)
    if labels.ndim == 1:
        labels = labels[:, None]
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {features.shape} and labels {labels.shape} must have the same rows.")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN/inf: select the rows that have features (e.g. has_poster).")
    x_all = torch.from_numpy(features)
    y_all = torch.from_numpy(labels.astype(np.float32))
    oof = np.zeros(labels.shape, dtype=np.float32)
    for test_idx in kfold_test_indices(len(features), n_folds, seed):
        train_mask = np.ones(len(features), dtype=bool)
        train_mask[test_idx] = False
        x_train, x_test = standardise(x_all[train_mask], x_all[test_idx])
        weight, bias = fit_logistic_regression(x_train, y_all[train_mask], l2, max_iter)
        oof[test_idx] = (x_test @ weight + bias).numpy()
    n_positive = labels.sum(axis=0)
    auc = np.array([roc_auc(oof[:, g], labels[:, g]) if 0 < n_positive[g] < len(labels) else np.nan
                    for g in range(labels.shape[1])])
    return ProbeResult(auc=auc, n_positive=n_positive, oof_scores=oof)
