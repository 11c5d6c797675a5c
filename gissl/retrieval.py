"""Polyp image retrieval (EndoFinder, MICCAI 2024; SSCD, CVPR 2022): descriptors, search, vote.

Pieces, in the order a query flows through them (reference: ``endofinder.md``):

- ``RetrievalModel``: an encoder (``gissl.models.build_encoder``) + Linear projection to 512-d
  + L2 norm for training. ViT: CLS token, polyp-aware masked pass and a small masked-patch
  decoder (§1.2-1.3); ResNet: GeM pooling p = 3 of the last stage (SSCD §1.10). At inference
  ``descriptor`` returns the L2-normalised CLS / GeM embedding without the projection, as
  EndoFinder (§2; ``use_head=True`` keeps it, as SSCD).
- ``polyp_aware_masking``: keep every patch that touches the polyp, mask background patches.
- ``DescriptorTransform``: optional centering or PCA-whitening fitted on a training gallery,
  re-normalisation, optional sign hashing (+1 / -1 per dimension, §2).
- ``DescriptorIndex``: faiss inner-product search (exact by default; IVF-Flat, IVF-PQ, HNSW
  by name) with training, ``nprobe``, save / load to one ``.npz`` file, incremental ``add``,
  names and labels of the gallery; a GPU index when faiss sees a GPU, CPU otherwise.
- ``neighbour_vote``: the k-nearest-neighbour diagnosis that EndoFinder describes but does not
  ship (§4): majority (or similarity-weighted) vote, ties broken by the nearest neighbour.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gissl.errors import CheckpointError, UserError
from gissl.losses import masked_patch_mse

INDEX_KINDS = ("flat", "ivfflat", "ivfpq", "hnsw")


# ---------------------------------------------------------------------------------------------
# Polyp-aware masking (EndoFinder ``assign_masking``, endofinder.md §1.2)
# ---------------------------------------------------------------------------------------------

def patch_coverage(masks, patch_size):
    """Fraction of each patch covered by the polyp mask.

    masks: (N, 1, H, W) float, polyp where > 0.5 (binarised first: JPEG noise in Kvasir-style
    masks must not count as polyp, endofinder.md §6 item 20). Returns (N, L) in [0, 1],
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
    EndoFinder (§1.2, item 6). ``descriptor(images)`` (inference) is the L2-normalised CLS /
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


