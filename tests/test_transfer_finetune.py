"""The SSL-transfer study's finetune protocol (issue #19 item 1, docs/transfer-study.md §b.6):
the step schedule, early stopping, the lr x wd search with its untouched test split, and exact
resume of a search killed in the middle.

Engine tests use a toy model; the script tests run ``train_classification.py``'s ``main`` in
this process (vit_t, 32 px, the built-in synthetic HyperKvasir, CPU, a few steps).
"""
import math
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from gissl import classification as cls
from gissl import cli, engine, loaders, optim
from gissl.checkpoint import load_file
from gissl.runfiles import RunFiles

import train_classification as script

NAME = "vit_t-random_init-frozen_False-dataset_Hyperkvasir_anatomical"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean((2, 3)))


def toy_data():
    x = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return [{"image": x[i], "label": (x[i].mean() > 0).long()} for i in range(24)]


def ce(model, batch):
    return {"loss": nn.functional.cross_entropy(model(batch["image"]), batch["label"])}


def fit_toy(run_dir, *, steps, lr=0.1, compute=ce, validate=None, **flags):
    """``engine.fit`` of the toy model (24 samples, batch 8: 3 steps per epoch) with the step
    options ``cli.step_options`` makes from the flags, SGD Nesterov as the recipe."""
    torch.manual_seed(0)
    model = Toy()
    args = SimpleNamespace(steps=steps, learning_rate_scheduler_minimum=0.0,
                           **{"eval_every_steps": None, "early_stopping_patience": 0, **flags})
    opt = optim.build_optimizer(model, lr, weight_decay=1e-8, kind="sgd-nesterov")
    loader = loaders.make_loader(toy_data(), batch_size=8, train=True, workers=0, seed=0)
    out = engine.fit(model, train_loader=loader, compute_losses=compute(opt) if compute is not ce else ce,
                     optimizer=opt, device=torch.device("cpu"), run=RunFiles(run_dir, "toy", config={}), epochs=1,
                     validate=validate, options=engine.FitOptions(amp=False, show_progress=False,
                                                                   **cli.step_options(args, lr)))
    return model, out


def test_step_schedule_is_the_cosine_annealing_of_the_study(tmp_path):
    lrs = []

    def compute(opt):
        def losses(model, batch):
            lrs.append(opt.param_groups[0]["lr"])
            return ce(model, batch)
        return losses

    _, out = fit_toy(tmp_path, steps=7, lr=0.1, compute=compute)
    assert out["steps_run"] == 7 and len(lrs) == 7  # 7 steps over 3 epochs, whatever the epochs
    # the study: torch's CosineAnnealingLR(T_max=steps) stepped after every optimiser step ...
    p = torch.zeros(1, requires_grad=True)
    ref_opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=7)
    expected = []
    for _ in range(7):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # ... which is the closed form lr_k = lr / 2 (1 + cos(pi k / T)) for k = 0 .. T-1
    assert lrs == pytest.approx([0.1 / 2 * (1 + math.cos(math.pi * k / 7)) for k in range(7)], rel=1e-12, abs=1e-15)


def peaked_validation(values):
    """``validate`` returning ``values[step]`` at the check of that step (read from the engine's
    after-step hook, so a resumed run sees the same curve), and the steps it was called at."""
    where = {"step": 0, "calls": []}

    def hook(step):
        where["step"] = step

    def validate(model):
        where["calls"].append(where["step"])
        return values[where["step"]]
    return validate, where, hook


@pytest.fixture
def hooks():
    added = []
    yield added
    for h in added:
        engine.HOOKS["after_step"].remove(h)


def test_early_stopping_stops_at_the_right_check_and_keeps_the_best_weights(tmp_path, hooks):
    # checks every 2 steps: 0.2, 0.5, 0.5 (a tie: counts as better, later weights kept), then
    # three checks below 0.5 -> patience 3 stops at step 12, with step 6's weights
    curve = {2: 0.2, 4: 0.5, 6: 0.5, 8: 0.4, 10: 0.3, 12: 0.1, 14: 0.9, 16: 0.9, 18: 0.9, 20: 0.9}
    validate, where, hook = peaked_validation(curve)
    weights, holder = {}, {}

    def keep(step):  # the weights after every optimiser step
        weights[step] = {k: v.clone() for k, v in holder["model"].state_dict().items()}
    for h in (hook, keep):
        hooks.append(h)
        engine.HOOKS["after_step"].append(h)

    def compute(opt):
        def losses(model, batch):
            holder["model"] = model
            return ce(model, batch)
        return losses

    model, out = fit_toy(tmp_path, steps=20, compute=compute, validate=validate, eval_every_steps=2,
                         early_stopping_patience=3)
    assert where["calls"] == [2, 4, 6, 8, 10, 12]
    assert out["stopped"] == "early_stopping" and out["steps_run"] == 12
    assert out["best_step"] == 6 and out["best_metric"] == 0.5
    best = weights[6]
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k
    assert not torch.equal(model.state_dict()["conv.weight"], weights[12]["conv.weight"])
    saved = load_file(tmp_path / "toy.pth")
    assert saved["best_step"] == 6 and all(torch.equal(saved["model"][k], best[k]) for k in best)
    assert "Early stopping at step 12 / 20" in (tmp_path / "toy.txt").read_text()


