"""What every train / eval / predict script promises (issue #16): ``--batch-size`` is the number
of images per optimizer step in every train script, split by ``--accum_iter``; and a finetuned
checkpoint knows its model, so ``eval_*.py`` / ``predict_*.py`` work with ``--weights FILE``
alone, and a flag that contradicts the file is refused with both values named."""
import os

import pytest

import eval_classification
import eval_depth
import eval_detection
import eval_retrieval
import eval_segmentation
import predict_classification
import predict_depth
import predict_detection
import predict_segmentation
import pretrain
import train_classification
import train_depth
import train_detection
import train_retrieval
import train_segmentation
from gissl import engine
from gissl.errors import UserError

RUN = ["--workers", "0", "--device", "cpu", "--epochs", "1"]
TRAIN = {
    "segmentation": (train_segmentation, ["--architecture", "resnet18", "--image-size", "32",
                                          "--decoder-channels", "16"]),
    "depth": (train_depth, ["--architecture", "resnet18", "--image-size", "32", "--decoder-channels", "16"]),
    "classification": (train_classification, ["--architecture", "resnet18", "--image-size", "32"]),
    "detection": (train_detection, ["--architecture", "resnet18", "--image-size", "64", "--proposals", "32",
                                    "--roi-samples", "16"]),
    "retrieval": (train_retrieval, ["--architecture", "resnet18", "--image-size", "32", "--mixup-prob", "0"]),
    "pretraining": (pretrain, ["--architecture", "resnet18", "--image-size", "32", "--ss-framework", "simsiam"]),
}


class _Stop(Exception):
    pass


def _images(batch):
    if isinstance(batch, (tuple, list)):  # pretraining: one tensor per view
        return len(batch[0])
    return len(batch["images"] if "images" in batch else batch["image"])


@pytest.mark.parametrize("task", sorted(TRAIN))
def test_batch_size_is_images_per_optimizer_step(task, tmp_path, monkeypatch):
    script, flags = TRAIN[task]
    passes, steps = [], []
    backward = engine._backward

    def counting(model, batch, *rest):
        passes.append(_images(batch))
        return backward(model, batch, *rest)

    def after_step(step):
        steps.append(sum(passes))
        if step == 2:
            raise _Stop

    monkeypatch.setattr(engine, "_backward", counting)
    monkeypatch.setitem(engine.HOOKS, "after_step", [after_step])
    monkeypatch.chdir(tmp_path)
    args = script.get_args(flags + RUN + ["--batch-size", "4", "--accum_iter", "2", "--output-dir", "out"])
    with pytest.raises(_Stop):
        script.main(args)
    assert passes[:4] == [2, 2, 2, 2]  # two forward passes of 2 images ...
    assert steps == [4, 8]  # ... make each optimizer step's 4 images


def test_batch_size_must_split_evenly():
    args = train_segmentation.get_args(["--batch-size", "5", "--accum_iter", "2"])
    with pytest.raises(UserError, match="--batch-size 5 is not a multiple of --accum_iter 2"):
        train_segmentation.main(args)


EVAL = {
    "segmentation": (eval_segmentation, predict_segmentation, "Segmentation results"),
    "depth": (eval_depth, predict_depth, "Depth estimation results"),
    "classification": (eval_classification, predict_classification, "Classification results"),
    "detection": (eval_detection, predict_detection, "Object detection results"),
    "retrieval": (eval_retrieval, None, "Copy-detection retrieval results"),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Tiny datasets in the real formats, so that each training epoch is a few steps."""
    from gissl.data.synthetic import generate
    from gissl.retrieval_data import write_synthetic_twins
    base = tmp_path_factory.mktemp("data")
    out = {name: generate(name, str(base / name), num=num, seed=0)
           for name, num in (("Kvasir", 16), ("Hyperkvasir_anatomical", 2), ("C3VD", 2))}
    out["twin"] = write_synthetic_twins(str(base / "twin"), out["Kvasir"], num_refs=4, num_queries=2,
                                        num_distractors=2)
    return out


# data flags of training / of evaluation (the only flags eval and predict get besides --weights)
DATA = {"segmentation": ("Kvasir", "Kvasir"), "depth": ("C3VD", "C3VD"), "detection": ("Kvasir", "Kvasir"),
        "classification": ("Hyperkvasir_anatomical", "Hyperkvasir_anatomical"), "retrieval": ("Kvasir", "twin")}


@pytest.mark.parametrize("task", sorted(EVAL))
def test_eval_and_predict_need_only_the_weights(task, roots, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script, flags = TRAIN[task]
    train_root, eval_root = (roots[name] for name in DATA[task])
    result = script.main(script.get_args(flags + RUN + ["--batch-size", "4", "--output-dir", "out",
                                                        "--data-root", train_root]))
    weights = next(p for p in sorted((tmp_path / "out").glob("*.pth")) if not p.name.endswith(".last.pth"))
    evaluate, predict, title = EVAL[task]
    data = ["--data-root", eval_root, "--workers", "0", "--device", "cpu"]
    evaluate.main(evaluate.get_args(["--weights", str(weights)] + data))
    first = (tmp_path / "eval_results.txt").read_text().splitlines()[0]
    assert first.startswith(f"{title} for ") and "resnet18-random" in first
    if predict is not None:
        predict.main(predict.get_args(["--weights", str(weights), "--idx", "0"] + data))
        assert list((tmp_path / "Predictions").rglob("test0_*.png"))
    with pytest.raises(UserError, match=r"--architecture resnet50 contradicts the checkpoint .* trained with "
                                        r"--architecture resnet18"):
        evaluate.main(evaluate.get_args(["--weights", str(weights), "--architecture", "resnet50"]))
    assert result is None and os.path.isfile(weights)


SCRIPTS = ["train_segmentation", "eval_segmentation", "predict_segmentation", "train_depth", "eval_depth",
           "predict_depth", "train_classification", "eval_classification", "predict_classification",
           "train_detection", "eval_detection", "predict_detection", "train_retrieval", "eval_retrieval",
           "predict_retrieval", "serve_retrieval", "pretrain", "eval_transfer"]
# export.py adds the task's model flags after --task: one parser per task
HELP_CASES = [(name, []) for name in SCRIPTS] + [
    ("export", ["--task", task, "--output", "m.onnx"])
    for task in ("classification", "detection", "depth", "retrieval", "segmentation")]


@pytest.mark.parametrize("name, argv", HELP_CASES, ids=[" ".join([n] + a[1:2]) for n, a in HELP_CASES])
def test_every_flag_has_help(name, argv, monkeypatch):
    import argparse
    import importlib

    class Parsed(Exception):
        pass

    def capture(parser, *a, **kw):
        raise Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed) as e:
        importlib.import_module(name).get_args(argv)
    parser = e.value.args[0]
    bare = [a.option_strings[0] for a in parser._actions
            if a.option_strings and a.option_strings[0] != "-h" and not a.help]
    assert not bare, f"{name} {' '.join(argv)}: flags without help: {bare}"
