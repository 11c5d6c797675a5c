"""One training engine for every task and pretraining method.

A task supplies ``compute_losses(model, batch) -> {"name": loss}`` and, optionally,
``validate(model) -> float``; :func:`fit` does the rest: device placement, DDP, bf16/fp16
autocast, gradient accumulation and clipping, a finite-loss check, ReduceLROnPlateau kept
identical on every rank, ``best`` and ``last`` checkpoints written atomically, automatic
resume from ``last``, a progress bar and per-epoch logs (text as SSL4GIE, plus JSON lines).
"""
import contextlib
import functools
from dataclasses import dataclass
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
from gissl.checkpoint import load_file, rng_state, set_rng_state
from gissl.errors import CheckpointError, UserError
from gissl.loaders import move_to
from gissl.optim import drop_frozen_parameters, plateau_scheduler, set_train_mode
from gissl.runfiles import append_line, save_checkpoint

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

    def __init__(self, limit=0, device="cpu", skipped=0, last_good=0):
        self.limit, self.skipped = int(limit), int(skipped)
        self.every_step = self.limit > 0 or torch.device(device).type == "cpu"
        self.last_good = last_good  # the last optimiser step whose loss was checked and finite

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


@dataclass
class FitOptions:
    """How :func:`fit` and :func:`train_one_epoch` train; every field is a plain value.

    ``amp``: bf16/fp16 autocast (``--no-amp`` turns it off). ``accum_iter``: forward passes per
    optimiser step; the loader's batch is one pass. ``clip_grad``: global gradient-norm limit.
    ``frozen``: modules that must not train (see :func:`fit`). ``lr_schedule(epoch_float) -> lr``:
    a per-step schedule (``--cosine``); ``plateau``: SSL4GIE's ReduceLROnPlateau on the
    validation metric, floored at ``lr_min``. ``after_step(model, global_step)``: called after
    every optimiser update (EMA teachers). ``skip_nonfinite``: optimiser steps with a
    non-finite loss that may be skipped over the run (:class:`NonFiniteGuard`). ``seed``
    reseeds model-side randomness every epoch. ``extra_state``: ``(get() -> dict, set(dict))``
    saved in checkpoints. ``compile``: ``torch.compile`` the training module;
    ``channels_last``: NHWC memory format (default: :func:`use_channels_last`).

    Step-based training (the SSL-transfer study's finetune protocol, docs/transfer-study.md
    §b.6): ``max_steps`` optimiser steps whatever the epochs; ``lr_schedule`` then takes the
    number of steps done (0, 1, ...) instead of the fractional epoch. ``eval_every_steps``:
    validate (and checkpoint) every that many steps, and always at ``max_steps``;
    ``patience``: stop after that many consecutive checks below the best (a tie counts as an
    improvement, as the study), 0 = never stop early. The best weights are restored at the end.
    """
    amp: bool = True
    accum_iter: int = 1
    clip_grad: float = None
    frozen: tuple = ()
    lr_schedule: object = None
    plateau: bool = False
    lr_min: float = 1e-6
    after_step: object = None
    skip_nonfinite: int = 0
    seed: int = 0
    log_every: int = 10
    show_progress: bool = True
    find_unused_parameters: bool = False
    extra_state: object = None
    compile: bool = False
    channels_last: bool = None
    max_steps: int = None
    eval_every_steps: int = None
    patience: int = 0


# Callbacks for code outside the loop, e.g. the tests' fault injection: each ``after_step``
# hook gets the global step after every optimiser step (taken or skipped), each
# ``before_replace`` hook the temporary file of a checkpoint before it is renamed into place.
HOOKS = {"after_step": [], "before_replace": []}


def _before_replace(tmp):
    for hook in HOOKS["before_replace"]:
        hook(tmp)


def _set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _optimizer_step(optimizer, scaler, clip_grad):
    """Unscale (fp16), clip, step and zero the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _skip_step(optimizer, scaler, guard, where, bar):
    """A step whose loss was non-finite: no update, counted against ``--skip-nonfinite``."""
    if guard.skipped >= guard.limit:
        guard.fail(*where)
    guard.skipped += 1
    if dist.is_main_process():
        (tqdm.write if bar is not None else print)(
            f"warning: non-finite loss at epoch {where[1]}, step {where[2]}: step skipped "
            f"({guard.skipped} of --skip-nonfinite {guard.limit})", file=sys.stderr)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # as GradScaler does for inf gradients: lower the scale
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())


def _backward(model, batch, compute_losses, device, opts, scaler, sync, group_len):
    """Forward and backward of one pass; returns the loss dict and its sum. The sum is divided
    by the accumulation group's real length, so a last partial group is a true mean."""
    with (contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()):
        with autocast(device, opts.amp):
            losses = compute_losses(model, batch)
            total = sum(losses.values())
        scaled = total / group_len
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return losses, total


