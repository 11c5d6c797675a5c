"""Segmentation and depth metrics on hand-made inputs with hand-computed values."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gissl.metrics import depth_errors, segmentation_scores, summarize_segmentation


def _mask(rows, cols, shape=(4, 4)):
    m = torch.zeros(shape, dtype=torch.bool)
    m[rows, cols] = True
    return m


def test_segmentation_scores_hand_computed():
    target = torch.stack([_mask(slice(0, 2), slice(0, 2)),   # 4 px
                          _mask(slice(0, 2), slice(0, 2)),   # polyp, nothing predicted
                          torch.zeros(4, 4, dtype=torch.bool),  # no polyp, false positive
                          torch.zeros(4, 4, dtype=torch.bool)])  # no polyp, nothing predicted
    pred = torch.stack([_mask(slice(0, 2), slice(0, 3)),     # 6 px, 4 of them right
                        torch.zeros(4, 4, dtype=torch.bool),
                        _mask(0, 0),
                        torch.zeros(4, 4, dtype=torch.bool)])
    s = segmentation_scores(pred, target)
    # image 0: Dice 2·4/(6+4) = 0.8, IoU 4/6, precision 4/6, recall 1
    np.testing.assert_allclose([s["dice"][0], s["iou"][0], s["precision"][0], s["recall"][0]],
                               [0.8, 4 / 6, 4 / 6, 1.0])
    # empty prediction on a polyp scores 0 everywhere (the reference's ε/ε gives precision 1)
    assert [s[k][1].item() for k in ("dice", "iou", "precision", "recall")] == [0, 0, 0, 0]
    assert [s[k][2].item() for k in ("dice", "iou", "precision", "recall")] == [0, 0, 0, 0]
    assert s["both_empty"].tolist() == [False, False, False, True]
    assert all(math.isnan(s[k][3].item()) for k in ("dice", "iou", "precision", "recall"))

    summary = summarize_segmentation([s])
    np.testing.assert_allclose(summary["Dice"], 0.8 / 3)
    np.testing.assert_allclose(summary["Recall"], 1 / 3)
    assert summary["Images"] == 4
    assert summary["Empty masks"] == 2 and summary["Empty masks predicted empty"] == 1


def test_segmentation_summary_without_empty_masks_has_reference_keys_only():
    s = segmentation_scores(torch.ones(2, 1, 3, 3), torch.ones(2, 1, 3, 3))
    assert summarize_segmentation(s) == {"Dice": 1.0, "IoU": 1.0, "Precision": 1.0, "Recall": 1.0,
                                         "Images": 2}


def test_depth_errors_match_numpy():
    g = np.random.default_rng(0)
    d = g.uniform(1, 100, size=(3, 10, 12))
    d[d < 20] = 0  # invalid
    p = d + g.normal(0, 5, size=d.shape)
    p = np.clip(p, 0, None)
    d[2] = 0  # no valid pixel → NaN
    got = depth_errors(torch.from_numpy(p), torch.from_numpy(d))
    for i in range(2):
        v = d[i] > 0
        pi, di = p[i][v], d[i][v]
        np.testing.assert_allclose(got["rmse"][i], np.sqrt(np.mean((pi - di) ** 2)))
        np.testing.assert_allclose(got["abs"][i], np.mean(np.abs(pi - di)))
        np.testing.assert_allclose(got["rel_median"][i], np.median(np.abs(pi - di) / di))
        np.testing.assert_allclose(got["abs_rel"][i], np.mean(np.abs(pi - di) / di))
        with np.errstate(divide="ignore"):
            delta = np.mean(np.maximum(pi / di, di / pi) < 1.25)
        np.testing.assert_allclose(got["delta1"][i], delta)
    assert all(math.isnan(got[k][2].item()) for k in got)


def test_fast_median_equals_numpy():
    from gissl.metrics import _median
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 11, 1000, 1001):
        for x in (rng.random(n), rng.integers(0, 4, n).astype(np.float64)):  # ties too
            assert _median(x) == np.median(x)
    x = rng.random(9)
    x[4] = np.nan
    assert np.isnan(_median(x))  # as np.median: a NaN error is not hidden


def _reference_segmentation_scores(pred, target, eps=1e-8):
    """SSL4GIE's per-image scores as its paper code defines them: every ratio (x + ε)/(y + ε)."""
    p, t = pred.flatten().double(), target.flatten().double()
    inter, sp, st = (p * t).sum(), p.sum(), t.sum()
    return {"dice": 2 * (inter + eps) / (sp + st + eps),
            "iou": (inter + eps) / (sp + st - inter + eps),
            "precision": (inter + eps) / (sp + eps), "recall": (inter + eps) / (st + eps)}


def test_reference_smoothing_scores_empty_images_2():
    """What the README says of the reference's smoothing is the reference formula's value,
    and gissl does not inherit it."""
    empty = torch.zeros(4, 4, dtype=torch.bool)
    polyp = _mask(slice(0, 2), slice(0, 2))
    ref = _reference_segmentation_scores(empty, empty)
    assert ref["dice"].item() == pytest.approx(2.0) and ref["iou"].item() == pytest.approx(1.0)
    assert ref["precision"].item() == pytest.approx(1.0) and ref["recall"].item() == pytest.approx(1.0)
    ref = _reference_segmentation_scores(empty, polyp)  # nothing predicted on a polyp
    assert ref["precision"].item() == pytest.approx(1.0) and ref["dice"].item() < 1e-8
    ours = segmentation_scores(torch.stack([empty, empty]), torch.stack([empty, polyp]))
    assert ours["both_empty"].tolist() == [True, False]
    assert math.isnan(ours["dice"][0].item()) and ours["precision"][1].item() == 0.0
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "neither a polyp nor a prediction gets Dice 2ε/ε = **2.0**" in readme
