"""Classification metrics of gissl.metrics against scikit-learn, incl. absent / never-predicted classes."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from gissl.errors import UserError
from gissl.metrics import binary_auroc, classification_metrics, confusion_matrix, topk_accuracy


def _random_case(seed, n=200, c=6, absent=(), never_predicted=()):
    rng = np.random.default_rng(seed)
    allowed_t = [k for k in range(c) if k not in absent]
    target = rng.choice(allowed_t, size=n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), target] += 1.0  # better than chance, still many errors
    for k in never_predicted:
        logits[:, k] = -1e9
    probs = torch.softmax(torch.tensor(logits), 1).numpy()
    return target, probs.argmax(1), probs


@pytest.mark.parametrize("absent,never", [((), ()), ((2,), ()), ((), (4,)), ((1, 5), (3,)), ((0,), (0,))])
def test_against_sklearn(absent, never):
    target, pred, probs = _random_case(len(absent) * 10 + len(never), absent=absent, never_predicted=never)
    c = probs.shape[1]
    m = classification_metrics(target, pred, probs, num_classes=c)
    present = sorted(set(target.tolist()))
    p, r, f, _ = skm.precision_recall_fscore_support(target, pred, labels=present, average="macro", zero_division=0)
    assert m["macro_precision"] == pytest.approx(p)
    assert m["macro_recall"] == pytest.approx(r)
    assert m["macro_f1"] == pytest.approx(f)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(target, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(target, pred))
    aucs = [skm.roc_auc_score(target == k, probs[:, k]) for k in present]
    assert m["macro_auroc"] == pytest.approx(np.mean(aucs))
    assert m["top3_accuracy"] == pytest.approx(skm.top_k_accuracy_score(target, probs, k=3, labels=range(c)))
    assert m["absent_classes"] == [str(k) for k in absent]
    assert torch.equal(m["confusion"], torch.tensor(skm.confusion_matrix(target, pred, labels=range(c))))
    for k, row in enumerate(m["per_class"]):
        if k in absent:
            assert math.isnan(row["recall"]) and math.isnan(row["f1"]) and row["support"] == 0
        if k in never:
            assert row["predicted"] == 0 and math.isnan(row["precision"])
            if k not in absent:
                assert row["f1"] == 0.0  # the reference would have scored precision 1 here


def test_never_predicted_class_is_not_rewarded():
    # Reference smoothing gives the never-predicted class precision ε/ε = 1; here it is 0.
    m = classification_metrics([0, 0, 1, 1], [0, 0, 0, 0], num_classes=2)
    assert m["macro_precision"] == pytest.approx(0.25)
    assert m["macro_recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(skm.f1_score([0, 0, 1, 1], [0, 0, 0, 0], average="macro", zero_division=0))


def test_auroc_ties_and_topk_and_confusion():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=100).astype(float)  # many ties
    pos = rng.random(100) < 0.4
    assert binary_auroc(scores, pos) == pytest.approx(skm.roc_auc_score(pos, scores))
    assert math.isnan(binary_auroc(scores, np.zeros(100, bool)))
    probs = rng.random((50, 5))
    t = rng.integers(0, 5, 50)
    assert topk_accuracy(t, probs, 2) == pytest.approx(skm.top_k_accuracy_score(t, probs, k=2))
    cm = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]


def test_empty_split_is_a_user_error():
    with pytest.raises(UserError, match="empty"):
        classification_metrics([], [], num_classes=3)


def test_reference_smoothing_gives_absent_class_f1_2():
    """SSL4GIE's macro scores, re-derived from their definition (every class, ε = 1e-8):
    F1_c = 2(|P_c ∩ T_c| + ε)/(|P_c| + |T_c| + ε). A class with no test image and no prediction
    gets F1 2.0 and lifts the reference's mF1 above 1; gissl lists it apart instead."""
    target, pred, c, eps = [0, 0, 1, 1], [0, 0, 1, 1], 3, 1e-8
    t, p = np.asarray(target), np.asarray(pred)
    ref_f1 = [2 * (np.sum((p == k) & (t == k)) + eps) / (np.sum(p == k) + np.sum(t == k) + eps) for k in range(c)]
    ref_precision = [(np.sum((p == k) & (t == k)) + eps) / (np.sum(p == k) + eps) for k in range(c)]
    assert ref_f1[2] == pytest.approx(2.0) and ref_precision[2] == pytest.approx(1.0)
    assert np.mean(ref_f1) == pytest.approx(4 / 3)
    m = classification_metrics(target, pred, num_classes=c)
    assert m["macro_f1"] == pytest.approx(1.0) and m["absent_classes"] == ["2"]
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "precision 1, recall 1 and F1 2ε/ε = **2.0**" in readme
