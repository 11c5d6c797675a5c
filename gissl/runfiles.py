"""The files of one training run and the rules for resuming it.

A run named ``<name>`` (SSL4GIE's naming, :func:`run_name`) in folder ``<dir>`` keeps
``<name>.pth`` (best), ``<name>.last.pth`` (resume point), ``<name>.txt`` (SSL4GIE-style log)
and ``<name>.jsonl`` (one JSON record per epoch). Checkpoints are written atomically.
"""
import json
import os
import shutil
import sys

import torch

from gissl import dist
from gissl.checkpoint import save_atomic
from gissl.errors import UserError


class RunFiles:
    """Paths of one training run: ``<dir>/<name>.pth`` (best), ``.last.pth``, ``.txt``, ``.jsonl``.

    ``config``: the plain settings of the run (a dict of flag values; JSON-able), written as the
    log's first line, stored in every checkpoint under ``"args"`` (eval and predict rebuild the
    model from it) and compared on resume (:func:`check_changed_settings`); ``resume_anyway``
    lets a run resume although its experiment settings changed."""

    def __init__(self, run_dir, run_name, config=None, resume_anyway=False):
        self.config, self.resume_anyway = dict(config or {}), resume_anyway
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

    def start_logs(self):
        """A new run: the text log starts with the settings, the JSON-lines log empty."""
        with open(self.log, "w") as f:
            f.write(json.dumps(self.config, default=str) + "\n")
        open(self.jsonl, "w").close()

    def check_resumable(self, saved, warn=True):
        """Refuse to resume ``last`` when it was another experiment (see :func:`check_changed_settings`)."""
        check_changed_settings(saved, self.config, self.last, warn=warn, resume_anyway=self.resume_anyway)

    def remove_stale_temporaries(self):
        """Delete temporary files of this run left by a process killed while saving."""
        prefixes = tuple(f".tmp-{os.path.basename(p)}-" for p in (self.best, self.last))
        stale = [f for f in os.listdir(self.dir) if f.startswith(prefixes)]
        for f in stale:
            os.remove(os.path.join(self.dir, f))
        return stale


def save_checkpoint(state, path, before_replace=None):
    """:func:`save_atomic`, with a full disk or a lost folder turned into a clear error."""
    try:
        save_atomic(state, path, before_replace=before_replace)
    except OSError as e:
        raise UserError(f"cannot write checkpoint '{path}' ({e.strerror or e}); the previous "
                        "checkpoint is unchanged. Free some space (or choose another --output-dir) "
                        "and re-run the same command to resume") from None


# Flags that may change between a run and its resumption without making it another experiment
RESUMABLE_CHANGES = {"epochs", "workers", "device", "compile", "skip_nonfinite", "deterministic",
                     "resume_anyway", "output_dir"}


# Optimisation settings: changing one on resume continues the same model on the same data,
# with a warning. Any other change (dataset, --data-root, --skip-bad-files, architecture,
# pretraining, a model flag) would continue another experiment's weights on this one: it stops.
WARN_ONLY_CHANGES = {"seed", "learning_rate", "learning_rate_scheduler", "learning_rate_scheduler_minimum",
                     "cosine", "warmup_epochs", "accum_iter", "batch_size", "clip_grad", "weight_decay",
                     "no_amp", "log_every", "steps", "eval_every_steps", "early_stopping_patience", "recipe",
                     "optimizer", "augment", "val_metric", "search_lrs", "search_wds", "search_wd_scale",
                     "class_weights"}


def _changed(saved, current, keys):
    return [f"--{k.replace('_', '-')} {saved[k]!r} -> {current[k]!r}" for k in keys
            if str(saved[k]) != str(current[k])]


def check_changed_settings(saved, current, path, warn=True, resume_anyway=False):
    """Compare the settings a run was started with (``saved``) with this command's.

    A changed dataset, data root, architecture or model flag is a UserError unless
    ``--resume-anyway``: resuming would silently train nothing new, or mix two experiments.
    A changed optimisation setting (--seed, learning rate, ...) only warns."""
    if not isinstance(saved, dict):
        return
    common = sorted((saved.keys() & current.keys()) - RESUMABLE_CHANGES)
    blocking = _changed(saved, current, [k for k in common if k not in WARN_ONLY_CHANGES])
    if blocking and not (resume_anyway or current.get("resume_anyway")):
        raise UserError(f"'{path}' is a run of another experiment ({'; '.join(blocking)}); resuming it "
                        "would continue its model instead of training this one. Start a new run with "
                        "another --output-dir (or delete that file), or add --resume-anyway to continue it")
    changed = blocking + _changed(saved, current, [k for k in common if k in WARN_ONLY_CHANGES])
    if changed and warn:
        print(f"warning: '{path}' was started with other settings ({'; '.join(changed)}); it continues "
              "with its saved weights and optimiser state. To start afresh, use another --output-dir "
              "or delete that file", file=sys.stderr, flush=True)


