"""Ranking and threshold metrics of the discriminator on held-out data (replaced = positive), in torch.

Computed once per evaluation over every real token of the held-out split, on whatever device the scores are:
a sort, a cumulative sum and no Python loop. Ties are handled exactly (ROC-AUC counts a tied pair as one half,
as the Mann-Whitney statistic; average precision steps at each distinct score, as scikit-learn's).
"""
from __future__ import annotations

import torch


def _distinct_score_counts(scores: torch.Tensor, labels: torch.Tensor):
    """Per distinct score, descending: (true positives, false positives) with exactly that score."""
    scores, labels = scores.reshape(-1).double(), labels.reshape(-1).bool()
    order = torch.argsort(scores, descending=True)
    s, y = scores[order], labels[order].double()
    _, counts = torch.unique_consecutive(s, return_counts=True)
    ends = torch.cumsum(counts, 0) - 1
    cum_pos = torch.cumsum(y, 0)[ends]
    tp = torch.diff(cum_pos, prepend=cum_pos.new_zeros(1))
    return tp, counts.double() - tp


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 P(tie). NaN without both classes."""
    tp, fp = _distinct_score_counts(scores, labels)
    pos, neg = tp.sum(), fp.sum()
    if pos == 0 or neg == 0:
        return float("nan")
    neg_above = torch.cumsum(fp, 0) - fp  # negatives with a strictly higher score
    wins = (tp * (neg - neg_above - fp)).sum() + 0.5 * (tp * fp).sum()
    return float(wins / (pos * neg))


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum over thresholds of precision x recall increment (scikit-learn's definition). NaN without positives."""
    tp, fp = _distinct_score_counts(scores, labels)
    pos = tp.sum()
    if pos == 0:
        return float("nan")
    ctp, cfp = torch.cumsum(tp, 0), torch.cumsum(fp, 0)
    return float((ctp / (ctp + cfp) * tp / pos).sum())


def threshold_metrics(predicted: torch.Tensor, labels: torch.Tensor) -> dict:
    """Precision, recall and F1 of the positive class, and accuracy; 0 where a denominator is 0."""
    predicted, labels = predicted.reshape(-1).bool(), labels.reshape(-1).bool()
    tp = float((predicted & labels).sum())
    pred_pos, pos, n = float(predicted.sum()), float(labels.sum()), labels.numel()
    precision = tp / pred_pos if pred_pos else 0.0
    recall = tp / pos if pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = float((predicted == labels).sum()) / n if n else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy}


__all__ = ["roc_auc", "average_precision", "threshold_metrics"]
