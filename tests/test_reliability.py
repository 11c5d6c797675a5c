"""Failure behaviour of training (issue #10, engine faults): kill and resume, signals,
determinism, non-finite losses, distributed faults, unwritable or full output folders.

The subprocess tests run the real ``train_classification.py`` (resnet18, 32 px, built-in
synthetic data, CPU, ``--deterministic``) and inject crashes through ``GISSL_FAULT``
(test-only, through the engine's hooks: see ``tests/faults.py``). Every resumed run must end with weights equal,
bit for bit, to one uninterrupted run, and no ``*.pth`` file may ever be unreadable.
"""
import ctypes
import errno
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from gissl import engine, loaders, optim, runfiles
from gissl.runfiles import RunFiles
from gissl.checkpoint import load_file, save_atomic
from gissl.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAME = "resnet18-random_init-frozen_False-dataset_Hyperkvasir_anatomical"
# 192 training images / batch 32 = 6 optimiser steps per epoch, 2 epochs
# run through tests/faults.py, which installs the GISSL_FAULT fault on the engine's hooks
TRAIN = [os.path.join(HERE, "faults.py"), os.path.join(ROOT, "train_classification.py"), "--architecture", "resnet18",
         "--dataset", "Hyperkvasir_anatomical", "--image-size", "32", "--epochs", "2",
         "--batch-size", "32", "--learning-rate", "1e-3", "--workers", "0", "--device", "cpu",
         "--deterministic"]


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A per-module GISSL_CACHE holding the synthetic dataset, generated once here so the
    subprocesses only read it."""
    path = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GISSL_CACHE", path)
        from gissl.data.synthetic import synthetic_root
        root = synthetic_root("Hyperkvasir_anatomical")
    return {"dir": path, "root": root}


def _env(cache, fault=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", GISSL_CACHE=cache["dir"])
    env.pop("GISSL_FAULT", None)
    if fault:
        env["GISSL_FAULT"] = fault
    return env


def train(cache, out, *extra, fault=None, cwd=None, **kw):
    r = subprocess.run([sys.executable, *TRAIN, "--output-dir", str(out), *extra],
                       cwd=cwd or next(p for p in out.parents if p.exists()), env=_env(cache, fault),
                       capture_output=True, text=True, timeout=300, **kw)
    r.output = r.stdout + r.stderr
    return r


def ok(r):
    assert r.returncode == 0, r.output[-3000:]
    return r


def checkpoints(folder):
    """Every ``*.pth`` in ``folder`` loads (none is truncated); returns them by name."""
    return {f: load_file(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
            if f.endswith(".pth")}


def temporaries(folder):
    return [f for f in os.listdir(folder) if f.startswith(".tmp")]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def baseline(cache, tmp_path_factory):
    """The uninterrupted run every other run is compared with."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    ok(train(cache, out))
    model = load_file(out / f"{NAME}.last.pth")["model"]
    shutil.rmtree(out)  # 2 x 134 MB
    return model


# --------------------------------------------------------------------------- kill and resume

@pytest.mark.slow
def test_determinism_with_spaces_and_unicode_in_paths(cache, baseline, tmp_path):
    """A second --deterministic run, its data and output under names with spaces and
    non-ASCII letters, gives bit-identical weights."""
    data = tmp_path / "data folder ü" / "Hyper kvasïr"
    shutil.copytree(cache["root"], data)
    out = tmp_path / "Trained models" / "ünïcødé run"
    r = ok(train(cache, out, "--data-root", str(data)))
    assert_same_weights(load_file(out / f"{NAME}.last.pth")["model"], baseline)
    assert (out / f"{NAME}.txt").is_file() and "Saving..." in r.stdout
    shutil.rmtree(out)  # 2 x 134 MB of checkpoints; kept when the test fails