def test_step_run_killed_between_checks_resumes_exactly(tmp_path, hooks):
    curve = {s: v for s, v in zip(range(2, 21, 2), [0.2, 0.5, 0.4, 0.6, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1])}
    runs = {}
    for name, kill in (("whole", None), ("killed", 9)):
        validate, where, hook = peaked_validation(curve)
        hooks.append(hook)
        engine.HOOKS["after_step"].append(hook)
        if kill:
            def crash(step, at=kill):
                if step == at:
                    raise RuntimeError("killed")
            hooks.append(crash)
            engine.HOOKS["after_step"].append(crash)
            with pytest.raises(RuntimeError, match="killed"):
                fit_toy(tmp_path / name, steps=20, validate=validate, eval_every_steps=2, early_stopping_patience=3)
            last = load_file(tmp_path / name / "toy.last.pth")
            assert last["global_step"] == 8 and last["partial"]["batches_done"] == 2  # mid epoch 3
            assert last["bad_checks"] == 0 and last["best_step"] == 8
            engine.HOOKS["after_step"].remove(crash)
            hooks.remove(crash)
            where["calls"].clear()
        runs[name] = fit_toy(tmp_path / name, steps=20, validate=validate, eval_every_steps=2,
                             early_stopping_patience=3)
    (m1, r1), (m2, r2) = runs["whole"], runs["killed"]
    assert (r1["stopped"], r1["steps_run"], r1["best_step"]) == (r2["stopped"], r2["steps_run"], r2["best_step"]) \
        == ("early_stopping", 14, 8)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert [h["val"] for h in r2["history"]] == [0.3, 0.2, 0.1]  # the resumed run redid no check


# --------------------------------------------------------------------------- the script

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GISSL_CACHE", path)
        from gissl.data.synthetic import synthetic_root
        synthetic_root("Hyperkvasir_anatomical")
    return path


def run_script(out, *extra):
    args = script.get_args(["--architecture", "vit_t", "--image-size", "32", "--recipe", "transfer-finetune",
                            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--output-dir", str(out),
                            *extra])
    cli.seed_everything(args.seed)
    script.main(args)
    return args


def test_recipe_sets_the_study_protocol_and_flags_override_it():
    args = script.get_args(["--recipe", "transfer-finetune", "--steps", "300"])
    assert (args.optimizer, args.learning_rate, args.weight_decay, args.batch_size) == ("sgd-nesterov", 1e-2, 1e-8, 64)
    assert (args.steps, args.eval_every_steps, args.early_stopping_patience, args.augment) == (300, 200, 3, "transfer")
    assert (args.class_weights, args.val_metric, args.learning_rate_scheduler_minimum) == ("none", "accuracy", 0.0)
    # the study's grid (finetune.py, --grid-size 2), transcribed: float32 there, hence rel=1e-6
    lr = torch.logspace(-4, -1, 2).flip(dims=(0,))
    wd = torch.cat([torch.zeros(1), torch.logspace(-6, -3, 2)])
    study = [v for ll in lr for w in wd for v in (ll.item(), (w / ll).item())]
    assert [v for p in cli.search_grid(args) for v in (p["lr"], p["wd"])] == pytest.approx(study, rel=1e-6)
    with pytest.raises(Exception, match="--search trains each grid point"):
        script.get_args(["--search"])


