"""Held-out metrics (`electra_fast.train.metrics`) against definitions written out naively: all pairs for ROC-AUC, a
walk over every threshold for average precision."""
import math

import pytest
import torch

from electra_fast.train.metrics import average_precision, roc_auc, threshold_metrics
from helpers import naive_ap, naive_auc


@pytest.mark.parametrize("n, levels", [(50, None), (200, 7), (3, 2)])
def test_auc_and_ap_match_naive_definitions_with_ties(n, levels):
    scores = torch.randn(n) if levels is None else torch.randint(0, levels, (n,)).float()
    labels = torch.rand(n) < 0.3
    labels[0], labels[1] = True, False
    s, y = scores.tolist(), labels.tolist()
    assert roc_auc(scores, labels) == pytest.approx(naive_auc(s, y), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(naive_ap(s, y), abs=1e-12)


def test_perfect_and_inverted_rankings():
    labels = torch.tensor([0, 0, 1, 1, 1])
    scores = torch.tensor([0.1, 0.2, 0.7, 0.8, 0.9])
    assert roc_auc(scores, labels) == 1.0 and average_precision(scores, labels) == 1.0
    assert roc_auc(-scores, labels) == 0.0


def test_one_class_only_gives_nan():
    assert math.isnan(roc_auc(torch.rand(5), torch.zeros(5)))
    assert math.isnan(average_precision(torch.rand(5), torch.zeros(5)))


def test_threshold_metrics_against_counts():
    pred = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    true = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool)
    m = threshold_metrics(pred, true)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(4 / 6)
    assert threshold_metrics(torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))["f1"] == 0.0