class GridSearch:
    """A hyper-parameter grid trained point by point, resumable after a kill.

    ``grid``: the points, dicts of plain values (e.g. ``{"lr": 0.1, "wd": 0.0}``). Each point is
    one training run named ``<name>-lr_0.1-wd_0`` in ``<dir>/<name>-search/``; when it ends its
    row (the point, ``best_metric``, ``best_step``, ``steps_run``, ``stopped``) is recorded in
    ``<dir>/<name>.search.pth`` (written atomically) and the point's checkpoints are deleted
    (their logs stay). Re-running the same search skips every recorded point and resumes the one
    that was running from its own ``last`` checkpoint. ``config``: the run's settings, stored and
    compared on resume as a training run's (:func:`check_changed_settings`).
    """

    def __init__(self, run_dir, name, grid, config=None, resume_anyway=False):
        self.name, self.grid, self.config = name, [dict(p) for p in grid], dict(config or {})
        self.dir = os.path.join(str(run_dir), name + "-search")
        self.path = os.path.join(str(run_dir), name + ".search.pth")
        self.rows = {}
        if os.path.exists(self.path):
            from gissl.checkpoint import load_file
            saved = load_file(self.path)
            check_changed_settings(saved.get("args"), self.config, self.path, warn=dist.is_main_process(),
                                   resume_anyway=resume_anyway)
            self.rows = dict(saved["rows"])

    def point_name(self, point):
        return self.name + "".join(f"-{k}_{v:g}" for k, v in point.items())

    def run(self, train_point):
        """Train every point not yet recorded: ``train_point(point, run_dir, run_name)`` returns a
        :func:`gissl.engine.fit` result. Returns the rows in grid order."""
        for point in self.grid:
            key = self.point_name(point)
            if key not in self.rows:
                result = train_point(point, self.dir, key)
                self.rows[key] = {**point, **{k: result.get(k) for k in
                                              ("best_metric", "best_step", "steps_run", "stopped")}}
                if dist.is_main_process():
                    save_checkpoint({"args": self.config, "grid": self.grid, "rows": self.rows}, self.path)
                dist.barrier()
            if dist.is_main_process():  # also after a kill between recording and deleting
                for f in (key + ".pth", key + ".last.pth"):
                    if os.path.exists(os.path.join(self.dir, f)):
                        os.remove(os.path.join(self.dir, f))
        return [self.rows[self.point_name(p)] for p in self.grid]

    def best(self, mode="max"):
        """The recorded row with the best ``best_metric``; the first in grid order on a tie."""
        rows = [self.rows[self.point_name(p)] for p in self.grid]
        scored = [r for r in rows if r["best_metric"] is not None] or rows
        sign = 1.0 if mode == "max" else -1.0
        return max(scored, key=lambda r: sign * r["best_metric"] if r["best_metric"] is not None else 0.0)

    def table(self, metric_name="val"):
        """The summary: one line per point (its values, best validation score, the step of that
        score and the step training stopped at, and why), the chosen point marked ``*``."""
        keys = list(self.grid[0])
        head = "  ".join(f"{k:>10}" for k in keys) + f"  {'best ' + metric_name:>16}  {'best step':>9}  " \
            f"{'stopped at':>10}  why"
        chosen = self.best()
        lines = [head]
        for p in self.grid:
            r = self.rows.get(self.point_name(p))
            if r is None:
                continue
            value = "-" if r["best_metric"] is None else f"{r['best_metric']:.6f}"
            lines.append("  ".join(f"{r[k]:>10.3g}" for k in keys) + f"  {value:>16}  {str(r['best_step']):>9}  "
                         f"{r['steps_run']:>10}  {r['stopped']}" + ("  *" if r is chosen else ""))
        return "\n".join(lines)


def append_line(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")


def run_name(architecture, pretraining, ss_framework, frozen, dataset):
    """The SSL4GIE checkpoint name (docs/ssl4gie-study.md §4.4), e.g.
    ``vit_b-Hyperkvasir_mae_init-frozen_False-dataset_Kvasir``."""
    ss = f"_{ss_framework}" if ss_framework else ""
    return f"{architecture}-{pretraining}{ss}_init-frozen_{bool(frozen)}-dataset_{dataset}"