def test_search_picks_the_best_val_point_and_scores_test_once_at_the_end(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("GISSL_CACHE", cache)
    # validation scores by call: point lr 0.1 peaks at 0.4, point lr 0.05 at 0.6 (step 1), then its refit
    scores = iter([0.3, 0.4, 0.6, 0.2, 0.6, 0.2])
    events, splits = [], {}
    monkeypatch.setattr(cls, "make_validate", lambda *a, **k: lambda model: next(scores))
    build = cls.build_datasets
    monkeypatch.setattr(cls, "build_datasets", lambda *a, **k: splits.update(ds=build(*a, **k)[0]) or
                        (splits["ds"], list(splits["ds"]["train"].classes)))
    loader = cli.eval_loader

    def eval_loader(args, dataset, device, **k):
        events.append(next(n for n, d in splits["ds"].items() if d is dataset))
        return loader(args, dataset, device, **k)
    monkeypatch.setattr(cli, "eval_loader", eval_loader)
    fit = engine.fit
    monkeypatch.setattr(engine, "fit", lambda *a, **k: events.append(("fit", k["options"].max_steps)) or fit(*a, **k))
    run_script(tmp_path, "--steps", "2", "--eval-every-steps", "1", "--early-stopping-patience", "0", "--search",
               "--search-lrs", "0.1,0.05", "--search-wds", "0")
    assert events == ["val", ("fit", 2), ("fit", 2), ("fit", 2), "test"]  # test built once, after the refit
    rows = load_file(tmp_path / f"{NAME}.search.pth")["rows"]
    assert [(r["lr"], r["best_metric"], r["best_step"], r["steps_run"]) for r in rows.values()] == \
        [(0.1, 0.4, 2, 2), (0.05, 0.6, 1, 2)]
    refit = load_file(tmp_path / f"{NAME}.pth")
    assert refit["args"]["learning_rate"] == 0.05 and refit["best_step"] == 1
    log = (tmp_path / f"{NAME}.txt").read_text()
    assert "0.600000          1           2  max_steps  *" in log and "of the refit, lr 0.05, weight decay 0" in log


# A search SIGKILLed after the N-th optimiser step counted over the whole search (tests/faults.py's
# kill_after_step counts one run's steps, which restart at every grid point)
KILLER = """
import os, runpy, signal, sys
from gissl import engine
calls = [0]
def kill(step):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
if os.environ.get("KILL_AFTER"):
    engine.HOOKS["after_step"].append(kill)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_child(out, cache, flags, kill_after=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", GISSL_CACHE=cache)
    env.pop("KILL_AFTER", None)
    if kill_after:
        env["KILL_AFTER"] = str(kill_after)
    argv = [os.path.join(ROOT, "train_classification.py"), "--architecture", "vit_t", "--image-size", "32",
            "--recipe", "transfer-finetune", "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--output-dir", str(out), *flags]
    return subprocess.run([sys.executable, "-c", KILLER, *argv], cwd=str(out.parent), env=env, capture_output=True,
                          text=True, timeout=300)


def test_search_killed_mid_point_resumes_to_the_uninterrupted_result(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("GISSL_CACHE", cache)
    flags = ("--steps", "4", "--eval-every-steps", "2", "--search", "--search-lrs", "0.1,0.01", "--search-wds", "0")
    # uninterrupted, in a child like the killed run: the same thread count gives the same float sums
    assert run_child(tmp_path / "whole", cache, flags).returncode == 0
    killed = tmp_path / "killed"
    r = run_child(killed, cache, flags, kill_after=7)  # the second point's step 3, after its check at step 2
    assert r.returncode == -signal.SIGKILL, (r.stdout + r.stderr)[-3000:]
    folder = killed / f"{NAME}-search"
    assert load_file(folder / f"{NAME}-lr_0.01-wd_0.last.pth")["global_step"] == 2
    assert list(load_file(killed / f"{NAME}.search.pth")["rows"]) == [f"{NAME}-lr_0.1-wd_0"]
    r = run_child(killed, cache, flags)  # the same command again
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "Resuming from" in r.stdout and r.stdout.count("Val   Step") == 1 + 2  # point 2's step 4, the refit's
    a, b = (load_file(tmp_path / d / f"{NAME}.search.pth")["rows"] for d in ("whole", "killed"))
    assert a == b
    a, b = (load_file(tmp_path / d / f"{NAME}.pth") for d in ("whole", "killed"))
    assert a["best_step"] == b["best_step"] and a["best_metric"] == b["best_metric"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    tests = [(tmp_path / d / f"{NAME}.txt").read_text().splitlines()[-1] for d in ("whole", "killed")]
    assert tests[0] == tests[1] and tests[0].startswith("test accuracy")
    assert not [f for f in folder.iterdir() if f.suffix == ".pth"]  # the points' checkpoints are gone
