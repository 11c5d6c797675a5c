"""Distributed helpers that are exact no-ops in a plain single process.

Launch with ``torchrun`` (``env://`` rendezvous: no hard-coded host or port); gloo is used
on CPU and nccl on CUDA. Every helper works at world size 1 without a process group, so
every loss that gathers across ranks runs in a unit test.
"""
import datetime
import os

import torch
import torch.distributed as dist

from gissl.errors import UserError


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def resolve_device(name="auto"):
    """``auto`` → the local CUDA device when there is one, else CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown --device '{name}'; choose from auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device="auto", timeout_s=1800):
    """Set up the process group when launched by torchrun; return the ``torch.device`` to use.

    In a plain process (no ``WORLD_SIZE`` in the environment) nothing is initialised.
    """
    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_dist():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dev


def cleanup(wait_for_peers=False):
    """Destroy the process group. ``wait_for_peers`` (a run that ended normally) first waits
    for every rank, so no rank tears gloo down while a peer's last collective is in flight
    (that can abort the peer). Error paths skip the wait: a failed peer may never arrive."""
    if is_dist():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_sum(t):
    """Sum of ``t`` over ranks (a new tensor; ``t`` is left unchanged)."""
    t = t.clone()
    if is_dist():
        dist.all_reduce(t)
    return t


def all_reduce_mean(t):
    """Mean of ``t`` over ranks (a new tensor)."""
    return all_reduce_sum(t) / get_world_size()


@torch.no_grad()
def concat_all_gather(t):
    """``(N, ...)`` per rank → ``(N * world, ...)`` in rank order, without gradient."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        ctx.n = t.shape[0]
        out = [torch.empty_like(t) for _ in range(get_world_size())]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        # Each rank's loss depends on every rank's slice; the gradient for the local slice
        # is the sum over ranks of d(loss_r)/d(slice). Summing keeps it equal to the
        # single-process gradient of the summed losses (DDP then averages over ranks).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rank = get_rank()
        return grad[rank * ctx.n:(rank + 1) * ctx.n]


def all_gather_with_grad(t):
    """``(N, ...)`` per rank → ``(N * world, ...)``; gradient flows back to the local slice only."""
    if not is_dist():
        return t
    return _GatherWithGrad.apply(t)


def broadcast_object(obj, src=0):
    """The value of ``obj`` on rank ``src``, on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_with_grad(t):
    """Sum of ``t`` over ranks whose gradient is also summed over ranks (``t`` itself without a
    process group): the gradient of a rank's contribution to a statistic every rank uses."""
    if not is_dist():
        return t
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t)



class _GlobalBatchStats:
    """BatchNorm that, in a CPU (gloo) training process under torchrun, normalises with the
    statistics of the global batch; elsewhere (GPU, eval mode, one process) the torch layer it
    is mixed into. Torch's ``SyncBatchNorm`` runs on GPUs only (and DDP refuses it on CPU): a
    CPU rank would otherwise normalise with its own slice of the batch, and a 2-process run would
    train other weights than one process on the same global batch.

    The per-channel sums of x and x^2 and the count are summed over ranks in float64 with a
    gradient that is itself summed over ranks (as the gathered embeddings of the contrastive
    losses: DDP's averaging then gives the one-process gradient); the running statistics get
    the unbiased variance and the momentum of ``F.batch_norm``.
    """

    def forward(self, x):
        if not (self.training and x.device.type == "cpu" and get_world_size() > 1):
            return super().forward(x)
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}, ...) input, got {tuple(x.shape)}")
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xd, c = x.double(), self.num_features
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() / c])])
        total = all_reduce_sum_with_grad(local)
        count = total[-1].detach()
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        y = ((xd - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)).to(
            torch.promote_types(x.dtype, torch.float32))
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y.to(x.dtype)


class CpuSyncBatchNorm1d(_GlobalBatchStats, torch.nn.BatchNorm1d):
    pass


class CpuSyncBatchNorm2d(_GlobalBatchStats, torch.nn.BatchNorm2d):
    pass


class CpuSyncBatchNorm3d(_GlobalBatchStats, torch.nn.BatchNorm3d):
    pass


_CPU_SYNC = ((torch.nn.BatchNorm1d, CpuSyncBatchNorm1d), (torch.nn.BatchNorm2d, CpuSyncBatchNorm2d),
             (torch.nn.BatchNorm3d, CpuSyncBatchNorm3d))


def convert_sync_batchnorm(module, device):
    """``module`` whose BatchNorm layers normalise with the global batch's statistics under
    torchrun: ``torch.nn.SyncBatchNorm`` on GPUs, the ``CpuSyncBatchNorm*d`` layers on CPU
    (same parameters, buffers and state-dict keys)."""
    if torch.device(device).type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    for plain, synced in _CPU_SYNC:
        if type(module) is plain:
            out = synced(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats)
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out
