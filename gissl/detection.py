"""Polyp detection: what ``train_detection.py``, ``eval_detection.py`` and
``predict_detection.py`` share (docs/ssl4gie-study.md §2.3, §3.4, §4, §5.2, §6).

Datasets: ``Kvasir`` (Kvasir-SEG boxes, the reference's) and ``coco`` (any COCO-format box
annotation file with ``--annotations FILE``; images under ``--data-root``), both split 80/10/10
with the reference split. Images without any box are valid training and test images.
Boxes are scored by :func:`gissl.metrics.coco_map` (equal to pycocotools) in original image
pixels; ``--save-predictions`` writes COCO result and ground-truth JSON that pycocotools reads.
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from gissl.data.datasets import DetectionDataset, build_detection_datasets
from gissl.data.images import check_image, open_rgb, report_bad
from gissl.data.splits import split_indices
from gissl.data.transforms import unpad_boxes
from gissl.loaders import make_loader
from gissl.errors import DataError, UserError
from gissl.metrics import coco_map
from gissl.models import is_vit
from gissl.models.detection import FIXED_SIZE, WINDOW_SIZE, build_detector
from gissl.models.ssl4gie_vitdet import build_ssl4gie_detector
from gissl.pictures import save_picture, select_positions

DATASETS = ["Kvasir", "coco"]
PYRAMIDS = ["vitdet", "ssl4gie"]  # gissl's ViT detectors; SSL4GIE's (gissl.models.ssl4gie_vitdet)
# gissl's own checkpoints store no --pyramid: train_detection.py builds ViTDet's (a given
# --pyramid ssl4gie then contradicts the file instead of failing on its keys)
LEGACY_SETTINGS = {"pyramid": "vitdet"}
RESNET_MIN_SIZE, RESNET_MAX_SIZE = 800, 1333  # torchvision's resize (docs/ssl4gie-study.md §2.3, ResNet path)
GT_COLOR, PRED_COLOR = (255, 234, 0), (0, 255, 0)  # the reference's yellow and green (docs/ssl4gie-study.md §6)


# --------------------------------------------------------------------------- flags and model

def add_arguments(parser, stage):
    """The detection flags. The model's (``--batchnorm``, ``--window-size``, ``--proposals``,
    ``--roi-samples``) are in every stage: eval and predict read them from the checkpoint."""
    g = parser.add_argument_group("detection")
    g.add_argument("--annotations", default=None, metavar="FILE",
                   help="COCO-format box annotations for --dataset coco (file names relative to "
                        "--data-root); split 80/10/10 like Kvasir")
    g.add_argument("--batchnorm", default="auto", choices=["auto", "train", "frozen"],
                   help="ResNet BatchNorm: 'frozen' = torchvision FrozenBatchNorm2d (statistics and "
                        "affine fixed, what the reference always did), 'train' = trainable; 'auto' "
                        "freezes it for pretrained encoders and trains it from random init "
                        "(torchvision's rule)")
    g.add_argument("--window-size", dest="window_size", type=int, default=WINDOW_SIZE,
                   help="ViT windowed attention, tokens per window side, in all blocks but 2/5/8/11")
    g.add_argument("--proposals", type=int, default=2000,
                   help="RPN proposals kept per image after NMS in training (half of it at test "
                        "time), torchvision's 2000/1000 by default; 200-500 makes CPU runs several "
                        "times faster")
    g.add_argument("--roi-samples", dest="roi_samples", type=int, default=512,
                   help="proposals sampled per image to train the box head (torchvision's 512); "
                        "64-128 is plenty for one or two polyps per image and much faster")
    if stage != "train":
        g.add_argument("--pyramid", default="vitdet", choices=PYRAMIDS,
                       help="the ViT detector's feature pyramid, read from the checkpoint: 'vitdet' = "
                            "gissl's (ViTDet's per-channel LayerNorms, what train_detection.py builds), "
                            "'ssl4gie' = SSL4GIE's released ViT detectors (LayerNorms over (C, H, W), "
                            "1024-px canvas only, no CLS token)")
    if stage == "predict":
        g.add_argument("--threshold", type=float, default=0.5,
                       help="draw predictions with at least this score (the reference's 0.5)")
    return parser


def default_image_size(architecture):
    """``--image-size`` by default: ResNet 800 (the short side after torchvision's resize; long
    side capped at 1333/800 of it), ViT 1024 (the zero-padded square canvas)."""
    return FIXED_SIZE if is_vit(architecture) else RESNET_MIN_SIZE


def check_settings(*, arch, image_size, dataset, annotations, data_root, proposals, roi_samples,
                   threshold=None, pyramid="vitdet"):
    """UserError for detection settings that cannot work, naming the flag (``arch``: the
    architecture)."""
    # (a non-ViT --architecture is refused when the model is built: before the checkpoint is
    # read, eval's --architecture is only the default)
    if pyramid == "ssl4gie" and is_vit(arch) and image_size != FIXED_SIZE:
        raise UserError(f"--image-size {image_size}: SSL4GIE's ViT detectors (--pyramid ssl4gie) work on the "
                        f"{FIXED_SIZE}-px canvas only, their pyramid LayerNorms span (C, H, W); drop --image-size")
    if is_vit(arch) and image_size % 64:
        raise UserError(f"--image-size {image_size}: the ViT detector canvas must be a "
                        "multiple of 64 (e.g. 256, 512, 1024)")
    if dataset == "coco":
        if not annotations:
            raise UserError("--dataset coco needs --annotations FILE (COCO box annotations)")
        if not os.path.isfile(annotations):
            raise UserError(f"--annotations '{annotations}' does not exist")
        if not data_root:
            raise UserError("--dataset coco needs --data-root DIR (the folder of the images)")
    elif annotations:
        raise UserError(f"--annotations is only used with --dataset coco, not {dataset}")
    if proposals < 1 or roi_samples < 1:
        raise UserError("--proposals and --roi-samples must be at least 1")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold {threshold} must be between 0 and 1")


def fixed_size(architecture, image_size):
    """The padded canvas side for ViT detectors, None for ResNets (the model resizes)."""
    return image_size if is_vit(architecture) else None


def batchnorm_mode(batchnorm, pretraining):
    """``--batchnorm auto``: frozen for pretrained encoders, trained from random init."""
    if batchnorm != "auto":
        return batchnorm
    return "train" if pretraining == "random" else "frozen"


def build_model(encoder, *, num_classes, image_size, proposals, roi_samples, window_size, batchnorm,
                pretraining, pyramid="vitdet", **kwargs):
    """The Faster R-CNN on ``encoder``: backbone and torchvision heads, ``num_classes`` with the
    background. ``pyramid="ssl4gie"``: SSL4GIE's ViT detector on the ``image_size`` canvas
    (its released files, ``window_size`` and ``batchnorm`` unused). ``kwargs`` go to ``FasterRCNN``."""
    n = proposals
    kwargs = dict(rpn_pre_nms_top_n_train=n, rpn_post_nms_top_n_train=n, rpn_pre_nms_top_n_test=max(1, n // 2),
                  rpn_post_nms_top_n_test=max(1, n // 2), box_batch_size_per_image=roi_samples, **kwargs)
    if pyramid == "ssl4gie":
        model = build_ssl4gie_detector(encoder, num_classes=num_classes, canvas=image_size, **kwargs)
        return model.to(memory_format=torch.channels_last)
    if pyramid != "vitdet":
        raise UserError(f"unknown pyramid {pyramid!r}; choose from {', '.join(PYRAMIDS)}")
    model = build_detector(encoder, num_classes=num_classes, batchnorm=batchnorm_mode(batchnorm, pretraining),
                           window_size=window_size, fixed_size=fixed_size(encoder.architecture, image_size),
                           min_size=image_size, max_size=round(image_size * RESNET_MAX_SIZE / RESNET_MIN_SIZE),
                           **kwargs)
    # channels-last convolution weights: oneDNN (CPU) and tensor cores run the convs and above
    # all their backward much faster (measured: a resnet18 train step on CPU 26 s -> 13 s)
    return model.to(memory_format=torch.channels_last)


def build_datasets(dataset, root, *, architecture, image_size, annotations=None, skip_bad=False):
    """dict(train=, val=, test=) of detection datasets. The number of classes is
    ``len(categories(data)) + 1`` (background included)."""
    size = fixed_size(architecture, image_size)
    if dataset == "coco":
        return build_coco_datasets(root, annotations, size, seed=42, skip_bad=skip_bad)
    return build_detection_datasets(root, fixed_size=size, seed=42, skip_bad=skip_bad)


def categories(data):
    """COCO category ids of the datasets (index = model label - 1); Kvasir has one, polyp = 1."""
    return list(getattr(data["test"], "categories", [1]))


# --------------------------------------------------------------------------- COCO-format data

def read_coco(root, annotations, skip_bad=False):
    """Samples of a COCO box annotation file, sorted by file name, and the category ids.

    Returns ``(samples, categories)``; each sample ``{"image": path, "size": (W, H), "boxes":
    (n, 4) float32 xyxy, "labels": (n,) int64 in 1..K, "image_id", "crowd_boxes": (c, 4),
    "crowd_labels": (c,), "area": (n,), "crowd_area": (c,)}``. Crowd regions are not trained on
    but are scored as COCO does (ignored); boxes are clipped to the image and those left without
    width or height are dropped.
    """
    try:
        with open(annotations) as f:
            coco = json.load(f)
        if not isinstance(coco, dict):
            raise TypeError("the top level is not an object with 'images', 'annotations', 'categories'")
        images, anns = coco["images"], coco.get("annotations", [])
        if not all(isinstance(x, dict) for x in images + anns):
            raise TypeError("'images' and 'annotations' must be lists of objects")
        categories = sorted(int(c["id"]) for c in coco["categories"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read COCO annotations {annotations}: "
                        f"{f'no key {e}' if isinstance(e, KeyError) else e}") from None
    if not categories:
        raise DataError(f"{annotations} lists no categories")
    label_of = {c: i + 1 for i, c in enumerate(categories)}
    per_image = {}
    for a in anns:
        per_image.setdefault(a.get("image_id"), []).append(a)
    bad, samples = [], []
    for im in sorted(images, key=lambda im: str(im.get("file_name"))):
        path = os.path.join(root, str(im.get("file_name")))
        try:
            size = check_image(path)
            boxes, labels, areas, crowd = [], [], [], []
            for a in per_image.get(im["id"], []):
                x, y, w, h = (float(v) for v in a["bbox"])
                if a["category_id"] not in label_of:
                    raise ValueError(f"annotation {a.get('id')} has unknown category {a['category_id']}")
                # clip to the image, then drop boxes left without width or height (as torchvision's
                # references/detection coco_utils): a degenerate box must not reach the losses
                x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, size[0]), min(y + h, size[1])
                if x1 <= x0 or y1 <= y0:
                    continue
                boxes.append([x0, y0, x1, y1])
                labels.append(label_of[a["category_id"]])
                areas.append(float(a.get("area", w * h)))
                crowd.append(bool(a.get("iscrowd", 0)))
        except (DataError, KeyError, TypeError, ValueError) as e:
            bad.append(f"{path}: {e}")
            continue
        b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        lab, ar, cr = torch.tensor(labels, dtype=torch.int64), torch.tensor(areas, dtype=torch.float64), torch.tensor(crowd, dtype=torch.bool)
        samples.append({"image": path, "size": size, "image_id": im["id"],
                        "boxes": b[~cr].numpy(), "labels": lab[~cr], "area": ar[~cr],
                        "crowd_boxes": b[cr], "crowd_labels": lab[cr], "crowd_area": ar[cr]})
    report_bad(bad, skip_bad, f"COCO annotations {annotations}")
    if not samples:
        raise DataError(f"no usable images in {annotations} under {root}")
    return samples, categories


class CocoDetectionDataset(DetectionDataset):
    """``DetectionDataset`` whose targets carry the annotation file's class labels."""

    def __init__(self, samples, categories, fixed_size=None, train=False):
        super().__init__(samples, fixed_size=fixed_size, train=train)
        self.categories = categories

    def __getitem__(self, i):
        out = super().__getitem__(i)
        out["target"]["labels"] = self.samples[i]["labels"].clone()  # augmentation keeps box order
        return out


