"""CLIP and SimCLR losses against loop transcriptions of the papers' formulas and reference
libraries; their 2-rank check shares the gloo run of tests/test_losses_ssl.py."""
import math

import pytest
import torch

from gissl import losses


def _clip_reference(u, t, s):
    # CLIP (Radford et al. 2021, Fig. 3): logits = s * <u_i, t_j> of unit vectors, symmetric CE.
    u = [x / x.norm() for x in u]
    t = [x / x.norm() for x in t]
    n = len(u)
    total = 0.0
    for i in range(n):
        row = [s * float(u[i] @ t[j]) for j in range(n)]
        col = [s * float(t[i] @ u[j]) for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


def _nt_xent_reference(z1, z2, tau):
    # SimCLR (Chen et al. 2020, eq. 1): 2N samples, l(i, j) = -log e^{sim(i,j)/tau} / sum_{k != i} e^{sim(i,k)/tau},
    # loss = mean over the 2N anchors with j the other view of the same image.
    z = [x / x.norm() for x in torch.cat([z1, z2])]
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -float(z[i] @ z[j]) / tau + math.log(denom)
    return total / (2 * n)


def test_clip_contrastive_matches_formula():
    g = torch.Generator().manual_seed(0)
    u, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    for s in (1.0, 1 / 0.07, 100.0):
        got = losses.clip_contrastive(u, t, torch.tensor(s, dtype=torch.float64)).item()
        assert got == pytest.approx(_clip_reference(u, t, s), rel=1e-9)


def test_simclr_matches_formula():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    for tau in (0.1, 0.5):
        assert losses.simclr(z1, z2, tau).item() == pytest.approx(_nt_xent_reference(z1, z2, tau), rel=1e-9)


def test_losses_of_identical_pairs_are_lowest_and_bf16_inputs_are_promoted():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 16, generator=g)
    matched = losses.clip_contrastive(z, z, torch.tensor(100.0))
    shuffled = losses.clip_contrastive(z, z[torch.randperm(8, generator=g)], torch.tensor(100.0))
    assert matched < 0.01 < shuffled
    assert losses.simclr(z.bfloat16(), z.bfloat16(), 0.1).dtype == torch.float32


def test_equal_to_open_clip_and_lightly():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    g = torch.Generator().manual_seed(3)
    u, t = torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g)
    s = torch.tensor(1 / 0.07)
    ref = open_clip_loss.ClipLoss()(torch.nn.functional.normalize(u, dim=1), torch.nn.functional.normalize(t, dim=1), s)
    torch.testing.assert_close(losses.clip_contrastive(u, t, s), ref)
    lightly_loss = pytest.importorskip("lightly.loss")
    torch.testing.assert_close(losses.simclr(u, t, 0.1), lightly_loss.NTXentLoss(temperature=0.1)(u, t))
