"""SSCD InfoNCE + KoLeo against a direct, loop-by-loop transcription of the SSCD formulas
(docs/endofinder-retrieval.md §1.4), in one process and gathered over two gloo processes."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from gissl.losses import koleo, sscd_infonce

REPO = Path(__file__).resolve().parents[1]


def sscd_reference(z, match, tau=0.05, lam=5.0, mixup=False):
    """Loops over the formulas; match: (N, N) bool same-instance matrix (diagonal True)."""
    z = torch.nn.functional.normalize(z.double(), dim=1)
    s = z @ z.t()
    n = len(z)
    rows, ent = [], []
    for i in range(n):
        neg = [k for k in range(n) if not match[i, k]]
        pos = [j for j in range(n) if match[i, j] and j != i]
        denom_neg = sum(torch.exp(s[i, k] / tau) for k in neg) if neg else 0.0
        terms = [-torch.log(torch.exp(s[i, j] / tau) / (torch.exp(s[i, j] / tau) + denom_neg + 1e-6))
                 for j in pos]
        total = sum(terms) if terms else torch.zeros((), dtype=torch.float64)
        rows.append(total / len(pos) if (mixup and pos) else total)
        nearest = max(s[i, k] for k in neg) if neg else torch.tensor(-100.0, dtype=torch.float64)
        ent.append(-torch.log(torch.sqrt(torch.clamp(2 - 2 * nearest, min=1e-6))))
    infonce = sum(rows) / n
    return infonce + lam * sum(ent) / n


def test_matches_sscd_transcription_with_grad():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 16, generator=g, dtype=torch.float64)
    ids = torch.arange(6).repeat(2)
    z1 = z.clone().requires_grad_(True)
    ours = sscd_infonce(z1, ids) + 5.0 * koleo(z1, ids)
    ours.backward()
    z2 = z.clone().requires_grad_(True)
    ref = sscd_reference(z2, ids[:, None] == ids[None, :])
    ref.backward()
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(z1.grad, z2.grad, rtol=1e-4, atol=1e-6)


def test_mixup_soft_labels_and_temperature():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 8, generator=g)
    soft = torch.zeros(8, 4)
    soft[torch.arange(8), torch.arange(4).repeat(2)] = 1.0
    soft[3] = torch.tensor([0.0, 0.3, 0.0, 0.7])  # a mixed view: matches instances 1 and 3
    match = (soft @ soft.t()) > 0
    for tau in (0.05, 0.2):
        ours = sscd_infonce(z, soft, temperature=tau) + 30.0 * koleo(z, soft)
        ref = sscd_reference(z, match, tau=tau, lam=30.0, mixup=True)
        assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_koleo_pushes_apart_and_is_finite_for_duplicates():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # plain KoLeo: identical vectors are at distance 0 -> clamped, large finite loss
    value = koleo(z)
    assert torch.isfinite(value) and value > 2.0
    spread = koleo(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
    assert spread < value


def test_koleo_on_duplicate_rows_is_sscds():
    """SSCD's entropy term (sscd/train.py, re-derived): for each row the largest similarity to a
    non-matching embedding, ``d = sqrt(clamp(2 - 2 s, min=1e-6))``, loss ``-mean log d``. An
    exact duplicate of another instance sits at the clamp, d = 1e-3 (lightly's KoLeoLoss would
    give d = ||x - y + 1e-8|| and -log(d + 1e-8), about 17.5 per duplicated row instead of 6.9)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 8, generator=g)
    z = torch.cat([z, z[:2]])  # rows 5, 6 duplicate rows 0, 1 (other instances)
    zn = torch.nn.functional.normalize(z.double(), dim=1)
    sim = zn @ zn.t()
    sim.fill_diagonal_(-100.0)  # SSCD's fill value for the excluded (matching) entries
    want = -(2 - 2 * sim.max(dim=1).values).clamp(min=1e-6).sqrt().log().mean()
    assert torch.allclose(koleo(z).double(), want, rtol=1e-6)
    # the same rows as one instance are matches, not neighbours: no clamp
    ids = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    sim = zn @ zn.t()
    sim[ids[:, None] == ids[None, :]] = -100.0
    want = -(2 - 2 * sim.max(dim=1).values).clamp(min=1e-6).sqrt().log().mean()
    assert torch.allclose(koleo(z, ids).double(), want, rtol=1e-6)


WORKER = textwrap.dedent("""
    import sys, torch
    from gissl import dist
    from gissl.losses import koleo, sscd_infonce
    dist.init_distributed("cpu")
    r, w = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    z_all = torch.randn(2 * 10, 16, generator=g, dtype=torch.float64)
    z = z_all[r * 10:(r + 1) * 10].clone().requires_grad_(True)
    ids = torch.arange(5).repeat(2)            # per-rank instance ids
    loss = sscd_infonce(z, ids) + 5.0 * koleo(z, ids)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": z.grad}, sys.argv[1] + f"/rank{r}.pt")
    dist.cleanup()
""")


def test_gathered_two_processes_equal_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    g = torch.Generator().manual_seed(0)
    z_all = torch.randn(20, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    ids = torch.cat([torch.arange(5).repeat(2), 100 + torch.arange(5).repeat(2)])  # unique across ranks
    ref = sscd_reference(z_all, ids[:, None] == ids[None, :])
    ref.backward()
    mean_loss = (out[0]["loss"] + out[1]["loss"]) / 2
    assert torch.allclose(mean_loss, ref.detach(), rtol=1e-9, atol=1e-9)
    # each rank's gradient is world_size x the single-process gradient; DDP's averaging of
    # parameter gradients then gives exactly the single-process update
    grad = torch.cat([out[0]["grad"], out[1]["grad"]]) / 2
    assert torch.allclose(grad, z_all.grad, rtol=1e-7, atol=1e-10)
