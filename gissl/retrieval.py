"""Polyp image retrieval (EndoFinder, MICCAI 2024; SSCD, CVPR 2022): descriptors, search, vote.

Pieces, in the order a query flows through them (reference: ``docs/endofinder-retrieval.md``):

- ``RetrievalModel``: an encoder (``gissl.models.build_encoder``) + Linear projection to 512-d
  + L2 norm for training. ViT: CLS token, polyp-aware masked pass and a small masked-patch
  decoder (docs/endofinder-retrieval.md §1.2-1.3); ResNet: GeM pooling p = 3 of the last stage (docs/endofinder-retrieval.md §1.10). At inference
  ``descriptor`` returns the L2-normalised CLS / GeM embedding without the projection, as
  EndoFinder (docs/endofinder-retrieval.md §2; ``use_head=True`` keeps it, as SSCD).
- ``polyp_aware_masking``: keep every patch that touches the polyp, mask background patches.
- ``DescriptorTransform`` (in :mod:`gissl.search`): optional centering or PCA-whitening fitted on a training gallery,
  re-normalisation, optional sign hashing (+1 / -1 per dimension, docs/endofinder-retrieval.md §2).
- ``DescriptorIndex`` (in :mod:`gissl.search`): faiss inner-product search (exact by default; IVF-Flat, IVF-PQ, HNSW
  by name) with training, ``nprobe``, save / load to one ``.npz`` file, incremental ``add``,
  names and labels of the gallery; a GPU index when faiss sees a GPU, CPU otherwise.
- ``neighbour_vote``: the k-nearest-neighbour diagnosis that EndoFinder describes but does not
  ship (docs/endofinder-retrieval.md §4): majority (or similarity-weighted) vote, ties broken by the nearest neighbour.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gissl.errors import UserError
from gissl.losses import masked_patch_mse
from gissl.search import INDEX_KINDS, DescriptorIndex, DescriptorTransform

# ---------------------------------------------------------------------------------------------
# Polyp-aware masking (EndoFinder ``assign_masking``, docs/endofinder-retrieval.md §1.2)
# ---------------------------------------------------------------------------------------------

def patch_coverage(masks, patch_size):
    """Fraction of each patch covered by the polyp mask.

    masks: (N, 1, H, W) float, polyp where > 0.5 (binarised first: JPEG noise in Kvasir-style
    masks must not count as polyp, docs/endofinder-retrieval.md §6 item 20). Returns (N, L) in [0, 1],
    L = (H / p) * (W / p) in row-major patch order (the ViT token order).
    """
    binary = (masks > 0.5).float()
    return F.avg_pool2d(binary, patch_size).flatten(1)


def polyp_aware_masking(coverage, num_keep, generator=None):
    """Choose the visible patches: every polyp patch first, then random background patches.

    coverage: (N, L) per-patch polyp fraction (``patch_coverage``); all zeros = plain MAE
    random masking (no mask available). Polyp patches score 1 + coverage, background patches
    a uniform random score in [0, 1), and the ``num_keep`` highest scores stay visible, so no
    patch touching the polyp is masked unless the polyp covers more than ``num_keep`` patches
    (then the least covered ones go), as EndoFinder's ``assign_masking``.
    Returns ``ids_keep (N, num_keep)`` int64 and ``masked (N, L)`` bool (True = removed).
    """
    n, num_patches = coverage.shape
    if not 0 < num_keep <= num_patches:
        raise UserError(f"cannot keep {num_keep} of {num_patches} patches visible; "
                        f"choose a mask ratio in [0, 1)")
    noise = torch.rand(n, num_patches, generator=generator, device=coverage.device)
    score = torch.where(coverage > 0, 1.0 + coverage.float(), noise)
    ids_keep = score.argsort(dim=1, descending=True)[:, :num_keep]
    masked = torch.ones(n, num_patches, dtype=torch.bool, device=coverage.device)
    masked.scatter_(1, ids_keep, False)
    return ids_keep, masked


# ---------------------------------------------------------------------------------------------
# Descriptor model (EndoFinder ViT / SSCD ResNet)
# ---------------------------------------------------------------------------------------------

def gem(x, p=3.0, eps=1e-6):
    """Generalised-mean pooling (Radenovic et al. 2018; SSCD p = 3): (N, C, H, W) -> (N, C)."""
    return x.float().clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class RetrievalModel(nn.Module):
    """Encoder + Linear(embed_dim -> dim) + L2 norm, trained with SSCD's loss (+ masked
    reconstruction for ViT).

    ``forward(images (N, 3, H, W), masks (N, 1, H, W) or None)`` (training) returns
    ``{"z": (N, dim) unit-norm projections, "mse": masked-patch reconstruction loss}`` (ViT
    with ``mask_ratio > 0``; absent otherwise). The ViT sees CLS + the visible patches chosen
    by ``polyp_aware_masking`` and the contrastive CLS comes from this masked pass, as
    EndoFinder (docs/endofinder-retrieval.md §1.2, item 6). ``descriptor(images)`` (inference) is the L2-normalised CLS /
    GeM embedding of the full image (``use_head=True``: after the projection, as SSCD).
    Parameter names: ``encoder.*`` (the trunk, loadable by every task), ``head.*``,
    ``decoder_*`` (ViT only; MAE's names).
    """

    def __init__(self, encoder, *, dim=512, gem_p=3.0, mask_ratio=0.5, decoder_dim=128,
                 decoder_depth=2, decoder_heads=4):
        super().__init__()
        self.encoder = encoder
        self.is_vit = hasattr(encoder, "patch_embed")
        self.gem_p = gem_p
        self.mask_ratio = mask_ratio if self.is_vit else 0.0
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError(f"--mask-ratio must be in [0, 1), got {mask_ratio}")
        if self.mask_ratio > 0 and getattr(encoder, "num_prefix_tokens", 1) != 1:
            raise UserError(f"the masked reconstruction pass builds its own token sequence and does not know "
                            f"{encoder.architecture}'s register tokens; use --mask-ratio 0 with it, or a ViT "
                            "without registers")
        self.head = nn.Linear(encoder.embed_dim, dim)
        if self.is_vit and self.mask_ratio > 0:
            from gissl.ssl.mae import add_pixel_decoder
            add_pixel_decoder(self, encoder, decoder_dim, decoder_depth, decoder_heads)

    def embed(self, images):
        """Full-image embedding before the projection: (N, 3, H, W) -> (N, embed_dim)."""
        if self.is_vit:
            return self.encoder(images)
        return gem(self.encoder.forward_features(images)[-1], self.gem_p)

    def descriptor(self, images, use_head=False):
        """Inference descriptor: (N, 3, H, W) -> (N, D) L2-normalised float32."""
        x = self.embed(images)
        if use_head:
            x = self.head(x)
        return F.normalize(x.float(), dim=1)

    def _masked_vit(self, images, masks):
        enc = self.encoder
        p = self.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        num_patches = grid[0] * grid[1]
        num_keep = max(1, int(num_patches * (1 - self.mask_ratio)))
        coverage = (patch_coverage(masks, p) if masks is not None
                    else images.new_zeros(images.shape[0], num_patches))
        ids_keep, masked = polyp_aware_masking(coverage, num_keep)
        pos = enc.pos_embed_for(*grid)
        x = enc.patch_embed(images) + pos[:, 1:]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([(enc.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for blk in enc.blocks:
            x = blk(x, grid)
        latent = enc.norm(x)
        # decoder (MAE, He et al. 2022 §3, smaller): visible tokens back in place, mask tokens
        # elsewhere, fixed sin-cos positions
        from gissl.ssl.mae import patchify, sincos_pos_embed
        y = self.decoder_embed(latent)
        n, d = y.shape[0], y.shape[-1]
        tokens = self.mask_token.to(y.dtype).expand(n, num_patches, d).clone()
        tokens.scatter_(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), y[:, 1:])
        y = torch.cat([y[:, :1], tokens], dim=1) + sincos_pos_embed(*grid, d).to(y.device, y.dtype)
        for blk in self.decoder_blocks:
            y = blk(y, grid)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        mse = masked_patch_mse(pred, patchify(images, p), masked)
        return latent[:, 0], mse

    def forward(self, images, masks=None):
        out = {}
        if self.is_vit and self.mask_ratio > 0:
            feat, out["mse"] = self._masked_vit(images, masks)
        else:
            feat = self.embed(images)
        out["z"] = F.normalize(self.head(feat).float(), dim=1)
        return out


class DescriptorModel(nn.Module):
    """Standalone inference module for TorchScript export: (N, 3, H, W) ImageNet-normalised
    images -> (N, D) L2-normalised descriptors (encoder [+ GeM] [+ projection])."""

    def __init__(self, model, use_head=False):
        super().__init__()
        self.encoder = model.encoder
        self.head = model.head if use_head else nn.Identity()
        self.is_vit, self.gem_p = model.is_vit, float(model.gem_p)

    def forward(self, images):
        if self.is_vit:
            x = self.encoder(images)
        else:
            x = gem(self.encoder.forward_features(images)[-1], self.gem_p)
        return F.normalize(self.head(x).float(), dim=1)


def load_projection_head(model, path):
    """Copy a descriptor file's own projection into ``model.head`` when it has one of the right
    shape: SSCD's ``*.torchvision.pt`` (``Model("TV_RESNET50", 512, 3.0)``: ``backbone.*`` with a
    ``backbone.fc`` Linear after GeM pooling), so that ``descriptor(use_head=True)`` is SSCD's
    L2(fc(GeM(trunk))), and its ``*.classy.pt`` (``Model("CV_RESNET50", ...)``: the same Linear as
    ``embeddings.1``); EndoFinder's ``checkpoint-N.pth`` (``{"model": ...}`` with ``head``, the
    Linear 1024 -> 512 of its contrastive loss, on the CLS token). The encoder itself loads through
    ``--checkpoint`` as usual (the loader drops these heads). Returns the key prefix used, or
    ``None`` (nothing copied)."""
    from gissl.checkpoint import load_file
    state = load_file(path)
    if isinstance(state, dict):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), state)
    else:
        state = {}
    for prefix in ("backbone.fc.", "module.backbone.fc.", "embeddings.1.", "head."):
        weight, bias = state.get(prefix + "weight"), state.get(prefix + "bias")
        if not torch.is_tensor(weight) or weight.ndim != 2:
            continue
        if tuple(weight.shape) != tuple(model.head.weight.shape):
            if prefix == "head." or weight.shape[1] != model.head.weight.shape[1]:
                continue  # 'head.' may be a classifier (timm); SSCD's names are its descriptor head
            # SSCD's own descriptor head, of another size: a random head would be used silently
            raise UserError(f"'{path}' holds a {weight.shape[0]}-d projection ({prefix}weight); pass "
                            f"--embedding-dim {weight.shape[0]} to use it (now {model.head.weight.shape[0]})")
        with torch.no_grad():
            model.head.weight.copy_(weight)
            if torch.is_tensor(bias):
                model.head.bias.copy_(bias)
        return prefix
    return None


class ScriptedDescriptor(nn.Module):
    """A TorchScript descriptor model used as it is (``--descriptor-model``): SSCD's released
    ``*.torchscript.pt`` files or gissl's own ``--export-torchscript`` output. Takes (N, 3, H, W)
    ImageNet-normalised images; :meth:`descriptor` returns its output L2-normalised (N, D).

    Loading TorchScript runs the file's TorchScript program (not arbitrary Python), which is why
    it is a flag of its own and never what ``--checkpoint`` / ``--weights`` read."""

    def __init__(self, path):
        super().__init__()
        try:
            self.module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise UserError(f"--descriptor-model '{path}' is not a TorchScript model ({str(e).splitlines()[0]}); "
                            "pass a *.torchscript.pt file (SSCD) or one written by predict_retrieval.py "
                            "--export-torchscript") from None

    def descriptor(self, images, use_head=False):
        return F.normalize(self.module(images).float(), dim=1)


def mixup_cutmix(images, instance_ids, num_instances, prob=0.05, alpha=2.0, switch_prob=0.5,
                 generator=None):
    """Per-element Mixup / CutMix at a small rate (SSCD / docs/endofinder-retrieval.md §1.7: probability 0.05,
    alpha 2 for both, CutMix chosen half the time, lambda corrected to the pasted area).

    images: (N, 3, H, W) views; instance_ids: (N,) int64. Element i mixed with element
    N-1-i. Returns ``(images, soft_labels (N, num_instances))``: a mixed view matches both
    instances (SSCD counts any overlap as a positive). Masks are not mixed (as the reference).
    """
    n, _, h, w = images.shape
    device = images.device
    soft = F.one_hot(instance_ids, num_instances).float()
    apply = torch.rand(n, generator=generator) < prob
    if not apply.any():
        return images, soft
    images = images.clone()
    flipped, soft_flip = images.flip(0), soft.flip(0)
    beta = torch.distributions.Beta(alpha, alpha)
    new_soft = soft.clone()
    for i in torch.nonzero(apply).flatten().tolist():
        lam = float(beta.sample())
        if torch.rand(1, generator=generator).item() < switch_prob:  # CutMix box of area 1 - lam
            ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy, cx = int(torch.randint(h, (1,), generator=generator)), int(torch.randint(w, (1,), generator=generator))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            images[i, :, y0:y1, x0:x1] = flipped[i, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            images[i] = lam * images[i] + (1 - lam) * flipped[i]
        new_soft[i] = lam * soft[i] + (1 - lam) * soft_flip[i]
    return images, new_soft.to(device)


# ---------------------------------------------------------------------------------------------
# Neighbour-vote diagnosis (docs/endofinder-retrieval.md §4, recommended spec)
# ---------------------------------------------------------------------------------------------

def neighbour_vote(labels, scores=None, num_classes=None, weighted=False):
    """k-nearest-neighbour vote over the labels of retrieved gallery cases.

    labels: (Q, K) int labels of the neighbours, best first (-1 = unknown, ignored); scores:
    (Q, K) similarities (needed for ``weighted``: each vote weighs its similarity, clipped at
    0). Ties between classes go to the class of the nearest neighbour among the tied classes.
    Returns ``pred (Q,)`` int64 (-1 when no neighbour has a label) and ``shares (Q, C)`` (vote
    fraction per class: the confidence shown with the explanation).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    q, k = labels.shape
    weights = np.ones((q, k))
    if weighted:
        if scores is None:
            raise UserError("a similarity-weighted vote needs the neighbour scores")
        weights = np.clip(np.asarray(scores, dtype=np.float64), 0, None)
    votes = np.zeros((q, max(num_classes, 1)))
    valid = labels >= 0
    for i in range(q):
        np.add.at(votes[i], labels[i][valid[i]], weights[i][valid[i]])
    pred = np.full(q, -1, dtype=np.int64)
    for i in range(q):
        if not valid[i].any():
            continue
        best = np.flatnonzero(np.isclose(votes[i], votes[i].max()))
        if len(best) == 1:
            pred[i] = best[0]
        else:  # nearest neighbour among the tied classes decides
            pred[i] = next(c for c in labels[i] if c in best)
    total = votes.sum(axis=1, keepdims=True)
    shares = np.divide(votes, total, out=np.zeros_like(votes), where=total > 0)
    return pred, shares


