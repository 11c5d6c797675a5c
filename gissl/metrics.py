"""Evaluation metrics, each defined without the reference's smoothing artefacts.

The SSL4GIE code scores every ratio as (x + ε) / (y + ε), ε = 1e-8. Where y = 0 that gives
ε/ε = 1 for a ratio (precision of an empty prediction or of a never-predicted class) and
2ε/ε = 2.0 for a Dice or F1 score (an image with neither a polyp nor a prediction; a class
with no test sample and no prediction, which the reference averages into its macro F1).
Here an undefined ratio is reported as such (NaN or a separate count), never as 1 or 2.
"""
import math

import numpy as np
import torch

# ---- segmentation / depth (helper: seg-depth) ----

def segmentation_scores(pred, target):
    """Per-image Dice, IoU, precision and recall of binary masks, without ε smoothing.

    pred, target: (N, ...) bool (or 0/1) masks. Returns a dict of (N,) float64 tensors
    ``dice``, ``iou``, ``precision``, ``recall`` and bool tensors ``both_empty``, ``target_empty``.

    A ratio whose denominator is 0 scores 0 (an empty prediction on a polyp, a prediction on
    an image without one) — the reference's ε smoothing gives such a precision or recall 1.
    An empty prediction on an empty mask has no defined score at all: it is flagged in
    ``both_empty`` (its scores are NaN) and :func:`summarize_segmentation` reports it apart.
    """
    p = pred.reshape(pred.shape[0], -1).bool()
    t = target.reshape(target.shape[0], -1).bool()
    # count_nonzero of each flat row: several times faster than summing bools or counting along
    # a dimension on CPU (a 1072x1280 original)
    def counts(x):
        return torch.tensor([int(torch.count_nonzero(row)) for row in x], dtype=torch.float64)
    inter, np_, nt = counts(p & t), counts(p), counts(t)
    union = np_ + nt - inter

    def ratio(num, den):
        return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))

    both_empty = (np_ == 0) & (nt == 0)
    scores = {"dice": ratio(2 * inter, np_ + nt), "iou": ratio(inter, union),
              "precision": ratio(inter, np_), "recall": ratio(inter, nt)}
    scores = {k: torch.where(both_empty, torch.full_like(v, float("nan")), v) for k, v in scores.items()}
    scores["both_empty"] = both_empty
    scores["target_empty"] = nt == 0
    return scores


def summarize_segmentation(per_image):
    """Average per-image scores (dicts of :func:`segmentation_scores`, or one concatenated dict).

    Returns ``{"Dice", "IoU", "Precision", "Recall"}`` means over images with a polyp or a
    prediction, plus ``"Images"`` and, when any ground-truth mask is empty, ``"Empty masks"``
    and ``"Empty masks predicted empty"`` counts. Means are NaN when no image qualifies.
    """
    if isinstance(per_image, (list, tuple)):
        per_image = {k: torch.cat([d[k] for d in per_image]) for k in per_image[0]}
    keep = ~per_image["both_empty"]
    out = {}
    for key, name in (("dice", "Dice"), ("iou", "IoU"), ("precision", "Precision"), ("recall", "Recall")):
        out[name] = per_image[key][keep].mean().item() if keep.any() else float("nan")
    out["Images"] = int(keep.numel())
    empty = int(per_image["target_empty"].sum())
    if empty:
        out["Empty masks"] = empty
        out["Empty masks predicted empty"] = int(per_image["both_empty"].sum())
    return out


def _median(x, count=None, start=0):
    """np.median of a 1-D float array, or of its ``count`` values from sorted place ``start`` on
    when the other values are known to sort below them (depth_errors: the invalid pixels' zeros):
    the mean of the two middle values of an even count (torch.median takes the lower one), NaN if
    any value is NaN, from one O(n) partition around the upper middle (everything left of it is
    smaller, so the lower middle is their maximum). Five times faster than np.median on a C3VD
    frame, which partitions around two values and the end."""
    n = x.size if count is None else count
    if count is None and np.isnan(x).any():
        return float("nan")
    k = start + n // 2
    part = np.partition(x, k)
    if n % 2:
        return float(part[k])
    return float((part[:k].max() + part[k]) / 2)


