"""Worker for tests/test_dist.py: trains a BatchNorm-free toy model with the engine, under
torchrun or as a plain process, and saves the final weights of each rank."""
import sys

import torch
import torch.nn as nn

from gissl import dist, engine, loaders, optim
from gissl.runfiles import RunFiles


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 6, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def main(out, epochs):
    device = dist.init_distributed("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = optim.build_optimizer(model, lr=0.05)
    loader = loaders.make_loader(Data(), batch_size=8, train=True, workers=0, seed=1)
    compute = lambda m, b: {"ce": nn.functional.cross_entropy(m(b["x"]), b["y"])}  # noqa: E731
    # a validation value that differs per rank if computed locally: the engine must use rank 0's
    validate = lambda m: float(m(Data().x).sum())  # noqa: E731
    engine.fit(model, train_loader=loader, compute_losses=compute, optimizer=opt, device=device,
               run=RunFiles(out + "/run", "toy", config={"seed": 1}), epochs=epochs, validate=validate,
               options=engine.FitOptions(plateau=True, amp=False, show_progress=False, seed=1))
    torch.save({"model": model.state_dict(), "lr": opt.param_groups[0]["lr"]},
               f"{out}/rank{dist.get_rank()}.pth")
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
