"""Classification task: head, class weights, explanations, and the four scripts end to end on a
tiny class-folder dataset (train -> eval -> predict, eval_transfer on a frozen encoder)."""
import csv
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval_classification
import eval_transfer
import predict_classification
import train_classification
from gissl import cli, probes
from gissl.classification import Classifier, class_weights, explanation, grad_cam, make_compute_losses
from gissl.models import build_encoder


def test_class_weights_from_train_labels_only():
    w = class_weights(np.array([0, 0, 0, 1, 2, 2]), 4)
    # N / (C * N_c) with N = 6, C = 4; class 3 has no training image -> 0
    assert torch.allclose(w, torch.tensor([6 / 12, 6 / 4, 6 / 8, 0.0]))


def test_classifier_names_loss_and_explanations():
    model = Classifier(build_encoder("resnet18"), 3)
    assert any(k.startswith("encoder.layer4.") for k in model.state_dict()) and "head.weight" in model.state_dict()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    w = torch.tensor([1.0, 2.0, 3.0])
    loss = make_compute_losses(w)(model, {"image": x, "label": y})["loss"]
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(model(x), y, weight=w))
    model.eval()
    cam = grad_cam(model, x[0], 1)
    assert cam.shape == (64, 64) and float(cam.min()) >= 0 and float(cam.max()) <= 1
    vit = Classifier(build_encoder("vit_t", img_size=32), 3).eval()
    occ = explanation(vit, torch.randn(3, 32, 32), 0)  # ViT: occlusion
    assert occ.shape == (32, 32) and float(occ.max()) > 0


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    """3 colour classes x 10 images of 40 px: learnable in one or two steps."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, col in enumerate([(200, 60, 60), (60, 200, 60), (60, 60, 200)]):
        (root / f"class{c}").mkdir()
        for i in range(10):
            a = np.clip(rng.normal(0, 30, (40, 40, 3)) + np.array(col), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"class{c}" / f"img{i}.jpg", quality=95)
    return root


def _args(module, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    return module.get_args()


def test_scripts_end_to_end(folder_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--architecture", "resnet18", "--dataset", "folder", "--data-root", str(folder_dataset),
              "--image-size", "32", "--workers", "0", "--output-dir", str(tmp_path / "models")]
    train_classification.main(_args(train_classification, monkeypatch, common + [
        "--epochs", "1", "--batch-size", "8", "--learning-rate", "1e-3", "--no-amp"]))
    name = "resnet18-random_init-frozen_False-dataset_folder"
    assert (tmp_path / "models" / f"{name}.pth").is_file()

    eval_classification.main(_args(eval_classification, monkeypatch, common + [
        "--save-predictions", "preds.csv"]))
    text = (tmp_path / "eval_results.txt").read_text().splitlines()
    assert text[0].startswith(f"Classification results for {name} @ ")
    assert [line.split(":")[0] for line in text[1:5]] == ["mF1", "mPrecision", "mRecall", "Accuracy"]
    assert any(line.startswith("mAUROC: ") for line in text)
    assert (tmp_path / "Predictions" / "classification-folder" / f"confusion-{name}.png").is_file()
    rows = list(csv.reader(open("preds.csv")))
    assert rows[0] == ["path", "target", "pred", "prob_0", "prob_1", "prob_2"] and len(rows) == 1 + 3
    assert abs(sum(float(v) for v in rows[1][3:]) - 1) < 1e-4

    predict_classification.main(_args(predict_classification, monkeypatch, common + ["--idx", "0,2"]))
    pics = sorted((tmp_path / "Predictions" / "classification-folder").glob("test*_resnet18-random_init-frozen_False.png"))
    assert [p.name.split("_")[0] for p in pics] == ["test0", "test2"]
    with pytest.raises(SystemExit) as e:  # bad --idx: one clear message, exit code 2
        cli.run(predict_classification.main, lambda: _args(predict_classification, monkeypatch, common + ["--idx", "99"]))
    assert e.value.code == 2


def test_folder_without_root_is_a_user_error(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_classification.py", "--dataset", "folder"])
    with pytest.raises(SystemExit) as e:
        cli.run(train_classification.main, train_classification.get_args)
    assert e.value.code == 2 and "--data-root" in capsys.readouterr().err


def test_eval_transfer_keeps_encoder_frozen(folder_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    encoder = build_encoder("resnet18")
    encoder.train()  # freshly built; the probes must switch BN to eval and leave every buffer alone
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    common = ["--architecture", "resnet18", "--dataset", "folder", "--data-root", str(folder_dataset),
              "--image-size", "32", "--workers", "0", "--batch-size", "8", "--output-dir", str(tmp_path / "t"),
              "--split", "stratified"]
    lin = eval_transfer.main(_args(eval_transfer, monkeypatch, common + ["--protocol", "linear", "--wd-values", "4"]),
                             encoder=encoder)
    assert 0 <= lin["Accuracy"] <= 1 and lin["C"] in probes.c_grid(4)
    assert lin["Classes absent from test split"] == "none"  # stratified: every class in test
    assert list((tmp_path / "t" / "features").glob("*.pth"))  # cached for the next protocol
    knn = eval_transfer.main(_args(eval_transfer, monkeypatch, common + ["--protocol", "knn"]), encoder=encoder)
    assert 0 <= knn["Accuracy"] <= 1
    few = eval_transfer.main(_args(eval_transfer, monkeypatch, common + [
        "--protocol", "fewshot", "--fewshot-pool", "pooled", "--n-way", "3", "--k-shot", "2", "--n-query", "3",
        "--episodes", "20"]), encoder=encoder)
    assert 0 <= few["Accuracy (%)"] <= 100
    inv = eval_transfer.main(_args(eval_transfer, monkeypatch, common + [
        "--protocol", "invariance", "--num-images", "3", "--k-transforms", "2"]), encoder=encoder)
    assert inv["flips similarity"] <= 1.0 + 1e-5
    sal = eval_transfer.main(_args(eval_transfer, monkeypatch, common + [
        "--protocol", "saliency", "--idx", "0", "--patch", "10", "--stride", "10"]), encoder=encoder)
    assert 0 < sal["Attentive diffusion (%)"] < 100
    assert not encoder.training
    for k, v in encoder.state_dict().items():  # weights, BN running statistics, batch counters
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in encoder.parameters())
    text = (tmp_path / "eval_results.txt").read_text()
    assert "Transfer (linear) results for resnet18-random_init-frozen_True-dataset_folder" in text
