import json
import os

import pytest
import torch
import torch.nn as nn

from gissl import engine, loaders, optim
from gissl.runfiles import RunFiles
from gissl.errors import UserError


class Toy(nn.Module):
    """A small conv net with BatchNorm, so frozen-mode and resume cover BN buffers."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(x).mean((2, 3)))


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = (self.x.mean((1, 2, 3)) > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        # random "augmentation" drawn from torch's global RNG: resume must reproduce it
        return {"image": self.x[i] + 0.01 * torch.randn(3, 8, 8), "label": self.y[i]}


def losses(model, batch):
    return {"ce": nn.functional.cross_entropy(model(batch["image"]), batch["label"])}


def run(tmp_path, epochs, amp=False, accum_iter=1, frozen=False, validate=True, seed=0):
    torch.manual_seed(seed)
    model = Toy()
    frozen_mods = [optim.freeze(model.encoder)] if frozen else []
    opt = optim.build_optimizer(model, lr=1e-2)
    loader = loaders.make_loader(ToyData(), batch_size=8, train=True, workers=0, seed=seed)
    val = (lambda m: float(-sum(losses(m, b)["ce"] for b in
                                loaders.make_loader(ToyData(), batch_size=8, train=False, workers=0))))
    out = engine.fit(model, train_loader=loader, compute_losses=losses, optimizer=opt,
                     device=torch.device("cpu"), run=RunFiles(tmp_path, "toy", config={"seed": seed}),
                     epochs=epochs, validate=val if validate else None,
                     options=engine.FitOptions(amp=amp, accum_iter=accum_iter, frozen=frozen_mods,
                                               show_progress=False, plateau=True, seed=seed))
    return model, out


def test_two_steps_reduce_loss_and_write_files(tmp_path):
    model, out = run(tmp_path, epochs=2)
    assert out["epochs_run"] == 2
    for suffix in (".pth", ".last.pth", ".txt", ".jsonl"):
        assert os.path.isfile(tmp_path / f"toy{suffix}")
    records = [json.loads(line) for line in open(tmp_path / "toy.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train"]["ce"] < records[0]["train"]["ce"]
    ck = torch.load(tmp_path / "toy.last.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "args", "best_metric"} <= set(ck)


def test_resume_is_bit_identical(tmp_path):
    full, _ = run(tmp_path / "a", epochs=3)
    run(tmp_path / "b", epochs=1)
    resumed, out = run(tmp_path / "b", epochs=3)  # same command again: resumes at epoch 2
    assert out["epochs_run"] == 2
    for (n, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), n


def test_bf16_autocast_trains(tmp_path):
    _, out = run(tmp_path, epochs=2, amp=True)
    assert all(torch.isfinite(torch.tensor(r["train"]["ce"])) for r in out["history"])


def test_frozen_encoder_is_untouched(tmp_path):
    torch.manual_seed(0)
    before = Toy().encoder.state_dict()
    model, _ = run(tmp_path, epochs=1, frozen=True)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN running stats


def test_accumulation_steps_last_partial_group(tmp_path):
    # 24 samples / batch 8 = 3 batches; accum 2 → steps after batch 2 and after batch 3
    model = Toy()
    opt = optim.build_optimizer(model, lr=1e-2)
    loader = loaders.make_loader(ToyData(), batch_size=8, train=True, workers=0)
    steps = []
    engine.train_one_epoch(model, loader, opt, losses, device=torch.device("cpu"), epoch=1,
                           options=engine.FitOptions(amp=False, accum_iter=2, show_progress=False,
                                                     after_step=lambda m, s: steps.append(s)))
    assert steps == [1, 2]


def test_accumulation_equals_big_batch():
    torch.manual_seed(0)
    a, b = Toy(), Toy()
    b.load_state_dict(a.state_dict())
    data = ToyData(16)
    for model, chunks in ((a, 1), (b, 2)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        n = 16 // chunks
        loader = [{"image": data.x[i:i + n], "label": data.y[i:i + n]} for i in range(0, 16, n)]
        engine.train_one_epoch(model, loader, opt, losses, device=torch.device("cpu"), epoch=1,
                               options=engine.FitOptions(amp=False, accum_iter=chunks, show_progress=False,
                                                         frozen=[model.encoder[1]]))  # BN in eval: no batch statistics
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_names_the_step(tmp_path):
    model = Toy()
    opt = optim.build_optimizer(model, lr=1e-2)
    loader = loaders.make_loader(ToyData(), batch_size=8, train=True, workers=0)
    with pytest.raises(engine.NonFiniteLossError, match="epoch 1, step 1"):
        engine.train_one_epoch(model, loader, opt, lambda m, b: {"bad": m(b["image"]).sum() * float("nan")},
                               device=torch.device("cpu"), epoch=1,
                               options=engine.FitOptions(amp=False, show_progress=False))


def test_optimizer_groups_skip_norms_biases_and_frozen():
    model = Toy()
    optim.freeze(model.head)
    opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.encoder[0].weight)}
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == 4  # conv w, conv b, bn w, bn b; head excluded
    with pytest.raises(UserError):
        optim.build_optimizer(optim.freeze(Toy()), lr=1e-3)


def test_loader_order_depends_only_on_seed_and_epoch():
    data = ToyData(10)
    orders = []
    for _ in range(2):
        loader = loaders.make_loader(data, batch_size=2, train=True, workers=0, seed=3)
        loader.sampler.set_epoch(5)
        orders.append([i for i, _ in loader.sampler])
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(10))
    loader.sampler.set_epoch(6)
    assert [i for i, _ in loader.sampler] != orders[0]


def test_collate_keeps_variable_sizes_as_lists():
    batch = loaders.collate([{"a": torch.zeros(2), "m": torch.zeros(1, 3, 4), "p": "x", "i": 1},
                            {"a": torch.ones(2), "m": torch.zeros(1, 5, 4), "p": "y", "i": 2}])
    assert batch["a"].shape == (2, 2) and isinstance(batch["m"], list) and batch["p"] == ["x", "y"]
    assert torch.equal(batch["i"], torch.tensor([1, 2]))


def test_lars_steps_and_skips_1d_decay():
    w = nn.Parameter(torch.ones(3, 3))
    b = nn.Parameter(torch.ones(3))
    opt = optim.LARS([w, b], lr=0.1, weight_decay=0.0, momentum=0.0, eta=0.001)
    (w.sum() + b.sum()).backward()
    opt.step()
    # trust ratio eta*||w||/||g|| = 0.001 for w (norms equal); 1 for the bias
    torch.testing.assert_close(w.detach(), torch.full((3, 3), 1 - 0.1 * 0.001))
    torch.testing.assert_close(b.detach(), torch.full((3,), 0.9))


def test_sigterm_mid_epoch_saves_and_resume_is_exact(tmp_path):
    import signal

    full, _ = run(tmp_path / "a", epochs=2)

    calls = {"n": 0}

    def losses_with_kill(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, batch 2 of 3
            os.kill(os.getpid(), signal.SIGTERM)
        return losses(model, batch)

    torch.manual_seed(0)
    model = Toy()
    opt = optim.build_optimizer(model, lr=1e-2)
    loader = loaders.make_loader(ToyData(), batch_size=8, train=True, workers=0, seed=0)
    val = (lambda m: float(-sum(losses(m, b)["ce"] for b in
                                loaders.make_loader(ToyData(), batch_size=8, train=False, workers=0))))
    kw = dict(train_loader=loader, optimizer=opt, device=torch.device("cpu"),
              run=RunFiles(tmp_path / "b", "toy", config={"seed": 0}), epochs=2, validate=val,
              options=engine.FitOptions(amp=False, show_progress=False, plateau=True))
    with pytest.raises(engine.TrainingInterrupted) as e:
        engine.fit(model, compute_losses=losses_with_kill, **kw)
    assert e.value.signum == signal.SIGTERM
    saved = torch.load(tmp_path / "b" / "toy.last.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["partial"]["batches_done"] == 2
    # the handler is restored after fit: a later SIGTERM would not be swallowed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed, out = run(tmp_path / "b", epochs=2)
    assert out["epochs_run"] == 1
    for (n, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), n


def test_sample_augmentation_independent_of_workers():
    data = ToyData(8)
    a = next(iter(loaders.make_loader(data, batch_size=8, train=True, workers=0, seed=5)))
    b = next(iter(loaders.make_loader(data, batch_size=8, train=True, workers=2, seed=5)))
    assert torch.equal(a["image"], b["image"])


def test_resume_with_other_settings_warns(tmp_path, capsys):
    run(tmp_path, epochs=1, seed=0)
    capsys.readouterr()
    run(tmp_path, epochs=2, seed=0)  # more epochs: a plain continuation
    assert "warning" not in capsys.readouterr().err
    run(tmp_path, epochs=3, seed=1)
    err = capsys.readouterr().err
    assert "other settings (--seed 0 -> 1)" in err and "--output-dir" in err


class DropoutToy(Toy):
    """Toy with model-side randomness: dropout draws from torch's global generator in the
    training process, whatever the number of loader workers."""

    def forward(self, x):
        return self.head(nn.functional.dropout(self.encoder(x).mean((2, 3)), 0.5, self.training))


def test_final_weights_do_not_depend_on_workers(tmp_path):
    # Two epochs: with persistent workers the loader's base seed is drawn once, with
    # workers=0 once per epoch, so epoch 2 also checks that this draw leaves the
    # model's random stream alone.
    finals = []
    for workers in (0, 1, 2):
        torch.manual_seed(0)
        model = DropoutToy()
        loader = loaders.make_loader(ToyData(16), batch_size=8, train=True, workers=workers, seed=3)
        engine.fit(model, train_loader=loader, compute_losses=losses,
                   optimizer=optim.build_optimizer(model, lr=1e-2), device=torch.device("cpu"),
                   run=RunFiles(tmp_path / f"w{workers}", "toy", config={"seed": 3}), epochs=2,
                   options=engine.FitOptions(amp=False, show_progress=False, seed=3))
        finals.append(model.state_dict())
    for other in finals[1:]:
        for name, value in finals[0].items():
            assert torch.equal(value, other[name]), name


def test_fit_freezes_what_it_is_given_even_with_an_optimizer_built_before(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    opt = optim.build_optimizer(model, lr=1e-1)  # built over every parameter, encoder included
    loader = loaders.make_loader(ToyData(), batch_size=8, train=True, workers=0)
    engine.fit(model, train_loader=loader, compute_losses=losses, optimizer=opt,
               device=torch.device("cpu"), run=RunFiles(tmp_path, "toy", config={"seed": 0}),
               epochs=1, options=engine.FitOptions(amp=False, frozen=[model.encoder], show_progress=False))
    assert not any(p.requires_grad for p in model.encoder.parameters())
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not held & {id(p) for p in model.encoder.parameters()}
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights, running stats and num_batches_tracked


def _lars_transcription(params, grads_per_step, lr, wd, momentum, eta):
    """LARS as Barlow Twins' paper code defines it (You et al. 2017): d = g + wd*w and the trust
    ratio eta*||w||/||d|| for tensors of 2+ dims only; mu <- momentum*mu + d; w <- w - lr*mu."""
    ws = [p.detach().clone().double() for p in params]
    mus = [torch.zeros_like(w) for w in ws]
    for grads in grads_per_step:
        for w, mu, g in zip(ws, mus, grads):
            d = g.double()
            if w.ndim > 1:
                d = d + wd * w
                wn, dn = w.norm(), d.norm()
                d = d * (eta * wn / dn if wn > 0 and dn > 0 else 1.0)
            mu.mul_(momentum).add_(d)
            w.sub_(lr * mu)
    return ws


def test_lars_equals_the_paper_code_over_steps():
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 5, generator=g)), nn.Parameter(torch.randn(5, generator=g)),
              nn.Parameter(torch.zeros(3, 3))]  # a zero weight: trust 1
    steps = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    expected = _lars_transcription(params, steps, lr=0.3, wd=1e-2, momentum=0.9, eta=0.02)
    opt = optim.LARS(params, lr=0.3, weight_decay=1e-2, momentum=0.9, eta=0.02)
    for grads in steps:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def test_sgd_is_fused_and_equals_torch_default():
    w = nn.Parameter(torch.randn(4, 3))
    ref = nn.Parameter(w.detach().clone())
    mine = optim.build_optimizer([w], 0.1, weight_decay=1e-3, kind="sgd-nesterov")
    theirs = torch.optim.SGD([ref], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False)
    assert mine.defaults.get("fused") or mine.defaults.get("foreach")
    for _ in range(3):
        w.grad, ref.grad = torch.ones_like(w), torch.ones_like(ref)
        mine.step()
        theirs.step()
    torch.testing.assert_close(w.detach(), ref.detach())
