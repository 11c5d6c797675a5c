"""pretrain.py end to end on a tiny image folder: every method writes checkpoint.pth and
encoder.pth, both load into a task script's model through --checkpoint, re-running resumes."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pretrain
import train_segmentation
from gissl import cli, segmentation
from gissl.checkpoint import load_file

# Tiny heads so one step is cheap; the method code paths are the full ones.
METHODS = {
    "mocov3": ("resnet18", ["--dim", "16", "--mlp-dim", "32"]),
    "barlowtwins": ("resnet18", ["--mlp-dim", "32"]),
    "mae": ("vit_t", ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"]),
    "simsiam": ("resnet18", ["--dim", "32", "--mlp-dim", "8"]),
    "fpsiam": ("resnet18", ["--dim", "32", "--mlp-dim", "8"]),
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    for i in range(8):
        a = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / f"frame{i}.jpg", quality=90)
    return root


def _parse(module, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    return module.get_args()


def _pretrain(monkeypatch, tmp_path, root, framework, extra=()):
    arch, head = METHODS[framework]
    argv = ["--ss-framework", framework, "--architecture", arch, "--data-root", str(root), "--dataset", "folder",
            "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--output-dir", str(tmp_path / "pretrained"), *head, *extra]
    pretrain.main(_parse(pretrain, monkeypatch, argv))
    return tmp_path / "pretrained" / f"{arch}-{framework}-folder"


# SimSiam and Barlow Twins share their code path with FPSiam / MoCo v3 here (same heads and
# optimiser plumbing); they run in CI as slow tests to keep the local set fast.
@pytest.mark.parametrize("framework", [
    "mocov3", "mae", "fpsiam",
    pytest.param("simsiam", marks=pytest.mark.slow), pytest.param("barlowtwins", marks=pytest.mark.slow)])
def test_pretrain_writes_loadable_checkpoints(framework, image_folder, tmp_path, monkeypatch, capsys):
    out = _pretrain(monkeypatch, tmp_path, image_folder, framework)
    state = load_file(out / "checkpoint.pth")
    assert {"model", "optimizer", "epoch", "args", "rng"} <= set(state) and state["epoch"] == 1
    encoder = load_file(out / "encoder.pth")
    expected = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    assert encoder.keys() == expected.keys() and all(torch.equal(encoder[k], v) for k, v in expected.items())
    assert all(torch.isfinite(v).all() for v in encoder.values() if v.is_floating_point())
    arch = METHODS[framework][0]
    for name in ("encoder.pth", "checkpoint.pth"):
        # the segmentation script's own model builder, strict loading through --checkpoint
        args = _parse(train_segmentation, monkeypatch, [
            "--architecture", arch, "--pretraining", "Hyperkvasir", "--ss-framework", framework,
            "--checkpoint", str(out / name), "--image-size", "32"])
        model = segmentation.build_model(cli.encoder(args, img_size=32),
                                         **cli.model_kwargs(segmentation.build_model, args))
        for k, v in model.encoder.state_dict().items():
            assert torch.equal(v, encoder[k]), (name, k)
    if framework == "mocov3":
        # momentum encoder moved towards the encoder (cosine schedule from 0.99)
        diff = [(state["model"]["momentum_encoder." + k] - v).abs().sum() for k, v in encoder.items()
                if v.is_floating_point() and not k.endswith("running_var")]
        assert sum(diff) > 0
        # same command again: resumes from checkpoint.last.pth with nothing left to do
        capsys.readouterr()
        _pretrain(monkeypatch, tmp_path, image_folder, framework)
        assert "Resuming from" in capsys.readouterr().out


def test_bad_combinations_exit_2(monkeypatch, tmp_path, capsys):
    for argv in (["--ss-framework", "mae", "--architecture", "resnet18"],
                 ["--ss-framework", "barlowtwins", "--architecture", "vit_t"],
                 ["--architecture", "resnet18"]):
        monkeypatch.setattr(sys, "argv", ["pretrain.py", *argv, "--output-dir", str(tmp_path)])
        with pytest.raises(SystemExit) as e:
            cli.run(pretrain.main, pretrain.get_args)
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith("error: ")