def depth_errors(pred, target, valid=None):
    """Per-frame depth errors over valid pixels (docs/ssl4gie-study.md §5.4 plus the usual δ and abs-rel).

    pred, target: (N, ...) depth in one unit (gissl: millimetres); valid: bool, default
    ``target > 0``. Returns a dict of (N,) float64 tensors: ``rmse``, ``abs`` (mean |p−d|),
    ``rel_median`` (median |p−d|/d, the reference's "Relative Error"), ``abs_rel``
    (mean |p−d|/d), ``delta1`` (fraction with max(p/d, d/p) < 1.25) and ``constant_rmse``
    (RMSE of the best constant prediction, the frame's mean valid depth: a baseline any model
    must beat). Frames without a valid pixel get NaN. Each frame is computed alone, so the
    numbers do not depend on how frames are batched.

    Everything is computed in the inputs' dtype (torch's float32 sums are cascaded, so their
    relative error stays near 1e-7 on a frame), with invalid pixels zeroed rather than selected:
    float64 inputs give the float64 formulas' values and float32 ones (an eval pass) agree with
    them to ~1e-6 relative, at a fraction of the cost (a C3VD frame has 1.46 M pixels; widening and
    selecting each frame in NumPy took several times the model's forward pass).
    """
    n = pred.shape[0]
    dtype = torch.promote_types(pred.dtype, target.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    p = pred.detach().reshape(n, -1).to(dtype)
    d = target.detach().reshape(n, -1).to(dtype)
    if valid is not None:  # invalid pixels as 0 ground truth, which the default rule (d > 0) skips
        d = d.masked_fill(~valid.detach().reshape(d.shape).bool().to(d.device), 0)
    keys = ("rmse", "abs", "rel_median", "abs_rel", "delta1", "constant_rmse")
    rows = [_frame_depth_errors(pi, di) for pi, di in zip(p, d)]
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in keys}


def _frame_depth_errors(p, d):
    """:func:`depth_errors` of one flat frame, valid where ``d > 0``. Float arithmetic only (a
    mask m = sign(max(d, 0)) instead of boolean selection, which costs 4x a float pass), one
    frame at a time so its 1.46 M pixels stay in cache."""
    nan = float("nan")
    if math.isnan(float(d.sum())):  # NaN ground truth is invalid (NaN > 0 is false): zero it first
        d = torch.nan_to_num(d, nan=0.0, posinf=math.inf, neginf=-math.inf)
    dz = d.clamp_min(0)
    m = torch.sign(dz)                 # 1 on valid pixels, 0 elsewhere
    count = float(m.sum())
    if count == 0:
        return dict.fromkeys(("rmse", "abs", "rel_median", "abs_rel", "delta1", "constant_rmse"), nan)
    # invalid pixels: p = d = 0, so every term below is 0 there (a non-finite prediction on an
    # invalid pixel must not leak in through 0 * inf = NaN)
    pz = p * m if math.isfinite(float(p.sum())) else torch.where(m > 0, p, 0)
    err = (pz - dz).abs_()
    den = (dz - m).add_(1)             # d on valid pixels, 1 elsewhere: no 0/0
    rel = err / den
    out = {"rmse": math.sqrt(float((err * err).sum()) / count), "abs": float(err.sum()) / count}
    rel_sum = float(rel.sum())
    out["abs_rel"] = rel_sum / count
    # max(p/d, d/p) < 1.25 without the second full-frame division: p/d < 1.25 and d/p < 1.25
    # ⇔ 0.8 < p/d < 1.25 for p > 0 (p = 0 fails both forms, as does every invalid pixel: 0/1)
    ratio = pz.div_(den)
    out["delta1"] = int(torch.count_nonzero((ratio < 1.25) & (ratio > 0.8))) / count
    const = torch.tensor(float(dz.sum()) / count, dtype=d.dtype)  # the best constant, in d's dtype
    c = (dz - const).mul_(m)
    out["constant_rmse"] = math.sqrt(float((c * c).sum()) / count)
    # the median of the valid errors: the invalid pixels' are 0, the smallest, so the valid ones
    # take the sorted places from len - count on (a NaN error makes the sum and the median NaN)
    start = rel.numel() - int(count)
    out["rel_median"] = nan if math.isnan(rel_sum) else _median(rel.cpu().numpy(), int(count), start)
    return out


