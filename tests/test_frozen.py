"""``--frozen`` with a ``--checkpoint``: every train script saves the file's encoder untouched.

The reference side is the checkpoint file itself, written in MoCo v3's release layout
(``{'epoch', 'arch', 'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*',
'module.predictor.*'}, 'optimizer'}``): after training, each encoder weight and BatchNorm buffer
in the saved finetuned checkpoint must equal the file's bit for bit.
"""
import sys

import pytest
import torch

import train_classification
import train_depth
import train_detection
import train_retrieval
import train_segmentation
from gissl.checkpoint import load_file
from gissl.models import build_encoder

COMMON = ["--architecture", "resnet18", "--image-size", "64", "--workers", "0", "--epochs", "1",
          "--batch-size", "4", "--learning-rate", "1e-2", "--pretraining", "ImageNet_self",
          "--ss-framework", "mocov3", "--frozen", "--no-amp"]
SCRIPTS = {
    "classification": (train_classification, train_classification.get_args, ["--image-size", "32"]),
    "segmentation": (train_segmentation, train_segmentation.get_args, ["--decoder-channels", "16"]),
    "depth": (train_depth, train_depth.get_args, ["--decoder-channels", "16"]),
    "detection": (train_detection, train_detection.get_args, ["--proposals", "16", "--roi-samples", "8"]),
    "retrieval": (train_retrieval, train_retrieval.get_args, ["--image-size", "32"]),
}


def _moco_v3_file(path):
    torch.manual_seed(7)
    enc = build_encoder("resnet18").state_dict()
    for k, v in enc.items():  # BN statistics unlike a fresh model's, so any update shows
        if k.endswith("running_mean"):
            v.normal_()
        elif k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith("num_batches_tracked"):
            v.fill_(1000)
    state = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    state.update({f"module.momentum_encoder.{k}": v.clone() for k, v in enc.items()})
    state.update({"module.base_encoder.fc.0.weight": torch.randn(32, 512),
                  "module.predictor.0.weight": torch.randn(32, 16)})
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}, path)
    return enc


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Tiny datasets in the real formats: an epoch is a few steps (the property needs no more)."""
    from gissl.data.synthetic import generate
    base = tmp_path_factory.mktemp("data")
    return {name: generate(name, str(base / name), num=num, seed=0)
            for name, num in (("Kvasir", 16), ("Hyperkvasir_anatomical", 2), ("C3VD", 2))}


DATA = {"classification": "Hyperkvasir_anatomical", "segmentation": "Kvasir", "depth": "C3VD",
        "detection": "Kvasir", "retrieval": "Kvasir"}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(SCRIPTS))
def test_frozen_encoder_is_saved_unchanged(task, roots, tmp_path, monkeypatch):
    module, get_args, extra = SCRIPTS[task]
    monkeypatch.chdir(tmp_path)
    enc = _moco_v3_file(tmp_path / "r-18.pth.tar")
    out = tmp_path / "models"
    monkeypatch.setattr(sys, "argv", [module.__file__, *COMMON, *extra, "--checkpoint", str(tmp_path / "r-18.pth.tar"),
                                      "--output-dir", str(out), "--data-root", roots[DATA[task]]])
    module.main(get_args())
    saved = load_file(next(p for p in out.glob("*.pth") if not p.name.endswith(".last.pth")))["model"]
    probe = "layer4.1.bn2.running_var"
    prefix = next(k for k in saved if k.endswith("." + probe))[: -len(probe)]  # encoder. / backbone.body.
    compared = 0
    for key, value in enc.items():
        if key.endswith("num_batches_tracked") and prefix + key not in saved:
            continue  # detection's FrozenBatchNorm2d keeps no batch counter
        assert torch.equal(saved[prefix + key], value), f"{task}: {prefix + key} changed although --frozen"
        compared += 1
    assert compared >= 100