@pytest.mark.slow
def test_sigkill_mid_save_and_mid_epoch_then_resume_is_exact(cache, baseline, tmp_path):
    out = tmp_path / "run"
    # 1) killed while writing its 3rd checkpoint (epoch 2's best or last), temp file half written
    r = train(cache, out, fault="kill_in_save:3")
    assert r.returncode == -signal.SIGKILL, r.output[-2000:]
    files = checkpoints(out)
    assert files[f"{NAME}.last.pth"]["epoch"] == 1
    stray = temporaries(out)
    assert len(stray) == 1 and stray[0].startswith(f".tmp-{NAME}.")
    assert os.path.getsize(out / stray[0]) < os.path.getsize(out / f"{NAME}.last.pth")
    # 2) resumes from epoch 1 (the stray temp file is cleaned up), killed after step 9 = mid epoch 2
    r = train(cache, out, fault="kill_after_step:9")
    assert r.returncode == -signal.SIGKILL, r.output[-2000:]
    assert "Resuming from" in r.stdout and "Removed 1 temporary file" in r.stdout
    assert checkpoints(out)[f"{NAME}.last.pth"]["epoch"] == 1
    assert temporaries(out) == []
    # 3) the same command again finishes, equal to the uninterrupted run
    r = ok(train(cache, out))
    assert "Resuming from" in r.stdout
    files = checkpoints(out)
    assert files[f"{NAME}.last.pth"]["epoch"] == 2
    assert_same_weights(files[f"{NAME}.last.pth"]["model"], baseline)
    shutil.rmtree(out)


@pytest.mark.slow
def test_sigterm_and_sigint_save_last_and_resume_is_exact(cache, baseline, tmp_path):
    out = tmp_path / "run"
    r = train(cache, out, fault="kill_after_step:3:TERM")
    assert r.returncode == 128 + signal.SIGTERM, r.output[-2000:]
    assert "Re-run the same command" in r.stderr
    last = checkpoints(out)[f"{NAME}.last.pth"]
    assert last["epoch"] == 0 and last["partial"]["batches_done"] == 3
    # resumes in the middle of epoch 1; Ctrl-C in the middle of epoch 2
    r = train(cache, out, fault="kill_after_step:9:INT")
    assert r.returncode == 128 + signal.SIGINT, r.output[-2000:]
    assert "Resuming from" in r.stdout and "epoch 1, batch 3" in r.stdout
    last = checkpoints(out)[f"{NAME}.last.pth"]
    assert last["epoch"] == 1 and last["partial"]["batches_done"] == 3
    ok(train(cache, out))
    assert_same_weights(checkpoints(out)[f"{NAME}.last.pth"]["model"], baseline)
    assert temporaries(out) == []
    shutil.rmtree(out)


@pytest.mark.slow
def test_nonfinite_loss_in_script_exits_1_naming_the_step(cache, tmp_path):
    # AdamW's first step moves every weight by about the learning rate: 1e30 overflows at step 2
    r = train(cache, tmp_path / "run", "--epochs", "1", "--learning-rate", "1e30")
    assert r.returncode == 1, r.output[-2000:]
    assert "\nerror: non-finite loss at epoch 1, step 2, batch 2/6" in r.stderr
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".pth")]


def _drop_root_file_override():
    """In the child, before exec: give up root's power to ignore file permissions
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a read-only folder is read-only for it too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the bounding set,
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")  # so exec drops it


@pytest.mark.slow
def test_readonly_output_folder_exits_2_before_training(cache, tmp_path):
    out = tmp_path / "Trained models" / "read only"
    out.mkdir(parents=True)
    previous = out / f"{NAME}.last.pth"
    save_atomic({"epoch": 1}, previous)
    before = (previous.read_bytes(), os.stat(previous).st_mtime_ns)
    out.chmod(0o555)
    try:
        r = train(cache, out, preexec_fn=_drop_root_file_override if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as e:  # no prctl here (not Linux, or not allowed)
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE: {e}")
    finally:
        out.chmod(0o755)
    assert r.returncode == 2, r.output[-2000:]
    assert f"error: cannot write to output folder '{out}' (Permission denied)" in r.stderr
    assert "--output-dir" in r.stderr and "Train Epoch" not in r.stdout
    assert (previous.read_bytes(), os.stat(previous).st_mtime_ns) == before


# --------------------------------------------------------------------------- in-process

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


class ToyData(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        self.y = (self.x.mean((1, 2, 3)) > 0).long()

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def nan_at(*steps, seen=None):
    """compute_losses whose loss is NaN at the given calls (= optimiser steps of a fresh run,
    3 per epoch); ``seen`` collects the model's conv weight before every call."""
    calls = {"n": 0}

    def compute(model, batch):
        calls["n"] += 1
        if seen is not None:
            seen.append(model.conv.weight.detach().clone())
        loss = nn.functional.cross_entropy(model(batch["image"]), batch["label"])
        return {"ce": loss * float("nan") if calls["n"] in steps else loss}
    return compute