def mixup_cutmix(images, instance_ids, num_instances, prob=0.05, alpha=2.0, switch_prob=0.5,
                 generator=None):
    """Per-element Mixup / CutMix at a small rate (SSCD / EndoFinder §1.7: probability 0.05,
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
# Descriptor post-processing (SSCD codecs "PCA<d>" / "PCAW<d>" + L2norm, EndoFinder hash)
# ---------------------------------------------------------------------------------------------

class DescriptorTransform:
    """Centering or PCA-whitening fitted on a gallery, L2 re-normalisation, sign hashing.

    mode: ``none``, ``center`` (subtract the gallery mean), ``pcaw`` (project on the top
    ``dim`` principal axes and divide by their standard deviation, SSCD "PCAW512").
    ``hash``: sign per dimension, +1 / -1 (zero -> +1 as EndoFinder); inner product of two
    codes of d bits equals ``d - 2 * Hamming``, so the same inner-product index searches them.
    Descriptors in and out are (N, D) float32 numpy arrays.
    """

    def __init__(self, mode="none", dim=None, hash=False, eps=1e-6):
        if mode not in ("none", "center", "pcaw"):
            raise UserError(f"unknown descriptor post-processing '{mode}'; choose none, center or pcaw")
        self.mode, self.dim, self.hash, self.eps = mode, dim, bool(hash), eps
        self.mean = None
        self.projection = None

    @property
    def needs_fit(self):
        return self.mode != "none" and self.mean is None

    def fit(self, x):
        """Fit on gallery descriptors x: (N, D)."""
        x = np.asarray(x, dtype=np.float64)
        self.mean = x.mean(axis=0)
        if self.mode == "pcaw":
            dim = self.dim or x.shape[1]
            if dim > min(x.shape):
                raise UserError(f"PCA-whitening to {dim} dimensions needs at least {dim} gallery "
                                f"descriptors of >= {dim} dimensions, got {x.shape}; lower --pca-dim")
            cov = np.cov(x - self.mean, rowvar=False)
            eigval, eigvec = np.linalg.eigh(cov)
            order = np.argsort(eigval)[::-1][:dim]
            self.projection = eigvec[:, order] / np.sqrt(eigval[order] + self.eps)
        return self

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float32)
        if self.mode != "none":
            if self.mean is None:
                raise UserError("descriptor centering / whitening is not fitted; pass a training "
                                "gallery (e.g. --whiten-gallery DIR) or use --postprocess none")
            x = x - self.mean.astype(np.float32)
            if self.projection is not None:
                x = x @ self.projection.astype(np.float32)
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if self.hash:
            x = np.where(x >= 0, 1.0, -1.0).astype(np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

    def state(self):
        return {"mode": self.mode, "dim": self.dim, "hash": self.hash,
                "mean": None if self.mean is None else self.mean.tolist(),
                "projection": None if self.projection is None else self.projection.tolist()}

    @classmethod
    def from_state(cls, state):
        t = cls(state["mode"], state.get("dim"), state.get("hash", False))
        if state.get("mean") is not None:
            t.mean = np.asarray(state["mean"], dtype=np.float64)
        if state.get("projection") is not None:
            t.projection = np.asarray(state["projection"], dtype=np.float64)
        return t


# ---------------------------------------------------------------------------------------------
# faiss index wrapper
# ---------------------------------------------------------------------------------------------

def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a runtime requirement
        raise UserError("faiss is not installed; `pip install faiss-gpu` (it also runs on CPU)") from e
    return faiss


def use_faiss_gpu(device="auto"):
    """True when faiss should put the index on a GPU: ``device`` allows it and faiss sees one."""
    if device == "cpu":
        return False
    faiss = _faiss()
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device == "cuda" and not has_gpu:
        raise UserError("--device cuda but faiss sees no GPU (CPU-only faiss build or no GPU)")
    return has_gpu


class DescriptorIndex:
    """Inner-product search over L2-normalised (or ±1 hashed) descriptors, with gallery metadata.

    kind: ``flat`` (exact, default), ``ivfflat``, ``ivfpq``, ``hnsw``. ``nlist`` (IVF cells;
    default ``4 * sqrt(N)`` at training time), ``nprobe`` (cells visited per query), ``pq_m``
    (PQ sub-quantisers; must divide the dimension) and ``pq_bits``, ``hnsw_m`` (graph degree),
    ``ef_search`` / ``ef_construction`` (HNSW beam widths), ``refine`` (IVF-PQ only: re-rank
    ``refine`` x k PQ candidates with exact distances; 0 = off). Search returns similarities
    (higher = closer) and gallery positions; ``names`` / ``labels`` give their metadata.
    The same code runs on CPU and GPU: with ``device`` ``auto`` the index lives on GPU 0 when
    faiss sees one (HNSW and refinement have no GPU version and stay on CPU).
    """

    def __init__(self, dim, kind="flat", *, nlist=None, nprobe=16, pq_m=None, pq_bits=8,
                 hnsw_m=32, ef_search=128, ef_construction=80, refine=0, device="auto"):
        if kind not in INDEX_KINDS:
            raise UserError(f"unknown index kind '{kind}'; choose from {', '.join(INDEX_KINDS)}")
        self.dim, self.kind = int(dim), kind
        self.params = dict(nlist=nlist, nprobe=int(nprobe), pq_m=pq_m, pq_bits=int(pq_bits),
                           hnsw_m=int(hnsw_m), ef_search=int(ef_search),
                           ef_construction=int(ef_construction), refine=int(refine))
        if kind == "ivfpq":
            m = pq_m or _default_pq_m(self.dim)
            if self.dim % m:
                raise UserError(f"--pq-m {m} must divide the descriptor dimension {self.dim}")
            self.params["pq_m"] = m
        self.device = device
        self.on_gpu = False
        self.index = None
        self.names, self.labels = [], []
        self.label_names = None
        self.transform = None  # DescriptorTransform applied to gallery and queries, if any
        if kind in ("flat", "hnsw"):
            self._build(None)

    # -- construction ------------------------------------------------------------------------
    def _build(self, n_train):
        faiss = _faiss()
        p, d = self.params, self.dim
        ip = faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p["hnsw_m"], ip)
            index.hnsw.efConstruction = p["ef_construction"]
        else:
            # ~4 sqrt(N) cells (faiss wiki "Guidelines to choose an index"), at most N / 39 so
            # k-means has its recommended 39 points per centroid.
            nlist = p["nlist"] or max(1, min(int(4 * math.sqrt(n_train)), n_train // 39))
            p["nlist"] = int(nlist)
            quantizer = faiss.IndexFlatIP(d)
            if self.kind == "ivfflat":
                index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
            else:
                index = faiss.IndexIVFPQ(quantizer, d, nlist, p["pq_m"], p["pq_bits"], ip)
            # The C++ index does not own the quantizer here: keep the Python object alive.
            self._quantizer = quantizer
        if self.kind != "hnsw" and use_faiss_gpu(self.device) and not p["refine"]:
            res = faiss.StandardGpuResources()
            self._gpu_res = res
            index = faiss.index_cpu_to_gpu(res, 0, index)
            self.on_gpu = True
        if self.kind == "ivfpq" and p["refine"]:
            index = faiss.IndexRefineFlat(index)
        self.index = index
        self._set_search_params()

    def _set_search_params(self):
        faiss = _faiss()
        if self.kind in ("ivfflat", "ivfpq"):
            space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
            space.set_index_parameter(self.index, "nprobe", self.params["nprobe"])
            if self.params["refine"]:
                self.index.k_factor = float(self.params["refine"])
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = self.params["ef_search"]

    def set_nprobe(self, nprobe):
        self.params["nprobe"] = int(nprobe)
        if self.index is not None:
            self._set_search_params()

    def set_ef_search(self, ef):
        self.params["ef_search"] = int(ef)
        if self.index is not None:
            self._set_search_params()

    @property
    def is_trained(self):
        return self.index is not None and self.index.is_trained

    @property
    def ntotal(self):
        return 0 if self.index is None else int(self.index.ntotal)

    def _check(self, x):
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"descriptors must be (N, {self.dim}), got {tuple(x.shape)}")
        return x

    def train(self, x):
        """Train an IVF index (k-means, and PQ codebooks) on x: (N, D). No-op for flat / HNSW."""
        x = self._check(x)
        if self.index is None:
            if len(x) < 39 and self.params["nlist"] is None:
                raise UserError(f"an IVF index needs at least 39 training descriptors, got {len(x)}; "
                                f"use --index flat for small galleries")
            self._build(len(x))
        if not self.index.is_trained:
            if self.kind == "ivfpq" and len(x) < 2 ** self.params["pq_bits"]:
                raise UserError(f"IVF-PQ with {self.params['pq_bits']}-bit codes needs at least "
                                f"{2 ** self.params['pq_bits']} training descriptors, got {len(x)}; "
                                f"lower --pq-bits or use --index ivfflat / flat")
            self.index.train(x)
        return self

    def add(self, x, names=None, labels=None):
        """Append gallery descriptors x: (N, D) with optional names (str) and labels (int).

        An untrained IVF index is trained on the first batch added.
        """
        x = self._check(x)
        if not self.is_trained:
            self.train(x)
        n = len(x)
        names = [str(s) for s in names] if names is not None else [str(self.ntotal + i) for i in range(n)]
        labels = [int(v) for v in labels] if labels is not None else [-1] * n
        if len(names) != n or len(labels) != n:
            raise UserError(f"add() got {n} descriptors but {len(names)} names / {len(labels)} labels")
        self.index.add(x)
        self.names.extend(names)
        self.labels.extend(labels)
        return self

    def search(self, q, k=10):
        """q: (Q, D) -> ``scores (Q, k)`` float32 similarities and ``ids (Q, k)`` int64 gallery
        positions, best first (-1 / -inf where the gallery has fewer than k entries)."""
        q = self._check(q)
        if self.ntotal == 0:
            raise UserError("the gallery index is empty; add descriptors first")
        k = int(k)
        scores, ids = self.index.search(q, k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    # -- persistence -------------------------------------------------------------------------
    def save(self, path):
        """Write index, parameters, gallery names / labels and the descriptor transform to one
        ``.npz`` file (no pickle; loadable with ``allow_pickle=False``)."""
        faiss = _faiss()
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        meta = {"dim": self.dim, "kind": self.kind, "params": self.params, "names": self.names,
                "labels": self.labels, "label_names": self.label_names,
                "transform": None if self.transform is None else self.transform.state()}
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, index=faiss.serialize_index(index),
                 meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, device="auto"):
        faiss = _faiss()
        try:
            with np.load(path, allow_pickle=False) as f:
                raw, meta = f["index"], json.loads(f["meta"].tobytes().decode())
        except (OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"cannot read retrieval index '{path}' ({e}); build one with "
                                  f"eval_retrieval.py --save-index or predict_retrieval.py --gallery DIR") from e
        self = cls.__new__(cls)
        self.dim, self.kind, self.params = meta["dim"], meta["kind"], meta["params"]
        self.device, self.on_gpu = device, False
        self.names, self.labels = meta["names"], meta["labels"]
        self.label_names = meta.get("label_names")
        self.transform = None if meta.get("transform") is None else DescriptorTransform.from_state(meta["transform"])
        index = faiss.deserialize_index(raw)
        if self.kind in ("flat", "ivfflat", "ivfpq") and not self.params.get("refine") and use_faiss_gpu(device):
            self._gpu_res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            self.on_gpu = True
        self.index = index
        self._set_search_params()
        return self


def _default_pq_m(dim):
    # 16 dimensions per sub-quantiser (32 bytes per 512-d vector with 8-bit codes, 64x smaller
    # than float32); 8-d sub-vectors train about twice as slowly for little recall with refine
    for m in (dim // 16, 32, 16, 8, 4, 2, 1):
        if m >= 1 and dim % m == 0:
            return m
    return 1


def exact_topk(gallery, queries, k):
    """Brute-force inner-product top-k in NumPy (the reference for tests and recall).

    gallery: (N, D), queries: (Q, D) -> ``scores (Q, k)``, ``ids (Q, k)``; ties by lower id.
    """
    sims = np.asarray(queries, dtype=np.float64) @ np.asarray(gallery, dtype=np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def recall_at_k(approx_ids, exact_ids):
    """Fraction of the exact top-k found in the approximate top-k. Both (Q, k)."""
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids))
    return hits / exact_ids.size


# ---------------------------------------------------------------------------------------------
# Neighbour-vote diagnosis (EndoFinder §4, recommended spec)
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


# ---------------------------------------------------------------------------------------------
# Shared by train / eval / predict scripts
# ---------------------------------------------------------------------------------------------

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
    g.add_argument("--decoder-depth", dest="decoder_depth", type=int, default=2)
    g.add_argument("--use-head", dest="use_head", action="store_true",
                   help="inference descriptor after the 512-d projection (SSCD) instead of the "
                        "backbone CLS / GeM embedding (EndoFinder, default)")
    return p


def build_model(args, encoder):
    """``RetrievalModel`` from the flags of ``add_model_arguments``."""
    return RetrievalModel(encoder, dim=args.embedding_dim, gem_p=args.gem_p, mask_ratio=args.mask_ratio,
                          decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth)


@torch.inference_mode()
def extract_descriptors(model, paths, *, image_size, batch_size, device, workers=0, use_head=False,
                        amp=True):
    """Descriptors of image files: (len(paths), D) float32 numpy, L2-normalised, in order."""
    from gissl.engine import autocast, make_loader
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
    """Copy-detection protocol (endofinder.md §3) on a ``retrieval_data.twin_set``.

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
    g.add_argument("--weights", default=None,
                   help="a train_retrieval.py checkpoint to use instead of the one named by the flags")
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