# ---- classification (helper: classification) ----
from gissl.errors import UserError  # noqa: E402  (kept inside this section: shared file)

# Macro scores average over the classes present in the evaluated targets only; a class that is
# never predicted scores precision 0 (not the reference's ε/ε = 1) and a
# class absent from the targets is listed, not averaged in. Definitions equal scikit-learn's
# `precision_recall_fscore_support(labels=present, zero_division=0)` and torchmetrics' macro
# metrics (docs/transfer-study.md §c.2); tests check them against scikit-learn.


def confusion_matrix(target, pred, num_classes):
    """Counts `(C, C)` int64, rows = true class, columns = predicted class.

    target, pred: `(N,)` integer class ids in `[0, num_classes)`.
    """
    target = torch.as_tensor(target).long().flatten()
    pred = torch.as_tensor(pred).long().flatten()
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def binary_auroc(scores, positive):
    """ROC AUC of `scores (N,)` for the boolean `positive (N,)`, ties counted half (Mann-Whitney U).

    NaN when one of the two groups is empty (AUROC is undefined there).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positive = torch.as_tensor(positive).bool().flatten()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average ranks over tied scores, then U = rank-sum of positives − n_pos(n_pos+1)/2
    sorted_scores, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based mean rank of each tie group
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def topk_accuracy(target, probs, k):
    """Fraction of rows whose true class is among the `k` highest of `probs (N, C)`."""
    target = torch.as_tensor(target).long().flatten()
    probs = torch.as_tensor(probs)
    k = min(k, probs.shape[1])
    top = probs.topk(k, dim=1).indices
    return float((top == target[:, None]).any(dim=1).double().mean())


def classification_metrics(target, pred, probs=None, num_classes=None, class_names=None, topk=(3, 5)):
    """All classification scores for one evaluated split.

    target, pred: `(N,)` class ids; probs: optional `(N, C)` class probabilities (AUROC, top-k).
    Returns a dict: `accuracy`, `balanced_accuracy`, `macro_f1`, `macro_precision`,
    `macro_recall` (macro over classes present in `target`), `macro_auroc` (one-vs-rest on
    `probs`, mean over present classes), `top{k}_accuracy` for each k < C, `absent_classes`
    (names of classes with no target sample), `per_class` (list of dicts: name, support,
    predicted, precision, recall, f1, auroc; NaN where undefined) and `confusion` `(C, C)`.
    """
    target = torch.as_tensor(target).long().flatten()
    pred = torch.as_tensor(pred).long().flatten()
    if target.numel() == 0:
        raise UserError("cannot compute classification metrics on an empty split (0 samples)")
    if target.shape != pred.shape:
        raise UserError(f"targets {tuple(target.shape)} and predictions {tuple(pred.shape)} differ in length")
    if num_classes is None:
        num_classes = probs.shape[1] if probs is not None else int(max(target.max(), pred.max())) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    cm = confusion_matrix(target, pred, num_classes)
    tp = cm.diag().double()
    support = cm.sum(1).double()
    predicted = cm.sum(0).double()
    present = support > 0
    nan = torch.full_like(tp, float("nan"))
    recall = torch.where(present, tp / support.clamp(min=1), nan)
    precision_defined = tp / predicted.clamp(min=1)  # 0 for a never-predicted class
    precision = torch.where(predicted > 0, precision_defined, nan)
    f1 = torch.where(present, 2 * tp / (support + predicted).clamp(min=1), nan)  # = 2PR/(P+R), 0 if TP=0
    auroc = [float("nan")] * num_classes
    if probs is not None:
        probs = torch.as_tensor(probs).double()
        for c in range(num_classes):
            if present[c]:
                auroc[c] = binary_auroc(probs[:, c], target == c)
    out = {
        "accuracy": float((pred == target).double().mean()),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "macro_precision": float(precision_defined[present].mean()),
        "macro_recall": float(recall[present].mean()),
    }
    defined = [a for a in auroc if a == a]
    out["macro_auroc"] = float(np.mean(defined)) if defined else float("nan")
    if probs is not None:
        for k in topk:
            if k < num_classes:
                out[f"top{k}_accuracy"] = topk_accuracy(target, probs, k)
    out["absent_classes"] = [names[c] for c in range(num_classes) if not present[c]]
    out["per_class"] = [
        {"name": names[c], "support": int(support[c]), "predicted": int(predicted[c]),
         "precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
         "auroc": auroc[c]}
        for c in range(num_classes)]
    out["confusion"] = cm
    return out


def format_per_class(metrics):
    """The `per_class` table of :func:`classification_metrics` as aligned text lines."""
    width = max([len("class")] + [len(r["name"]) for r in metrics["per_class"]])
    lines = [f"{'class':<{width}}  support  predicted  precision  recall     f1  auroc"]
    for r in metrics["per_class"]:
        lines.append(f"{r['name']:<{width}}  {r['support']:7d}  {r['predicted']:9d}  {r['precision']:9.4f}"
                     f"  {r['recall']:6.4f}  {r['f1']:5.4f}  {r['auroc']:5.4f}")
    return lines


# ---- detection: COCO mAP (helper: detection) ----
# Box AP/AR written here so that validation needs no pycocotools, yet equal to pycocotools'
# COCOeval(iouType="bbox") number for number (tests/test_metrics_detection.py checks it):
# 10 IoU thresholds .50:.05:.95, 101 recall points, greedy score-ordered matching, area ranges
# small/medium/large (32², 96²), at most 1/10/100 detections per image, macro over classes.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
COCO_AREA_RANGES = {"all": (0.0, 1e5**2), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2),
                    "large": (96.0**2, 1e5**2)}
COCO_MAX_DETS = (1, 10, 100)


def _numpy(x, dtype):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def coco_box_iou(dt_xywh, gt_xywh, gt_crowd=None):
    """IoU as pycocotools computes it for boxes: dt (D, 4), gt (G, 4) xywh -> (D, G) float64.

    For a crowd ground truth the union is the detection's own area (COCO's crowd rule).
    """
    d = _numpy(dt_xywh, np.float64).reshape(-1, 4)[:, None, :]
    g = _numpy(gt_xywh, np.float64).reshape(-1, 4)[None, :, :]
    w = np.minimum(d[..., 0] + d[..., 2], g[..., 0] + g[..., 2]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 1] + d[..., 3], g[..., 1] + g[..., 3]) - np.maximum(d[..., 1], g[..., 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    d_area, g_area = d[..., 2] * d[..., 3], g[..., 2] * g[..., 3]
    union = d_area + g_area - inter
    if gt_crowd is not None:
        union = np.where(_numpy(gt_crowd, bool)[None, :], d_area, union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / np.where(inter > 0, union, 1.0), 0.0)


def _greedy_match(ious, gt_ignore, gt_crowd):
    """COCOeval.evaluateImg's matching for all IoU thresholds at once.

    ious (D, G) with detections by descending score and ground truth ignore-last. Each detection
    takes the still free ground truth of highest IoU >= threshold (ties: the later one, as in
    pycocotools), preferring non-ignored ones; crowd ground truth can be taken many times.
    Returns the matched ground-truth index per (threshold, detection), -1 when unmatched: (T, D).
    """
    n_dt, n_gt = ious.shape
    thr = np.minimum(COCO_IOU_THRESHOLDS, 1 - 1e-10)[:, None]
    match = np.full((len(thr), n_dt), -1)
    taken = np.zeros((len(thr), n_gt), dtype=bool)
    if n_gt == 0:
        return match
    for d in np.flatnonzero(ious.max(axis=1) >= thr[0, 0]):
        ok = (~taken | gt_crowd[None, :]) & (ious[d][None, :] >= thr)
        for group in (~gt_ignore, gt_ignore):
            cand = ok & group[None, :] & (match[:, d] < 0)[:, None]
            best = n_gt - 1 - np.argmax(np.where(cand, ious[d], -np.inf)[:, ::-1], axis=1)
            hit = cand.any(axis=1)
            match[hit, d] = best[hit]
        rows = np.flatnonzero(match[:, d] >= 0)
        taken[rows, match[rows, d]] = True
    return match


def coco_map(predictions, targets):
    """COCO box AP/AR over a set of images, equal to pycocotools' COCOeval summary.

    predictions: list (one per image) of dicts `boxes (n, 4)` xyxy, `scores (n,)`, `labels (n,)`;
    targets: list (same images, same order) of dicts `boxes (m, 4)` xyxy, `labels (m,)` and
    optionally `area (m,)` (default box area) and `iscrowd (m,)`. Images without ground truth or
    without predictions are fine. Returns floats `map` (AP@[.5:.95]), `map_50`, `map_75`,
    `map_small/medium/large`, `mar_1`, `mar_10`, `mar_100`, `mar_small/medium/large`; a value
    pycocotools reports as -1 (no ground truth to measure it on) is NaN here.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"coco_map got {len(predictions)} predictions for {len(targets)} images")
    images = []
    for pred, tgt in zip(predictions, targets):
        g_xyxy = _numpy(tgt["boxes"], np.float64).reshape(-1, 4)
        d_xyxy = _numpy(pred["boxes"], np.float64).reshape(-1, 4)
        g = np.concatenate([g_xyxy[:, :2], g_xyxy[:, 2:] - g_xyxy[:, :2]], axis=1)
        d = np.concatenate([d_xyxy[:, :2], d_xyxy[:, 2:] - d_xyxy[:, :2]], axis=1)
        images.append(dict(
            gt=g, gt_labels=_numpy(tgt["labels"], np.int64).reshape(-1),
            gt_area=_numpy(tgt["area"], np.float64).reshape(-1) if "area" in tgt else g[:, 2] * g[:, 3],
            gt_crowd=_numpy(tgt.get("iscrowd", np.zeros(len(g))), bool).reshape(-1),
            dt=d, dt_scores=_numpy(pred["scores"], np.float64).reshape(-1),
            dt_labels=_numpy(pred["labels"], np.int64).reshape(-1)))
    classes = np.unique(np.concatenate([im["gt_labels"] for im in images] + [np.zeros(0, np.int64)]))
    areas = list(COCO_AREA_RANGES.values())
    n_t, n_r, n_k, n_a, n_m = len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_THRESHOLDS), len(classes), len(areas), len(COCO_MAX_DETS)
    precision = -np.ones((n_t, n_r, n_k, n_a, n_m))
    recall = -np.ones((n_t, n_k, n_a, n_m))
    for k, cls in enumerate(classes):
        per_area = [[] for _ in areas]  # per area range: (scores, matched, ignored, n_gt) per image
        for im in images:
            gi, di = np.flatnonzero(im["gt_labels"] == cls), np.flatnonzero(im["dt_labels"] == cls)
            if len(gi) == 0 and len(di) == 0:
                continue
            # stable sort as pycocotools (mergesort): ties keep input order
            di = di[np.argsort(-im["dt_scores"][di], kind="mergesort")][: COCO_MAX_DETS[-1]]
            dt, scores = im["dt"][di], im["dt_scores"][di]
            dt_area = dt[:, 2] * dt[:, 3]
            for a, (lo, hi) in enumerate(areas):
                g_area = im["gt_area"][gi]
                ignore = im["gt_crowd"][gi] | (g_area < lo) | (g_area > hi)
                order = gi[np.argsort(ignore, kind="mergesort")]
                ignore = np.sort(ignore, kind="mergesort")
                crowd = im["gt_crowd"][order]
                match = _greedy_match(coco_box_iou(dt, im["gt"][order], crowd), ignore, crowd)
                matched = match >= 0
                dt_ignore = matched & np.append(ignore, False)[match]  # index -1 -> False
                dt_ignore |= ~matched & ((dt_area < lo) | (dt_area > hi))[None, :]
                per_area[a].append((scores, matched, dt_ignore, int((~ignore).sum())))
        for a, entries in enumerate(per_area):
            n_gt = sum(e[3] for e in entries)
            if n_gt == 0:
                continue
            for m, max_det in enumerate(COCO_MAX_DETS):
                scores = np.concatenate([e[0][:max_det] for e in entries])
                order = np.argsort(-scores, kind="mergesort")
                matched = np.concatenate([e[1][:, :max_det] for e in entries], axis=1)[:, order]
                ignored = np.concatenate([e[2][:, :max_det] for e in entries], axis=1)[:, order]
                tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(float)
                fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(float)
                for t in range(n_t):
                    tp, fp = tp_sum[t], fp_sum[t]
                    rc = tp / n_gt
                    pr = tp / (fp + tp + np.spacing(1))
                    recall[t, k, a, m] = rc[-1] if len(tp) else 0.0
                    # precision envelope (monotone from the right), read at 101 recall points;
                    # recall points beyond the last reached recall count as precision 0
                    pr = np.maximum.accumulate(pr[::-1])[::-1]
                    idx = np.searchsorted(rc, COCO_RECALL_THRESHOLDS, side="left")
                    q = np.zeros(n_r)
                    q[idx < len(pr)] = pr[idx[idx < len(pr)]]
                    precision[t, :, k, a, m] = q

    def summary(values, iou=None, area="all", max_det=100):
        a, m = list(COCO_AREA_RANGES).index(area), COCO_MAX_DETS.index(max_det)
        s = values[..., a, m]
        if iou is not None:
            s = s[np.where(iou == COCO_IOU_THRESHOLDS)[0]]
        s = s[s > -1]
        return float(np.mean(s)) if s.size else float("nan")

    return {
        "map": summary(precision), "map_50": summary(precision, iou=0.5),
        "map_75": summary(precision, iou=0.75), "map_small": summary(precision, area="small"),
        "map_medium": summary(precision, area="medium"), "map_large": summary(precision, area="large"),
        "mar_1": summary(recall, max_det=1), "mar_10": summary(recall, max_det=10),
        "mar_100": summary(recall), "mar_small": summary(recall, area="small"),
        "mar_medium": summary(recall, area="medium"), "mar_large": summary(recall, area="large"),
    }

