"""One training engine for every task and pretraining method.

A task supplies ``compute_losses(model, batch) -> {"name": loss}`` and, optionally,
``validate(model) -> float``; :func:`fit` does the rest: device placement, DDP, bf16/fp16
autocast, gradient accumulation and clipping, a finite-loss check, ReduceLROnPlateau kept
identical on every rank, ``best`` and ``last`` checkpoints written atomically, automatic
resume from ``last``, a progress bar and per-epoch logs (text as SSL4GIE, plus JSON lines).
"""
import contextlib
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.nn as nn

from gissl import dist
from gissl.checkpoint import load_file, rng_state, save_atomic, set_rng_state
from gissl.errors import CheckpointError, UserError

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: without it there is no bar, only epoch lines
    tqdm = None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch, step and loss terms."""


# --------------------------------------------------------------------------- precision

def amp_dtype(device, enabled=True):
    """The autocast dtype for ``device``: bf16 where supported (CPU with AVX512-BF16/AMX runs
    bf16 matmuls ~8× faster than fp32), fp16 on older GPUs, ``None`` when disabled."""
    if not enabled:
        return None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return None


def autocast(device, enabled=True):
    """``torch.autocast`` for ``device`` with :func:`amp_dtype`, or a no-op context."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def use_channels_last(device):
    """Whether convolutional models run in ``channels_last`` (NHWC) memory format on ``device``.

    Yes on CUDA (tensor-core convolutions are NHWC) and on CPU too: oneDNN's NHWC kernels made
    a ResNet-50 train step 15 % faster with bf16 autocast and 9 % faster in fp32 on the 2-core
    AMD EPYC (AVX512-BF16) development machine (batch 4, 224 px, 1 thread: 0.55 vs 0.64 s and
    1.06 vs 1.17 s of CPU time per step, median of 6 interleaved steps).
    """
    return torch.device(device).type in ("cuda", "cpu")


def to_channels_last(model, device, enabled=None):
    """``model`` converted in place to channels_last when it has 2-D convolutions and
    ``enabled`` (default :func:`use_channels_last`) says so; parameters stay the same objects,
    so an optimiser built before keeps working. Returns ``model``."""
    if enabled is None:
        enabled = use_channels_last(device)
    if enabled and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


def prepare_for_eval(model, device, compile=False):
    """``model`` on ``device`` in eval mode, in the memory format training used
    (:func:`to_channels_last`) and, with ``compile`` (eval ``--compile``), compiled."""
    model = to_channels_last(model.to(device).eval(), device)
    return compile_model(model, device) if compile else model


def compile_model(model, device):
    """``torch.compile(model)`` (``--compile``). On CPU, inductor builds C++ kernels, so a C++
    compiler must be on PATH; without one this stops before any work with a UserError."""
    if torch.device(device).type == "cpu":
        compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
        if not any(shutil.which(c) for c in compilers):
            raise UserError("--compile on CPU needs a C++ compiler on PATH (torch.compile builds C++ "
                            "kernels); install one (e.g. apt-get install g++) or run without --compile")
    return torch.compile(model)


# --------------------------------------------------------------------------- optimisation

def _no_decay(name, param):
    # Norm scales, biases and learned tokens/position embeddings are not weights to shrink
    # (timm/MAE practice); the reference decays everything (ssl4gie.md §4.1).
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token")) or ".pos_embed" in name