def load_model(args, device):
    """The descriptor model for eval / predict, in eval mode on ``device`` (its ``embed``
    compiled with eval ``--compile``)."""
    import argparse
    from gissl import cli
    from gissl.engine import compile_model, prepare_for_eval
    from gissl.models import build_encoder, vit_num_heads
    torch.manual_seed(args.seed)  # --untrained: the same random init as train_retrieval.py
    if args.untrained:
        model = build_model(args, build_encoder(args.arch, args.pretraining, args.ss_framework, args.checkpoint,
                                                img_size=args.image_size))
    else:
        model = build_model(args, build_encoder(args.arch, img_size=args.image_size,
                                                num_heads=vit_num_heads(args.arch, args.ss_framework)))
        named = argparse.Namespace(**vars(args))
        named.dataset, named.task = args.train_dataset, "retrieval"
        cli.load_trained(model, named, path=args.weights)
    model = prepare_for_eval(model, device)
    if getattr(args, "compile", False):
        # descriptors come from embed(), not forward(): compile that (image -> embedding)
        model.embed = compile_model(model.embed, device)
    return model


def make_postprocess(args, model, device):
    """``DescriptorTransform`` from the flags; fitted on ``--whiten-gallery`` when given."""
    if args.postprocess == "none" and not args.hash:
        return None
    t = DescriptorTransform(args.postprocess, args.pca_dim, args.hash)
    if args.postprocess != "none" and args.whiten_gallery:
        from gissl.data import image_folder
        paths = [s["image"] for s in image_folder(args.whiten_gallery)]
        t.fit(extract_descriptors(model, paths, image_size=args.image_size, batch_size=args.batch_size,
                                  device=device, workers=args.workers, use_head=args.use_head,
                                  amp=not args.no_amp))
    return t
