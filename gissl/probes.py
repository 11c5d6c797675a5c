"""Representation probes: how good is a frozen encoder without finetuning it.

The protocols follow the SSL-transfer study (docs/transfer-study.md §b.1) with the fixes it asks
for (docs/transfer-study.md §b.4, §b.5): the encoder is always in eval mode (BatchNorm statistics never move), the
logistic-regression probe standardises features and converges, few-shot episodes draw their
support set from train and their queries from test, occlusion is batched.

- features: :func:`extract_features` (one pass, cached per encoder / dataset / split);
- linear: :func:`fit_logistic_regression`, :func:`linear_probe` (L2 strength chosen on val);
- kNN: :func:`knn_predict` (cosine, temperature-weighted votes, k = 20, T = 0.07 as DINO);
- few-shot: :func:`fewshot_episodes` (Prototypical Networks at test time, mean ± 95 % CI);
- invariance: :func:`invariance` (cosine similarity of features under transform families);
- saliency: :func:`occlusion_map`, :func:`attentive_diffusion`.
"""
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from gissl.checkpoint import load_file, save_atomic
from gissl.errors import UserError
from gissl.metrics import classification_metrics



def c_grid(n=45):
    """Inverse L2 strengths ``C = 1 / wd`` with ``wd = logspace(-6, 5, n)``; the reference's
    n = 45 gives quarter-decade steps (docs/transfer-study.md §b.1)."""
    return tuple(float(c) for c in 1.0 / np.logspace(-6, 5, n))


C_GRID = c_grid()


# --------------------------------------------------------------------------- features

def feature_cache_path(folder, **identity):
    """A file name in ``folder`` that changes whenever anything in ``identity`` changes.

    ``identity`` holds what determines the features (architecture, pretraining, checkpoint
    path with its size and mtime, dataset, data root, split, image size ...).
    """
    key = json.dumps(identity, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    readable = "-".join(str(identity[k]) for k in ("arch", "dataset", "split") if k in identity)
    return Path(folder) / f"{readable or 'features'}-{digest}.pth"


def checkpoint_identity(path):
    """``(path, size, mtime)`` of a checkpoint file, so a re-written file invalidates caches."""
    if not path:
        return None
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, int(st.st_mtime)]


