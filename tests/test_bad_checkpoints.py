"""Bad checkpoints at every entry point (issue #10 item 3).

Each training script (and pretrain.py) gets ``--pretraining Hyperkvasir --ss-framework X
--checkpoint FILE`` with a FILE that is for another architecture, truncated, not a checkpoint at
all, full of NaN/Inf, or a pickle that would run code when loaded. Each must stop with exit code 2
and one ``error:`` line that names the file, the problem and what to do, before any training:
nothing is written to the output folder. The eval scripts' finetuned-weights loading
(``cli.finetuned`` and ``cli.load_weights``, ``--weights``) is held to the same rules.

The scripts run in this process (``runpy``; a subprocess costs seconds of torch import) on tiny
copies of the built-in synthetic datasets; one real subprocess proves the end-to-end exit code.
"""
import contextlib
import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from gissl.data.synthetic import generate
from gissl.models import build_encoder
from gissl.retrieval_data import write_synthetic_twins

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--workers", "0", "--epochs", "1", "--batch-size", "4", "--image-size", "32"]


def run_script(script, argv):
    """Run ``REPO/script`` as ``__main__`` with ``argv`` in this process; returns (exit code,
    stdout, stderr). Exit code 0 when the script returns normally."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", [str(REPO / script)] + [str(a) for a in argv]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_nothing_written(folder):
    written = [p for p in Path(folder).rglob("*") if p.is_file()] if Path(folder).exists() else []
    assert not written, f"training artefacts written before the error: {written}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny synthetic datasets, one per on-disk format (generated once for the module)."""
    base = tmp_path_factory.mktemp("data")
    roots = {name: generate(name, str(base / name), num=num, seed=0)
             for name, num in (("Kvasir", 12), ("Hyperkvasir_anatomical", 2),
                               ("Hyperkvasir_unlabelled", 4), ("C3VD", 2))}
    roots["twin"] = write_synthetic_twins(str(base / "twin"), roots["Kvasir"], num_refs=4, num_queries=2,
                                          num_distractors=2)
    return roots


