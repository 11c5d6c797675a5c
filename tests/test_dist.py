import os
import subprocess
import sys

import pytest
import torch

from gissl import dist

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_helpers_are_noops_without_process_group():
    t = torch.arange(4.0)
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main_process()
    assert torch.equal(dist.all_reduce_mean(t), t)
    assert torch.equal(dist.concat_all_gather(t), t)
    assert dist.all_gather_with_grad(t) is t
    assert dist.broadcast_object({"a": 1}) == {"a": 1}


def _run(cmd, out):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(tmp_path):
    """2 CPU processes under torchrun: both ranks end with the same weights, equal to one
    process with the same global batch (the toy model has no BatchNorm)."""
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    os.makedirs(ddp), os.makedirs(single)
    worker = os.path.join(HERE, "ddp_toy.py")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          worker, ddp, "3"], ddp)
    _run([sys.executable, worker, single, "3"], single)
    r0, r1 = (torch.load(f"{ddp}/rank{r}.pth", weights_only=True) for r in (0, 1))
    one = torch.load(f"{single}/rank0.pth", weights_only=True)
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
        torch.testing.assert_close(r0["model"][k], one["model"][k], rtol=1e-5, atol=1e-6)
    assert r0["lr"] == r1["lr"]
    assert os.path.isfile(f"{ddp}/run/toy.last.pth")
