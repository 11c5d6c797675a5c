"""Worker for tests/test_reliability.py: a toy model with BatchNorm and dropout trained by
the engine under torchrun (CPU, gloo), with the plateau LR scheduler firing; each rank saves
its final parameters, optimiser state and learning rate. Faults come from ``GISSL_FAULT``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_faults.py OUT EPOCHS
"""
import itertools
import sys

import torch
import torch.nn as nn

import ddp_toy  # this folder is on sys.path when the file runs as a script
import faults  # noqa: F401  (installs GISSL_FAULT's hooks)
from gissl import dist, engine, loaders, optim
from gissl.runfiles import RunFiles


class Data(ddp_toy.Data):
    def __getitem__(self, i):
        # noise from the per-sample seeded RNG: ranks see different streams
        sample = super().__getitem__(i)
        return {"x": sample["x"] + 0.1 * torch.randn(6), "y": sample["y"]}


def main(out, epochs):
    device = dist.init_distributed("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(16, 2))
    opt = optim.build_optimizer(model, lr=0.05)
    loader = loaders.make_loader(Data(), batch_size=8, train=True, workers=0, seed=1)
    calls = itertools.count(1)

    def compute(m, b):
        loss = nn.functional.cross_entropy(m(b["x"]), b["y"])
        if next(calls) == 10 and dist.get_rank() == 1:  # NaN on one rank only: both must skip
            loss = loss * float("nan")
        return {"ce": loss}

    # rank 0's metric is constant, so ReduceLROnPlateau (patience 10) halves the learning rate
    # after epoch 12; rank 1's improves every epoch and would never reduce it, were it used
    values = itertools.count(1)
    validate = lambda m: 0.5 if dist.get_rank() == 0 else float(next(values))  # noqa: E731
    engine.fit(model, train_loader=loader, compute_losses=compute, optimizer=opt, device=device,
               run=RunFiles(out + "/run", "toy", config={"seed": 1}), epochs=epochs, validate=validate,
               options=engine.FitOptions(plateau=True, amp=False, show_progress=False, log_every=2,
                                         skip_nonfinite=1, seed=1))
    torch.save({"params": dict(model.named_parameters()), "optimizer": opt.state_dict(),
                "lr": opt.param_groups[0]["lr"]}, f"{out}/rank{dist.get_rank()}.pth")
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