def build_coco_datasets(root, annotations, fixed_size=None, seed=42, skip_bad=False):
    """dict(train=, val=, test=) of a COCO annotation file, split like Kvasir (docs/ssl4gie-study.md §2.1)."""
    samples, categories = read_coco(root, annotations, skip_bad)
    if len(samples) < 3:
        raise DataError(f"{annotations} has {len(samples)} usable images; need at least 3 to split")
    parts = split_indices(len(samples), seed)
    return {name: CocoDetectionDataset([samples[i] for i in idx], categories, fixed_size, train=name == "train")
            for name, idx in zip(("train", "val", "test"), parts)}


# --------------------------------------------------------------------------- training

def collate(samples):
    """A batch as lists (images differ in size): ``{"images", "targets", "index", "path",
    "meta"}``, the torchvision detection convention."""
    return {"images": [s["image"] for s in samples], "targets": [s["target"] for s in samples],
            "index": [s["index"] for s in samples], "path": [s["path"] for s in samples],
            "meta": [s["meta"] for s in samples]}


def compute_losses(model, batch):
    """torchvision's Faster R-CNN loss dict (``loss_classifier``, ``loss_box_reg``,
    ``loss_objectness``, ``loss_rpn_box_reg``); the engine sums them with equal weights (docs/ssl4gie-study.md §4.2)."""
    return model(batch["images"], batch["targets"])


