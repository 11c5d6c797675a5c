"""One training engine for every task and pretraining method.

A task supplies ``compute_losses(model, batch) -> {"name": loss}`` and, optionally,
``validate(model) -> float``; :func:`fit` does the rest: device placement, DDP, bf16/fp16
autocast, gradient accumulation and clipping, a finite-loss check, ReduceLROnPlateau kept
identical on every rank, ``best`` and ``last`` checkpoints written atomically, automatic
resume from ``last``, a progress bar and per-epoch logs (text as SSL4GIE, plus JSON lines).
"""
import contextlib
import json
import math
import os
import random
import signal
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
    Pass it to ``fit(frozen=[module])`` too, which keeps it in eval mode so BatchNorm
    statistics never change (the reference's ``--frozen`` did neither, ssl4gie.md §8.7)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


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
    """Seeds python, numpy and torch from the sampler's per-sample seed, then reads the sample."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]


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
    Workers persist across epochs; memory is pinned on CUDA.
    """
    if len(dataset) == 0:
        raise UserError("the dataset is empty; check --data-root and --dataset")
    pin = torch.device(device).type == "cuda"
    if not train:
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
            collate_fn=collate_fn or collate, drop_last=bool(drop_last), pin_memory=pin,
            persistent_workers=workers > 0)
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
        persistent_workers=workers > 0)


# --------------------------------------------------------------------------- training

def _check_finite(losses, total, epoch, step):
    if not torch.isfinite(total):
        terms = ", ".join(f"{k}={v.detach().float().item():.4g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {step} ({terms}); the last good checkpoint "
            "is kept. Lower --learning-rate, or try --no-amp if this happens under fp16")


def train_one_epoch(model, loader, optimizer, compute_losses, *, device, epoch, scaler=None,
                    amp=True, accum_iter=1, clip_grad=None, frozen=(), lr_schedule=None,
                    after_step=None, global_step=0, log_every=10, show_progress=True,
                    resume=None, should_stop=None):
    """One pass over ``loader``. Returns ``(mean_losses, global_step, stopped)``.

    The loss is divided by ``accum_iter`` and the optimiser steps every ``accum_iter``
    batches and once more on a last partial accumulation (the reference silently dropped
    it). Loss values are read back to the host only every ``log_every`` steps.
    ``resume`` (``{"batches_done", "sums", "count"}``) continues a partly done epoch whose
    loader already skips those batches. ``should_stop(global_step)`` is asked after each
    optimiser step; when it says yes the pass ends there and ``stopped`` holds the
    ``resume`` dict for this point (``None`` when the epoch completed).
    """
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
    stopped = None
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
            # the check needs the value on the host: only at logging steps and the last
            # step, so the hot loop has no per-step device sync
            if j % log_every == 0 or j + 1 == n_batches:
                _check_finite(losses, total, epoch, global_step + 1)
            # divide by the group's real length so a last partial group is a true mean
            group_len = min(accum_iter, n_batches - (j // accum_iter) * accum_iter)
            scaled = total / group_len
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        count += 1
        if last_of_group:
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
        if bar is not None:
            bar.update(1)
            if j % log_every == 0:
                bar.set_postfix(loss=f"{float(total.detach()):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if last_of_group and j + 1 < n_batches and should_stop is not None and should_stop(global_step):
            stopped = {"batches_done": j + 1, "count": count,
                       "sums": {k: float(v) for k, v in sums.items()}}
            break
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
        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            flag = flag.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())


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


def _make_scheduler(optimizer, metric_mode, lr_min):
    # ReduceLROnPlateau as the reference: factor 0.5, patience 10, min 1e-6 (ssl4gie.md §4.1)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=metric_mode, factor=0.5, patience=10,
        min_lr=lr_min if lr_min and lr_min > 0 else 0.0)


def _better(value, best, mode):
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def fit(model, *, train_loader, compute_losses, optimizer, device, run_dir, run_name, args,
        epochs, validate=None, metric_mode="max", lr_scheduler=False, lr_min=1e-6,
        accum_iter=1, clip_grad=None, amp=True, frozen=(), lr_schedule=None, after_step=None,
        log_every=10, find_unused_parameters=False, extra_state=None, show_progress=True):
    """Train ``model`` for ``epochs`` epochs, resuming from ``<run_name>.last.pth`` if present.

    ``model`` is the bare module, already on ``device``; under torchrun it is wrapped in
    DistributedDataParallel here (and the bare module is what gets saved). ``validate``,
    when given, runs on rank 0 after every epoch with the bare model in eval mode; its
    value (higher is better for ``metric_mode="max"``) selects the ``best`` checkpoint and
    drives the plateau scheduler, which every rank steps with the same broadcast value.
    ``extra_state``: optional ``(get() -> dict, set(dict))`` pair saved in checkpoints.
    SIGTERM/SIGINT save a resumable ``last`` checkpoint at the next optimiser step and
    raise :class:`TrainingInterrupted`.

    Returns a dict with ``best_metric``, ``best_epoch``, ``epochs_run``, ``best_path``,
    ``last_path`` and ``history`` (one dict per epoch run in this call).
    """
    files = RunFiles(run_dir, run_name)
    files.check_writable()
    bare = model
    if dist.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            bare, device_ids=[device.index] if torch.device(device).type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)
    dtype = amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(torch.device(device).type) if dtype == torch.float16 else None
    scheduler = _make_scheduler(optimizer, metric_mode, lr_min) if (lr_scheduler and validate) else None
    args_dict = dict(args) if isinstance(args, dict) else dict(vars(args))
    seed = int(args_dict.get("seed", 0) or 0)

    def snapshot(epoch, best, best_epoch, global_step, partial=None):
        return {"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch, "best_metric": best, "best_epoch": best_epoch,
                "global_step": global_step, "partial": partial, "args": args_dict,
                "extra": extra_state[0]() if extra_state is not None else None}

    start_epoch, best, best_epoch, global_step, partial = 1, None, None, 0, None
    if os.path.exists(files.last):
        state = load_file(files.last)
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
                should_stop=stop)
            partial = None
            if stopped is not None:
                rngs = _gather_rng()
                if dist.is_main_process():
                    state = snapshot(epoch - 1, best, best_epoch, global_step, partial=stopped)
                    state["rng"] = rngs
                    save_atomic(state, files.last)
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
                if improved:
                    save_atomic(state, files.best)
                    lines.append("Saving...")
                save_atomic(state, files.last)
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
