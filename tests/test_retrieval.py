"""Retrieval library: polyp-aware masking, descriptor transforms, faiss index, neighbour vote."""
import time

import numpy as np
import pytest
import torch

from gissl.errors import UserError
from gissl.retrieval import (DescriptorIndex, DescriptorTransform, exact_topk, neighbour_vote,
                             patch_coverage, polyp_aware_masking, recall_at_k, vote_sentence)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---- polyp-aware masking ----------------------------------------------------------------------

def test_polyp_aware_masking_never_masks_a_patch_touching_the_polyp():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(16, 1, 64, 64)
    for i in range(16):  # random boxes of polyp, some only one pixel into a patch
        y, x = torch.randint(0, 50, (2,), generator=g).tolist()
        h, w = torch.randint(1, 30, (2,), generator=g).tolist()
        masks[i, 0, y:y + h, x:x + w] = 1.0
    masks[0, 0, 17, 17] = 1.0  # a single pixel touching a patch is still "touching"
    masks[1].zero_()           # no polyp: plain random masking
    cov = patch_coverage(masks, 16)  # (16, 16 patches)
    ids_keep, masked = polyp_aware_masking(cov, num_keep=8, generator=g)
    assert ids_keep.shape == (16, 8) and masked.shape == (16, 16)
    assert (masked.sum(1) == 8).all()
    touching = cov > 0
    for i in range(16):
        if touching[i].sum() <= 8:
            assert not (masked[i] & touching[i]).any()
        else:  # the polyp is larger than the visible budget: only polyp patches are visible
            assert touching[i][~masked[i]].all()
    assert not masked[0].view(4, 4)[1, 1]


def test_masks_binarised_before_scoring():
    masks = torch.full((1, 1, 32, 32), 0.2)  # JPEG-like noise below 0.5 is background
    assert patch_coverage(masks, 16).sum() == 0


# ---- descriptor transform --------------------------------------------------------------------

def test_pca_whitening_and_hash():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16)) + 3.0
    t = DescriptorTransform("pcaw", dim=8).fit(x)
    raw = (x - t.mean) @ t.projection
    assert np.allclose(np.cov(raw, rowvar=False), np.eye(8), atol=1e-6)
    y = t(x)
    assert y.shape == (500, 8) and np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    h = DescriptorTransform("center", hash=True).fit(x)
    codes = h(x[:5])
    assert set(np.unique(codes)) <= {-1.0, 1.0}
    hamming = (codes[0] != codes[1]).sum()
    assert codes[0] @ codes[1] == 16 - 2 * hamming
    with pytest.raises(UserError):
        DescriptorTransform("pcaw")(x)


# ---- faiss index ------------------------------------------------------------------------------

def test_exact_search_equals_numpy_bruteforce():
    rng = np.random.default_rng(1)
    gallery, queries = _unit(rng.standard_normal((3000, 64))), _unit(rng.standard_normal((40, 64)))
    index = DescriptorIndex(64, "flat", device="cpu").add(gallery[:1000]).add(gallery[1000:])
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = exact_topk(gallery, queries, 10)
    assert (ids == ref_ids).all()
    assert np.allclose(scores, ref_scores, atol=1e-5)


def test_save_load_incremental_metadata(tmp_path):
    rng = np.random.default_rng(2)
    gallery = _unit(rng.standard_normal((2000, 32)))
    index = DescriptorIndex(32, "ivfflat", nprobe=4, device="cpu")
    index.transform = DescriptorTransform("center").fit(gallery)
    index.label_names = ["a", "b"]
    index.add(gallery[:1500], names=[f"g{i}" for i in range(1500)], labels=[i % 2 for i in range(1500)])
    path = tmp_path / "gallery.npz"
    index.save(path)
    loaded = DescriptorIndex.load(path, device="cpu")
    loaded.add(gallery[1500:], names=[f"g{i}" for i in range(1500, 2000)], labels=[0] * 500)
    assert loaded.ntotal == 2000 and loaded.names[1700] == "g1700" and loaded.labels[3] == 1
    assert loaded.label_names == ["a", "b"] and loaded.params["nprobe"] == 4
    assert np.allclose(loaded.transform.mean, index.transform.mean)
    # visiting every cell makes IVF-Flat exact
    loaded.set_nprobe(loaded.params["nlist"])
    _, ids = loaded.search(gallery[:20], 5)
    _, ref = exact_topk(gallery, gallery[:20], 5)
    assert (ids == ref).all()


def test_ivfpq_with_refinement_and_small_gallery():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((50, 64))
    gallery = _unit(centres[rng.integers(0, 50, 4000)] + 0.3 * rng.standard_normal((4000, 64)))
    queries = _unit(gallery[:50] + 0.05 * rng.standard_normal((50, 64)))
    index = DescriptorIndex(64, "ivfpq", nprobe=8, pq_m=8, pq_bits=6, refine=10, device="cpu")
    index.add(gallery)
    _, ids = index.search(queries, 10)
    _, ref = exact_topk(gallery, queries, 10)
    assert recall_at_k(ids, ref) >= 0.9
    scores, ids = DescriptorIndex(64, device="cpu").add(gallery[:3]).search(queries[:1], 5)
    assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    with pytest.raises(UserError):
        DescriptorIndex(64, "ivfflat", device="cpu").add(gallery[:10])


@pytest.mark.slow
def test_approximate_recall_at_10_on_100k():
    """IVF-Flat and HNSW reach recall@10 >= 0.95 of exact search on 100k 512-d vectors."""
    rng = np.random.default_rng(0)
    n, d = 100_000, 512
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    x = centres[rng.integers(0, 1000, n + 200)] + 0.6 * rng.standard_normal((n + 200, d), dtype=np.float32)
    x = _unit(x)
    gallery, queries = x[:n], x[n:]
    t = time.perf_counter()
    _, exact = DescriptorIndex(d, "flat", device="cpu").add(gallery).search(queries, 10)
    t_exact = time.perf_counter() - t
    for kind, kw in [("ivfflat", dict(nprobe=16)), ("hnsw", dict(hnsw_m=16, ef_construction=40, ef_search=128))]:
        index = DescriptorIndex(d, kind, device="cpu", **kw)
        index.train(gallery[:20000]).add(gallery)
        t = time.perf_counter()
        _, ids = index.search(queries, 10)
        t_approx = time.perf_counter() - t
        recall = recall_at_k(ids, exact)
        print(f"{kind}: recall@10 {recall:.4f}, search speed-up x{t_exact / t_approx:.1f} vs exact")
        assert recall >= 0.95, kind


# ---- neighbour vote ----------------------------------------------------------------------------

def test_neighbour_vote_majority_ties_and_weights():
    labels = np.array([[2, 1, 1, 2, 0], [0, 0, 1, -1, -1], [-1, -1, -1, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.5], [0.2, 0.2, 0.9, 0.5, 0.5], [0.1] * 5])
    pred, shares = neighbour_vote(labels, num_classes=3)
    assert pred.tolist() == [2, 0, -1]  # row 0: 2 and 1 tie, the nearest (2) decides
    assert np.allclose(shares[0], [0.2, 0.4, 0.4]) and np.allclose(shares[1], [2 / 3, 1 / 3, 0])
    wpred, _ = neighbour_vote(labels, scores, num_classes=3, weighted=True)
    assert wpred[:2].tolist() == [1, 1]  # 1.5 > 1.0 and 0.9 > 0.4
    assert vote_sentence(labels[0], 2, ["a", "b", "adenoma"]) == "2 of 5 nearest cases were adenoma"
