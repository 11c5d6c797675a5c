"""Evaluation metrics, each defined without the reference's smoothing artefacts.

The reference adds ε to numerator and denominator (ε/ε = 1), which scores a class that is
never predicted, or an empty prediction, as perfect (ssl4gie.md §8 item 10). Here an undefined
ratio is reported as such (NaN or a separate count), never as 1.
"""
import numpy as np
import torch

# ---- segmentation / depth (helper: seg-depth) ----

# ---- classification (helper: classification) ----
from gissl.errors import UserError  # noqa: E402  (kept inside this section: shared file)

# Macro scores average over the classes present in the evaluated targets only; a class that is
# never predicted scores precision 0 (not the reference's ε/ε = 1, ssl4gie.md §8 item 10) and a
# class absent from the targets is listed, not averaged in. Definitions equal scikit-learn's
# `precision_recall_fscore_support(labels=present, zero_division=0)` and torchmetrics' macro
# metrics (other-methods.md §c.2); tests check them against scikit-learn.


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

# ---- retrieval (helper: retrieval) ----