def param_groups(model_or_params, weight_decay):
    """Split trainable parameters into a decayed and a non-decayed group."""
    if isinstance(model_or_params, nn.Module):
        named = list(model_or_params.named_parameters())
    else:
        named = [(f"p{i}", p) for i, p in enumerate(model_or_params)]
    decay = [p for n, p in named if p.requires_grad and not _no_decay(n, p)]
    no_decay = [p for n, p in named if p.requires_grad and _no_decay(n, p)]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters (everything is frozen)")
    return groups


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by Barlow Twins and MoCo v3 for ResNets: SGD with
    momentum whose update is scaled per tensor by ``eta * ||w|| / ||g + wd*w||``.
    1-D parameters (biases, norms) get neither weight decay nor the trust ratio."""

    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    g = g.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(g)
                p.add_(mu, alpha=-group["lr"])
        return loss


def build_optimizer(model_or_params, lr, weight_decay=0.01, kind="adamw", **kwargs):
    """AdamW (the reference's optimiser, 1e-4), LARS or SGD over the trainable parameters.

    Parameters with ``requires_grad=False`` (a frozen encoder) are left out, and norms,
    biases and tokens get no weight decay. AdamW uses the fused kernel where available.
    """
    groups = param_groups(model_or_params, weight_decay)
    if kind == "adamw":
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, lr=lr, foreach=True, **kwargs)
    if kind == "lars":
        return LARS(groups, lr=lr, **kwargs)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=kwargs.pop("momentum", 0.9), **kwargs)
    raise UserError(f"unknown optimizer '{kind}'; choose from adamw, lars, sgd")


def freeze(module):
    """Stop ``module`` from training: no gradients (so the optimiser leaves it out).
    ``fit(frozen=[module])`` calls this itself, takes the module's parameters out of an
    optimiser built before, and keeps it in eval mode so BatchNorm statistics never change
    (SSL4GIE's ``--frozen`` did neither)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def drop_frozen_parameters(optimizer, frozen):
    """Freeze every module in ``frozen`` and remove its parameters (and their state) from
    ``optimizer``, whenever it was built: a frozen module then gets neither updates nor
    weight decay. Groups left empty are removed; none left at all is a UserError."""
    held = set()
    for module in frozen:
        held.update(id(p) for p in freeze(module).parameters())
    if not held:
        return optimizer
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in held:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) not in held]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    if not optimizer.param_groups:
        raise UserError("the model has no trainable parameters (everything is frozen)")
    return optimizer


def set_train_mode(model, frozen=()):
    model.train()
    for m in frozen:
        m.eval()


# --------------------------------------------------------------------------- batches

def move_to(batch, device, non_blocking=True):
    """Move every tensor in a nested structure of lists/tuples/dicts to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to(v, device, non_blocking) for v in batch]
        return type(batch)(moved) if isinstance(batch, list) else tuple(moved)
    return batch


def collate(samples):
    """Collate dict (or tuple) samples: tensors of one shape are stacked, anything else
    (variable-size originals, detection targets, paths) is kept as a list."""
    first = samples[0]
    if isinstance(first, dict):
        return {k: collate([s[k] for s in samples]) for k in first}
    if isinstance(first, tuple):
        return tuple(collate(list(parts)) for parts in zip(*samples))
    if torch.is_tensor(first) and all(s.shape == first.shape for s in samples):
        return torch.stack(samples)
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return torch.tensor(samples)
    return list(samples)


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, sample_seed)`` pairs for one rank's shard.

    The order depends only on ``(seed, epoch)`` and each sample's seed only on
    ``(seed, epoch, index)``: with :class:`SeededDataset` the augmentation of a sample is
    then the same whatever the number of workers or ranks, and a resumed run (even one
    resumed in the middle of an epoch, see ``skip``) repeats an uninterrupted one exactly.
    Under torchrun each rank takes every world-th item of the same permutation.
    """

    def __init__(self, n, shuffle, seed=0, drop_last=False):
        self.n, self.shuffle, self.seed, self.drop_last = n, shuffle, seed, drop_last
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.epoch, self.skip = 0, 0
        self.per_rank = n // self.world if drop_last else math.ceil(n / self.world)

    def set_epoch(self, epoch, skip=0):
        """Select the epoch; ``skip`` drops this rank's first ``skip`` samples (mid-epoch resume)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        if total > len(order):  # pad by repeating, as DistributedSampler, so ranks stay in step
            order += order[: total - len(order)]
        mine = order[self.rank:total:self.world][self.skip:]
        base = (self.seed * 1_000_003 + self.epoch * 7_919) * 1_000_033
        return iter((i, (base + i) % 2**62) for i in mine)

    def __len__(self):
        return self.per_rank - self.skip


class SeededDataset(torch.utils.data.Dataset):
    """Reads a sample with python, numpy and torch's CPU generator seeded from the sampler's
    per-sample seed, and gives the process its own generator states back afterwards.

    With ``--workers 0`` the samples are read in the training process itself: leaving the
    generators re-seeded there would change the model's own random draws (dropout,
    drop-path, MAE / retrieval masking), and a run would end with other weights than with
    worker processes. Only the CPU generator is seeded (``torch.manual_seed`` would also
    re-seed every GPU's); augmentations draw on the CPU."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


def make_loader(dataset, *, batch_size, train, workers=2, seed=0, device="cpu",
                collate_fn=None, drop_last=None):
    """A DataLoader for one process.

    Training (``train=True``): ``batch_size`` is global (as SSL4GIE's ``--batch-size``), so
    each of the ``world`` ranks loads ``batch_size // world`` samples of its own shard; the
    order is fixed by (seed, epoch), the last incomplete batch is dropped, and every
    sample's augmentation is seeded from (seed, epoch, index), so ranks and workers draw
    distinct random streams (the reference gave every rank the same stream, ssl4gie.md
    §8.8) and results do not depend on the number of workers.
    Evaluation (``train=False``): every sample, in order, on this process alone —
    validation runs on rank 0 only, and must see the whole split.
    Workers persist across epochs; memory is pinned on CUDA. The loader draws its workers'
    base seed from a generator of its own, not from torch's global one: with persistent
    workers that draw happens once, with ``workers=0`` once per epoch, so drawing it from
    the global generator would shift the model's random draws by the number of workers.
    """
    if len(dataset) == 0:
        raise UserError("the dataset is empty; check --data-root and --dataset")
    pin = torch.device(device).type == "cuda"
    generator = torch.Generator().manual_seed(int(seed))
    if not train:
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
            collate_fn=collate_fn or collate, drop_last=bool(drop_last), pin_memory=pin,
            persistent_workers=workers > 0, generator=generator)
    world = dist.get_world_size()
    if batch_size < world:
        raise UserError(f"--batch-size {batch_size} is smaller than the number of processes "
                        f"({world}); it is the global batch and must be at least {world}")
    per_rank = batch_size // world
    drop_last = True if drop_last is None else drop_last
    if len(dataset) < batch_size:
        drop_last = False  # a tiny dataset still trains, with one short batch per epoch
    sampler = EpochSampler(len(dataset), shuffle=True, seed=seed, drop_last=drop_last)
    return torch.utils.data.DataLoader(
        SeededDataset(dataset), batch_size=per_rank, sampler=sampler, num_workers=workers,
        collate_fn=collate_fn or collate, drop_last=drop_last, pin_memory=pin,
        persistent_workers=workers > 0, generator=generator)


