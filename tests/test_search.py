"""gissl.search for the retrieval service (issue #20): every index kind saves atomically and loads
back equal, and benchmark_retrieval.py's descriptors have a low intrinsic dimension (unlike its
isotropic clusters) and its tuned indexes meet their recall at tiny sizes."""
import numpy as np
import pytest

from gissl.errors import CheckpointError
from gissl.search import DescriptorIndex, exact_topk, recall_at_k


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "ivfflat", "hnsw"])
def test_index_round_trip_and_a_failed_save_keeps_the_previous_file(kind, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((1200, 32)))
    index = DescriptorIndex(32, kind, nlist=16, nprobe=16, device="cpu")
    index.add(x[:1000], names=[f"c{i}" for i in range(1000)], labels=[i % 3 for i in range(1000)])
    index.label_names = ["a", "b", "c"]
    path = tmp_path / "index.npz"
    index.save(path)
    loaded = DescriptorIndex.load(path, device="cpu")
    assert (loaded.search(x[:20], 5)[1] == index.search(x[:20], 5)[1]).all()
    assert loaded.names[7] == "c7" and loaded.labels[7] == 1 and loaded.label_names == ["a", "b", "c"]
    _, ref = exact_topk(x[:1000], x[:20], 5)
    assert recall_at_k(loaded.search(x[:20], 5)[1], ref) >= 0.9
    # a save that dies half-way through writing leaves the previous file as it was, and no temporary file
    loaded.add(x[1000:], names=[f"n{i}" for i in range(200)], labels=[0] * 200)

    def dying(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", dying)
    with pytest.raises(OSError):
        loaded.save(path)
    monkeypatch.undo()
    assert DescriptorIndex.load(path, device="cpu").ntotal == 1000
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]
    loaded.save(path)
    assert DescriptorIndex.load(path, device="cpu").ntotal == 1200
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(CheckpointError, match="cannot read retrieval index"):
        DescriptorIndex.load(tmp_path / "broken.npz", device="cpu")


def _dims_for(x, share):
    """Principal components needed for ``share`` of the variance (numpy SVD)."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(s) / s.sum(), share) + 1)


def test_benchmark_descriptors_and_tuned_indexes_at_tiny_size(tmp_path):
    import json

    import benchmark_retrieval as B
    manifold = B.Descriptors(np.random.default_rng(0), data="manifold").sample(3000)
    clustered = B.Descriptors(np.random.default_rng(0), data="clustered").sample(3000)
    assert np.allclose(np.linalg.norm(manifold, axis=1), 1, atol=1e-5)
    # the realistic mixture lives near a low-dimensional manifold (3/4 of its variance in <= 32 principal
    # axes, the rest the 512-d noise); isotropic clusters spread theirs over hundreds of axes
    assert _dims_for(manifold, 0.75) <= 32 < 200 <= _dims_for(clustered, 0.75)
    out = tmp_path / "bench.json"
    B.main(B.get_args(["--embed-batches", "0", "--sizes", "4000", "--queries", "100", "--tune-queries", "50",
                       "--components", "100", "--kinds", "ivfflat,hnsw", "--device", "cpu", "--out", str(out)]))
    rows = json.loads(out.read_text())["search"]
    assert [r["index"] for r in rows] == ["flat", "ivfflat", "hnsw"]
    ivf, hnsw = rows[1], rows[2]
    assert ivf["nlist"] == 4000 // 39 and 1 <= ivf["nprobe"] <= ivf["nlist"] and hnsw["efSearch"] >= 16
    for r in rows[1:]:
        assert r["recall@10"] >= 0.9 and r["build_s"] > 0 and r["speedup"] > 0