def fit_toy(run_dir, compute, epochs=2, skip=0, **kw):
    torch.manual_seed(0)
    model = Toy()
    loader = loaders.make_loader(ToyData(), batch_size=8, train=True, workers=0, seed=0)
    return model, engine.fit(
        model, train_loader=loader, compute_losses=compute, optimizer=optim.build_optimizer(model, lr=1e-2),
        device=torch.device("cpu"), run=RunFiles(run_dir, "toy", config={"seed": 0, "skip_nonfinite": skip}),
        epochs=epochs, options=engine.FitOptions(amp=False, show_progress=False, skip_nonfinite=skip, **kw))


def test_skip_nonfinite_skips_the_step_and_counts_over_resume(tmp_path, capsys):
    seen = []
    model, out = fit_toy(tmp_path, nan_at(2, seen=seen), epochs=1, skip=2)
    assert torch.equal(seen[1], seen[2])  # step 2 changed nothing
    assert not torch.equal(seen[0], seen[1])
    warning = "non-finite loss at epoch 1, step 2: step skipped (1 of --skip-nonfinite 2)"
    assert warning in capsys.readouterr().err
    ck = load_file(tmp_path / "toy.last.pth")
    assert ck["nonfinite_skipped"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert math.isfinite(out["history"][0]["train"]["ce"])  # the skipped batch is left out of the mean
    # resumed run: the count carries over, so the second skip uses up the limit of 2 ...
    fit_toy(tmp_path, nan_at(1), epochs=2, skip=2)
    assert load_file(tmp_path / "toy.last.pth")["nonfinite_skipped"] == 2
    # ... and a third one stops the run
    with pytest.raises(engine.NonFiniteLossError, match="epoch 3, step 7, batch 1/3; 2 step"):
        fit_toy(tmp_path, nan_at(1), epochs=3, skip=2)


@pytest.mark.parametrize("skip,steps,message", [
    (0, (5,), "epoch 2, step 5, batch 2/3"),                    # CPU: every step is checked
    (1, (2, 5), "epoch 2, step 5, batch 2/3; 1 step"),          # the second one is over the limit
])
def test_nonfinite_stop_names_the_step_and_keeps_the_checkpoint(tmp_path, skip, steps, message):
    before = {}

    def compute(model, batch, inner=nan_at(*steps)):
        if not before and os.path.exists(tmp_path / "toy.last.pth"):  # epoch 1 is saved
            before.update({f: ((tmp_path / f).read_bytes(), os.stat(tmp_path / f).st_mtime_ns)
                           for f in ("toy.pth", "toy.last.pth")})
        return inner(model, batch)

    with pytest.raises(engine.NonFiniteLossError, match=message):
        fit_toy(tmp_path, compute, skip=skip)
    after = {f: ((tmp_path / f).read_bytes(), os.stat(tmp_path / f).st_mtime_ns) for f in before}
    assert before and after == before
    assert load_file(tmp_path / "toy.last.pth")["epoch"] == 1


def test_skipped_step_lowers_the_fp16_loss_scale():
    torch.manual_seed(0)
    model = Toy()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = engine.NonFiniteGuard(1)
    loader = loaders.make_loader(ToyData(), batch_size=8, train=True, workers=0)
    engine.train_one_epoch(model, loader, optim.build_optimizer(model, lr=1e-2), nan_at(2),
                           device=torch.device("cpu"), epoch=1, scaler=scaler, nonfinite=guard,
                           options=engine.FitOptions(amp=False, show_progress=False))
    assert guard.skipped == 1 and scaler.get_scale() == 512.0  # backoff 0.5, as for inf gradients
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gpu_policy_checks_log_steps_and_gives_the_range():
    """With nothing to skip, a GPU run reads the loss back only at logging steps (no
    per-step sync); the error then says in which steps the loss went bad."""
    guard = engine.NonFiniteGuard(0, device="cuda")
    assert not guard.every_step and engine.NonFiniteGuard(1, device="cuda").every_step
    torch.manual_seed(0)
    model = Toy()
    loader = loaders.make_loader(ToyData(), batch_size=8, train=True, workers=0)
    # NaN at step 2 (unchecked) poisons the weights; the check at the epoch's last step finds it
    with pytest.raises(engine.NonFiniteLossError, match="between steps 2 and 3"):
        engine.train_one_epoch(model, loader, optim.build_optimizer(model, lr=1e-2), nan_at(2),
                               device=torch.device("cpu"), epoch=1, nonfinite=guard,
                               options=engine.FitOptions(amp=False, show_progress=False))


def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    fit_toy(tmp_path, nan_at(), epochs=1)
    last = tmp_path / "toy.last.pth"
    before = (last.read_bytes(), os.stat(last).st_mtime_ns)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + bytes(1000))  # part of a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is unchanged"):
        fit_toy(tmp_path, nan_at(), epochs=2)
    monkeypatch.undo()
    assert (last.read_bytes(), os.stat(last).st_mtime_ns) == before
    assert load_file(last)["epoch"] == 1 and temporaries(tmp_path) == []


