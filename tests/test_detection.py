"""Detection task logic (gissl/detection.py) and the three detection scripts, on tiny data."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import eval_detection
import predict_detection
import train_detection
from gissl import cli
from gissl import detection as det
from gissl.data import build_detection_datasets
from gissl.data.transforms import unpad_boxes
from gissl.errors import UserError
from gissl.metrics import coco_map

TINY = ["--architecture", "resnet18", "--image-size", "64", "--workers", "0", "--proposals", "32",
        "--roi-samples", "16", "--batch-size", "4"]


def _image(rng, h, w, boxes):
    a = (rng.random((h, w, 3)) * 50 + np.array([150, 80, 70])).astype(np.uint8)
    for x0, y0, x1, y1 in boxes:
        a[y0:y1, x0:x1] = [230, 60, 70]
    return Image.fromarray(a)


@pytest.fixture()
def kvasir(tmp_path):
    """12 Kvasir-SEG-format images of different sizes; every third has no polyp."""
    rng = np.random.default_rng(0)
    (tmp_path / "kvasir" / "images").mkdir(parents=True)
    table = {}
    for i in range(12):
        h, w = int(rng.integers(70, 100)), int(rng.integers(90, 140))
        boxes = []
        if i % 3:
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            boxes.append([x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))])
        _image(rng, h, w, boxes).save(tmp_path / "kvasir" / "images" / f"im{i:02d}.png")
        table[f"im{i:02d}"] = {"height": h, "width": w, "bbox": [
            {"label": "polyp", "xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3]} for b in boxes]}
    (tmp_path / "kvasir" / "kavsir_bboxes.json").write_text(json.dumps(table))
    return str(tmp_path / "kvasir")


class CanvasBoxes(nn.Module):
    """Stands in for a detector: returns, in loader order, the given canvas boxes as detections."""

    def __init__(self, boxes):
        super().__init__()
        self.boxes = list(boxes)

    def forward(self, images):
        out = []
        for _ in images:
            b = self.boxes.pop(0)
            out.append({"boxes": b, "scores": torch.linspace(0.9, 0.5, len(b)),
                        "labels": torch.ones(len(b), dtype=torch.int64)})
        return out


@pytest.mark.parametrize("fixed_size", [None, 64])
def test_predictions_are_mapped_back_to_original_pixels(kvasir, fixed_size):
    # the canvas boxes of the dataset (shrunk + padded for the ViT path) fed back as detections
    # must come out in original pixels again: exact ground truth, AP 1
    test = build_detection_datasets(kvasir, fixed_size=fixed_size)["test"]
    canvas = [test[i]["target"]["boxes"] for i in range(len(test))]
    if fixed_size:
        assert all(test[i]["image"].shape[-2:] == (64, 64) for i in range(len(test)))
        meta = test[0]["meta"]
        torch.testing.assert_close(unpad_boxes(canvas[0], meta), torch.as_tensor(test.samples[0]["boxes"]))
    loader = det.eval_loader(test, architecture="resnet18", image_size=fixed_size or 64, batch_size=16)
    predictions, targets, indices = det.predict(CanvasBoxes(canvas), loader, "cpu")
    assert indices == list(range(len(test)))
    for p, t in zip(predictions, targets):
        torch.testing.assert_close(p["boxes"], t["boxes"], atol=1e-4, rtol=0)
    if any(len(t["boxes"]) for t in targets):
        assert coco_map(predictions, targets)["map"] == pytest.approx(1.0)


def test_saved_coco_json_scores_the_same_in_pycocotools(kvasir, tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    data = build_detection_datasets(kvasir)
    ds = data["train"]  # the largest split: more images, boxes and empty images
    rng = np.random.default_rng(1)
    indices = list(range(len(ds)))
    targets = [det.ground_truth(ds, i) for i in indices]
    predictions = []
    for t in targets:  # near hits, misses and a false positive per image
        boxes = torch.cat([t["boxes"] + torch.tensor(rng.normal(0, 3, t["boxes"].shape), dtype=torch.float32),
                           torch.tensor([[5.0, 5.0, 30.0, 40.0]])])
        predictions.append({"boxes": boxes, "scores": torch.tensor(rng.random(len(boxes)), dtype=torch.float32),
                            "labels": torch.ones(len(boxes), dtype=torch.int64)})
    res_path, gt_path = det.save_predictions(tmp_path / "dets.json", ds, indices, predictions, targets)
    assert gt_path.endswith("dets.ground_truth.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        ev = COCOeval(gt, gt.loadRes(res_path), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = coco_map(predictions, targets)
    for name, ref in zip(["map", "map_50", "map_75"], ev.stats[:3]):
        assert ours[name] == pytest.approx(ref, abs=1e-6), name


def test_coco_reader_classes_crowd_and_empty_images(tmp_path):
    rng = np.random.default_rng(2)
    images, anns = [], []
    for i in range(10):
        _image(rng, 60, 80, [[10, 10, 40, 40]]).save(tmp_path / f"f{i}.png")
        images.append({"id": 100 + i, "file_name": f"f{i}.png", "width": 80, "height": 60})
        if i == 0:
            continue  # an image without annotations
        anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 7 if i % 2 else 3,
                     "bbox": [10, 10, 30, 30], "area": 850.0, "iscrowd": 0})
    anns.append({"id": 99, "image_id": 101, "category_id": 3, "bbox": [50, 5, 20, 20], "area": 400, "iscrowd": 1})
    anns.append({"id": 98, "image_id": 102, "category_id": 3, "bbox": [50, 5, 0, 20], "area": 0, "iscrowd": 0})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}))
    samples, categories = det.read_coco(str(tmp_path), str(path))
    assert categories == [3, 7]
    by_id = {s["image_id"]: s for s in samples}
    assert len(by_id[100]["boxes"]) == 0
    assert by_id[101]["labels"].tolist() == [2] and len(by_id[101]["crowd_boxes"]) == 1
    assert len(by_id[102]["boxes"]) == 1  # the zero-width box is dropped
    data = det.build_coco_datasets(str(tmp_path), str(path))
    assert sorted(s["image_id"] for d in data.values() for s in d.samples) == list(range(100, 110))
    ds = det.CocoDetectionDataset(samples, categories)
    i = [s["image_id"] for s in samples].index(101)
    assert ds[i]["target"]["labels"].tolist() == [2]  # the file's class, not Kvasir's all-ones
    target = det.ground_truth(ds, i)
    assert target["iscrowd"].tolist() == [False, True]
    gt = det.coco_ground_truth(ds, [i], [target], categories)
    assert [(a["category_id"], a["iscrowd"], a["area"]) for a in gt["annotations"]] == [(7, 0, 850.0), (3, 1, 400.0)]
    assert gt["images"][0]["id"] == 101
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="cannot read COCO"):
        det.read_coco(str(tmp_path), str(tmp_path / "bad.json"))


def test_picture_colours_and_threshold():
    image = torch.zeros(3, 100, 120, dtype=torch.uint8)
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    boxes = torch.tensor([[60.0, 20.0, 110.0, 90.0], [5.0, 60.0, 40.0, 95.0]])
    out = det.draw(image, gt, boxes, torch.tensor([0.9, 0.3]), threshold=0.5)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert out[:, 30, 10].tolist() == list(det.GT_COLOR)  # left edge of the ground truth
    assert out[:, 60, 110].tolist() == list(det.PRED_COLOR)  # right edge of the kept prediction
    assert out[:, 80, 5].tolist() == [0, 0, 0]  # the 0.3 prediction is below the threshold


def test_flags(tmp_path):
    assert train_detection.get_args(["--architecture", "resnet18"]).image_size == 800
    assert train_detection.get_args(["--architecture", "vit_t"]).image_size == 1024
    with pytest.raises(UserError, match="multiple of 64"):
        train_detection.get_args(["--architecture", "vit_t", "--image-size", "224"])
    with pytest.raises(UserError, match="--annotations"):
        train_detection.get_args(["--dataset", "coco", "--data-root", str(tmp_path)])
    with pytest.raises(UserError, match="only used with --dataset coco"):
        eval_detection.get_args(["--annotations", str(tmp_path)])
    with pytest.raises(UserError, match="--threshold"):
        predict_detection.get_args(["--threshold", "1.5"])
    args = train_detection.get_args(["--architecture", "resnet18", "--pretraining", "ImageNet_class"])
    assert det.batchnorm_mode(args.batchnorm, args.pretraining) == "frozen"
    assert det.batchnorm_mode("auto", "random") == "train"


@pytest.mark.slow
def test_scripts_end_to_end(kvasir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = TINY + ["--data-root", kvasir]
    train_detection.main(train_detection.get_args(common + ["--epochs", "1", "--accum_iter", "2"]))
    assert (tmp_path / "Trained models" / "detection" / "resnet18-random_init-frozen_False-dataset_Kvasir.pth").is_file()
    eval_detection.main(eval_detection.get_args(common + ["--save-predictions", "out/dets.json", "--print-list"]))
    lines = (tmp_path / "eval_results.txt").read_text().splitlines()
    assert lines[0].startswith("Object detection results for resnet18-random_init-frozen_False-dataset_Kvasir @ ")
    assert [line.rsplit(": ", 1)[0] for line in lines[1:]] == ["mAP@.5:.95", "mAP@.5", "mAP@.75", "AR@100"]
    results = json.loads((tmp_path / "out" / "dets.json").read_text())
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    assert json.loads((tmp_path / "out" / "dets.ground_truth.json").read_text())["images"]
    assert "RN18_NA_NA_Kvasir = [" in capsys.readouterr().out
    predict_detection.main(predict_detection.get_args(common + ["--idx", "0"]))
    pictures = list((tmp_path / "Predictions" / "detection-Kvasir").glob("test0_*.png"))
    assert len(pictures) == 1 and Image.open(pictures[0]).size == Image.open(
        build_detection_datasets(kvasir)["test"].samples[0]["image"]).size
    with pytest.raises(SystemExit) as e:
        cli.run(predict_detection.main, lambda: predict_detection.get_args(common + ["--idx", "99"]))
    assert e.value.code == 2


def test_pretrained_checkpoint_loads_into_the_backbone(tmp_path):
    from gissl.models import build_encoder
    source = build_encoder("resnet18")
    source.bn1.running_mean.uniform_(-1, 1)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    args = train_detection.get_args(TINY + ["--pretraining", "ImageNet_class", "--checkpoint",
                                            str(tmp_path / "resnet18.pth")])
    body = det.build_model(cli.encoder(args), **cli.model_kwargs(det.build_model, args, num_classes=2)).backbone.body
    torch.testing.assert_close(body.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(body.bn1.running_mean, source.bn1.running_mean)  # BN frozen with its statistics
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d"


def test_vit_detector_eval_is_batched_and_equals_batch_1(kvasir):
    args = eval_detection.get_args(["--architecture", "vit_t", "--image-size", "64", "--workers", "0",
                                    "--proposals", "32", "--batch-size", "4", "--data-root", kvasir])
    test = det.build_datasets("Kvasir", kvasir, architecture="vit_t", image_size=64)["test"]
    torch.manual_seed(0)
    model = det.build_model(cli.encoder(args), **cli.model_kwargs(det.build_model, args, num_classes=2)).eval()
    vit = dict(architecture="vit_t", image_size=64)
    assert det.eval_loader(test, **vit, batch_size=4).batch_size == 4  # one canvas size: batched
    one = det.predict(model, det.eval_loader(test, **vit, batch_size=1), "cpu")
    many = det.predict(model, det.eval_loader(test, **vit, batch_size=4), "cpu")
    assert one[2] == many[2]
    for a, b in zip(one[0], many[0]):
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
    assert coco_map(one[0], one[1])["map"] == pytest.approx(coco_map(many[0], many[1])["map"], abs=1e-6)
    resnet = det.eval_loader(test, architecture="resnet18", image_size=64, batch_size=4)
    assert resnet.batch_size == 1  # sizes differ: one image at a time