def vote_sentence(neighbour_labels, pred, class_names=None):
    """'7 of 10 nearest cases were adenoma' for one query; neighbour_labels: (K,) best first."""
    neighbour_labels = np.asarray(neighbour_labels)
    k = len(neighbour_labels)
    if pred < 0:
        return f"none of the {k} nearest cases has a known label"
    name = class_names[pred] if class_names else f"class {pred}"
    return f"{int((neighbour_labels == pred).sum())} of {k} nearest cases were {name}"


def vote_results(index, scores, ids, weighted=False):
    """The JSON answer for each query of a gallery search (``predict_retrieval.py``'s file and the
    retrieval service's reply): ``{"neighbours": [{"rank", "id", "reference", "label", "similarity"}],
    "vote": {"prediction", "shares", "weighted", "sentence"}}`` per query.

    index: a ``DescriptorIndex`` (its ``names``, ``labels``, ``label_names``); scores, ids: (Q, k)
    from ``index.search``. ``id`` is the neighbour's position in the gallery, ``reference`` its name.
    """
    labels = np.array(index.labels, dtype=np.int64)
    neighbour_labels = np.where(ids >= 0, labels[np.clip(ids, 0, None)], -1)
    classes = index.label_names
    preds, shares = neighbour_vote(neighbour_labels, scores, len(classes) if classes else None, weighted=weighted)

    def name_of(c):
        return classes[c] if classes and c >= 0 else None

    out = []
    for i in range(len(ids)):
        out.append({
            "neighbours": [{"rank": r, "id": int(j), "reference": index.names[j],
                            "label": name_of(int(neighbour_labels[i, r])), "similarity": float(scores[i, r])}
                           for r, j in enumerate(ids[i]) if j >= 0],
            "vote": {"prediction": name_of(int(preds[i])),
                     "shares": {name_of(c): float(v) for c, v in enumerate(shares[i]) if v > 0 and classes},
                     "weighted": bool(weighted),
                     "sentence": vote_sentence(neighbour_labels[i], int(preds[i]), classes)},
        })
    return out


