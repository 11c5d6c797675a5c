"""Depth task logic (alignment, evaluation protocol, pictures) and the scripts end to end."""
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval_depth
import predict_depth
import train_depth
from gissl import depth
from gissl.data.synthetic import generate
from gissl.engine import collate

MODEL_FLAGS = ["--architecture", "resnet18", "--image-size", "64", "--decoder-channels", "32",
               "--workers", "0", "--batch-size", "8"]


def test_align_modes_against_numpy():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 1, 8, 8, generator=g)
    gt = 40 * pred + 10 + torch.rand(2, 1, 8, 8, generator=g)
    gt[0, 0, :2] = 0  # invalid rows
    out = depth.align(pred, gt, "scale-shift")
    for i in range(2):
        v = (gt[i, 0] > 0).numpy()
        a = np.stack([pred[i, 0].numpy()[v], np.ones(v.sum())], 1)
        s, t = np.linalg.lstsq(a, gt[i, 0].numpy()[v], rcond=None)[0]
        np.testing.assert_allclose(out[i, 0].numpy(), s * pred[i, 0].numpy() + t, rtol=1e-4)
        ratio = np.median(gt[i, 0].numpy()[v]) / np.median(pred[i, 0].numpy()[v])
        np.testing.assert_allclose(depth.align(pred, gt, "median")[i].numpy(), ratio * pred[i].numpy(), rtol=1e-5)
    torch.testing.assert_close(depth.align(pred, gt, "none"), pred * 100)


def test_to_original_undoes_square_padding_and_clamps():
    # a 6×10 frame padded to 10×10 (2 rows on top and bottom), network grid 5×5
    pred = torch.full((1, 5, 5), 150.0)  # beyond the 100 mm range → clamped
    gt = torch.ones(1, 6, 10)
    gt[0, 0, 0] = 0
    out = depth.to_original(pred, gt)
    assert out.shape == (1, 6, 10)
    assert out[0, 0, 0] == 0 and torch.all(out.flatten()[1:] == 100.0)


class Fixed(torch.nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, x):
        return self.outputs[x[:, 0, 0, 0].long()]


def test_evaluate_scores_aligned_depth_in_mm_and_the_constant_baseline():
    # A perfect relative prediction (affine in the ground truth) scores 0 after alignment,
    # whatever the batch size; the constant baseline scores the frame's depth spread.
    g = torch.Generator().manual_seed(0)
    gts = 20 + 60 * torch.rand(2, 1, 8, 8, generator=g)
    outputs = (gts - 20) / 80  # in the model's [0, 1] unit
    samples = [{"image": torch.full((3, 8, 8), float(i)), "depth": gts[i], "depth_orig": gts[i],
                "path": f"seq/vid/{i}_color.png"} for i in range(2)]
    for batch_size in (1, 2):
        batches = [collate(samples[i:i + batch_size]) for i in range(0, 2, batch_size)]
        out = depth.evaluate(Fixed(outputs), batches, torch.device("cpu"), amp=False, keep_depth=True)
        assert out["rmse"].max() < 1e-3 and out["delta1"].min() == 1.0
        np.testing.assert_allclose(out["constant_rmse"].numpy(), gts.double().flatten(1).std(1, unbiased=False).numpy(),
                                   rtol=1e-5)
    summary = depth.summarize(out, "scale-shift")
    assert summary["Frames"] == 2 and "mm" in summary["Units"]
    # metric reading of the raw output: 100 mm per unit
    raw = depth.evaluate(Fixed(outputs), batches, torch.device("cpu"), alignment="none", amp=False)
    expected = ((outputs * 100).clamp(0, 100) - gts).square().flatten(1).mean(1).sqrt()
    np.testing.assert_allclose(raw["rmse"].numpy(), expected.numpy(), rtol=1e-5)


def test_depth_panel_saturates_the_error_map():
    gt = np.full((90, 120), 50.0)
    gt[-1] = 0  # invalid row → black
    pred = gt + 1000.0  # a huge error must saturate (bright), not wrap around
    panel = depth.depth_panel(Image.new("RGB", (120, 90)), gt, pred, rmse=1000.0)
    err = np.asarray(panel)[:90, -120:]  # the last panel, above its scale bar
    assert (err[40:-1] == depth.colourize(np.array([1e9]), 1.0)[0]).all()  # below the caption
    assert (err[-1] == 0).all()


@pytest.fixture(scope="module")
def c3vd(tmp_path_factory):
    return generate("C3VD", tmp_path_factory.mktemp("data") / "c3vd", num=3)


