"""Retrieval throughput: descriptor extraction (images/s) and search (queries/s), exact vs
approximate faiss indexes at several gallery sizes, with the recall@10 of each approximate
index against exact search. Uses the GPU for the model and faiss when one is visible.

Gallery vectors are synthetic 512-d unit vectors drawn around 1,000 random centres (real
descriptors are clustered; uniform random vectors are the worst case of every approximate
index and would understate it). Examples:

    python benchmark_retrieval.py                                   # 10k and 1M, all indexes
    python benchmark_retrieval.py --sizes 10000 --architecture resnet18 --image-size 64
"""
import argparse
import json
import time

import numpy as np
import torch

from gissl import dist
from gissl.retrieval import RetrievalModel
from gissl.search import DescriptorIndex, recall_at_k, use_faiss_gpu


def get_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--architecture", default="resnet50", help="encoder whose descriptor extraction is timed")
    p.add_argument("--image-size", dest="image_size", type=int, default=224)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--embed-batches", dest="embed_batches", type=int, default=3, help="timed batches")
    p.add_argument("--sizes", default="10000,1000000", help="gallery sizes (comma-separated)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--kinds", default="ivfflat,ivfpq,hnsw", help="approximate indexes to compare with exact")
    p.add_argument("--hnsw-max", dest="hnsw_max", type=int, default=200_000,
                   help="skip HNSW above this gallery size (its CPU build is the slowest step)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF cells visited per query")
    p.add_argument("--train-size", dest="train_size", type=int, default=50_000,
                   help="vectors used to train IVF / PQ")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args()


def clustered(rng, n, dim, centres, chunk=100_000):
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centres[rng.integers(0, len(centres), e - s)] + 0.6 * rng.standard_normal((e - s, dim), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


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


def main(args):
    device = dist.resolve_device(args.device)
    faiss_device = "cpu" if device.type == "cpu" else "auto"
    results = {"device": str(device), "faiss_gpu": use_faiss_gpu(faiss_device), "search": []}
    ips = embedding_throughput(args, device)
    results["embedding"] = {"architecture": args.architecture, "image_size": args.image_size,
                            "batch_size": args.batch_size, "images_per_s": ips}
    print(f"descriptor extraction ({args.architecture}, {args.image_size} px, batch {args.batch_size}, "
          f"{device}): {ips:.1f} images/s", flush=True)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
    queries = clustered(rng, args.queries, args.dim, centres)
    for n in [int(s) for s in args.sizes.split(",")]:
        gallery = clustered(rng, n, args.dim, centres)
        t = time.perf_counter()
        exact = DescriptorIndex(args.dim, "flat", device=faiss_device).add(gallery)
        build = time.perf_counter() - t
        exact_ids, qps = timed_search(exact, queries)
        row = {"gallery": n, "index": "flat", "build_s": build, "queries_per_s": qps, "recall@10": 1.0}
        results["search"].append(row)
        print(f"N={n:>9,}  flat     build {build:7.1f} s  {qps:10.1f} queries/s  recall@10 1.000", flush=True)
        del exact
        for kind in args.kinds.split(","):
            if kind == "hnsw" and n > args.hnsw_max:
                print(f"N={n:>9,}  hnsw     skipped (gallery > --hnsw-max {args.hnsw_max:,})", flush=True)
                continue
            t = time.perf_counter()
            index = DescriptorIndex(args.dim, kind, nprobe=args.nprobe, device=faiss_device,
                                    refine=10 if kind == "ivfpq" else 0)
            index.train(gallery[:args.train_size]).add(gallery)
            build = time.perf_counter() - t
            ids, qps = timed_search(index, queries)
            rec = recall_at_k(ids, exact_ids)
            results["search"].append({"gallery": n, "index": kind, "build_s": build, "queries_per_s": qps,
                                      "recall@10": rec, "on_gpu": index.on_gpu})
            print(f"N={n:>9,}  {kind:<8} build {build:7.1f} s  {qps:10.1f} queries/s  recall@10 {rec:.3f}",
                  flush=True)
            del index
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(get_args())
