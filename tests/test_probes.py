"""Representation probes: logistic regression vs scikit-learn, kNN / few-shot on features with
known structure, invariance and occlusion on encoders with known behaviour, frozen encoder."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression as SkLogReg
from sklearn.preprocessing import StandardScaler

from gissl import probes
from gissl.errors import UserError


def _blobs(n_per_class, num_classes, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_logistic_regression_matches_sklearn():
    x, y = _blobs(60, 4, 12, spread=3.0, seed=0)  # overlapping: accuracy well below 1
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:160], y[:160], x[160:], y[160:]
    for C in (0.01, 1.0):
        ours = probes.fit_logistic_regression(xtr, ytr, 4, C=C)
        acc = float((ours.logits(xte).argmax(1) == yte).double().mean())
        scaler = StandardScaler().fit(xtr.numpy())
        sk = SkLogReg(C=C, max_iter=5000, tol=1e-10).fit(scaler.transform(xtr.numpy()), ytr.numpy())
        sk_acc = sk.score(scaler.transform(xte.numpy()), yte.numpy())
        assert abs(acc - sk_acc) <= 0.01
        # same objective, same minimiser: the coefficients agree too
        assert np.allclose(ours.weight.numpy() - ours.weight.numpy().mean(0), sk.coef_ - sk.coef_.mean(0), atol=2e-3)
        assert 0.4 < acc < 1.0


def test_linear_probe_selects_on_val_and_separates_blobs():
    x, y = _blobs(40, 3, 8, spread=0.5, seed=2)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    model, history = probes.linear_probe(x[:80], y[:80], x[80:100], y[80:100], 3, grid=(1e-4, 1e-2, 1.0))
    assert [h[0] for h in history] == [1e-4, 1e-2, 1.0]
    assert model.C in (1e-4, 1e-2, 1.0)
    assert float((model.predict_proba(x[100:]).argmax(1) == y[100:]).double().mean()) == 1.0
    assert len(probes.C_GRID) == 45 and max(probes.C_GRID) == pytest.approx(1e6)


def test_knn_matches_bruteforce_and_structure():
    x, y = _blobs(30, 5, 16, spread=0.3, seed=3)
    q, qy = _blobs(10, 5, 16, spread=0.3, seed=3)  # same centres (same seed), new noise below
    q = q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    probs = probes.knn_predict(x, y, q, 5, k=20, temperature=0.07)
    assert float((probs.argmax(1) == qy).float().mean()) == 1.0
    assert torch.allclose(probs.sum(1), torch.ones(len(q)))
    # brute force on random features: DINO's weighted vote
    g = torch.Generator().manual_seed(4)
    x, y, q = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g), torch.randn(7, 6, generator=g)
    sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    expected = torch.zeros(7, 3)
    for i in range(7):
        for j in sim[i].topk(20).indices:
            expected[i, y[j]] += torch.exp(sim[i, j] / 0.07)
    expected /= expected.sum(1, keepdim=True)
    assert torch.allclose(probes.knn_predict(x, y, q, 3, chunk=3), expected, atol=1e-5)


def test_fewshot_separable_random_and_errors():
    x, y = _blobs(40, 6, 16, spread=0.3, seed=5)
    res = probes.fewshot_episodes(x, y, n_way=5, k_shot=5, n_query=15, episodes=50)  # pooled
    assert res["mean"] == 100.0 and res["ci95"] == 0.0
    # no structure: accuracy at chance (1/5), the CI covers it
    g = torch.Generator().manual_seed(6)
    rx, ry = torch.randn(400, 16, generator=g), torch.arange(8).repeat(50)
    tx, ty = torch.randn(400, 16, generator=g), torch.arange(8).repeat(50)
    res = probes.fewshot_episodes(rx, ry, tx, ty, n_way=5, k_shot=5, n_query=15, episodes=600, distance="cosine")
    assert abs(res["mean"] - 20.0) < 3 * res["ci95"] + 1.0
    assert len(res["accuracies"]) == 600
    with pytest.raises(UserError, match="Lower --n-way"):
        probes.fewshot_episodes(x[:30], y[:30], n_way=5, k_shot=5)


class _MeanColour(torch.nn.Module):
    """Features = per-channel image mean: invariant to flips and (roughly) blur, not to colour."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x.mean((2, 3)) * self.scale


def test_invariance_of_known_encoder():
    g = torch.Generator().manual_seed(7)
    images = torch.randn(12, 3, 32, 32, generator=g) * 0.3 + torch.randn(12, 3, 1, 1, generator=g)
    sims = probes.invariance(_MeanColour(), images, families=("flips", "colour", "blur"), k=3)
    assert sims["flips"] == pytest.approx(1.0, abs=1e-5)
    assert sims["blur"] > 0.95
    assert sims["colour"] < sims["flips"]
    with pytest.raises(UserError, match="unknown transform family"):
        probes.transform_family("warp")


def test_occlusion_and_attentive_diffusion():
    def top_left(x):  # depends only on the 8x8 top-left corner
        return x[:, :, :8, :8].sum((1, 2, 3))[:, None] + 1.0

    image = torch.ones(3, 32, 32)
    sal = probes.occlusion_map(top_left, image, patch=4, stride=2)
    assert sal.shape == (32, 32)
    # windows starting at 0..6 overlap the corner: pixels up to 9 see the change, no others
    assert sal[:8, :8].min() > 0 and sal[10:, :].abs().max() == 0 and sal[:, 10:].abs().max() == 0
    assert probes.attentive_diffusion(sal) == pytest.approx(100 * 100 / 1024)
    known = torch.zeros(32, 32)
    known[:8, :8] = 1.0
    assert probes.attentive_diffusion(known) == pytest.approx(100 * 64 / 1024)
    with pytest.raises(UserError):
        probes.occlusion_map(top_left, image, patch=4, stride=5)


class _Samples(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(8)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g) * 2 + 1, torch.arange(n) % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "index": i}


def test_extract_features_keeps_encoder_frozen_and_caches(tmp_path):
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    enc.train()  # as a freshly built model would be: extraction must not move BN statistics
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cache = probes.feature_cache_path(tmp_path, arch="tiny", dataset="x", split="train", ckpt=None)
    out = probes.extract_features(enc, _Samples(10), device=torch.device("cpu"), batch_size=4, cache=cache)
    assert out["features"].shape == (10, 8) and out["labels"].tolist() == [i % 3 for i in range(10)]
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert cache.is_file()
    again = probes.extract_features(None, _Samples(10), device=torch.device("cpu"), cache=cache)  # from cache
    assert torch.equal(again["features"], out["features"])
    assert probes.feature_cache_path(tmp_path, arch="tiny", dataset="x", split="test", ckpt=None) != cache
