"""Runs that would do nothing and say they succeeded (issue #15 item 13): a flag an eval or
predict script would ignore is refused, a resume never swaps the data or the model, and the
JSON-lines log names the loss and the validation metric for what they are."""
import importlib
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train_segmentation
from gissl import cli
from gissl import segmentation as seg
from gissl.checkpoint import load_file
from gissl.data import build_segmentation_datasets
from gissl.data.synthetic import generate

FLAGS = ["--architecture", "resnet18", "--image-size", "32", "--decoder-channels", "8",
         "--workers", "0", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--no-amp"]
NAME = "resnet18-random_init-frozen_False-dataset_Kvasir"
SCRIPTS = ["eval_classification", "eval_detection", "eval_segmentation", "eval_depth", "eval_retrieval",
           "predict_classification", "predict_detection", "predict_segmentation", "predict_depth",
           "predict_retrieval"]


def run_script(module, argv, monkeypatch):
    """The script as its ``__main__`` runs it (``cli.run``); returns the exit code."""
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    try:
        cli.run(module.main, module.get_args)
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_eval_and_predict_refuse_checkpoint_that_has_no_effect(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    (tmp_path / "eval_results.txt").write_text("earlier results\n")
    code = run_script(importlib.import_module(script), ["--checkpoint", str(notes)], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--checkpoint" in err and "no effect" in err and ("--weights" in err or "--output-dir" in err)
    assert (tmp_path / "eval_results.txt").read_text() == "earlier results\n"


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return [generate("Kvasir", base / "a", num=16, seed=0), generate("Kvasir", base / "b", num=16, seed=1)]


def dice(pred, target):
    """Dice of two boolean masks (1 when both are empty), the textbook 2|P∩T| / (|P| + |T|)."""
    total = pred.sum() + target.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(pred, target).sum() / total


def test_log_names_loss_and_metric_and_changed_data_stops_resume(roots, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    first = FLAGS + ["--data-root", str(roots[0]), "--output-dir", str(out)]
    assert run_script(train_segmentation, first, monkeypatch) == 0
    (record,) = [json.loads(line) for line in (out / f"{NAME}.jsonl").read_text().splitlines()]
    assert record["metric"] == "dice" and set(record["train"]) == {"dice_loss", "loss"}
    assert 0 < record["train"]["dice_loss"] < 1 and record["train"]["loss"] == record["train"]["dice_loss"]

    # the logged value is the validation Dice of the saved model, recomputed here per image
    monkeypatch.setattr(sys, "argv", ["train_segmentation.py"] + first)
    args = train_segmentation.get_args()
    model = seg.build_model(cli.encoder(args, img_size=args.image_size), **cli.model_kwargs(seg.build_model, args))
    model.load_state_dict(load_file(out / f"{NAME}.pth")["model"])
    val = build_segmentation_datasets(args.dataset, args.data_root, image_size=args.image_size, original=True)["val"]
    out_eval = seg.evaluate(model.eval(), cli.eval_loader(args, val, torch.device("cpu")), torch.device("cpu"),
                            amp=False, keep_masks=True)
    scores = []
    for path, pred in zip(out_eval["paths"], out_eval["masks"]):
        target = np.asarray(Image.open(str(path).replace("images", "masks")).convert("L")) > 127
        scores.append(dice(np.asarray(pred) > 0, target))
    np.testing.assert_allclose(record["val"], np.mean(scores), rtol=1e-6)

    # the same folder with other data: stop before any work, say how to go on
    capsys.readouterr()
    second = FLAGS + ["--data-root", str(roots[1]), "--output-dir", str(out), "--skip-bad-files"]
    before = (out / f"{NAME}.last.pth").read_bytes()
    assert run_script(train_segmentation, second, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "--output-dir" in err and "--resume-anyway" in err
    assert (out / f"{NAME}.last.pth").read_bytes() == before
    # a harmless change (more epochs to extend the run) still resumes
    more = first[:first.index("--epochs")] + ["--epochs", "2"] + first[first.index("--epochs") + 2:]
    assert run_script(train_segmentation, more, monkeypatch) == 0
    assert len((out / f"{NAME}.jsonl").read_text().splitlines()) == 2
    # forcing it is possible, and said in --help
    assert run_script(train_segmentation, second + ["--resume-anyway", "--epochs", "3"], monkeypatch) == 0
    assert "--resume-anyway" in cli.task_parser("segmentation", "train").format_help()