# ---- retrieval (helper: retrieval) ----
#
# Copy-detection metrics follow the ISC2021 / SSCD definitions (docs/endofinder-retrieval.md §3): the k
# predictions of every query are pooled and sorted by decreasing score with ties ranked
# worst-case (non-matches first), so giving every pair the same score cannot inflate a value.


def _pooled_matches(scores, is_match):
    # Decreasing score; within a tie, non-matches before matches (ISC2021 worst case).
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_match = np.asarray(is_match, dtype=bool).ravel()
    order = np.lexsort((is_match, -scores))
    return scores[order], is_match[order]


def precision_recall_curve_pooled(scores, is_match, num_gt):
    """Precision and recall after each position of the pooled, sorted prediction list.

    scores, is_match: (P,) score of each (query, reference) prediction and whether that pair
    is in the ground truth; num_gt: number of ground-truth pairs (pairs never predicted count
    as misses). Returns ``precision (P,), recall (P,), thresholds (P,)``.
    """
    if num_gt <= 0:
        raise ValueError("the ground truth has no pairs: recall is undefined")
    scores, is_match = _pooled_matches(scores, is_match)
    tp = np.cumsum(is_match)
    return tp / np.arange(1, len(tp) + 1), tp / num_gt, scores


def micro_average_precision(scores, is_match, num_gt):
    """Micro-AP (uAP) of pooled predictions: ``sum_i (R_i - R_{i-1}) * P_i`` over the list."""
    precision, recall, _ = precision_recall_curve_pooled(scores, is_match, num_gt)
    return float((np.diff(recall, prepend=0.0) * precision).sum())