# ---------------------------------------------------------------------------------------------
# Shared by train / eval / predict scripts
# ---------------------------------------------------------------------------------------------

def add_arguments(parser, stage):
    """Retrieval flags: the descriptor model's (every stage; eval and predict read them from the
    checkpoint) and, for eval / predict, how to post-process and search."""
    add_model_arguments(parser)
    if stage != "train":
        add_inference_arguments(parser)
    return parser


def add_model_arguments(p):
    """Flags that define the descriptor model (the same in train, eval and predict, so the
    evaluation rebuilds exactly the trained module)."""
    g = p.add_argument_group("retrieval model")
    g.add_argument("--embedding-dim", dest="embedding_dim", type=int, default=512,
                   help="projection size used by the training loss (SSCD / EndoFinder: 512)")
    g.add_argument("--gem-p", dest="gem_p", type=float, default=3.0,
                   help="GeM pooling exponent for ResNets (SSCD: 3; 1 = average pooling)")
    g.add_argument("--mask-ratio", dest="mask_ratio", type=float, default=0.5,
                   help="ViT: fraction of patches removed in the masked pass (EndoFinder 0.5); "
                        "0 disables masking and reconstruction")
    g.add_argument("--decoder-dim", dest="decoder_dim", type=int, default=128,
                   help="ViT reconstruction decoder width (EndoFinder: 512 with 8 blocks for ViT-L)")
    g.add_argument("--decoder-depth", dest="decoder_depth", type=int, default=2,
                   help="ViT reconstruction decoder blocks (EndoFinder: 8 for ViT-L)")
    g.add_argument("--use-head", dest="use_head", action="store_true",
                   help="inference descriptor after the 512-d projection (SSCD) instead of the "
                        "backbone CLS / GeM embedding (EndoFinder, default)")
    return p


