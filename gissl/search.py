"""Nearest-neighbour search over descriptors: faiss indexes and descriptor post-processing.

- ``DescriptorTransform``: optional centering or PCA-whitening fitted on a training gallery,
  re-normalisation, optional sign hashing (+1 / -1 per dimension, docs/endofinder-retrieval.md §2).
- ``DescriptorIndex``: faiss inner-product search (exact by default; IVF-Flat, IVF-PQ, HNSW
  by name) with training, ``nprobe``, save / load to one ``.npz`` file, incremental ``add``,
  names and labels of the gallery; a GPU index when faiss sees a GPU, CPU otherwise.
- ``exact_topk`` / ``recall_at_k``: the exact answer and how much of it an approximate index finds.
"""
import json
import math
import zipfile

import numpy as np

from gissl.errors import CheckpointError, UserError

INDEX_KINDS = ("flat", "ivfflat", "ivfpq", "hnsw")


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
        ``.npz`` file (no pickle; loadable with ``allow_pickle=False``).

        Atomic (``gissl.checkpoint.save_atomic``: temporary file, fsync, rename): a crash or a
        kill during the save leaves the previous file loadable, never a partial one."""
        from gissl.checkpoint import save_atomic
        faiss = _faiss()
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        meta = {"dim": self.dim, "kind": self.kind, "params": self.params, "names": self.names,
                "labels": self.labels, "label_names": self.label_names,
                "transform": None if self.transform is None else self.transform.state()}
        arrays = {"index": faiss.serialize_index(index),
                  "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        save_atomic(arrays, path, writer=lambda obj, f: np.savez(f, **obj))

    @classmethod
    def load(cls, path, device="auto"):
        faiss = _faiss()
        try:
            with np.load(path, allow_pickle=False) as f:
                raw, meta = f["index"], json.loads(f["meta"].tobytes().decode())
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
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