def _progress_bar(opts, epoch, total, done, global_step=0):
    if opts.show_progress and tqdm is not None and dist.is_main_process():
        desc = f"epoch {epoch}" + (f", step {global_step}/{opts.max_steps}" if opts.max_steps else "")
        return tqdm(total=total, initial=done, desc=desc, leave=False, dynamic_ncols=True)
    return None


def _epoch_means(sums, count, epoch):
    """One host sync per epoch: the mean of every term over batches and ranks."""
    means = {k: float(dist.all_reduce_mean(v / max(count, 1))) for k, v in sums.items()}
    if means:
        means.setdefault("loss", sum(means.values()))
        if not math.isfinite(means["loss"]):
            raise NonFiniteLossError(f"non-finite mean loss in epoch {epoch}; the last good checkpoint is "
                                     "kept. Lower --learning-rate, or try --no-amp")
    return means


def train_one_epoch(model, loader, optimizer, compute_losses, *, device, epoch, options=None,
                    scaler=None, nonfinite=None, global_step=0, resume=None, should_stop=None):
    """One pass over ``loader``. Returns ``(mean_losses, global_step, stopped)``.

    The optimiser steps every ``options.accum_iter`` batches and once more on a last partial
    group (the reference silently dropped it). Loss values reach the host only at logging
    steps (and every step where :class:`NonFiniteGuard` checks). ``resume`` (``{"batches_done",
    "sums", "count"}``) continues a partly done epoch whose loader already skips those batches.
    ``should_stop(global_step)`` is asked after each optimiser step; when it says yes the pass
    ends there and ``stopped`` holds the ``resume`` dict for this point (``None`` when the
    epoch completed). ``nonfinite``: a :class:`NonFiniteGuard` (default: stop at the first).
    """
    opts = options or FitOptions()
    guard = nonfinite or NonFiniteGuard(0, device, last_good=global_step)
    set_train_mode(model, opts.frozen)
    bare = model.module if hasattr(model, "module") else model
    done = resume["batches_done"] if resume else 0
    n_batches, accum = done + len(loader), opts.accum_iter
    sums = {k: torch.tensor(v, device=device) for k, v in (resume or {}).get("sums", {}).items()}
    count, group_bad = (resume["count"] if resume else 0), False
    bar = _progress_bar(opts, epoch, n_batches, done, global_step)
    optimizer.zero_grad(set_to_none=True)
    try:  # close the bar on errors too, so the error message starts on its own line
        for j, batch in enumerate(loader, start=done):
            if opts.lr_schedule is not None:
                _set_lr(optimizer, opts.lr_schedule(global_step if opts.max_steps else epoch - 1 + j / n_batches))
            last = (j + 1) % accum == 0 or j + 1 == n_batches
            losses, total = _backward(model, move_to(batch, device), compute_losses, device, opts, scaler,
                                      last, min(accum, n_batches - (j // accum) * accum))
            where = (losses, epoch, global_step + 1, j + 1, n_batches)
            bad = (guard.every_step or j % opts.log_every == 0 or j + 1 == n_batches) and guard.bad(total, global_step + 1)
            if bad and not guard.limit:
                guard.fail(*where)
            group_bad = group_bad or bad
            if not bad:  # a skipped batch would make the epoch mean NaN
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                count += 1
            if last:
                if guard.agree(group_bad):
                    _skip_step(optimizer, scaler, guard, where, bar)
                else:
                    _optimizer_step(optimizer, scaler, opts.clip_grad)
                    if opts.after_step is not None:
                        opts.after_step(bare, global_step + 1)
                global_step, group_bad = global_step + 1, False
                for hook in HOOKS["after_step"]:
                    hook(global_step)
            if bar is not None:
                bar.update(1)
                if j % opts.log_every == 0:
                    bar.set_postfix(loss=f"{float(total.detach()):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if last and j + 1 < n_batches and should_stop is not None and should_stop(global_step):
                return {}, global_step, {"batches_done": j + 1, "count": count,
                                         "sums": {k: float(v) for k, v in sums.items()}}
    finally:
        if bar is not None:
            bar.close()
    return _epoch_means(sums, count, epoch), global_step, None


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


def _report_rank_failure(fn):
    """Under torchrun, name the rank in the error before it propagates: the launcher stops
    every other rank, whose own (secondary) errors would otherwise bury the cause."""
    @functools.wraps(fn)
    def wrapper(*positional, **keywords):
        try:
            return fn(*positional, **keywords)
        except Exception as e:
            if dist.is_dist() and not isinstance(e, TrainingInterrupted):
                print(f"[rank {dist.get_rank()}/{dist.get_world_size()}] training failed: "
                      f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise
    return wrapper


def _better(value, best, mode):
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _wrap(bare, device, opts):
    """The module that runs the training steps: DDP under torchrun, compiled with ``compile``."""
    model = bare
    if dist.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            bare, device_ids=[device.index] if torch.device(device).type == "cuda" else None,
            find_unused_parameters=opts.find_unused_parameters)
    return compile_model(model, device) if opts.compile else model


def _empty_window():
    return {"sums": {}, "count": 0, "time": 0.0}


class _State:
    """What a checkpoint holds besides the weights, and how it is written and read back."""

    def __init__(self, bare, optimizer, scaler, scheduler, guard, opts):
        self.bare, self.optimizer, self.scaler, self.scheduler, self.guard = bare, optimizer, scaler, scheduler, guard
        self.extra = opts.extra_state
        self.epoch, self.best, self.best_epoch, self.global_step, self.partial = 0, None, None, 0, None
        # step-based runs: the step of the best check, consecutive checks below the best, why
        # the run ended (None while it runs) and the training losses since the last check
        self.best_step, self.bad_checks, self.finished, self.window = None, 0, None, _empty_window()

    def snapshot(self, config, rng, partial=None):
        optional = (self.scaler, self.scheduler)
        scaler, scheduler = (o.state_dict() if o is not None else None for o in optional)
        return {"model": self.bare.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": scaler, "scheduler": scheduler, "epoch": self.epoch, "best_metric": self.best,
                "best_epoch": self.best_epoch, "global_step": self.global_step,
                "partial": self.partial if partial is None else partial,
                "args": config, "extra": self.extra[0]() if self.extra is not None else None,
                "nonfinite_skipped": self.guard.skipped, "rng": rng, "best_step": self.best_step,
                "bad_checks": self.bad_checks, "finished": self.finished, "window": self.window}

    def restore(self, state, path):
        try:
            self.bare.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"cannot resume from '{path}': it does not match this model/optimizer "
                f"({str(e).splitlines()[0]}). Use another --output-dir or delete that file") from None
        for obj, key in ((self.scaler, "scaler"), (self.scheduler, "scheduler")):
            if obj is not None and state.get(key):
                obj.load_state_dict(state[key])
        if self.extra is not None and state.get("extra") is not None:
            self.extra[1](state["extra"])
        self.epoch, self.best, self.best_epoch = int(state["epoch"]), state.get("best_metric"), state.get("best_epoch")
        self.global_step, self.partial = int(state.get("global_step", 0)), state.get("partial")
        self.guard.skipped, self.guard.last_good = int(state.get("nonfinite_skipped", 0) or 0), self.global_step
        self.best_step, self.bad_checks = state.get("best_step"), int(state.get("bad_checks") or 0)
        self.finished, self.window = state.get("finished"), state.get("window") or _empty_window()
        set_rng_state(state["rng"][min(dist.get_rank(), len(state["rng"]) - 1)])


def _start(run, state, model):
    """Resume from ``run.last`` when it exists (after checking it is this experiment), else
    start the logs; only rank 0 writes."""
    if dist.is_main_process():
        run.check_space(model)
        stale = run.remove_stale_temporaries()
        if stale:
            print(f"Removed {len(stale)} temporary file(s) left by an interrupted save in '{run.dir}'", flush=True)
    if not os.path.exists(run.last):
        if dist.is_main_process():
            run.start_logs()
        return
    saved = load_file(run.last)
    run.check_resumable(saved.get("args"), warn=dist.is_main_process())  # every rank stops together
    state.restore(saved, run.last)
    if dist.is_main_process():
        where = (f"epoch {state.epoch + 1}, batch {state.partial['batches_done']}" if state.partial
                 else f"epoch {state.epoch} done") + (f", step {state.global_step}" if state.global_step else "")
        print(f"Resuming from {run.last} ({where})", flush=True)
        append_line(run.log, f"Resumed at epoch {state.epoch + 1}")


def _measure(bare, validate, where, mode, lines, metric_name=None):
    """The validation value (rank 0 computes, every rank gets it), logged as ``Val   <where>``."""
    value = None
    if dist.is_main_process():
        t1 = time.time()
        bare.eval()
        with torch.inference_mode():
            value = float(validate(bare))
        what = f" ({metric_name}, {'higher' if mode == 'max' else 'lower'} is better)" if metric_name else ""
        lines.append(f"Val   {where}\tAverage performance: {value:.6f}{what}\tTime: {time.time() - t1:.6f}")
    value = dist.broadcast_object(value)  # one float, the same on every rank
    if not math.isfinite(value):
        raise NonFiniteLossError(f"validation metric is {value} after {where.lower().replace(':', '')}")
    return value


def _validate(bare, validate, state, epoch, mode, lines, metric_name=None):
    """The validation value after ``epoch``; updates best and the plateau scheduler."""
    value = _measure(bare, validate, f"Epoch: {epoch}", mode, lines, metric_name)
    improved = _better(value, state.best, mode)
    if improved:
        state.best, state.best_epoch = value, epoch
    if state.scheduler is not None:
        old = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step(value)
        new = state.optimizer.param_groups[0]["lr"]
        if new != old:
            lines.append(f"Epoch {epoch:5d}: reducing learning rate of group 0 to {new:.4e}.")
    return value, improved


def _reseed(seed, epoch):
    # Reseed every epoch from (seed, rank, epoch): model-side randomness (dropout, masking)
    # then depends on nothing else, which makes resumed runs exact. A run resumed mid-epoch
    # continues from the restored RNG state instead.
    s = (seed * 7919 + epoch * 104729 + dist.get_rank()) % 2**32
    torch.manual_seed(s), random.seed(s), np.random.seed(s)


def _interrupted(run, state, stop, stopped, epoch):
    state.epoch = epoch - 1
    rng = _gather_rng()  # a collective: every rank takes part
    if dist.is_main_process():
        save_checkpoint(state.snapshot(run.config, rng, partial=stopped), run.last, _before_replace)
        append_line(run.log, f"Interrupted by signal {stop.signum} in epoch {epoch} after batch "
                             f"{stopped['batches_done']}; saved {run.last}")
    dist.barrier()
    raise TrainingInterrupted(stop.signum, run.last)


def _end_epoch(run, state, epoch, improved, lines, record):
    """Save ``best`` (when improved) then ``last``, and log the epoch; rank 0 writes."""
    state.epoch = epoch
    _save(run, state, improved, lines, record)


def _save(run, state, improved, lines, record):
    """Save ``best`` (when improved) then ``last`` and write the log lines; rank 0 writes."""
    rng = _gather_rng()  # a collective: every rank takes part; only rank 0 builds and writes the state
    if dist.is_main_process():
        snapshot = state.snapshot(run.config, rng)
        # best before last: a crash between the two leaves ``last`` one epoch behind, so the
        # resumed run redoes this epoch and rewrites ``best`` too
        if improved:
            save_checkpoint(snapshot, run.best, _before_replace)
            lines.append("Saving...")
        save_checkpoint(snapshot, run.last, _before_replace)
        print("\n".join(lines), flush=True)
        append_line(run.log, "\n".join(lines))
        append_line(run.jsonl, json.dumps(record))
    dist.barrier()


@_report_rank_failure
def fit(model, *, train_loader, compute_losses, optimizer, device, run, epochs, validate=None,
        metric_mode="max", metric_name=None, options=None):
    """Train ``model`` for ``epochs`` epochs in ``run`` (a :class:`gissl.runfiles.RunFiles`),
    resuming from its ``last`` checkpoint if there is one.

    ``model`` is the bare module, already on ``device``; under torchrun it is wrapped in
    DistributedDataParallel here (and the bare module is what gets saved). ``validate``,
    when given, runs on rank 0 after every epoch with the bare model in eval mode; its
    value (higher is better for ``metric_mode="max"``) selects the ``best`` checkpoint and
    drives the plateau scheduler, which every rank steps with the same broadcast value.
    The JSON-lines log records it as ``"val"``, with ``"metric": metric_name`` when given;
    ``"train"`` holds the mean of each loss term, under the names ``compute_losses`` gives.
    ``options``: :class:`FitOptions`. ``options.frozen`` modules are frozen here (no
    gradients), their parameters leave ``optimizer`` however it was built, and they stay in
    eval mode (BatchNorm statistics fixed). SIGTERM/SIGINT save a resumable ``last``
    checkpoint at the next optimiser step and raise :class:`TrainingInterrupted`. Before any
    training the output folder is checked for write access and room for the checkpoints.

    Returns a dict with ``best_metric``, ``best_epoch``, ``epochs_run``, ``best_path``,
    ``last_path`` and ``history`` (one dict per epoch run in this call). With
    ``options.max_steps`` the run is step-based instead (``epochs`` is ignored; see
    :class:`FitOptions` and :func:`_fit_steps`, whose result also has ``best_step``,
    ``steps_run`` and ``stopped``).
    """
    opts = options or FitOptions()
    _check_options(opts)
    drop_frozen_parameters(optimizer, opts.frozen)  # before check_space, which counts trainable state
    run.check_writable()
    bare = to_channels_last(model, device, opts.channels_last)
    model = _wrap(bare, device, opts)
    scaler = torch.amp.GradScaler(torch.device(device).type) if amp_dtype(device, opts.amp) == torch.float16 else None
    scheduler = plateau_scheduler(optimizer, metric_mode, opts.lr_min) if (opts.plateau and validate) else None
    state = _State(bare, optimizer, scaler, scheduler, NonFiniteGuard(opts.skip_nonfinite, device), opts)
    _start(run, state, bare)
    if opts.max_steps:
        return _fit_steps(model, train_loader, compute_losses, device, run, validate, metric_mode, metric_name,
                          opts, state)
    history = []
    with _StopSignals(check_every=opts.log_every) as stop:
        for epoch in range(state.epoch + 1, epochs + 1):
            partial, state.partial = state.partial, None
            _select_epoch(train_loader, epoch, partial, opts.seed)
            t0 = time.time()
            means, state.global_step, stopped = train_one_epoch(
                model, train_loader, optimizer, compute_losses, device=device, epoch=epoch, options=opts,
                scaler=scaler, nonfinite=state.guard, global_step=state.global_step, resume=partial,
                should_stop=stop)
            if stopped is not None:
                _interrupted(run, state, stop, stopped, epoch)
            record = {"epoch": epoch, "train": means, "lr": optimizer.param_groups[0]["lr"],
                      "train_time_s": round(time.time() - t0, 3)}
            n_seen = len(train_loader.sampler) * dist.get_world_size()
            lines = [f"Train Epoch: {epoch} [{n_seen}/{n_seen} (100.0%)]\tAverage loss: "
                     f"{means.get('loss', float('nan')):.6f}\tTime: {record['train_time_s']:.6f}"]
            improved = True
            if validate is not None:
                record["val"], improved = _validate(bare, validate, state, epoch, metric_mode, lines, metric_name)
                if metric_name:
                    record["metric"] = metric_name
            else:
                state.best_epoch = epoch
            _end_epoch(run, state, epoch, improved, lines, record)
            history.append(record)
    return {"best_metric": state.best, "best_epoch": state.best_epoch, "epochs_run": len(history),
            "best_path": run.best, "last_path": run.last, "history": history}


def _check_options(opts):
    for name, flag, value, least in (("skip_nonfinite", "--skip-nonfinite", opts.skip_nonfinite, 0),
                                     ("max_steps", "--steps", opts.max_steps, 1),
                                     ("eval_every_steps", "--eval-every-steps", opts.eval_every_steps, 1),
                                     ("patience", "--early-stopping-patience", opts.patience, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value} must be {least} or more")
    if (opts.eval_every_steps or opts.patience) and not opts.max_steps:
        raise UserError("--eval-every-steps and --early-stopping-patience need step-based training: add --steps N "
                        "(or --recipe transfer-finetune)")


def _select_epoch(train_loader, epoch, partial, seed):
    """Point the sampler at ``epoch`` (skipping the batches a partial epoch already did) and, at
    an epoch's start, reseed the model-side randomness (:func:`_reseed`)."""
    skip = partial["batches_done"] * train_loader.batch_size if partial else 0
    if hasattr(train_loader.sampler, "set_epoch"):
        train_loader.sampler.set_epoch(*((epoch, skip) if skip else (epoch,)))
    if not partial:
        _reseed(seed, epoch)


def _is_check(step, opts):
    """Whether optimiser step ``step`` ends with a validation check (and a checkpoint)."""
    return step >= opts.max_steps or bool(opts.eval_every_steps) and step % opts.eval_every_steps == 0


def _add_to_window(state, means, stopped, batches, seconds):
    """Add one stretch of training (a finished epoch's ``means`` over ``batches`` batches, or a
    ``stopped`` partial epoch's sums) to the losses logged at the next check."""
    w = state.window
    sums, count = (stopped["sums"], stopped["count"]) if stopped else ({k: v * batches for k, v in means.items()},
                                                                      batches)
    for k, v in sums.items():
        w["sums"][k] = w["sums"].get(k, 0.0) + float(v)
    w["count"] += count
    w["time"] += seconds


def _step_check(run, state, bare, validate, metric_mode, metric_name, opts):
    """Validate at the current step, update early stopping, save ``best`` (when not worse)
    and ``last``, log one line pair; returns the JSON record."""
    step, w = state.global_step, state.window
    means = {k: v / max(w["count"], 1) for k, v in w["sums"].items()}
    loss = means.get("loss", sum(means.values()))
    record = {"step": step, "epoch": state.epoch + 1 if state.partial else state.epoch, "train": means,
              "lr": state.optimizer.param_groups[0]["lr"], "train_time_s": round(w["time"], 3)}
    lines = [f"Train Step: {step}/{opts.max_steps}\tAverage loss: {loss:.6f}\tTime: {w['time']:.6f}"]
    improved = True
    if validate is not None:
        record["val"] = value = _measure(bare, validate, f"Step: {step}", metric_mode, lines, metric_name)
        if metric_name:
            record["metric"] = metric_name
        # a tie is an improvement and the later weights are kept, as the study's early stopping
        improved = state.best is None or (value >= state.best if metric_mode == "max" else value <= state.best)
        state.bad_checks = 0 if improved else state.bad_checks + 1
        if improved:
            state.best, state.best_step = value, step
        if opts.patience and state.bad_checks >= opts.patience:
            state.finished = "early_stopping"
            lines.append(f"Early stopping at step {step} / {opts.max_steps}: {state.bad_checks} checks below the "
                         f"best {state.best:.6f} (step {state.best_step})")
    else:
        state.best_step = step
    if step >= opts.max_steps:
        state.finished = state.finished or "max_steps"
    state.window = _empty_window()
    _save(run, state, improved, lines, record)
    return record


def _fit_steps(model, train_loader, compute_losses, device, run, validate, metric_mode, metric_name, opts, state):
    """:func:`fit`'s step-based mode: epochs follow one another until ``opts.max_steps`` optimiser
    steps or early stopping; every check (:func:`_is_check`) validates and saves, so a killed
    run resumes from its last check with the schedule, the early-stopping state and the data
    order exactly as they were (SIGTERM/SIGINT save where they are). A finished run (resumed or
    not) ends with the best check's weights loaded from ``best``."""
    history = []
    with _StopSignals(check_every=opts.log_every) as stop:
        while not state.finished:
            epoch = state.epoch + 1
            partial, state.partial = state.partial, None
            _select_epoch(train_loader, epoch, partial, opts.seed)
            t0 = time.time()
            means, state.global_step, stopped = train_one_epoch(
                model, train_loader, state.optimizer, compute_losses, device=device, epoch=epoch, options=opts,
                scaler=state.scaler, nonfinite=state.guard, global_step=state.global_step, resume=partial,
                should_stop=lambda step: stop(step) or _is_check(step, opts))
            _add_to_window(state, means, stopped, len(train_loader), time.time() - t0)
            # a partial epoch resumes with its own sums emptied: they are in the window now
            state.epoch, state.partial = (epoch - 1, dict(stopped, sums={}, count=0)) if stopped else (epoch, None)
            if _is_check(state.global_step, opts):  # before a signal is obeyed: a resumed run never redoes it
                history.append(_step_check(run, state, state.bare, validate, metric_mode, metric_name, opts))
            if stop.signum is not None and stopped is not None and not state.finished:
                _interrupted(run, state, stop, state.partial, epoch)
    if validate is not None and state.best_step is not None and state.best_step != state.global_step:
        state.bare.load_state_dict(load_file(run.best)["model"])  # every rank: the file rank 0 wrote
    if dist.is_main_process() and not history:
        print(f"{run.last} has already finished ({state.finished} at step {state.global_step})", flush=True)
    return {"best_metric": state.best, "best_epoch": state.best_epoch, "best_step": state.best_step,
            "steps_run": state.global_step, "stopped": state.finished, "epochs_run": len(history),
            "best_path": run.best, "last_path": run.last, "history": history}


def _gather_rng():
    """Every rank's RNG state (rank order), for exact resume under torchrun."""
    mine = rng_state()
    if not dist.is_dist():
        return [mine]
    out = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, mine)
    return out


