"""SSL losses against direct transcriptions of the papers' formulas, and across 2 ranks
(image–text losses included; their formula checks are in test_losses_image_text.py)."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gissl import losses


def _infonce_reference(q, k, tau):
    # MoCo v3 Alg. 1: q, k normalised; loss_i = -log exp(q_i.k_i/tau) / sum_j exp(q_i.k_j/tau).
    q = q.double() / q.double().norm(dim=1, keepdim=True)
    k = k.double() / k.double().norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(q.shape[0]):
        sims = [float(q[i] @ k[j]) / tau for j in range(k.shape[0])]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    return total / q.shape[0]


def _barlow_reference(za, zb, lambd):
    # Barlow Twins eq. 2: C_ij = sum_b za_bi zb_bj / (sqrt(sum_b za_bi^2) sqrt(sum_b zb_bj^2))
    # on batch-centred outputs; eq. 1: sum_i (1 - C_ii)^2 + lambda sum_i sum_{j!=i} C_ij^2.
    za = za.double() - za.double().mean(0)
    zb = zb.double() - zb.double().mean(0)
    d = za.shape[1]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = float((za[:, i] * zb[:, j]).sum() / (za[:, i].pow(2).sum().sqrt() * zb[:, j].pow(2).sum().sqrt()))
            loss += (1 - c) ** 2 if i == j else lambd * c ** 2
    return loss


def test_infonce_matches_formula():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for tau in (0.2, 1.0):
        assert losses.infonce(q, k, tau).item() == pytest.approx(_infonce_reference(q, k, tau), rel=1e-5)


def test_barlow_twins_matches_formula():
    g = torch.Generator().manual_seed(1)
    za, zb = torch.randn(10, 4, generator=g) * 3 + 1, torch.randn(10, 4, generator=g)
    zb = zb + za  # correlated views: diagonal terms are not all near zero
    got = losses.barlow_twins(za, zb, lambd=0.0051).item()
    assert got == pytest.approx(_barlow_reference(za, zb, 0.0051), rel=1e-4)
    # Identical views are perfectly correlated on the diagonal: only off-diagonal terms remain.
    same = losses.barlow_twins(za, za, lambd=0.0).item()
    assert same == pytest.approx(0.0, abs=1e-4)


def test_simsiam_matches_formula_and_stops_gradient():
    g = torch.Generator().manual_seed(2)
    p1, p2, z1, z2 = (torch.randn(5, 7, generator=g, requires_grad=True) for _ in range(4))
    got = losses.simsiam(p1, z1, p2, z2)
    ref = 0.0
    with torch.no_grad():
        for i in range(5):
            ref += -0.5 * float(p1[i] @ z2[i] / (p1[i].norm() * z2[i].norm())) / 5
            ref += -0.5 * float(p2[i] @ z1[i] / (p2[i].norm() * z1[i].norm())) / 5
    assert got.item() == pytest.approx(ref, rel=1e-5)
    got.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient on the projector outputs
    assert p1.grad.abs().sum() > 0
    # predictions equal to the other view's projection reach the minimum -1
    assert losses.simsiam(z2, z1, z1, z2).item() == pytest.approx(-1.0, abs=1e-6)


def test_masked_patch_mse_only_masked_patches():
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 8, 12, generator=g), torch.randn(2, 8, 12, generator=g)
    mask = torch.zeros(2, 8)
    mask[:, :6] = 1
    ref = sum(float(((pred[n, i] - target[n, i]) ** 2).mean()) for n in range(2) for i in range(6)) / 12
    assert losses.masked_patch_mse(pred, target, mask).item() == pytest.approx(ref, rel=1e-5)
    changed = pred.clone()
    changed[:, 6:] += 100.0  # visible patches do not count
    assert losses.masked_patch_mse(changed, target, mask).item() == pytest.approx(ref, rel=1e-5)
    # norm_pix: per-patch standardised target
    t = target[0, 0]
    tn = (t - t.mean()) / (t.var() + 1e-6).sqrt()
    one = torch.zeros(2, 8)
    one[0, 0] = 1
    expected = float(((pred[0, 0] - tn) ** 2).mean())
    assert losses.masked_patch_mse(pred, target, one, norm_pix=True).item() == pytest.approx(expected, rel=1e-5)


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [t.grad for t in leaves]


def _dist_worker(rank, world, port, n_local):
    # Reference on the concatenated batch, computed before the process group exists.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(world * n_local, 8, generator=g), torch.randn(world * n_local, 8, generator=g)
    z1, z2 = torch.randn(world * n_local, 6, generator=g), torch.randn(world * n_local, 6, generator=g)
    ref_nce, ref_nce_g = _grads(lambda a, b: losses.infonce(a, b, 0.2), q, k)
    ref_bt, ref_bt_g = _grads(lambda a, b: losses.barlow_twins(a, b), z1, z2)
    image_text = (lambda a, b: losses.clip_contrastive(a, b, torch.tensor(1 / 0.07)),
                  lambda a, b: losses.simclr(a, b, 0.1))
    image_text_refs = [_grads(fn, q, k) for fn in image_text]

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sl = slice(rank * n_local, (rank + 1) * n_local)
        nce, nce_g = _grads(lambda a, b: losses.infonce(a, b, 0.2), q[sl], k[sl])
        bt, bt_g = _grads(lambda a, b: losses.barlow_twins(a, b), z1[sl], z2[sl])
        # Mean over ranks of the local InfoNCE = the InfoNCE of the whole batch.
        mean_nce = nce.clone()
        torch.distributed.all_reduce(mean_nce)
        torch.testing.assert_close(mean_nce / world, ref_nce)
        torch.testing.assert_close(bt, ref_bt)
        # Local gradients are world x the single-process ones (DDP then averages).
        for got, ref in zip(nce_g + bt_g, ref_nce_g + ref_bt_g):
            torch.testing.assert_close(got / world, ref[sl], rtol=1e-4, atol=1e-6)
        # CLIP and SimCLR (gathered with gradients): the same two properties.
        for fn, (ref, ref_g) in zip(image_text, image_text_refs):
            value, grads = _grads(fn, q[sl], k[sl])
            mean = value.clone()
            torch.distributed.all_reduce(mean)
            torch.testing.assert_close(mean / world, ref)
            for got, want in zip(grads, ref_g):
                torch.testing.assert_close(got / world, want[sl], rtol=1e-4, atol=1e-6)
        # Momentum-encoder keys (no grad): gathered without gradient, query grads still match.
        qq = q[sl].clone().requires_grad_(True)
        losses.infonce(qq, k[sl], 0.2).backward()
        torch.testing.assert_close(qq.grad / world, ref_nce_g[0][sl], rtol=1e-4, atol=1e-6)
        # both ranks done communicating before either tears gloo down: destroying the group
        # while the peer's last collective is in flight aborted a rank once ("terminate called
        # without an active exception", SIGABRT) in CI
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_single_process():
    mp.spawn(_dist_worker, args=(2, _free_port(), 4), nprocs=2, join=True)