class _Evil:
    """Unpickling this would create the folder ``marker`` (stands for any code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _half(src, dst):
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, data):
    """{kind: (path, message fragment)} for a ResNet-18 run; ``evil`` also leaves ``marker`` unset."""
    d = tmp_path_factory.mktemp("ckpt")
    good = build_encoder("resnet18").state_dict()
    torch.save(good, d / "good.pth")
    torch.save(build_encoder("resnet50").state_dict(), d / "resnet50.pth")
    _half(d / "good.pth", d / "truncated.pth")
    jpeg = sorted(Path(data["Kvasir"], "images").iterdir())[0]
    (d / "photo.pth").write_bytes(jpeg.read_bytes())
    (d / "notes.pth").write_text("learning rate 1e-3, 100 epochs\n")
    nan = {k: v.clone() for k, v in good.items()}
    nan["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    nan["layer4.1.bn2.bias"][3] = float("inf")
    torch.save(nan, d / "nan.pth")
    marker = d / "evil-code-ran"
    torch.save({"state_dict": good, "extra": _Evil(str(marker))}, d / "evil.pth")
    return {
        "other_arch": (d / "resnet50.pth", "does not fit encoder resnet18.*ResNet-50"),
        "truncated": (d / "truncated.pth", "truncated"),
        "jpeg": (d / "photo.pth", "not a PyTorch checkpoint"),
        "text": (d / "notes.pth", "not a PyTorch checkpoint"),
        "nan": (d / "nan.pth", r"NaN/Inf.*layer1\.0\.conv1\.weight.*layer4\.1\.bn2\.bias"),
        "evil": (d / "evil.pth", "refused to load.*could run code"),
        "marker": marker,
    }


# script, flags (besides the shared small ones), SSL framework used to describe the checkpoint
TRAIN_ENTRY_POINTS = {
    "classification": ("train_classification.py", ["--dataset", "Hyperkvasir_anatomical", "--data-root",
                                                    "{Hyperkvasir_anatomical}"], "mocov3"),
    "segmentation": ("train_segmentation.py", ["--dataset", "Kvasir", "--data-root", "{Kvasir}"], "mocov3"),
    "depth": ("train_depth.py", ["--data-root", "{C3VD}"], "barlowtwins"),
    "detection": ("train_detection.py", ["--dataset", "Kvasir", "--data-root", "{Kvasir}",
                                         "--proposals", "16", "--roi-samples", "8"], "mocov3"),
    "retrieval": ("train_retrieval.py", ["--dataset", "Kvasir", "--data-root", "{Kvasir}",
                                         "--val-root", "{twin}"], "simsiam"),
    "pretrain": ("pretrain.py", ["--dataset", "folder", "--data-root", "{Hyperkvasir_unlabelled}"], "mocov3"),
}
KINDS = ("other_arch", "truncated", "jpeg", "text", "nan", "evil")


def train_argv(entry, data, out, arch="resnet18"):
    script, flags, framework = TRAIN_ENTRY_POINTS[entry]
    return script, ([f.format(**data) for f in flags] + SMALL
                    + ["--architecture", arch, "--output-dir", out, "--pretraining", "Hyperkvasir",
                       "--ss-framework", framework])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", list(TRAIN_ENTRY_POINTS))
def test_bad_pretrained_checkpoint_stops_before_training(entry, kind, data, bad_files, tmp_path,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, message = bad_files[kind]
    out = tmp_path / "out"
    script, argv = train_argv(entry, data, out)
    code, _, err = run_script(script, argv + ["--checkpoint", path])
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert str(path) in lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert_nothing_written(out)
    assert not bad_files["marker"].exists()  # the pickle's code never ran


def test_vit_checkpoint_of_another_width(data, tmp_path, monkeypatch):
    """A ViT-S file for --architecture vit_t (MAE pretraining continued from it)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "vit_s.pth"
    torch.save({"model": build_encoder("vit_s").state_dict()}, path)
    script, argv = train_argv("pretrain", data, tmp_path / "out", arch="vit_t")
    argv[argv.index("mocov3")] = "mae"
    code, _, err = run_script(script, argv + ["--checkpoint", path])
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert str(path) in lines[0] and "ViT-S" in lines[0] and "vit_t" in lines[0]
    assert "mis-shaped keys" in lines[0] and "(file (1, 1, 384), model (1, 1, 192))" in lines[0]
    assert_nothing_written(tmp_path / "out")


def test_good_checkpoint_still_trains(data, bad_files, tmp_path, monkeypatch):
    """The control: the same command with the good file trains and writes its checkpoint."""
    monkeypatch.chdir(tmp_path)
    script, argv = train_argv("classification", data, tmp_path / "out")
    code, _, err = run_script(script, argv + ["--checkpoint", bad_files["other_arch"][0].parent / "good.pth"])
    assert code == 0, err
    assert any(p.suffix == ".pth" for p in (tmp_path / "out").iterdir())


