"""Retrieval throughput: descriptor extraction (images/s) and search (queries/s), exact vs
approximate faiss indexes at several gallery sizes, with each approximate index's build time,
memory, tuned search parameter, speed-up over exact search and recall@10 against it. Uses the GPU
for the model and faiss when one is visible.

Gallery vectors (``--data manifold``, default) have the structure of real descriptors: a mixture
of ``--components`` cases (each with its augmentations around it) on a curved manifold of
intrinsic dimension ``--intrinsic-dim`` (16) embedded in 512-d by a fixed random 2-layer map,
plus isotropic noise, L2-normalised. ``--data clustered``: near-isotropic Gaussian clusters, the
worst case of every approximate index. Each approximate index is tuned (``nprobe`` for IVF,
``efSearch`` for HNSW: the smallest value whose recall@10 on separate tuning queries reaches
``--target-recall``) and then timed on the test queries. Examples:

    python benchmark_retrieval.py                                   # 10k and 1M
    python benchmark_retrieval.py --sizes 10000 --architecture resnet18 --image-size 64
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch

from gissl import dist
from gissl.retrieval import RetrievalModel
from gissl.search import DescriptorIndex, recall_at_k, use_faiss_gpu


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--architecture", default="resnet50", help="encoder whose descriptor extraction is timed")
    p.add_argument("--image-size", dest="image_size", type=int, default=224, help="input side, in pixels")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="images per timed batch")
    p.add_argument("--embed-batches", dest="embed_batches", type=int, default=3,
                   help="timed batches (0 skips the descriptor extraction timing)")
    p.add_argument("--sizes", default="10000,1000000", help="gallery sizes, in vectors (comma-separated)")
    p.add_argument("--dim", type=int, default=512, help="descriptor dimension")
    p.add_argument("--data", default="manifold", choices=["manifold", "clustered"],
                   help="synthetic descriptors: low-dimensional mixture (realistic) or isotropic clusters")
    p.add_argument("--intrinsic-dim", dest="intrinsic_dim", type=int, default=16,
                   help="manifold data: dimension of the latent space")
    p.add_argument("--components", type=int, default=2000, help="mixture components (cases / clusters)")
    p.add_argument("--queries", type=int, default=1000, help="timed test queries (batched, as one search call)")
    p.add_argument("--tune-queries", dest="tune_queries", type=int, default=1000,
                   help="separate queries on which nprobe / efSearch are tuned")
    p.add_argument("--target-recall", dest="target_recall", type=float, default=0.95,
                   help="recall@10 the approximate indexes must reach on the test queries")
    p.add_argument("--tune-margin", dest="tune_margin", type=float, default=0.01,
                   help="the tuning aims at --target-recall plus this much (recall varies between query sets)")
    p.add_argument("--kinds", default="ivfflat,hnsw", help="approximate indexes to compare with exact")
    p.add_argument("--hnsw-max", dest="hnsw_max", type=int, default=2_000_000,
                   help="skip HNSW above this gallery size (its CPU build is the slowest step)")
    p.add_argument("--hnsw-m", dest="hnsw_m", type=int, default=32, help="HNSW graph degree M")
    p.add_argument("--ef-construction", dest="ef_construction", type=int, default=40,
                   help="HNSW build beam width (higher: better graph, slower build)")
    p.add_argument("--nlist", type=int, default=None,
                   help="IVF cells (default: 2 * sqrt(N), a power of two; more cells: faster search, slower training)")
    p.add_argument("--train-size", dest="train_size", type=int, default=None,
                   help="vectors used to train IVF / PQ (default: 20 per cell)")
    p.add_argument("--refine", type=int, default=10, help="IVF-PQ: exact re-ranking of refine x k candidates")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model and faiss run: auto = the GPU when there is one")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic descriptors")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


class Descriptors:
    """Synthetic unit descriptors drawn from one fixed distribution (see the module docstring)."""

    def __init__(self, rng, *, dim=512, data="manifold", intrinsic_dim=16, components=2000):
        self.rng, self.dim, self.data = rng, dim, data
        latent = intrinsic_dim if data == "manifold" else dim
        self.centres = rng.standard_normal((components, latent), dtype=np.float32)
        if data == "manifold":
            hidden = 4 * intrinsic_dim
            self.w1 = rng.standard_normal((latent, hidden), dtype=np.float32) / math.sqrt(latent)
            self.b1 = rng.standard_normal(hidden, dtype=np.float32) * 0.5
            self.w2 = rng.standard_normal((hidden, dim), dtype=np.float32) / math.sqrt(hidden)

    def sample(self, n, chunk=100_000):
        out = np.empty((n, self.dim), np.float32)
        for s in range(0, n, chunk):
            m = min(n, s + chunk) - s
            z = self.centres[self.rng.integers(0, len(self.centres), m)]
            if self.data == "manifold":  # a case's augmentations spread around it on the manifold
                z = z + 0.35 * self.rng.standard_normal(z.shape, dtype=np.float32)
                x = np.tanh(z @ self.w1 + self.b1) @ self.w2
                x += 0.02 * np.linalg.norm(x, axis=1, keepdims=True) * self.rng.standard_normal(x.shape,
                                                                                                 dtype=np.float32)
            else:
                x = z + 0.6 * self.rng.standard_normal(z.shape, dtype=np.float32)
            out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def rss_bytes():
    """Resident memory of this process (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


@torch.no_grad()
def embedding_throughput(args, device):
    from gissl.engine import autocast
    from gissl.models import build_encoder
    model = RetrievalModel(build_encoder(args.architecture, img_size=args.image_size), mask_ratio=0).to(device).eval()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with autocast(device):
        model.descriptor(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.embed_batches):
            model.descriptor(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return args.embed_batches * args.batch_size / (time.perf_counter() - t)


def timed_search(index, queries, k=10):
    t = time.perf_counter()
    _, ids = index.search(queries, k)
    return ids, len(queries) / (time.perf_counter() - t)


def tune(index, kind, tune_queries, tune_exact, target):
    """Smallest nprobe / efSearch whose recall@10 on the tuning queries reaches ``target``."""
    if kind == "hnsw":
        values, setter = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512), index.set_ef_search
    else:
        nlist = index.params["nlist"]
        values, setter = [v for v in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256) if v <= nlist], index.set_nprobe
    for v in values:
        setter(v)
        if recall_at_k(index.search(tune_queries, 10)[1], tune_exact) >= target:
            return v
    return values[-1]