# --------------------------------------------------------------------------- training

class NonFiniteGuard:
    """What a non-finite loss does: skip the optimiser step (gradients zeroed, no update,
    counted) up to ``limit`` times per run, then stop with :class:`NonFiniteLossError`
    naming the step. ``limit=0`` stops at the first one.

    Checking reads the loss back to the host. That is free on CPU, so there every step is
    checked; on a GPU it would stall the launch queue every step, so with ``limit=0`` only
    logging steps (and the last of an epoch) are checked and the error gives the range of
    steps in which the loss went bad. A ``limit > 0`` checks every step everywhere.
    """

    def __init__(self, limit=0, device="cpu", skipped=0):
        self.limit, self.skipped = int(limit), int(skipped)
        self.every_step = self.limit > 0 or torch.device(device).type == "cpu"
        self.last_good = 0  # the last optimiser step whose loss was checked and finite

    def bad(self, total, step):
        """True when ``total`` is non-finite (one host sync); remembers the last good step."""
        if bool(torch.isfinite(total)):
            self.last_good = step
            return False
        return True

    def agree(self, bad):
        # under DDP every rank must skip the same steps or their weights would diverge
        if self.limit > 0 and dist.is_dist():
            bad = float(dist.all_reduce_sum(torch.tensor([float(bad)], device=_comm_device()))) > 0
        return bad

    def fail(self, losses, epoch, step, batch, n_batches):
        terms = ", ".join(f"{k}={v.detach().float().item():.4g}" for k, v in losses.items())
        where = f"epoch {epoch}, step {step}, batch {batch}/{n_batches}"
        if not self.every_step and step - self.last_good > 1:
            where += (f"; on GPU the loss is only checked at logging steps, so it became non-finite "
                      f"between steps {self.last_good + 1} and {step} (--skip-nonfinite N checks "
                      "every step)")
        if self.limit:
            where += f"; {self.skipped} step(s) were already skipped, the --skip-nonfinite limit"
        raise NonFiniteLossError(
            f"non-finite loss at {where} ({terms}); the last good checkpoint is kept. Lower "
            "--learning-rate, or try --no-amp (or --skip-nonfinite N for rare fp16 overflows)")


