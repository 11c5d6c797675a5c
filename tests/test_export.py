"""ONNX export (issue #17 item 5): every task's finetuned model, rebuilt by ``export.py`` from a
checkpoint in the train scripts' layout, runs on onnxruntime with PyTorch's fp32 outputs on a
batch size other than the export example's (2), and bad input is a UserError (exit code 2).

No training: the model is built from the train script's own flags as that script builds it and
saved with the keys :class:`gissl.engine._State` writes (eval reads ``model`` and ``args``);
its BatchNorm statistics are randomised so that eval-mode normalisation is not the identity.
"""
import importlib

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import export
from gissl import cli
from gissl import export as ex
from gissl.checkpoint import save_atomic
from gissl.errors import CheckpointError, UserError

# fp32 onnxruntime vs PyTorch: measured up to ~5e-6 on the dense outputs and ~2e-4 px on boxes
ATOL = 1e-4
BOX_ATOL = 1e-3  # detection boxes are in input pixels (64-96 here)
CASES = {  # name -> (task, train script, its flags, image size)
    "classification": ("classification", "train_classification", ["--architecture", "resnet18"], 32),
    "segmentation": ("segmentation", "train_segmentation", ["--architecture", "resnet18",
                                                            "--decoder-channels", "16"], 32),
    "segmentation-vit": ("segmentation", "train_segmentation", ["--architecture", "vit_t",
                                                                "--decoder-channels", "16"], 32),
    "depth": ("depth", "train_depth", ["--architecture", "resnet18", "--decoder-channels", "16"], 32),
    "retrieval": ("retrieval", "train_retrieval", ["--architecture", "resnet18", "--mixup-prob", "0"], 32),
    "retrieval-vit": ("retrieval", "train_retrieval", ["--architecture", "vit_t", "--mixup-prob", "0"], 32),
    "detection": ("detection", "train_detection", ["--architecture", "resnet18", "--proposals", "32",
                                                   "--roi-samples", "16"], 64),
    "detection-vit": ("detection", "train_detection", ["--architecture", "vit_t", "--proposals", "32",
                                                       "--roi-samples", "16"], 64),
}


def _build(task, args):
    """The model as ``train_<task>.py`` builds it (before any training step)."""
    module = export.TASKS[task][0]
    known = {"num_classes": 4} if task == "classification" else {"num_classes": 2} if task == "detection" else {}
    kwargs = {} if task == "detection" else dict(img_size=args.image_size)
    return module.build_model(cli.encoder(args, **kwargs), **cli.model_kwargs(module.build_model, args, **known))


def _checkpoint(name, folder):
    """(path of a finetuned checkpoint in the train scripts' layout, the model it holds, eval mode)."""
    task, script, flags, size = CASES[name]
    args = importlib.import_module(script).get_args(flags + ["--image-size", str(size), "--device", "cpu",
                                                             "--output-dir", str(folder)])
    torch.manual_seed(0)
    model = _build(task, args)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    path = folder / f"{cli.run_name(args)}.pth"
    save_atomic({"model": model.state_dict(), "optimizer": {}, "scaler": None, "scheduler": None, "epoch": 1,
                 "best_metric": 0.5, "best_epoch": 1, "global_step": 1, "partial": None,
                 "args": cli.settings(args), "extra": None, "nonfinite_skipped": 0, "rng": []}, path)
    return path, model.eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_exported_model_matches_pytorch(name, tmp_path, capsys):
    task, _, _, size = CASES[name]
    weights, model = _checkpoint(name, tmp_path)
    onnx_path = tmp_path / "model.onnx"
    export.main(export.get_args(["--task", task, "--weights", str(weights), "--output", str(onnx_path), "--check"]))
    assert "max |difference|" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    module, _, outputs = ex.exportable(task, model)
    if task == "detection":  # one image; a ResNet detector takes any size (it resizes in the graph)
        sizes = [(size, size)] + ([(size + 32, size), (size, 2 * size)] if "vit" not in name else [])
        inputs = [torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h + w)) for h, w in sizes]
    else:  # batch 3, where the export traced a batch of 2
        inputs = [torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(3))]
    for x in inputs:
        got = ex.run_onnx(onnx_path, (x,))
        with torch.no_grad():
            ref = module(x)
        ref = [t.numpy() for t in (ref if isinstance(ref, tuple) else (ref,))]
        assert len(got) == len(ref) == len(outputs)
        for out, g, r in zip(outputs, got, ref):
            assert g.shape == r.shape, (out, g.shape, r.shape)
            if task != "detection":
                assert g.shape[0] == 3
            atol = BOX_ATOL if out == "boxes" else 0 if out == "labels" else ATOL
            np.testing.assert_allclose(g, r, rtol=0, atol=atol, err_msg=out)
        if task == "detection":
            assert len(got[0]) > 0  # random weights still detect: a real comparison, not two empty lists


def test_check_reports_the_difference(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    path = ex.export_onnx(model, tmp_path / "m.onnx", example=torch.randn(2, 3, 8, 8), input_names=("images",),
                          output_names=("out",))
    x = torch.randn(5, 3, 8, 8)
    assert ex.check_onnx(model, path, x)["out"] < ATOL
    with torch.no_grad():
        model[0].bias += 0.01
    with pytest.raises(ex.ParityError, match=r"output 'out' differs from PyTorch by up to 0\.01"):
        ex.check_onnx(model, path, x)


def test_failed_export_leaves_the_old_file(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace")

    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="cannot trace"):
        ex.export_onnx(Broken(), target, example=torch.randn(1, 3), input_names=("x",), output_names=("y",))
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_bad_input_is_a_user_error(tmp_path):
    weights, _ = _checkpoint("classification", tmp_path)
    base = ["--weights", str(weights), "--output", str(tmp_path / "m.onnx")]
    with pytest.raises(SystemExit) as e:  # argparse: "the following arguments are required: --task"
        export.get_args(base)
    assert e.value.code == 2
    for extra, message in ((["--device", "cuda"], "drop --device cuda"), (["--compile"], "--compile has no effect"),
                           (["--opset", "9"], "--opset 9"), (["--image-size", "30"], "multiple of 32")):
        with pytest.raises(UserError, match=message):
            export.get_args(["--task", "classification"] + base + extra)
    with pytest.raises(CheckpointError, match="no detection checkpoint"):  # a classifier's file as a detector
        export.main(export.get_args(["--task", "detection"] + base))
    with pytest.raises(UserError, match="contradicts the checkpoint"):
        export.main(export.get_args(["--task", "classification", "--architecture", "resnet50"] + base))
    with pytest.raises(SystemExit) as e:  # the script's exit code for bad input
        cli.run(export.main, lambda: export.get_args(["--task", "classification", "--weights", "missing.pth",
                                                      "--output", "m.onnx"]))
    assert e.value.code == 2