def recall_at_precision(scores, is_match, num_gt, precision=0.9):
    """Highest recall at any list position whose precision is >= ``precision``.

    Returns ``(recall, threshold)``; ``(0.0, None)`` when that precision is never reached.
    """
    p, r, t = precision_recall_curve_pooled(scores, is_match, num_gt)
    ok = p >= precision
    if not ok.any():
        return 0.0, None
    best = np.argmax(np.where(ok, r, -1.0))
    return float(r[best]), float(t[best])


def copy_detection_metrics(pred_queries, pred_refs, pred_scores, gt_pairs):
    """uAP, accuracy@1 (= recall at rank 1), recall@P90 and recall@10 of pooled predictions.

    pred_queries, pred_refs, pred_scores: (P,) query id, reference id and score of each
    prediction (typically k per query); gt_pairs: iterable of (query id, reference id).
    The rank of a ground-truth pair is the number of that query's predictions scoring at
    least as high as it, minus one (ties count against it); a pair never predicted has no
    rank. Duplicated (query, reference) predictions are an error, as in ISC2021. A ground-truth
    pair listed twice counts twice, as in the ISC2021 / SSCD ``evaluate``: twice in the number
    of positives that recall divides by (a prediction matches it once) and twice in the rank
    metrics.
    """
    gt_rows = [(str(q), str(r)) for q, r in gt_pairs]
    gt = set(gt_rows)
    pairs = [(str(q), str(r)) for q, r in zip(pred_queries, pred_refs)]
    if len(set(pairs)) != len(pairs):
        raise ValueError("predictions contain the same (query, reference) pair twice")
    scores = np.asarray(pred_scores, dtype=np.float64)
    is_match = np.array([p in gt for p in pairs], dtype=bool)
    by_query = {}
    for (q, r), s in zip(pairs, scores):
        by_query.setdefault(q, []).append((r, s))
    ranks = []
    for q, r in gt_rows:
        found = [s for rr, s in by_query.get(q, []) if rr == r]
        if not found:
            ranks.append(np.inf)
            continue
        ranks.append(sum(s >= found[0] for _, s in by_query[q]) - 1)
    ranks = np.asarray(ranks, dtype=np.float64)
    r90, t90 = recall_at_precision(scores, is_match, len(gt_rows), 0.9)
    return {"uAP": micro_average_precision(scores, is_match, len(gt_rows)),
            "accuracy@1": float((ranks == 0).mean()),
            "recall@P90": r90, "threshold@P90": t90,
            "recall@10": float((ranks < 10).mean())}