@torch.inference_mode()
def encode(encoder, images, batch_size=64):
    """Embeddings `(N, D)` of `images (N, 3, H, W)`, in batches, encoder in eval mode."""
    encoder.eval()
    device = next(encoder.parameters()).device
    out = [encoder(images[i:i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def extract_features(encoder, dataset, *, device, batch_size=64, workers=0, cache=None):
    """Embeddings of every sample of a classification ``dataset`` with the frozen ``encoder``.

    Returns ``{"features": (N, D) float32 CPU, "labels": (N,) int64}``. The encoder is put in
    eval mode (the reference's analysis scripts left BatchNorm in train mode, docs/transfer-study.md
    §b.4 item 2) and runs under ``torch.inference_mode``. With ``cache`` (a path, see
    :func:`feature_cache_path`) the result is read from there when present, else written.
    """
    if cache is not None and os.path.isfile(cache):
        stored = load_file(cache)
        if stored.get("features") is not None and len(stored["features"]) == len(dataset):
            return {"features": stored["features"], "labels": stored["labels"]}
    from gissl.engine import move_to  # engine imports stay local: probes are also used without it
    from gissl.loaders import make_loader
    loader = make_loader(dataset, batch_size=batch_size, train=False, workers=workers, device=device)
    encoder.eval()
    feats, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            batch = move_to(batch, device)
            feats.append(encoder(batch["image"]).float().cpu())
            labels.append(batch["label"].long().cpu())
    out = {"features": torch.cat(feats), "labels": torch.cat(labels)}
    if cache is not None:
        save_atomic(out, cache)
    return out


# --------------------------------------------------------------------------- linear probe

class LogisticRegression:
    """Multinomial logistic regression on standardised features (weights `(C, D)`, bias `(C,)`).

    Fitted by :func:`fit_logistic_regression`; :meth:`predict_proba` maps `(N, D)` features to
    `(N, C)` probabilities.
    """

    def __init__(self, mean, std, weight, bias, C):
        self.mean, self.std, self.weight, self.bias, self.C = mean, std, weight, bias, C

    def logits(self, x):
        x = (torch.as_tensor(x, dtype=torch.float64) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict_proba(self, x):
        return torch.softmax(self.logits(x), dim=1).float()


def _standardiser(x):
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features stay 0


def fit_logistic_regression(x, y, num_classes, C=1.0, max_iter=1000, init=None, standardise=True):
    """Fit multinomial logistic regression with an L2 penalty on the weights (not the bias).

    x: `(N, D)` features; y: `(N,)` class ids. The objective is scikit-learn's
    ``C * sum_i CE_i + ||W||² / 2`` divided by ``C·N`` (same minimiser), solved with L-BFGS
    (strong-Wolfe line search) in float64 to convergence, so the result does not depend on
    the order of a hyper-parameter sweep (docs/transfer-study.md §b.4 item 9). ``init`` warm-starts
    from another :class:`LogisticRegression` (faster only: the problem is convex).
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y).long()
    if standardise:
        mean, std = _standardiser(x)
    else:
        mean, std = torch.zeros(x.shape[1], dtype=torch.float64), torch.ones(x.shape[1], dtype=torch.float64)
    xs = (x - mean) / std
    n, d = xs.shape
    w = torch.zeros(num_classes, d, dtype=torch.float64)
    b = torch.zeros(num_classes, dtype=torch.float64)
    if init is not None:
        w, b = init.weight.clone(), init.bias.clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    l2 = 1.0 / (2.0 * C * n)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may be inside inference_mode
        opt.step(closure)
    return LogisticRegression(mean, std, w.detach(), b.detach(), C)


def linear_probe(train_x, train_y, val_x, val_y, num_classes, grid=C_GRID, refit=True, max_iter=1000):
    """Choose the inverse L2 strength ``C`` on val, then refit on train + val.

    train_x `(N, D)`, val_x `(M, D)`. The grid is the reference's 45 values (docs/transfer-study.md
    §b.1), swept from strong to weak regularisation with warm starts. ``C`` is chosen by val
    macro-F1 (classes present in val; robust to HyperKvasir's imbalance); when several values
    tie (common on a small val split) the middle of the tied run is taken, away from both
    extremes. Returns ``(model, history)`` with ``history = [(C, val_macro_f1, val_acc)]``.
    """
    train_x = torch.as_tensor(train_x, dtype=torch.float64)
    val_x = torch.as_tensor(val_x, dtype=torch.float64)
    train_y, val_y = torch.as_tensor(train_y).long(), torch.as_tensor(val_y).long()
    if len(train_y) == 0 or len(val_y) == 0:
        raise UserError("the linear probe needs a non-empty train and val split")
    history, model = [], None
    for C in sorted(grid):  # small C = strong regularisation first
        model = fit_logistic_regression(train_x, train_y, num_classes, C=C, init=model, max_iter=max_iter)
        pred = model.logits(val_x).argmax(1)
        m = classification_metrics(val_y, pred, num_classes=num_classes)
        history.append((C, m["macro_f1"], m["accuracy"]))
    best = max(h[1] for h in history)
    tied = [h[0] for h in history if h[1] >= best - 1e-12]
    best_c = tied[len(tied) // 2]
    if refit:
        model = fit_logistic_regression(torch.cat([train_x, val_x]), torch.cat([train_y, val_y]),
                                        num_classes, C=best_c, max_iter=max_iter)
    else:
        model = fit_logistic_regression(train_x, train_y, num_classes, C=best_c, max_iter=max_iter)
    return model, history


# --------------------------------------------------------------------------- kNN

def knn_predict(train_x, train_y, query_x, num_classes, k=20, temperature=0.07, chunk=1024):
    """Weighted cosine kNN as DINO's ``eval_knn``: class scores `(M, C)` of `query_x (M, D)`.

    Each of the k most similar train features votes ``exp(cos / T)`` for its class; scores
    are normalised to sum to 1 (usable as probabilities for AUROC).
    """
    train_x = F.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    query_x = F.normalize(torch.as_tensor(query_x, dtype=torch.float32), dim=1)
    train_y = torch.as_tensor(train_y).long()
    k = min(k, len(train_x))
    out = []
    for i in range(0, len(query_x), chunk):
        sim, idx = (query_x[i:i + chunk] @ train_x.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[idx], weights)
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)


# --------------------------------------------------------------------------- few-shot

def fewshot_episodes(support_x, support_y, query_x=None, query_y=None, *, n_way=5, k_shot=5,
                     n_query=15, episodes=600, seed=0, distance="euclidean"):
    """Prototypical-network episodes with a frozen encoder (no meta-training).

    Each episode draws ``n_way`` classes, ``k_shot`` support features per class from
    ``support_x (N, D)`` and ``n_query`` query features per class from ``query_x (M, D)``
    (docs/transfer-study.md §b.5: support from train, queries from test). Without ``query_x`` both
    come from the one pool, disjoint within an episode (the reference's pooled protocol).
    Prototype = mean support feature; ``distance`` ``euclidean`` (squared, raw features, as
    the reference) or ``cosine`` (L2-normalised). Returns ``{"mean", "ci95", "accuracies"}``
    in % with ci95 = 1.96·std/√episodes (docs/transfer-study.md §b.1).
    """
    support_x = torch.as_tensor(support_x, dtype=torch.float32)
    support_y = torch.as_tensor(support_y).long()
    pooled = query_x is None
    query_x = support_x if pooled else torch.as_tensor(query_x, dtype=torch.float32)
    query_y = support_y if pooled else torch.as_tensor(query_y).long()
    if distance == "cosine":
        support_x, query_x = F.normalize(support_x, dim=1), F.normalize(query_x, dim=1)
    elif distance != "euclidean":
        raise UserError(f"unknown few-shot distance '{distance}'; choose euclidean or cosine")
    by_class_s = {int(c): torch.nonzero(support_y == c).flatten() for c in support_y.unique()}
    by_class_q = {int(c): torch.nonzero(query_y == c).flatten() for c in query_y.unique()}
    need_s = k_shot + (n_query if pooled else 0)
    eligible = [c for c in sorted(by_class_s) if len(by_class_s[c]) >= need_s
                and (pooled or len(by_class_q.get(c, [])) >= n_query)]
    if len(eligible) < n_way:
        where = "in the pool" if pooled else f"({k_shot} in train and {n_query} in test)"
        raise UserError(f"{n_way}-way {k_shot}-shot episodes with {n_query} queries need {n_way} classes "
                        f"with enough samples {where}; only {len(eligible)} have them. Lower --n-way, "
                        "--k-shot or --n-query")
    g = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(episodes):
        classes = [eligible[i] for i in torch.randperm(len(eligible), generator=g)[:n_way].tolist()]
        protos, queries = [], []
        for c in classes:
            pool = by_class_s[c][torch.randperm(len(by_class_s[c]), generator=g)]
            protos.append(support_x[pool[:k_shot]].mean(0))
            if pooled:
                queries.append(query_x[pool[k_shot:k_shot + n_query]])
            else:
                qpool = by_class_q[c][torch.randperm(len(by_class_q[c]), generator=g)]
                queries.append(query_x[qpool[:n_query]])
        protos = torch.stack(protos)  # (n_way, D)
        q = torch.cat(queries)  # (n_way * n_query, D)
        truth = torch.arange(n_way).repeat_interleave(n_query)
        pred = torch.cdist(q, protos).argmin(1)  # argmin of distance = of squared distance
        accs.append(float((pred == truth).float().mean()) * 100)
    accs = np.array(accs)
    return {"mean": float(accs.mean()), "ci95": float(1.96 * accs.std() / math.sqrt(episodes)),
            "accuracies": accs}


# --------------------------------------------------------------------------- invariance

INVARIANCE_FAMILIES = ("rotation", "flips", "colour", "blur", "crop")


def _denormalise(x, mean, std):
    return (x * std + mean).clamp(0, 1)


def transform_family(name, k=8, seed=0, mean=None, std=None):
    """``k`` deterministic transforms of one family, each mapping a normalised batch
    `(N, 3, H, W)` to a batch of the same shape.

    Families (endoscopy-relevant, docs/transfer-study.md §b.5): ``rotation`` (angles spread over
    360°, the scope rotates), ``flips`` (h, v, both), ``colour`` (brightness, contrast,
    saturation 0.6–1.4 and hue ±0.05: illumination), ``blur`` (Gaussian σ 0.5–4, kernel 23:
    motion/focus, as the reference's kernel), ``crop`` (resized crops of 30–90 % of the area).
    ``mean``/``std``: the normalisation, `(3,)`; colour changes are applied in [0, 1] space.
    """
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(mean if mean is not None else (0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor(std if std is not None else (0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    if name == "rotation":
        return [lambda x, a=360.0 * (j + 1) / (k + 1): TF.rotate(x, a) for j in range(k)]
    if name == "flips":
        return [TF.horizontal_flip, TF.vertical_flip, lambda x: TF.vertical_flip(TF.horizontal_flip(x))][:k]
    if name == "colour":
        out = []
        for _ in range(k):
            b, c, s = (0.6 + 0.8 * torch.rand(3, generator=g)).tolist()
            h = float(torch.rand(1, generator=g) * 0.1 - 0.05)

            def jitter(x, b=b, c=c, s=s, h=h):
                m, sd = mean.to(x.device), std.to(x.device)
                y = _denormalise(x, m, sd)
                y = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(y, b), c), s), h)
                return (y - m) / sd
            out.append(jitter)
        return out
    if name == "blur":
        return [lambda x, s=float(v): TF.gaussian_blur(x, [23, 23], [s, s]) for v in np.linspace(0.5, 4.0, k)]
    if name == "crop":
        out = []
        for _ in range(k):
            area = float(0.3 + 0.6 * torch.rand(1, generator=g))
            u, v = torch.rand(2, generator=g).tolist()

            def crop(x, area=area, u=u, v=v):
                h, w = x.shape[-2:]
                ch, cw = max(1, round(h * math.sqrt(area))), max(1, round(w * math.sqrt(area)))
                top, left = int(u * (h - ch)), int(v * (w - cw))
                return TF.resized_crop(x, top, left, ch, cw, [h, w], antialias=True)
            out.append(crop)
        return out
    raise UserError(f"unknown transform family '{name}'; choose from {', '.join(INVARIANCE_FAMILIES)}")


def invariance(encoder, images, *, families=INVARIANCE_FAMILIES, k=8, center=None, batch_size=64,
               seed=0, mean=None, std=None):
    """Mean cosine similarity between features of each image and of its transformed copies.

    images: `(N, 3, H, W)` normalised; ``center`` `(D,)` is subtracted from every feature
    first (default: the mean clean feature of ``images``). Centring matters: raw features of
    ReLU networks are all positive, so their cosine is near 1 for anything. (The reference
    also whitens, docs/transfer-study.md §b.1; with a few hundred images and D ≥ 192 the covariance
    is singular, so gissl only centres.) Returns ``{family: similarity}`` with 1 = invariant.
    """
    clean = encode(encoder, images, batch_size)
    center = clean.mean(0) if center is None else torch.as_tensor(center, dtype=clean.dtype)
    clean = clean - center
    out = {}
    for fam in families:
        sims = []
        for t in transform_family(fam, k=k, seed=seed, mean=mean, std=std):
            feats = encode(encoder, t(images), batch_size) - center
            sims.append(F.cosine_similarity(clean, feats, dim=1))
        out[fam] = float(torch.stack(sims).mean())
    return out


# --------------------------------------------------------------------------- saliency

def _positions(size, patch, stride):
    pos = list(range(0, max(size - patch, 0) + 1, stride))
    if pos[-1] != max(size - patch, 0):
        pos.append(size - patch)  # the last window touches the border
    return pos


@torch.inference_mode()
def occlusion_map(fn, image, patch=10, stride=5, batch_size=64, fill=0.0):
    """Occlusion sensitivity `(H, W)` of ``fn`` at `image (3, H, W)` (Ericsson et al.'s method,
    docs/transfer-study.md §b.1).

    A ``patch``×``patch`` window of value ``fill`` (0 in normalised space = the ImageNet mean
    colour, as the reference) slides with ``stride``; each position scores
    ``‖fn(x) − fn(x_occ)‖ / ‖fn(x)‖`` where ``fn`` maps `(B, 3, H, W)` to `(B, D)` (an
    encoder's features, or a class probability `(B, 1)`). A pixel's value is the mean score
    of the windows covering it (stride 1 = the reference's sum / 100 in the interior).
    Stride 1 costs (H−9)² forward passes; the default 5 is 25× cheaper.
    """
    if patch < 1 or stride < 1 or stride > patch:
        raise UserError(f"occlusion needs 1 <= stride <= patch (got patch {patch}, stride {stride})")
    _, h, w = image.shape
    base = fn(image[None]).float().flatten(1)
    norm = base.norm().clamp(min=1e-12)
    windows = [(t, l) for t in _positions(h, patch, stride) for l in _positions(w, patch, stride)]
    total = torch.zeros(h, w)
    count = torch.zeros(h, w)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        batch = image[None].repeat(len(chunk), 1, 1, 1)
        for j, (t, l) in enumerate(chunk):
            batch[j, :, t:t + patch, l:l + patch] = fill
        scores = ((fn(batch).float().flatten(1) - base).norm(dim=1) / norm).cpu()
        for (t, l), s in zip(chunk, scores):
            total[t:t + patch, l:l + patch] += s
            count[t:t + patch, l:l + patch] += 1
    return total / count.clamp(min=1)


def attentive_diffusion(saliency):
    """% of the map's pixels strictly above its mean (docs/transfer-study.md §b.1, ``saliency.py``):
    low = attention concentrated on a small region."""
    saliency = torch.as_tensor(saliency)
    return float((saliency > saliency.mean()).double().mean() * 100)


# --------------------------------------------------------------------------- image–text: zero-shot, retrieval

# Prompt templates for endoscopy class names (CLIP §3.1.4 prompt ensembling); "{}" is the class.
ENDOSCOPY_TEMPLATES = ("endoscopy image of the {}.", "an endoscopic view of the {}.", "endoscopy image showing {}.",
                       "a photo of the {} taken at endoscopy.", "{}")


def read_templates(path):
    """Prompt templates from a text file, one per line, each with one ``{}`` for the class name."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--templates {path}: cannot read it ({e})") from None
    bad = [line for line in lines if line.count("{}") != 1]
    if not lines or bad:
        raise UserError(f"--templates {path}: every line needs exactly one '{{}}' where the class name goes "
                        f"(e.g. 'endoscopy image of the {{}}.'); {'no templates' if not lines else repr(bad[0])}")
    return tuple(lines)


class ImageEmbedder(torch.nn.Module):
    """A CLIP-style model's image side as an encoder: ``(N, 3, H, W) -> (N, embed_dim)``
    (``model.encode_image``), so :func:`extract_features` embeds a dataset with it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.encode_image(images)


@torch.inference_mode()
def zeroshot_weights(encode_text, tokenize, classnames, templates, device="cpu"):
    """Zero-shot classifier `(C, D)`: for each class the mean over ``templates`` of the
    L2-normalised text embeddings of ``template.format(name)``, normalised again (CLIP §3.1.4).
    ``encode_text((T, L) tokens) -> (T, D)``; ``tokenize(list of str) -> (T, L)``."""
    rows = []
    for name in classnames:
        emb = encode_text(tokenize([t.format(name) for t in templates]).to(device)).float()
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0))
    return torch.stack(rows)


def zeroshot_logits(image_emb, weights, logit_scale=100.0):
    """`(N, C)` logits: ``logit_scale`` x cosine of the L2-normalised image embeddings `(N, D)`
    with the class rows of :func:`zeroshot_weights` `(C, D)`."""
    return float(logit_scale) * F.normalize(image_emb.float(), dim=-1) @ weights.float().T


def image_text_recall(image_emb, text_emb, text_image, ks=(1, 5, 10)):
    """Recall@K both ways (in %), as the CLIP / COCO-Karpathy retrieval protocol.

    image_emb: `(N, D)`; text_emb: `(M, D)` captions; text_image: `(M,)` the image of each
    caption. Image→text: an image is found at K when any of its captions is among its K
    most similar captions; text→image: a caption when its image is among its K most similar
    images. Cosine similarity; K is capped at the number of candidates.
    """
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T  # (N, M)
    text_image = torch.as_tensor(text_image).long()
    out = {}
    for k in ks:
        top_texts = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (N, k)
        i2t = (text_image[top_texts] == torch.arange(sim.shape[0])[:, None]).any(1).double().mean()
        top_images = sim.topk(min(k, sim.shape[0]), dim=0).indices  # (k, M)
        t2i = (top_images == text_image[None]).any(0).double().mean()
        out[f"image-to-text R@{k}"], out[f"text-to-image R@{k}"] = 100 * float(i2t), 100 * float(t2i)
    return out