def build_approximate(args, kind, gallery, faiss_device):
    """(index, build seconds, resident bytes added) of one approximate index over ``gallery``."""
    n = len(gallery)
    nlist = args.nlist or min(2 ** round(math.log2(2 * math.sqrt(n))), max(1, n // 39))
    train = gallery[:min(n, args.train_size or 20 * nlist)]
    before = rss_bytes()
    t = time.perf_counter()
    index = DescriptorIndex(args.dim, kind, nlist=nlist, device=faiss_device, hnsw_m=args.hnsw_m,
                            ef_construction=args.ef_construction, refine=args.refine if kind == "ivfpq" else 0)
    index.train(train).add(gallery)
    build = time.perf_counter() - t
    after = rss_bytes()
    return index, build, None if before is None or after is None else after - before


def compare(args, n, sampler, queries, tune_queries, faiss_device):
    """Rows of one gallery size: exact, then each approximate index tuned and timed."""
    gallery = sampler.sample(n)
    t = time.perf_counter()
    exact = DescriptorIndex(args.dim, "flat", device=faiss_device).add(gallery)
    build = time.perf_counter() - t
    exact_ids, exact_qps = timed_search(exact, queries)
    tune_exact = exact.search(tune_queries, 10)[1]
    del exact
    rows = [{"gallery": n, "index": "flat", "build_s": build, "queries_per_s": exact_qps, "recall@10": 1.0,
             "speedup": 1.0, "memory_mb": gallery.nbytes / 2 ** 20}]
    print(f"N={n:>9,}  flat     build {build:7.1f} s  {exact_qps:10.1f} queries/s  recall@10 1.000", flush=True)
    for kind in args.kinds.split(","):
        if kind == "hnsw" and n > args.hnsw_max:
            print(f"N={n:>9,}  hnsw     skipped (gallery > --hnsw-max {args.hnsw_max:,})", flush=True)
            continue
        index, build, memory = build_approximate(args, kind, gallery, faiss_device)
        value = tune(index, kind, tune_queries, tune_exact, args.target_recall + args.tune_margin)
        ids, qps = timed_search(index, queries)
        rec = recall_at_k(ids, exact_ids)
        param = {"hnsw": "efSearch"}.get(kind, "nprobe")
        rows.append({"gallery": n, "index": kind, "build_s": build, "queries_per_s": qps, "recall@10": rec,
                     "speedup": qps / exact_qps, param: value,
                     "nlist": None if kind == "hnsw" else index.params.get("nlist"),
                     "memory_mb": None if memory is None else memory / 2 ** 20, "on_gpu": index.on_gpu,
                     "meets_target": rec >= args.target_recall and qps / exact_qps >= 20})
        mem = "" if memory is None else f"  +{memory / 2 ** 20:,.0f} MB"
        print(f"N={n:>9,}  {kind:<8} build {build:7.1f} s  {qps:10.1f} queries/s  recall@10 {rec:.3f}  "
              f"x{qps / exact_qps:.1f} vs exact  ({param} {value}{', nlist ' + str(index.params['nlist']) if kind != 'hnsw' else ''}){mem}",
              flush=True)
        del index
    return rows


def main(args):
    device = dist.resolve_device(args.device)
    faiss_device = "cpu" if device.type == "cpu" else "auto"
    results = {"device": str(device), "faiss_gpu": use_faiss_gpu(faiss_device), "data": args.data, "search": []}
    if args.embed_batches > 0:
        ips = embedding_throughput(args, device)
        results["embedding"] = {"architecture": args.architecture, "image_size": args.image_size,
                                "batch_size": args.batch_size, "images_per_s": ips}
        print(f"descriptor extraction ({args.architecture}, {args.image_size} px, batch {args.batch_size}, "
              f"{device}): {ips:.1f} images/s", flush=True)
    sampler = Descriptors(np.random.default_rng(args.seed), dim=args.dim, data=args.data,
                          intrinsic_dim=args.intrinsic_dim, components=args.components)
    queries, tune_queries = sampler.sample(args.queries), sampler.sample(args.tune_queries)
    for n in [int(s) for s in args.sizes.split(",")]:
        results["search"].extend(compare(args, n, sampler, queries, tune_queries, faiss_device))
    if args.out:
        from gissl.checkpoint import save_atomic
        save_atomic(json.dumps(results, indent=2).encode(), args.out, writer=lambda b, f: f.write(b))
    return results


if __name__ == "__main__":
    main(get_args())