def test_unwritable_output_folder_in_process(tmp_path, monkeypatch):
    """The up-front check in-process: the probe write fails, training never starts and the
    checkpoint already there is untouched."""
    fit_toy(tmp_path, nan_at(), epochs=1)
    last = tmp_path / "toy.last.pth"
    before = (last.read_bytes(), os.stat(last).st_mtime_ns)

    def read_only(path, mode="r", *args, **kwargs):
        if "w" in mode or "a" in mode:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runfiles, "open", read_only, raising=False)
    calls = []
    with pytest.raises(UserError, match="cannot write to output folder .*Permission denied.*--output-dir"):
        fit_toy(tmp_path, lambda m, b: calls.append(1), epochs=2)
    assert calls == [] and (last.read_bytes(), os.stat(last).st_mtime_ns) == before


def test_no_room_for_checkpoints_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, free=1000))
    calls = []
    with pytest.raises(UserError, match="free in .*checkpoints need about"):
        fit_toy(tmp_path, lambda m, b: calls.append(1), epochs=1)
    assert calls == []


def test_fault_hook_is_off_without_the_variable(monkeypatch):
    sys.path.insert(0, HERE)
    from faults import Fault
    monkeypatch.delenv("GISSL_FAULT", raising=False)
    assert Fault.from_env() is None
    monkeypatch.setenv("GISSL_FAULT", "kill_after_step:3@1")  # another rank's fault
    assert Fault.from_env() is None
    monkeypatch.setenv("GISSL_FAULT", "raise_after_step:2")
    with pytest.raises(RuntimeError, match="injected fault"):
        Fault.from_env().after_step(2)
    assert not any(engine.HOOKS.values())  # nothing was installed in this process


# --------------------------------------------------------------------------- distributed

def torchrun(tmp_path, epochs, fault=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("GISSL_FAULT", None)
    if fault:
        env["GISSL_FAULT"] = fault
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "--max-restarts", "0",
                        os.path.join(HERE, "ddp_faults.py"), str(tmp_path), str(epochs)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    r.output, r.seconds = r.stdout + r.stderr, time.time() - t0
    return r


@pytest.mark.slow
def test_ddp_ranks_stay_identical_with_scheduler_and_skipped_step(tmp_path):
    r = torchrun(tmp_path, 13)
    assert r.returncode == 0, r.output[-3000:]
    assert "step skipped (1 of --skip-nonfinite 1)" in r.output  # rank 1's NaN, skipped on both
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pth", weights_only=True) for k in (0, 1))
    assert r0["lr"] == r1["lr"] == 0.025  # the plateau scheduler halved 0.05 after epoch 12
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    for a, b in zip(r0["optimizer"]["state"].values(), r1["optimizer"]["state"].values()):
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("fault,shown", [
    ("raise_after_step:6@1", "[rank 1/2] training failed: RuntimeError: injected fault"),
    ("kill_after_step:6@1", "Signal 9 (SIGKILL) received"),
])
def test_ddp_failing_rank_ends_the_job_with_its_error(tmp_path, fault, shown):
    r = torchrun(tmp_path, 13, fault)
    assert r.returncode != 0 and r.seconds < 60, (r.seconds, r.output[-3000:])
    assert shown in r.output, r.output[-3000:]
    # rank 1 is the root cause torchrun reports, and nothing finished
    assert r.output.split("Root Cause")[1].split("rank")[1].lstrip(" :").startswith("1"), r.output[-1500:]
    assert not os.path.exists(tmp_path / "rank0.pth")
