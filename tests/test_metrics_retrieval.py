"""Copy-detection (ISC2021 / SSCD) and class-retrieval metrics against hand-computed values."""
import math

import numpy as np
import pytest

from gissl.metrics import (copy_detection_metrics, map_at_k, micro_average_precision,
                           precision_at_k, recall_at_precision)

# q1: its match first; q2: a tie between a non-match and its match; q3: its match ties with
# q1's non-match across queries; q4: its ground-truth pair is never predicted.
PRED = [("q1", "r1", 0.9, True), ("q1", "r2", 0.5, False), ("q2", "r3", 0.8, False),
        ("q2", "r4", 0.8, True), ("q3", "r5", 0.5, True)]
GT = [("q1", "r1"), ("q2", "r4"), ("q3", "r5"), ("q4", "r9")]


def test_copy_detection_by_hand_with_ties():
    # worst-case order: .9 M, .8 N, .8 M, .5 N, .5 M -> precision 1, 1/2, 2/3, 1/2, 3/5;
    # recall 1/4, 1/4, 2/4, 2/4, 3/4 -> uAP = 1/4 * (1 + 2/3 + 3/5)
    q, r, s, _ = zip(*PRED)
    m = copy_detection_metrics(q, r, s, GT)
    assert math.isclose(m["uAP"], 0.25 * (1 + 2 / 3 + 3 / 5))
    # q1 at rank 0, q2's match ties with a non-match (rank 1), q3 rank 0, q4 missing
    assert math.isclose(m["accuracy@1"], 0.5)
    assert math.isclose(m["recall@10"], 0.75)
    # only the first position reaches precision 0.9
    assert math.isclose(m["recall@P90"], 0.25) and math.isclose(m["threshold@P90"], 0.9)


def test_all_equal_scores_cannot_inflate_ap():
    scores = np.ones(4)
    is_match = np.array([True, False, False, True])
    # worst case: N N M M -> precision 0, 0, 1/3, 1/2; recall steps 1/2 at positions 3 and 4
    assert math.isclose(micro_average_precision(scores, is_match, 2), 0.5 * (1 / 3 + 1 / 2))
    assert recall_at_precision(scores, is_match, 2, 0.9) == (0.0, None)


def test_perfect_and_duplicates():
    m = copy_detection_metrics(["a", "b"], ["x", "y"], [0.2, 0.1], [("a", "x"), ("b", "y")])
    assert m["uAP"] == 1.0 and m["accuracy@1"] == 1.0 and m["recall@P90"] == 1.0
    with pytest.raises(ValueError):
        copy_detection_metrics(["a", "a"], ["x", "x"], [0.2, 0.1], [("a", "x")])


def test_precision_and_map_at_k_by_hand():
    retrieved = np.array([[1, 0, 1], [0, 0, 0]])
    query = np.array([1, 0])
    assert math.isclose(precision_at_k(retrieved, query, 3), (2 / 3 + 1) / 2)
    assert math.isclose(precision_at_k(retrieved, query, 1), 1.0)
    # q1: relevant at ranks 1 and 3 -> P@1 = 1, P@3 = 2/3
    assert math.isclose(map_at_k(retrieved, query, 3), ((1 + 2 / 3) / 2 + 1) / 2)
    assert math.isclose(map_at_k(retrieved, query, 3, num_relevant=[4, 3]), ((1 + 2 / 3) / 3 + 1) / 2)
    assert map_at_k(np.array([[0, 0]]), np.array([1]), 2) == 0.0


def _isc2021_reference(gt_rows, preds):
    """The ISC2021 / SSCD ``evaluate`` (sscd/datasets/isc/metrics.py), re-derived: predictions
    sorted by decreasing (score, not match); recall divides by the number of ground-truth rows
    as listed; ranks are taken per ground-truth row."""
    gt_set = set(gt_rows)
    rows = sorted(((s, (q, r) in gt_set) for q, r, s in preds), key=lambda t: (t[0], not t[1]), reverse=True)
    tp = np.cumsum([m for _, m in rows])
    precision, recall = tp / np.arange(1, len(rows) + 1), tp / len(gt_rows)
    uap = float(((recall - np.concatenate([[0], recall[:-1]])) * precision).sum())
    ranks = []
    for q, r in gt_rows:
        mine = [(s, rr == r) for qq, rr, s in preds if qq == q]
        hit = [s for s, m in mine if m]
        ranks.append(sum(s >= hit[0] for s, _ in mine) - 1 if hit else 1 << 35)
    ranks = np.array(ranks)
    return uap, float((ranks == 0).mean()), float((ranks < 10).mean())


def test_duplicated_ground_truth_rows_count_as_in_isc2021():
    gt = [("a", "x"), ("a", "x"), ("b", "y"), ("c", "w")]
    preds = [("a", "x", 0.9), ("b", "z", 0.8), ("b", "y", 0.7), ("c", "v", 0.6)]
    q, r, s = zip(*preds)
    m = copy_detection_metrics(q, r, s, gt)
    uap, acc1, r10 = _isc2021_reference(gt, preds)
    assert math.isclose(uap, 1 / 4 + 1 / 4 * 2 / 3)  # 4 positives: M N M N
    assert math.isclose(m["uAP"], uap) and math.isclose(m["accuracy@1"], acc1)
    assert math.isclose(m["recall@10"], r10)
    # a duplicated prediction is an error in ISC2021 ("Predictions contains duplicates")
    with pytest.raises(ValueError):
        copy_detection_metrics(q + ("a",), r + ("x",), s + (0.1,), gt)