def precision_at_k(retrieved_labels, query_labels, k):
    """Mean over queries of the fraction of the top ``k`` neighbours with the query's label.

    retrieved_labels: (Q, K) labels of the neighbours in rank order (K >= k); query_labels: (Q,).
    """
    retrieved_labels = np.asarray(retrieved_labels)
    if retrieved_labels.shape[1] < k:
        raise ValueError(f"precision@{k} needs at least {k} neighbours, got {retrieved_labels.shape[1]}")
    hits = retrieved_labels[:, :k] == np.asarray(query_labels).reshape(-1, 1)
    return float(hits.mean())


def map_at_k(retrieved_labels, query_labels, k, num_relevant=None):
    """Mean average precision at ``k`` of class-based retrieval.

    ``AP@k = sum_{i<=k} P@i * rel_i / min(k, R)`` where R is the number of gallery items with
    the query's label (``num_relevant``, (Q,)); without it R is the number of hits in the top k
    (queries without any hit score 0).
    """
    retrieved_labels = np.asarray(retrieved_labels)
    if retrieved_labels.shape[1] < k:
        raise ValueError(f"mAP@{k} needs at least {k} neighbours, got {retrieved_labels.shape[1]}")
    rel = (retrieved_labels[:, :k] == np.asarray(query_labels).reshape(-1, 1)).astype(np.float64)
    prec = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    if num_relevant is None:
        denom = rel.sum(axis=1)
    else:
        denom = np.minimum(np.asarray(num_relevant, dtype=np.float64), k)
    ap = np.where(denom > 0, (prec * rel).sum(axis=1) / np.maximum(denom, 1), 0.0)
    return float(ap.mean())