# --------------------------------------------------------------------------- inference

def ground_truth(dataset, i):
    """Ground truth of sample ``i`` in original pixels: ``boxes`` (n, 4) xyxy, ``labels``,
    and for COCO files ``area`` / ``iscrowd`` (crowd regions appended)."""
    s = dataset.samples[i]
    boxes = torch.as_tensor(s["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(s["labels"]) if "labels" in s else torch.ones(len(boxes), dtype=torch.int64)
    if "crowd_boxes" not in s:
        return {"boxes": boxes, "labels": labels}
    return {"boxes": torch.cat([boxes, s["crowd_boxes"]]), "labels": torch.cat([labels, s["crowd_labels"]]),
            "area": torch.cat([s["area"], s["crowd_area"]]),
            "iscrowd": torch.cat([torch.zeros(len(boxes), dtype=torch.bool), torch.ones(len(s["crowd_boxes"]), dtype=torch.bool)])}


@torch.inference_mode()
def predict(model, loader, device):
    """Run ``model`` (eval mode, fp32 as the reference) over ``loader`` (no shuffling).

    Returns ``(predictions, targets, indices)``: per image ``{"boxes" (n, 4) xyxy, "scores",
    "labels"}`` mapped back to original pixels (ViT padding/shrinking undone), the ground truth
    in original pixels (:func:`ground_truth`), and the dataset indices.
    """
    model.eval()
    dataset = getattr(loader.dataset, "dataset", loader.dataset)  # a Subset keeps base indices
    predictions, targets, indices = [], [], []
    for batch in loader:
        images = [im.to(device, non_blocking=True) for im in batch["images"]]
        for out, meta, i in zip(model(images), batch["meta"], batch["index"]):
            out = {k: v.cpu() for k, v in out.items()}
            out["boxes"] = unpad_boxes(out["boxes"], meta)
            predictions.append(out)
            targets.append(ground_truth(dataset, i))
            indices.append(i)
    return predictions, targets, indices


def eval_loader(dataset, *, architecture, image_size, batch_size, workers=0):
    """In-order loader over a whole split with the detection collate.

    ViT detectors see one fixed canvas, so their images are batched (``batch_size``): every
    image still gets its own proposals, NMS and boxes, so batching changes no box beyond float
    rounding (``tests/test_detection.py``). ResNet detectors resize each image to its own size
    and torchvision pads a batch to its largest image, which changes the features near the
    borders: they run one image at a time, as the reference evaluated.
    """
    return make_loader(dataset, batch_size=batch_size if fixed_size(architecture, image_size) else 1,
                       train=False, workers=workers, collate_fn=collate)


def validation_ap(model, loader, device):
    """AP@[.5:.95] on ``loader`` (the reference selects on torchmetrics' ``map``, docs/ssl4gie-study.md §4.2).
    A split with no box at all has no AP; it then scores 0 (every epoch alike)."""
    predictions, targets, _ = predict(model, loader, device)
    ap = coco_map(predictions, targets)["map"]
    return 0.0 if ap != ap else ap


def results_lines(metrics):
    """The reference's ``eval_results.txt`` lines (docs/ssl4gie-study.md §5.2) plus AR@100."""
    return {"mAP@.5:.95": metrics["map"], "mAP@.5": metrics["map_50"], "mAP@.75": metrics["map_75"],
            "AR@100": metrics["mar_100"]}


# --------------------------------------------------------------------------- COCO JSON output

def coco_ground_truth(dataset, indices, targets, categories=(1,)):
    """COCO ground-truth dict for the evaluated images (ids: the COCO file's, else 1-based
    position in the split); pycocotools' ``COCO`` reads it as is."""
    images, anns = [], []
    for pos, (i, t) in enumerate(zip(indices, targets)):
        s = dataset.samples[i]
        image_id = s.get("image_id", pos + 1)
        w, h = s["size"]
        images.append({"id": image_id, "file_name": os.path.basename(s["image"]), "width": w, "height": h})
        crowd = t.get("iscrowd", torch.zeros(len(t["boxes"]), dtype=torch.bool))
        for k, (box, label) in enumerate(zip(t["boxes"].tolist(), t["labels"].tolist())):
            bw, bh = box[2] - box[0], box[3] - box[1]
            area = float(t["area"][k]) if "area" in t else bw * bh
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": categories[label - 1],
                         "bbox": [box[0], box[1], bw, bh], "area": area, "iscrowd": int(crowd[k])})
    cats = [{"id": c, "name": "polyp" if categories == [1] else str(c)} for c in categories]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_results(dataset, indices, predictions, categories=(1,)):
    """COCO results list ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``."""
    out = []
    for pos, (i, p) in enumerate(zip(indices, predictions)):
        image_id = dataset.samples[i].get("image_id", pos + 1)
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            out.append({"image_id": image_id, "category_id": categories[label - 1],
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    return out


def save_predictions(path, dataset, indices, predictions, targets, categories=(1,)):
    """Write the COCO results to ``path`` and the ground truth next to it
    (``<stem>.ground_truth.json``). Returns both paths."""
    path = str(path)
    stem = path[:-5] if path.endswith(".json") else path
    gt_path = stem + ".ground_truth.json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(coco_results(dataset, indices, predictions, list(categories)), f)
    with open(gt_path, "w") as f:
        json.dump(coco_ground_truth(dataset, indices, targets, list(categories)), f)
    return path, gt_path


# --------------------------------------------------------------------------- pictures

def draw(image, gt_boxes, boxes, scores, threshold=0.5):
    """The prediction picture (docs/ssl4gie-study.md §6): ``image`` (3, H, W) uint8 original, ground truth (n, 4) in
    yellow, predictions with score >= ``threshold`` in green labelled with their score.
    Returns (3, H, W) uint8."""
    width = max(2, round(max(image.shape[-2:]) / 200))  # the reference's 6 px at ~1200 px
    keep = scores >= threshold
    out = draw_bounding_boxes(image, gt_boxes.reshape(-1, 4), colors=[GT_COLOR] * len(gt_boxes), width=width)
    return draw_bounding_boxes(out, boxes[keep].reshape(-1, 4), labels=[f"{s:.2f}" for s in scores[keep].tolist()],
                               colors=[PRED_COLOR] * int(keep.sum()), width=width)


def render_predictions(model, dataset, device, *, folder, label, loader_kwargs, positions=None, threshold=0.5):
    """Draw the test images at ``positions`` (all by default) into ``<folder>/test{i}_<label>.png``;
    ``loader_kwargs`` go to :func:`eval_loader`. Yields ``(image path, picture path)``."""
    positions = select_positions(positions, len(dataset))
    loader = eval_loader(torch.utils.data.Subset(dataset, positions), **loader_kwargs)
    predictions, targets, indices = predict(model, loader, device)
    for pos, pred, target, i in zip(positions, predictions, targets, indices):
        path = dataset.samples[i]["image"]
        image = torch.from_numpy(np.asarray(open_rgb(path), dtype=np.uint8).copy()).permute(2, 0, 1)
        gt = target["boxes"][~target["iscrowd"]] if "iscrowd" in target else target["boxes"]
        picture = draw(image, gt, pred["boxes"], pred["scores"], threshold)
        yield path, save_picture(Image.fromarray(picture.permute(1, 2, 0).numpy()), folder, pos, label)