def _run(module, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    module.main(module.get_args())


def test_scripts_end_to_end(c3vd, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = MODEL_FLAGS + ["--data-root", str(c3vd)]
    _run(train_depth, monkeypatch, flags + ["--epochs", "1"])
    capsys.readouterr()

    _run(eval_depth, monkeypatch, flags + ["--print-list", "--save-predictions", "depth", "--alignment", "median"])
    text = capsys.readouterr().out
    listed = re.search(r"RN18_NA_NA_C3VD = \[\n(.*?)\]", text, re.S).group(1).strip().splitlines()
    assert len(listed) == 6  # two test videos × 3 frames
    results = (tmp_path / "eval_results.txt").read_text()
    assert "Depth estimation results for resnet18-random_init-frozen_False-dataset_C3VD @ " in results
    assert all(f"\n{k}: " in results for k in ("RMSE", "Relative Error", "Absolute Error", "Constant-depth RMSE"))
    saved = sorted((tmp_path / "depth").rglob("*_depth.npy"))
    assert len(saved) == 6
    assert np.load(saved[0]).shape == (128, 160) and np.load(saved[0]).dtype == np.float32  # original frame

    _run(predict_depth, monkeypatch, flags + ["--idx", "0,5"])
    printed = capsys.readouterr().out.strip().splitlines()
    for i, line in zip((0, 5), printed):
        picture = tmp_path / f"Predictions/depth-C3VD/test{i}_resnet18-random_init-frozen_False.png"
        assert picture.is_file() and line.endswith(str(picture.relative_to(tmp_path)))


# Points of the grid a user's collapse was found in (random-init resnet18 + DPT, AdamW, no
# schedule, 64 px, 12 optimiser steps on the built-in synthetic C3VD): (seed, lr, batch, bf16).
# On the sigmoid head with the plain scale-and-shift-invariant loss, (0, 3e-3, 4, bf16) and
# (1, 3e-3, 2, fp32) ended with every output exactly 1.0 and a zero gradient.
GRID = [(0, 3e-3, 4, True), (1, 3e-3, 2, False), (0, 1e-3, 4, False), (1, 1e-3, 2, True)]


@pytest.mark.slow
def test_depth_training_does_not_collapse_over_a_grid():
    from gissl.data import build_depth_datasets
    from gissl.data.synthetic import synthetic_root
    from gissl.engine import autocast, build_optimizer, make_loader
    from gissl.losses import flat_predictions
    from gissl.models import build_encoder
    from gissl.models.dpt import DPT
    ds = build_depth_datasets(synthetic_root("C3VD"), image_size=64)["train"]
    failures = []
    for seed, lr, batch, amp in GRID:
        torch.manual_seed(seed)
        model = DPT(build_encoder("resnet18"), "depth", features=16).train()
        opt = build_optimizer(model, lr, weight_decay=0.01)
        loader = make_loader(ds, batch_size=batch, train=True, workers=0, seed=seed)
        steps = 0
        while steps < 12:
            for b in loader:
                with autocast(torch.device("cpu"), amp):
                    loss = sum(depth.compute_losses(model, b).values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                if steps == 12:
                    break
        model.eval()
        with torch.no_grad():
            b = next(iter(make_loader(ds, batch_size=8, train=False, workers=0)))
            pred = model(b["image"])
        valid = b["depth"] > 0
        if not torch.isfinite(loss) or flat_predictions(pred, valid).any() or pred.abs().max() > 100:
            failures.append((seed, lr, batch, amp, float(loss), float(pred.min()), float(pred.max())))
    assert not failures, failures


def test_constant_prediction_is_reported_in_validation(capsys):
    from gissl.data import build_depth_datasets
    from gissl.data.synthetic import synthetic_root
    from gissl.engine import make_loader
    from gissl.models import build_encoder
    from gissl.models.dpt import DPT
    val = build_depth_datasets(synthetic_root("C3VD"), image_size=64, original=True)["val"]
    model = DPT(build_encoder("resnet18"), "depth", features=16)
    with torch.no_grad():
        model.head.conv3.weight.zero_()  # the collapsed state: one value everywhere
    loader = make_loader(val, batch_size=8, train=False, workers=0)
    rmse = depth.make_validate(loader, torch.device("cpu"))(model)
    err = capsys.readouterr().err
    assert re.search(r"warning: the depth model predicts a constant depth map for (\d+) of \1 validation", err)
    out = depth.evaluate(model, loader, torch.device("cpu"))
    # the fit of a constant map is the best constant: its RMSE equals the constant baseline
    assert rmse == pytest.approx(float(np.nanmean(out["constant_rmse"].numpy())), rel=1e-4)