def _comm_device():
    """Where a small tensor for a collective must live: the current GPU under nccl, else CPU."""
    if dist.is_dist() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train_one_epoch(model, loader, optimizer, compute_losses, *, device, epoch, scaler=None,
                    amp=True, accum_iter=1, clip_grad=None, frozen=(), lr_schedule=None,
                    after_step=None, global_step=0, log_every=10, show_progress=True,
                    resume=None, should_stop=None, nonfinite=None, fault=None):
    """One pass over ``loader``. Returns ``(mean_losses, global_step, stopped)``.

    The loss is divided by ``accum_iter`` and the optimiser steps every ``accum_iter``
    batches and once more on a last partial accumulation (the reference silently dropped
    it). Loss values are read back to the host only every ``log_every`` steps.
    ``resume`` (``{"batches_done", "sums", "count"}``) continues a partly done epoch whose
    loader already skips those batches. ``should_stop(global_step)`` is asked after each
    optimiser step; when it says yes the pass ends there and ``stopped`` holds the
    ``resume`` dict for this point (``None`` when the epoch completed). ``nonfinite``: a
    :class:`NonFiniteGuard` (default: stop at the first non-finite loss). ``fault``: test-only
    crash injection (:class:`_Fault`).
    """
    if nonfinite is None:
        nonfinite = NonFiniteGuard(0, device)
        nonfinite.last_good = global_step
    guard = nonfinite
    set_train_mode(model, frozen)
    bare = model.module if hasattr(model, "module") else model
    done = resume["batches_done"] if resume else 0
    n_batches = done + len(loader)
    sums = {k: torch.tensor(v, device=device) for k, v in (resume or {}).get("sums", {}).items()}
    count = resume["count"] if resume else 0
    bar = None
    if show_progress and tqdm is not None and dist.is_main_process():
        bar = tqdm(total=n_batches, initial=done, desc=f"epoch {epoch}", leave=False,
                   dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    stopped, group_bad = None, False
    try:  # close the bar on errors too, so the error message starts on its own line
        for j, batch in enumerate(loader, start=done):
            if lr_schedule is not None:
                lr = lr_schedule(epoch - 1 + j / n_batches)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
            batch = move_to(batch, device)
            last_of_group = (j + 1) % accum_iter == 0 or j + 1 == n_batches
            no_sync = hasattr(model, "no_sync") and not last_of_group
            with (model.no_sync() if no_sync else contextlib.nullcontext()):
                with autocast(device, amp):
                    losses = compute_losses(model, batch)
                    total = sum(losses.values())
                bad = ((guard.every_step or j % log_every == 0 or j + 1 == n_batches)
                       and guard.bad(total, global_step + 1))
                if bad and not guard.limit:
                    guard.fail(losses, epoch, global_step + 1, j + 1, n_batches)
                group_bad = group_bad or bad
                # divide by the group's real length so a last partial group is a true mean
                group_len = min(accum_iter, n_batches - (j // accum_iter) * accum_iter)
                scaled = total / group_len
                if scaler is not None:
                    scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            if not bad:  # a skipped batch would make the epoch mean NaN
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                count += 1
            if last_of_group and guard.agree(group_bad):
                if guard.skipped >= guard.limit:
                    guard.fail(losses, epoch, global_step + 1, j + 1, n_batches)
                guard.skipped += 1
                if dist.is_main_process():
                    (tqdm.write if bar is not None else print)(
                        f"warning: non-finite loss at epoch {epoch}, step {global_step + 1}: step "
                        f"skipped ({guard.skipped} of --skip-nonfinite {guard.limit})", file=sys.stderr)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:  # as GradScaler does for inf gradients: lower the scale
                    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
                global_step += 1
            elif last_of_group:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if clip_grad:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                if after_step is not None:
                    after_step(bare, global_step)
            if last_of_group:
                group_bad = False
                if fault is not None:
                    fault.after_step(global_step)
            if bar is not None:
                bar.update(1)
                if j % log_every == 0:
                    bar.set_postfix(loss=f"{float(total.detach()):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if last_of_group and j + 1 < n_batches and should_stop is not None and should_stop(global_step):
                stopped = {"batches_done": j + 1, "count": count,
                           "sums": {k: float(v) for k, v in sums.items()}}
                break
    finally:
        if bar is not None:
            bar.close()
    if stopped is not None:
        return {}, global_step, stopped
    # one host sync per epoch: the mean of every term over batches and ranks
    means = {k: float(dist.all_reduce_mean(v / max(count, 1))) for k, v in sums.items()}
    if means:
        if "loss" not in means:
            means["loss"] = sum(means.values())
        if not math.isfinite(means["loss"]):
            raise NonFiniteLossError(
                f"non-finite mean loss in epoch {epoch}; the last good checkpoint is kept. "
                "Lower --learning-rate, or try --no-amp")
    return means, global_step, None


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived; a resumable ``last`` checkpoint was saved first."""

    def __init__(self, signum, path):
        self.signum, self.path = signum, path
        super().__init__(f"stopped by signal {signum}; progress saved to '{path}'. "
                         "Re-run the same command to resume")


class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks at the next optimiser step, so the
    run can save where it is (pre-emption on shared clusters sends SIGTERM)."""

    def __init__(self, check_every):
        self.signum, self.check_every, self.old = None, check_every, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __call__(self, global_step):
        if not dist.is_dist():
            return self.signum is not None
        # every rank must stop at the same step: agree on the flag (cheap, not every step)
        if global_step % self.check_every:
            return False
        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.float64,
                            device=_comm_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())


class _Fault:
    """Test-only crash injection for tests/test_reliability.py, read from ``GISSL_FAULT``.
    Outside those tests the variable is unset and :meth:`from_env` returns ``None``, so the
    training loop pays one ``is None`` test per step.

    ``kill_after_step:N[:SIG]``  send SIG (``KILL`` by default; ``TERM``, ``INT``) to this
                                 process after optimiser step N (counted over the whole run)
    ``raise_after_step:N``       raise RuntimeError after optimiser step N
    ``kill_in_save:N``           in this process's N-th checkpoint write, cut the temporary
                                 file to half its length and SIGKILL the process before the rename
    ``<fault>@R``                only on rank R
    """

    def __init__(self, action, n, sig):
        self.action, self.n, self.sig, self.saves = action, n, sig, 0

    @classmethod
    def from_env(cls):
        spec = os.environ.get("GISSL_FAULT")
        if not spec:
            return None
        spec, _, rank = spec.partition("@")
        if rank and int(rank) != dist.get_rank():
            return None
        action, n, *sig = spec.split(":")
        return cls(action, int(n), sig[0] if sig else "KILL")

    def after_step(self, global_step):
        if global_step != self.n:
            return
        if self.action == "kill_after_step":
            os.kill(os.getpid(), getattr(signal, "SIG" + self.sig))
        elif self.action == "raise_after_step":
            raise RuntimeError(f"injected fault (GISSL_FAULT) on rank {dist.get_rank()} "
                               f"after step {global_step}")

    def before_replace(self, tmp):
        self.saves += 1
        if self.action == "kill_in_save" and self.saves == self.n:
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)


def _save(state, path, fault=None):
    """:func:`save_atomic`, with a full disk or a lost folder turned into a clear error."""
    try:
        save_atomic(state, path, before_replace=fault.before_replace if fault is not None else None)
    except OSError as e:
        raise UserError(f"cannot write checkpoint '{path}' ({e.strerror or e}); the previous "
                        "checkpoint is unchanged. Free some space (or choose another --output-dir) "
                        "and re-run the same command to resume") from None


def _report_rank_failure(fn):
    """Under torchrun, name the rank in the error before it propagates: the launcher stops
    every other rank, whose own (secondary) errors would otherwise bury the cause."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if dist.is_dist() and not isinstance(e, TrainingInterrupted):
                print(f"[rank {dist.get_rank()}/{dist.get_world_size()}] training failed: "
                      f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise
    return wrapper


class RunFiles:
    """Paths of one training run: ``<dir>/<name>.pth`` (best), ``.last.pth``, ``.txt``, ``.jsonl``."""

    def __init__(self, run_dir, run_name):
        self.dir = str(run_dir)
        self.best = os.path.join(self.dir, run_name + ".pth")
        self.last = os.path.join(self.dir, run_name + ".last.pth")
        self.log = os.path.join(self.dir, run_name + ".txt")
        self.jsonl = os.path.join(self.dir, run_name + ".jsonl")

    def check_writable(self):
        """Fail before any training when the output folder cannot be written."""
        try:
            os.makedirs(self.dir, exist_ok=True)
            probe = os.path.join(self.dir, f".gissl-write-test-{dist.get_rank()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to output folder '{self.dir}' ({e.strerror}); "
                            "choose another with --output-dir") from None

    def check_space(self, model):
        """Fail before training when the folder cannot hold the checkpoints: each write
        needs room for a complete new file beside the previous one (which is kept until
        the new one is complete). The size is estimated as the model's state plus two
        tensors per trainable parameter (AdamW's moments)."""
        need_one = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                       if torch.is_tensor(t))
        need_one += 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        exist = [os.path.exists(p) for p in (self.best, self.last)]
        need = need_one * ((2 - sum(exist)) + any(exist))
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise UserError(f"only {free / 2**20:.0f} MiB free in '{self.dir}', but this run's "
                            f"checkpoints need about {need / 2**20:.0f} MiB; free some space or "
                            "choose another --output-dir")

    def remove_stale_temporaries(self):
        """Delete temporary files of this run left by a process killed while saving."""
        prefixes = tuple(f".tmp-{os.path.basename(p)}-" for p in (self.best, self.last))
        stale = [f for f in os.listdir(self.dir) if f.startswith(prefixes)]
        for f in stale:
            os.remove(os.path.join(self.dir, f))
        return stale


def _make_scheduler(optimizer, metric_mode, lr_min):
    # ReduceLROnPlateau as the reference: factor 0.5, patience 10, min 1e-6 (ssl4gie.md §4.1)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=metric_mode, factor=0.5, patience=10,
        min_lr=lr_min if lr_min and lr_min > 0 else 0.0)


def _better(value, best, mode):
    if best is None:
        return True
    return value > best if mode == "max" else value < best


# Flags that may change between a run and its resumption without making it another experiment
RESUMABLE_CHANGES = {"epochs", "workers", "device", "compile", "skip_nonfinite", "deterministic",
                     "resume_anyway", "output_dir"}
# Optimisation settings: changing one on resume continues the same model on the same data,
# with a warning. Any other change (dataset, --data-root, --skip-bad-files, architecture,
# pretraining, a model flag) would continue another experiment's weights on this one: it stops.
WARN_ONLY_CHANGES = {"seed", "learning_rate", "learning_rate_scheduler", "learning_rate_scheduler_minimum",
                     "cosine", "warmup_epochs", "accum_iter", "batch_size", "clip_grad", "weight_decay",
                     "no_amp", "log_every"}


def _changed(saved, current, keys):
    return [f"--{k.replace('_', '-')} {saved[k]!r} -> {current[k]!r}" for k in keys
            if str(saved[k]) != str(current[k])]


def _check_changed_settings(saved, current, path, warn=True):
    """Compare the settings a run was started with (``saved``) with this command's.

    A changed dataset, data root, architecture or model flag is a UserError unless
    ``--resume-anyway``: resuming would silently train nothing new, or mix two experiments.
    A changed optimisation setting (--seed, learning rate, ...) only warns."""
    if not isinstance(saved, dict):
        return
    common = sorted((saved.keys() & current.keys()) - RESUMABLE_CHANGES)
    blocking = _changed(saved, current, [k for k in common if k not in WARN_ONLY_CHANGES])
    if blocking and not current.get("resume_anyway"):
        raise UserError(f"'{path}' is a run of another experiment ({'; '.join(blocking)}); resuming it "
                        "would continue its model instead of training this one. Start a new run with "
                        "another --output-dir (or delete that file), or add --resume-anyway to continue it")
    changed = blocking + _changed(saved, current, [k for k in common if k in WARN_ONLY_CHANGES])
    if changed and warn:
        print(f"warning: '{path}' was started with other settings ({'; '.join(changed)}); it continues "
              "with its saved weights and optimiser state. To start afresh, use another --output-dir "
              "or delete that file", file=sys.stderr, flush=True)


@_report_rank_failure
def fit(model, *, train_loader, compute_losses, optimizer, device, run_dir, run_name, args,
        epochs, validate=None, metric_mode="max", metric_name=None, lr_scheduler=False, lr_min=1e-6,
        accum_iter=1, clip_grad=None, amp=True, frozen=(), lr_schedule=None, after_step=None,
        log_every=10, find_unused_parameters=False, extra_state=None, show_progress=True,
        skip_nonfinite=None,
        channels_last=None, compile=None):
    """Train ``model`` for ``epochs`` epochs, resuming from ``<run_name>.last.pth`` if present.

    ``model`` is the bare module, already on ``device``; under torchrun it is wrapped in
    DistributedDataParallel here (and the bare module is what gets saved). ``validate``,
    when given, runs on rank 0 after every epoch with the bare model in eval mode; its
    value (higher is better for ``metric_mode="max"``) selects the ``best`` checkpoint and
    drives the plateau scheduler, which every rank steps with the same broadcast value.
    The JSON-lines log records it as ``"val"``, with ``"metric": metric_name`` when given;
    ``"train"`` holds the mean of each loss term, under the names ``compute_losses`` gives.
    ``extra_state``: optional ``(get() -> dict, set(dict))`` pair saved in checkpoints.
    SIGTERM/SIGINT save a resumable ``last`` checkpoint at the next optimiser step and
    raise :class:`TrainingInterrupted`. ``skip_nonfinite`` (default: ``args.skip_nonfinite``,
    else 0): how many optimiser steps with a non-finite loss may be skipped over the whole
    run before it stops (:class:`NonFiniteGuard`). Before any training the output folder
    is checked for write access and room for the checkpoints (UserError otherwise).
    ``frozen``: modules that must not train; fit freezes them (no gradients), removes their
    parameters from ``optimizer`` however it was built, and keeps them in eval mode
    (BatchNorm statistics fixed).

    Returns a dict with ``best_metric``, ``best_epoch``, ``epochs_run``, ``best_path``,
    ``last_path`` and ``history`` (one dict per epoch run in this call).
    """
    frozen = tuple(frozen)
    drop_frozen_parameters(optimizer, frozen)  # before check_space, which counts trainable state
    files = RunFiles(run_dir, run_name)
    files.check_writable()
    args_dict = dict(args) if isinstance(args, dict) else dict(vars(args))
    if skip_nonfinite is None:
        skip_nonfinite = int(args_dict.get("skip_nonfinite", 0) or 0)
    if skip_nonfinite < 0:
        raise UserError(f"--skip-nonfinite {skip_nonfinite} must be 0 or more")
    fault = _Fault.from_env()
    if dist.is_main_process():
        files.check_space(model)
        stale = files.remove_stale_temporaries()
        if stale:
            print(f"Removed {len(stale)} temporary file(s) left by an interrupted save in "
                  f"'{files.dir}'", flush=True)
    bare = to_channels_last(model, device, channels_last)
    if dist.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            bare, device_ids=[device.index] if torch.device(device).type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)
    if compile is None:  # default: the script's --compile flag
        compile = bool(args_dict.get("compile", False))
    if compile:  # the compiled module runs the steps; the bare one is validated and saved
        model = compile_model(model, device)
    dtype = amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(torch.device(device).type) if dtype == torch.float16 else None
    scheduler = _make_scheduler(optimizer, metric_mode, lr_min) if (lr_scheduler and validate) else None
    seed = int(args_dict.get("seed", 0) or 0)

    def snapshot(epoch, best, best_epoch, global_step, partial=None):
        return {"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch, "best_metric": best, "best_epoch": best_epoch,
                "global_step": global_step, "partial": partial, "args": args_dict,
                "extra": extra_state[0]() if extra_state is not None else None,
                "nonfinite_skipped": guard.skipped}

    start_epoch, best, best_epoch, global_step, partial = 1, None, None, 0, None
    guard = NonFiniteGuard(skip_nonfinite, device)
    if os.path.exists(files.last):
        state = load_file(files.last)
        # on every rank, before any state is loaded: all ranks stop together
        _check_changed_settings(state.get("args"), args_dict, files.last, warn=dist.is_main_process())
        try:
            bare.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"cannot resume from '{files.last}': it does not match this model/optimizer "
                f"({str(e).splitlines()[0]}). Use another --output-dir or delete that file") from None
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if extra_state is not None and state.get("extra") is not None:
            extra_state[1](state["extra"])
        start_epoch = int(state["epoch"]) + 1
        best, best_epoch = state.get("best_metric"), state.get("best_epoch")
        global_step = int(state.get("global_step", 0))
        partial = state.get("partial")
        guard.skipped = int(state.get("nonfinite_skipped", 0) or 0)
        guard.last_good = global_step
        set_rng_state(state["rng"][min(dist.get_rank(), len(state["rng"]) - 1)])
        if dist.is_main_process():
            where = (f"epoch {start_epoch}, batch {partial['batches_done']}" if partial
                     else f"epoch {start_epoch - 1} done")
            print(f"Resuming from {files.last} ({where})", flush=True)
            _append(files.log, f"Resumed at epoch {start_epoch}")
    elif dist.is_main_process():
        with open(files.log, "w") as f:
            f.write(json.dumps(args_dict, default=str) + "\n")
        open(files.jsonl, "w").close()

    history = []
    with _StopSignals(check_every=log_every) as stop:
        for epoch in range(start_epoch, epochs + 1):
            skip = partial["batches_done"] * train_loader.batch_size if partial else 0
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch, skip) if skip else train_loader.sampler.set_epoch(epoch)
            if not partial:
                # Reseed every epoch from (seed, rank, epoch): model-side randomness (dropout,
                # masking) then depends on nothing else, which makes resumed runs exact. A
                # run resumed mid-epoch continues from the restored RNG state instead.
                s = (seed * 7919 + epoch * 104729 + dist.get_rank()) % 2**32
                torch.manual_seed(s), random.seed(s), np.random.seed(s)
            t0 = time.time()
            means, global_step, stopped = train_one_epoch(
                model, train_loader, optimizer, compute_losses, device=device, epoch=epoch,
                scaler=scaler, amp=amp, accum_iter=accum_iter, clip_grad=clip_grad, frozen=frozen,
                lr_schedule=lr_schedule, after_step=after_step, global_step=global_step,
                log_every=log_every, show_progress=show_progress, resume=partial,
                should_stop=stop, nonfinite=guard, fault=fault)
            partial = None
            if stopped is not None:
                rngs = _gather_rng()
                if dist.is_main_process():
                    state = snapshot(epoch - 1, best, best_epoch, global_step, partial=stopped)
                    state["rng"] = rngs
                    _save(state, files.last, fault)
                    _append(files.log, f"Interrupted by signal {stop.signum} in epoch {epoch} "
                                       f"after batch {stopped['batches_done']}; saved {files.last}")
                dist.barrier()
                raise TrainingInterrupted(stop.signum, files.last)
            train_time = time.time() - t0
            record = {"epoch": epoch, "train": means, "lr": optimizer.param_groups[0]["lr"],
                      "train_time_s": round(train_time, 3)}
            n_seen = len(train_loader.sampler) * dist.get_world_size()
            lines = [f"Train Epoch: {epoch} [{n_seen}/{n_seen} (100.0%)]\tAverage loss: "
                     f"{means.get('loss', float('nan')):.6f}\tTime: {train_time:.6f}"]
            if validate is not None:
                value = None
                if dist.is_main_process():
                    t1 = time.time()
                    bare.eval()
                    with torch.inference_mode():
                        value = float(validate(bare))
                    lines.append(f"Val   Epoch: {epoch}\tAverage performance: {value:.6f}\t"
                                 f"Time: {time.time() - t1:.6f}")
                value = dist.broadcast_object(value)  # one float, the same on every rank
                record["val"] = value
                if metric_name:
                    record["metric"] = metric_name
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"validation metric is {value} after epoch {epoch}")
                improved = _better(value, best, metric_mode)
                if improved:
                    best, best_epoch = value, epoch
                if scheduler is not None:
                    old = optimizer.param_groups[0]["lr"]
                    scheduler.step(value)
                    new = optimizer.param_groups[0]["lr"]
                    if new != old:
                        lines.append(f"Epoch {epoch:5d}: reducing learning rate of group 0 to {new:.4e}.")
            else:
                improved, best_epoch = True, epoch
            rngs = _gather_rng()
            if dist.is_main_process():
                state = snapshot(epoch, best, best_epoch, global_step)
                state["rng"] = rngs
                # best before last: a crash between the two leaves ``last`` one epoch
                # behind, so the resumed run redoes this epoch and rewrites ``best`` too
                if improved:
                    _save(state, files.best, fault)
                    lines.append("Saving...")
                _save(state, files.last, fault)
                for line in lines:
                    print(line, flush=True)
                _append(files.log, "\n".join(lines))
                _append(files.jsonl, json.dumps(record))
            dist.barrier()
            history.append(record)
    return {"best_metric": best, "best_epoch": best_epoch, "epochs_run": len(history),
            "best_path": files.best, "last_path": files.last, "history": history}


def _gather_rng():
    """Every rank's RNG state (rank order), for exact resume under torchrun."""
    mine = rng_state()
    if not dist.is_dist():
        return [mine]
    out = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, mine)
    return out


def _append(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")
