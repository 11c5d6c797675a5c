"""gissl.metrics.coco_map against pycocotools' COCOeval on random and edge-case inputs."""
import contextlib
import io
import math

import numpy as np
import pytest

from gissl.metrics import coco_box_iou, coco_map

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

STATS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
         "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def _xywh(boxes):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def pycoco_stats(predictions, targets):
    """COCOeval's 12 summary numbers for the same inputs (image ids 1..N, -1 -> NaN)."""
    anns, results = [], []
    for i, (pred, tgt) in enumerate(zip(predictions, targets), start=1):
        crowd = tgt.get("iscrowd", np.zeros(len(tgt["labels"]), dtype=int))
        for box, label, c in zip(_xywh(tgt["boxes"]), tgt["labels"], crowd):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label),
                         "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": int(c)})
        for box, label, score in zip(_xywh(pred["boxes"]), pred["labels"], pred["scores"]):
            results.append({"image_id": i, "category_id": int(label), "bbox": box.tolist(),
                            "score": float(score)})
    labels = sorted({a["category_id"] for a in anns} | {r["category_id"] for r in results})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(1, len(targets) + 1)], "annotations": anns,
                      "categories": [{"id": c} for c in labels]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float("nan") if s == -1 else float(s) for s in ev.stats]


def assert_equal_to_pycocotools(predictions, targets):
    ours = coco_map(predictions, targets)
    ref = pycoco_stats(predictions, targets)
    for name, r in zip(STATS, ref):
        if math.isnan(r):
            assert math.isnan(ours[name]), name
        else:
            assert ours[name] == pytest.approx(r, abs=1e-12), name
    return ours


def random_boxes(rng, n, size=400):
    xy = rng.uniform(0, size * 0.8, (n, 2))
    # side lengths spanning the small (<32²), medium and large (>96²) area ranges
    wh = np.exp(rng.uniform(np.log(4), np.log(size * 0.6), (n, 2)))
    return np.concatenate([xy, xy + wh], axis=1)


def random_case(rng, n_images, n_classes=1, score_levels=None, max_gt=4, max_extra=6):
    predictions, targets = [], []
    for _ in range(n_images):
        gt = random_boxes(rng, rng.integers(0, max_gt + 1))
        gt_labels = rng.integers(1, n_classes + 1, len(gt))
        # detections: jittered copies of some ground truth (near hits at various IoU) + clutter
        keep = rng.random(len(gt)) < 0.8
        jitter = gt[keep] + rng.normal(0, 6, (int(keep.sum()), 4))
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        dt = np.concatenate([jitter, random_boxes(rng, rng.integers(0, max_extra + 1))])
        dt_labels = np.concatenate([gt_labels[keep], rng.integers(1, n_classes + 1, len(dt) - keep.sum())])
        scores = rng.random(len(dt))
        if score_levels:
            scores = np.round(scores * score_levels) / score_levels  # many exact ties
        predictions.append({"boxes": dt, "scores": scores, "labels": dt_labels})
        targets.append({"boxes": gt, "labels": gt_labels})
    return predictions, targets


@pytest.mark.parametrize("seed", range(4))
def test_random_inputs_match_pycocotools(seed):
    rng = np.random.default_rng(seed)
    assert_equal_to_pycocotools(*random_case(rng, n_images=12, n_classes=1 + seed % 3))


def test_tied_scores_match_pycocotools():
    rng = np.random.default_rng(10)
    assert_equal_to_pycocotools(*random_case(rng, n_images=15, n_classes=2, score_levels=3))


def test_many_images_match_pycocotools():
    rng = np.random.default_rng(11)
    ours = assert_equal_to_pycocotools(*random_case(rng, n_images=150, max_gt=3, max_extra=3))
    assert 0 < ours["map"] < 1


def test_more_than_100_detections_in_an_image_match_pycocotools():
    rng = np.random.default_rng(12)
    predictions, targets = random_case(rng, n_images=3)
    predictions[0] = {"boxes": random_boxes(rng, 150), "scores": rng.random(150),
                      "labels": np.ones(150, dtype=np.int64)}
    targets[0] = {"boxes": predictions[0]["boxes"][::7] + 1.0, "labels": np.ones(22, dtype=np.int64)}
    assert_equal_to_pycocotools(predictions, targets)


def test_images_without_ground_truth_or_without_predictions_match_pycocotools():
    rng = np.random.default_rng(13)
    predictions, targets = random_case(rng, n_images=8)
    targets[1] = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, dtype=np.int64)}  # only false positives
    predictions[2] = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, dtype=np.int64)}
    targets[3] = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, dtype=np.int64)}
    predictions[3] = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, dtype=np.int64)}
    assert_equal_to_pycocotools(predictions, targets)


def test_crowd_ground_truth_matches_pycocotools():
    rng = np.random.default_rng(14)
    predictions, targets = random_case(rng, n_images=6, max_gt=5)
    for t in targets:
        t["iscrowd"] = (rng.random(len(t["labels"])) < 0.3).astype(int)
    assert_equal_to_pycocotools(predictions, targets)


def test_perfect_and_empty_predictions_known_values():
    rng = np.random.default_rng(15)
    targets = [{"boxes": random_boxes(rng, 3), "labels": np.ones(3, dtype=np.int64)} for _ in range(4)]
    perfect = [{"boxes": t["boxes"], "scores": np.linspace(1, 0.5, 3), "labels": t["labels"]} for t in targets]
    assert coco_map(perfect, targets)["map"] == pytest.approx(1.0)
    assert coco_map(perfect, targets)["mar_100"] == pytest.approx(1.0)
    # no predictions at all (pycocotools cannot even load an empty result list): AP 0, not NaN
    none = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)} for _ in targets]
    result = coco_map(none, targets)
    assert result["map"] == 0.0 and result["map_50"] == 0.0 and result["mar_100"] == 0.0
    # no ground truth anywhere: nothing to measure, reported as NaN (pycocotools: -1)
    empty = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0)} for _ in targets]
    assert math.isnan(coco_map(perfect, empty)["map"])


def test_box_iou_known_values():
    ious = coco_box_iou([[0, 0, 10, 10], [5, 5, 10, 10], [20, 20, 0, 0]], [[0, 0, 10, 10]])
    np.testing.assert_allclose(ious[:, 0], [1.0, 25 / 175, 0.0])
    # crowd ground truth: union is the detection's area
    np.testing.assert_allclose(coco_box_iou([[5, 5, 10, 10]], [[0, 0, 10, 10]], [1]), [[0.25]])