def test_end_to_end_exit_code_in_a_subprocess(data, bad_files, tmp_path):
    script, argv = train_argv("segmentation", data, tmp_path / "out")
    path = bad_files["evil"][0]
    proc = subprocess.run([sys.executable, str(REPO / script)] + [str(a) for a in argv] + ["--checkpoint", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == [l for l in proc.stderr.splitlines() if l.strip()]  # noqa: E741
    assert "refused to load" in proc.stderr and str(path) in proc.stderr
    assert not bad_files["marker"].exists()
    assert_nothing_written(tmp_path / "out")


# --- finetuned weights read by the eval scripts (cli.finetuned, --weights) -----

EVAL_ENTRY_POINTS = {
    "classification": ("train_classification.py", "eval_classification.py",
                       ["--dataset", "Hyperkvasir_anatomical", "--data-root", "{Hyperkvasir_anatomical}"], []),
    "segmentation": ("train_segmentation.py", "eval_segmentation.py",
                     ["--dataset", "Kvasir", "--data-root", "{Kvasir}"], []),
    "retrieval": ("train_retrieval.py", "eval_retrieval.py", ["--data-root", "{Kvasir}", "--val-root", "{twin}"],
                  ["--data-root", "{twin}"]),
}
NAME = "{arch}-random_init-frozen_False-dataset_{dataset}.pth"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data):
    """{task: path of a good finetuned resnet18 checkpoint} (one epoch of each train script)."""
    base = tmp_path_factory.mktemp("finetuned")
    paths = {}
    for task, (train, _, flags, _) in EVAL_ENTRY_POINTS.items():
        argv = [f.format(**data) for f in flags] + SMALL + ["--architecture", "resnet18", "--output-dir", base / task]
        code, _, err = run_script(train, argv)
        assert code == 0, err
        paths[task] = next(p for p in (base / task).glob("*.pth") if not p.name.endswith(".last.pth"))
    return paths


def _bad_finetuned(kind, good, dst, marker):
    """Write the ``kind`` of bad copy of the finetuned checkpoint ``good`` to ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("other_arch", "good"):  # other_arch: the file is read with --architecture vit_t
        dst.write_bytes(good.read_bytes())
    elif kind == "truncated":
        _half(good, dst)
    elif kind == "text":
        dst.write_text("not a checkpoint")
    elif kind in ("nan", "evil"):
        state = torch.load(good, weights_only=True)
        if kind == "nan":
            state["model"]["encoder.layer2.0.conv1.weight"][0] = float("inf")
        else:
            state["args"] = _Evil(str(marker))
        torch.save(state, dst)


EVAL_KINDS = {
    # the file says which model it holds: a contradicting flag is refused naming both values (a file
    # without that record gets the strict loader's key mismatch, naming the flag to fix)
    "other_arch": r"(does not fit this \w+: its encoder is a ResNet-18.*mis-shaped keys.*same --architecture|"
                  r"--architecture vit_t contradicts the checkpoint .* trained with --architecture resnet18)",
    "truncated": "truncated or is not a PyTorch checkpoint.*copy or download it again",
    "text": "not a PyTorch checkpoint",
    "nan": r"NaN/Inf values in 1 tensor\(s\) \(encoder\.layer2\.0\.conv1\.weight\)",
    "evil": "refused to load.*could run code",
}


@pytest.mark.parametrize("kind", list(EVAL_KINDS) + ["good"])
@pytest.mark.parametrize("task", list(EVAL_ENTRY_POINTS))
def test_bad_finetuned_weights_in_eval(task, kind, data, finetuned, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, script, _, flags = EVAL_ENTRY_POINTS[task]
    flags = flags or EVAL_ENTRY_POINTS[task][2]
    arch = "vit_t" if kind == "other_arch" else "resnet18"
    argv = [f.format(**data) for f in flags] + [a for a in SMALL if a not in ("--epochs", "1")]
    argv += ["--architecture", arch, "--output-dir", tmp_path / "out"]
    if task == "retrieval":
        path = tmp_path / "weights.pth"
        argv += ["--weights", path]
    else:
        path = tmp_path / "out" / NAME.format(arch=arch, dataset=argv[argv.index("--dataset") + 1])
    marker = tmp_path / "evil-code-ran"
    _bad_finetuned(kind, finetuned[task], path, marker)
    code, _, err = run_script(script, argv)
    if kind == "good":  # the control: the same command evaluates the model
        assert code == 0, err
        assert "results for" in (tmp_path / "eval_results.txt").read_text()
        return
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert str(path) in lines[0] and re.search(EVAL_KINDS[kind], lines[0]), lines[0]
    assert not marker.exists() and not (tmp_path / "eval_results.txt").exists()


def test_bad_safetensors_files(tmp_path):
    """The same rules for .safetensors: truncated / not one / NaN each give a CheckpointError."""
    safetensors = pytest.importorskip("safetensors.torch")
    from gissl.errors import CheckpointError
    from gissl.models.pretrained import load_pretrained
    state = {k: v.contiguous() for k, v in build_encoder("resnet18").state_dict().items()}
    state["bn1.running_var"][0] = float("nan")
    safetensors.save_file(state, str(tmp_path / "nan.safetensors"))
    _half(tmp_path / "nan.safetensors", tmp_path / "cut.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    for name, message in (("nan", r"NaN/Inf values in 1 encoder tensor\(s\) \(bn1.running_var\)"),
                          ("cut", "truncated or not a safetensors file: copy or download it again"),
                          ("text", "truncated or not a safetensors file")):
        with pytest.raises(CheckpointError, match=message):
            load_pretrained(build_encoder("resnet18"), tmp_path / f"{name}.safetensors")