def build_model(encoder, *, embedding_dim=512, gem_p=3.0, mask_ratio=0.5, decoder_dim=128, decoder_depth=2):
    """:class:`RetrievalModel` on ``encoder`` (the keywords are the flags of ``add_model_arguments``)."""
    return RetrievalModel(encoder, dim=embedding_dim, gem_p=gem_p, mask_ratio=mask_ratio,
                          decoder_dim=decoder_dim, decoder_depth=decoder_depth)


@torch.inference_mode()
def extract_descriptors(model, paths, *, image_size, batch_size, device, workers=0, use_head=False,
                        amp=True):
    """Descriptors of image files: (len(paths), D) float32 numpy, L2-normalised, in order."""
    from gissl.engine import autocast
    from gissl.loaders import make_loader
    from gissl.retrieval_data import ImageListDataset
    was_training = model.training
    model.eval()
    loader = make_loader(ImageListDataset(paths, image_size), batch_size=batch_size, train=False,
                         workers=workers, device=device)
    out = []
    with autocast(device, amp):
        for batch in loader:
            out.append(model.descriptor(batch["image"].to(device), use_head=use_head).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def search_pairs(index, queries, query_ids, k):
    """Top-k search; returns (query ids, reference names, scores, ranks) of every prediction."""
    scores, ids = index.search(queries, min(k, index.ntotal))
    q_out, r_out, s_out, rank_out = [], [], [], []
    for qi, (row_s, row_i) in enumerate(zip(scores, ids)):
        for rank, (s, i) in enumerate(zip(row_s, row_i)):
            if i < 0:
                continue
            q_out.append(query_ids[qi])
            r_out.append(index.names[i])
            s_out.append(float(s))
            rank_out.append(rank)
    return q_out, r_out, s_out, rank_out


def copy_detection_eval(model, twin, *, image_size, batch_size, device, k=10, workers=0,
                        use_head=False, postprocess=None, index_kind="flat", nprobe=16, amp=True):
    """Copy-detection protocol (docs/endofinder-retrieval.md §3) on a ``retrieval_data.twin_set``.

    Returns ``(metrics, predictions)``: uAP, accuracy@1, recall@P90, recall@10 and the pooled
    (query, reference, score, rank) lists. ``postprocess``: a ``DescriptorTransform`` (fitted
    here on the references when it needs fitting and no training gallery fitted it before).
    """
    from gissl.metrics import copy_detection_metrics
    kw = dict(image_size=image_size, batch_size=batch_size, device=device, workers=workers,
              use_head=use_head, amp=amp)
    refs = extract_descriptors(model, twin["references"], **kw)
    queries = extract_descriptors(model, twin["queries"], **kw)
    if postprocess is not None:
        if postprocess.needs_fit:
            postprocess.fit(refs)
        refs, queries = postprocess(refs), postprocess(queries)
    index = DescriptorIndex(refs.shape[1], index_kind, nprobe=nprobe,
                            device="cpu" if device.type == "cpu" else "auto")
    index.add(refs, names=twin["reference_ids"])
    q, r, s, rank = search_pairs(index, queries, twin["query_ids"], k)
    return copy_detection_metrics(q, r, s, twin["matches"]), (q, r, s, rank)


def add_inference_arguments(p):
    """Flags of eval / predict: which trained model, how to post-process and search."""
    g = p.add_argument_group("retrieval inference")
    g.add_argument("--train-dataset", dest="train_dataset", default="Kvasir",
                   help="dataset the model was trained on (names its checkpoint under --output-dir)")
    g.add_argument("--descriptor-model", dest="descriptor_model", default=None, metavar="FILE",
                   help="a TorchScript descriptor model used as it is instead of a trained one, e.g. SSCD's "
                        "sscd_disc_mixup.torchscript.pt or predict_retrieval.py --export-torchscript output "
                        "(ImageNet-normalised images -> descriptors, L2-normalised here)")
    g.add_argument("--untrained", action="store_true",
                   help="no retrieval training: descriptors of the encoder as built by --pretraining "
                        "(and --checkpoint), e.g. the random-init or SSL baseline")
    g.add_argument("--k", type=int, default=10, help="neighbours per query (EndoFinder / SSCD: 10)")
    g.add_argument("--index", default="flat", choices=INDEX_KINDS,
                   help="faiss index: flat = exact; ivfflat / ivfpq / hnsw for galleries of ~1e5+ images")
    g.add_argument("--nprobe", type=int, default=16, help="IVF cells searched per query (recall vs speed)")
    g.add_argument("--postprocess", default="none", choices=["none", "center", "pcaw"],
                   help="descriptor centering or PCA-whitening (SSCD's PCA / PCAW codecs) fitted on "
                        "--whiten-gallery (default: the reference / gallery images)")
    g.add_argument("--pca-dim", dest="pca_dim", type=int, default=None, help="PCA-whitening output size")
    g.add_argument("--whiten-gallery", dest="whiten_gallery", default=None,
                   help="image folder to fit --postprocess on (SSCD: a separate training set)")
    g.add_argument("--hash", action="store_true",
                   help="sign-hash descriptors to +1/-1 bits (EndoFinder's 1024-bit codes)")
    return p


def make_postprocess(*, model, device, postprocess="none", pca_dim=None, hash=False, whiten_gallery=None,
                     image_size=224, batch_size=32, workers=0, use_head=False, amp=True):
    """The ``DescriptorTransform`` (``postprocess`` none / center / pcaw, optional sign ``hash``),
    or ``None`` when there is nothing to do; fitted on the images of ``whiten_gallery`` when
    given (else the caller fits it on its gallery, see ``needs_fit``)."""
    if postprocess == "none" and not hash:
        return None
    t = DescriptorTransform(postprocess, pca_dim, hash)
    if postprocess != "none" and whiten_gallery:
        from gissl.data import image_folder
        paths = [s["image"] for s in image_folder(whiten_gallery)]
        t.fit(extract_descriptors(model, paths, image_size=image_size, batch_size=batch_size, device=device,
                                  workers=workers, use_head=use_head, amp=amp))
    return t
