"""Segmentation task logic and the three scripts end to end on a tiny synthetic Kvasir-SEG."""
import re
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import eval_segmentation
import predict_segmentation
import train_segmentation
from gissl import cli
from gissl import segmentation as seg
from gissl.data.synthetic import generate
from gissl.loaders import collate

MODEL_FLAGS = ["--architecture", "resnet18", "--image-size", "64", "--decoder-channels", "32",
               "--workers", "0", "--batch-size", "4"]


class Fixed(torch.nn.Module):
    """A 'model' returning given logits (picked by the value of the input's first pixel), to
    test the evaluation protocol alone."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def test_to_original_resizes_logits_then_thresholds():
    logits = torch.full((1, 4, 4), -5.0)
    logits[:, :2, :2] = 5.0  # top-left quarter
    mask = seg.to_original(logits, (8, 12))
    assert mask.shape == (1, 8, 12) and mask.dtype == torch.bool
    # bilinear (align_corners=False) on logits, then logit > 0 ⇔ sigmoid > 0.5
    assert mask[0, :3, :5].all() and not mask[0, 5:].any() and not mask[0, :, 7:].any()


def test_evaluate_is_per_image_at_original_size_and_batch_independent():
    logits = torch.full((3, 1, 8, 8), -4.0)
    logits[0, :, :4] = 4.0   # predicts the top half
    logits[2, :, :, :] = 4.0  # predicts everything on an image without a polyp
    samples = []
    for i, (h, w) in enumerate([(16, 16), (10, 20), (12, 12)]):
        target = torch.zeros(1, h, w, dtype=torch.bool)
        if i == 0:
            target[:, : h // 4] = True  # a quarter of the image
        if i == 1:
            target[:, :3, :3] = True  # nothing predicted on it
        samples.append({"image": torch.full((3, 8, 8), float(i)), "mask_orig": target, "path": f"img{i}.jpg"})
    results = []
    for batch_size in (1, 3):
        batches = [collate(samples[i:i + batch_size]) for i in range(0, 3, batch_size)]
        results.append(seg.evaluate(Fixed(logits), batches, torch.device("cpu"), amp=False))
    for key in ("dice", "iou", "precision", "recall"):
        assert torch.equal(results[0][key], results[1][key])
    out = results[1]
    np.testing.assert_allclose(out["dice"].numpy(), [2 * 64 / (128 + 64), 0.0, 0.0])
    np.testing.assert_allclose(out["precision"].numpy(), [0.5, 0.0, 0.0])
    np.testing.assert_allclose(out["recall"].numpy(), [1.0, 0.0, 0.0])
    assert out["paths"] == ["img0.jpg", "img1.jpg", "img2.jpg"]


def test_list_id_follows_the_reference():
    args = Namespace(arch="vit_b", pretraining="Hyperkvasir", ss_framework="mae", dataset="Kvasir")
    assert cli.list_name(args) == "VT_HK_MA_Kvasir"
    args = Namespace(arch="resnet50", pretraining="ImageNet_class", ss_framework=None, dataset="CVC")
    assert cli.list_name(args) == "RN_IN_SL_CVC"
    args = Namespace(arch="resnet18", pretraining="random", ss_framework=None, dataset="Kvasir")
    assert cli.list_name(args) == "RN18_NA_NA_Kvasir"


def test_compute_losses_terms():
    model = Fixed(torch.zeros(2, 1, 4, 4, requires_grad=True))
    batch = {"image": torch.zeros(2, 3, 4, 4), "mask": torch.ones(2, 1, 4, 4)}
    assert set(seg.compute_losses(model, batch)) == {"dice_loss"}
    losses = seg.compute_losses(model, batch, bce_weight=0.5)
    np.testing.assert_allclose(losses["bce"].item(), 0.5 * np.log(2), rtol=1e-6)


@pytest.fixture(scope="module")
def kvasir(tmp_path_factory):
    return generate("Kvasir", tmp_path_factory.mktemp("data") / "kvasir", num=24)


def _run(module, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    module.main(module.get_args())


def test_scripts_end_to_end(kvasir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = MODEL_FLAGS + ["--data-root", str(kvasir)]
    _run(train_segmentation, monkeypatch, flags + ["--epochs", "1", "--bce-weight", "1", "--cosine"])
    assert (tmp_path / "Trained models/segmentation/resnet18-random_init-frozen_False-dataset_Kvasir.pth").is_file()
    capsys.readouterr()

    _run(eval_segmentation, monkeypatch, flags + ["--print-list", "--save-predictions", "masks"])
    text = capsys.readouterr().out
    listed = re.search(r"RN18_NA_NA_Kvasir = \[\n(.*?)\]", text, re.S).group(1).strip().splitlines()
    assert len(listed) == 2  # the test split of 24 images (SSL4GIE split: 10 % = 2)
    results = (tmp_path / "eval_results.txt").read_text()
    assert "Segmentation results for resnet18-random_init-frozen_False-dataset_Kvasir @ " in results
    assert all(f"\n{k}: " in results for k in ("Dice", "IoU", "Precision", "Recall"))
    masks = sorted((tmp_path / "masks").iterdir())
    assert len(masks) == 2
    for m in masks:  # original size, 0/255, named by the image stem
        original = Image.open(kvasir / "images" / (m.stem + ".jpg"))
        arr = np.asarray(Image.open(m))
        assert arr.shape == original.size[::-1] and set(np.unique(arr)) <= {0, 255}

    _run(predict_segmentation, monkeypatch, flags + ["--idx", "1"])
    printed = capsys.readouterr().out.strip().splitlines()
    picture = tmp_path / "Predictions/segmentation-Kvasir/test1_resnet18-random_init-frozen_False.png"
    assert picture.is_file() and str(picture.relative_to(tmp_path)) in printed[-1]
    assert Image.open(picture).width > 3 * 256  # three panels at original width
