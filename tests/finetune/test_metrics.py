"""Metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.metrics import (
    average_clips,
    ccc,
    classification_metrics,
    confusion_matrix,
    pcc,
    regression_metrics,
)


def _onehot(pred, c):
    return np.eye(c)[pred]


def test_uar_differs_from_war_on_an_unbalanced_set():
    # class 0: 8 samples, 7 right; class 1: 2 samples, 0 right
    target = np.array([0] * 8 + [1] * 2)
    pred = np.array([0] * 7 + [1] + [0, 0])
    m = classification_metrics(_onehot(pred, 2), target, 2)
    assert m["war"] == pytest.approx(7 / 10)
    assert m["uar"] == pytest.approx((7 / 8 + 0 / 2) / 2)
    # F1 class 0: tp 7, fp 2, fn 1 -> 14/17; class 1: tp 0 -> 0
    assert m["macro_f1"] == pytest.approx((14 / 17 + 0) / 2)
    assert m["confusion"] == [[7, 1], [2, 0]]


def test_class_absent_from_targets_is_left_out_of_uar():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 never true, predicted once
    m = classification_metrics(_onehot(pred, 3), target, 3)
    assert m["uar"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["per_class_recall"][2] is None
    # F1: class0 tp1 fn1 -> 2/3; class1 tp2 -> 1; class 2 absent -> excluded
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_confusion_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2)


def test_ccc_and_pcc_match_hand_computation():
    p = torch.tensor([1.0, 2.0, 3.0, 4.0])
    t = torch.tensor([2.0, 4.0, 6.0, 8.0])
    # PCC = 1 (t = 2 p); CCC: mu 2.5 vs 5, var 1.25 vs 5, cov 2.5 -> 5 / (1.25 + 5 + 6.25) = 0.4
    assert float(pcc(p, t)) == pytest.approx(1.0)
    assert float(ccc(p, t)) == pytest.approx(0.4)
    assert float(ccc(t, t)) == pytest.approx(1.0)
    assert float(pcc(p, -p)) == pytest.approx(-1.0)
    m = regression_metrics(
        torch.stack([p, p], 1).numpy(), torch.stack([t, p], 1).numpy(), ["valence", "arousal"]
    )
    assert m["ccc_valence"] == pytest.approx(0.4) and m["ccc_arousal"] == pytest.approx(1.0)
    assert m["ccc"] == pytest.approx(0.7)


def test_clip_averaging_takes_the_mean_of_window_probabilities():
    keys = ["a", "b", "a", "b"]
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.2, 0.8], [0.4, 0.6]])
    clips, scores, targets = average_clips(keys, probs, np.array([0, 1, 0, 1]))
    assert clips == ["a", "b"]
    np.testing.assert_allclose(scores, [[0.55, 0.45], [0.3, 0.7]])
    assert targets.tolist() == [0, 1]
    with pytest.raises(ValueError, match="clip 'a' carry different labels"):
        average_clips(keys, probs, np.array([0, 1, 1, 1]))
