"""Image classification: encoder + linear head, and what train / eval / predict share.

SSL4GIE's classification task (docs/ssl4gie-study.md §2.2, §4.2, §5.1) with its bugs fixed: class
weights come from the training split only (docs/ssl4gie-study.md §8 item 11), and the scores are
:func:`gissl.metrics.classification_metrics` (no ε/ε = 1, docs/ssl4gie-study.md §8 item 10).
"""
import argparse
import csv
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from gissl.data import medical
from gissl.engine import autocast
from gissl.errors import UserError
from gissl.pictures import heat_colours, text_font
from gissl.probes import occlusion_map

# HyperKvasir, any class folders, and the SSL-transfer study's medical datasets (csv + presets)
CLASSIFICATION_DATASETS = ("Hyperkvasir_anatomical", "Hyperkvasir_pathological", "folder") + medical.MEDICAL_DATASETS
VAL_METRICS = ("macro_f1", "accuracy", "balanced_accuracy")
# Named recipes of train_classification.py: flag values that apply unless given on the command
# line. transfer-finetune: the SSL-transfer study's finetune.py (docs/transfer-study.md §b.6).
RECIPES = {"transfer-finetune": dict(optimizer="sgd-nesterov", learning_rate=1e-2, weight_decay=1e-8, batch_size=64,
                                     steps=5000, eval_every_steps=200, early_stopping_patience=3,
                                     learning_rate_scheduler_minimum=0.0, augment="transfer", val_metric="accuracy",
                                     class_weights="none")}


class Classifier(torch.nn.Module):
    """``encoder`` followed by a linear ``head``: `(N, 3, H, W)` -> logits `(N, num_classes)`.

    The encoder keeps its own parameter names under ``encoder.`` (STYLE.md rule 5), so a
    finetuned encoder exports by stripping that prefix.
    """

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.embed_dim, num_classes)
        self.num_classes = num_classes

    def forward(self, x):
        return self.head(self.encoder(x))


# --------------------------------------------------------------------------- data

def transfer_train_transform(image_size):
    """The SSL-transfer study's finetuning augmentation (docs/transfer-study.md §b.6):
    RandomResizedCrop (scale 0.08-1, bicubic) back to ``image_size`` and a horizontal flip,
    then ImageNet normalisation. Input: the resized Image in [0, 1] `(3, S, S)`."""
    from torchvision.transforms import v2

    from gissl.data.transforms import normalize
    return v2.Compose([v2.RandomResizedCrop(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.RandomHorizontalFlip(0.5), normalize()])


def build_datasets(dataset, root, *, image_size=224, split="random", seed=42, skip_bad=False,
                   augment_train=True, augment="ssl4gie"):
    """``dict(train=, val=, test=)`` of ``gissl.data.ClassificationDataset`` and the class names.

    ``dataset``: ``Hyperkvasir_anatomical`` / ``Hyperkvasir_pathological`` (reference class ids)
    or ``folder`` (``root/<class>/<images>``, classes in sorted order). ``split``: ``random``
    (SSL4GIE's unstratified split) or ``stratified`` (per class 80/10/10). With
    ``augment_train=False`` the train split gets the eval transform (feature extraction);
    ``augment="transfer"`` gives it :func:`transfer_train_transform` instead of SSL4GIE's.
    """
    out, classes = _build_datasets(dataset, root, image_size=image_size, split=split, seed=seed, skip_bad=skip_bad,
                                   augment_train=augment_train)
    return _with_augment(out, image_size, augment_train, augment), classes


def _with_augment(out, image_size, augment_train, augment):
    """``out`` with its train split under ``augment``'s transform (SSL4GIE's is the datasets' own)."""
    if augment == "transfer" and augment_train:
        from gissl import data
        tr = out["train"]
        out["train"] = data.ClassificationDataset(tr.samples, image_size, train=True, classes=tr.classes,
                                                  transform=transfer_train_transform(image_size))
    elif augment != "ssl4gie":
        raise UserError(f"unknown --augment '{augment}'; choose ssl4gie or transfer")
    return out


def _build_datasets(dataset, root, *, image_size, split, seed, skip_bad, augment_train):
    from gissl import data
    if dataset == "folder":
        samples, classes = data.class_folder(root, skip_bad)
        if split == "random":
            idx = data.split_indices(len(samples), seed)
        elif split == "stratified":
            idx = data.stratified_split_indices([s["label"] for s in samples], seed)
        else:
            raise UserError(f"unknown split '{split}'; choose random (reference) or stratified")
        out = {name: data.ClassificationDataset([samples[i] for i in ix], image_size,
                                                train=name == "train" and augment_train, classes=classes)
               for name, ix in zip(("train", "val", "test"), idx)}
        return out, list(classes)
    out = data.build_classification_datasets(dataset, root, image_size=image_size, split=split,
                                             seed=seed, skip_bad=skip_bad)
    if not augment_train:
        tr = out["train"]
        out["train"] = data.ClassificationDataset(tr.samples, image_size, train=False, classes=tr.classes)
    return out, list(out["train"].classes)


def class_weights(labels, num_classes):
    """Cross-entropy class weights `(C,)` from the **training** labels `(N,)`:
    ``w_c = N / (C · N_c)`` (the reference's formula, docs/ssl4gie-study.md §2.2, which used the whole
    dataset instead, docs/ssl4gie-study.md §8 item 11). A class with no training sample gets weight 0: it never
    appears as a target, so its weight never enters the loss."""
    counts = torch.bincount(torch.as_tensor(labels).long(), minlength=num_classes).double()
    w = counts.sum() / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w)).float()


def make_compute_losses(weights):
    """``compute_losses(model, batch) -> {"loss": weighted CE}`` for ``gissl.engine.fit``."""
    def compute_losses(model, batch):
        logits = model(batch["image"])
        return {"loss": F.cross_entropy(logits.float(), batch["label"], weight=weights.to(logits.device))}
    return compute_losses


# --------------------------------------------------------------------------- inference

@torch.inference_mode()
def predict(model, loader, device, amp=False):
    """Run ``model`` (eval mode) over ``loader``, in fp32 or (``amp``) under bf16/fp16 autocast.

    Returns ``{"probs": (N, C) float32, "preds": (N,), "targets": (N,), "indices": (N,)}``
    on the CPU, in loader order.
    """
    model.eval()
    from gissl.loaders import move_to
    probs, targets, indices = [], [], []
    for batch in loader:
        batch = move_to(batch, device)
        with autocast(device, amp):
            logits = model(batch["image"])
        probs.append(torch.softmax(logits.float(), 1).cpu())
        targets.append(batch["label"].long().cpu())
        indices.append(torch.as_tensor(batch["index"]).long().cpu())
    probs = torch.cat(probs)
    return {"probs": probs, "preds": probs.argmax(1), "targets": torch.cat(targets), "indices": torch.cat(indices)}


def make_validate(loader, device, amp=True, metric="macro_f1"):
    """``validate(model) -> macro F1`` on ``loader`` (classes present there): the reference's
    model-selection metric (docs/ssl4gie-study.md §4.2), defined without its smoothing; under autocast
    unless ``amp`` is False (``--no-amp``), as training and evaluation. ``metric``: another key of
    :func:`gissl.metrics.classification_metrics` (``accuracy``: the SSL-transfer study's)."""
    def validate(model):
        return score(model, loader, device, amp)[metric]
    return validate


def score(model, loader, device, amp=True):
    """:func:`gissl.metrics.classification_metrics` of ``model``'s predictions on ``loader``."""
    from gissl.metrics import classification_metrics
    out = predict(model, loader, device, amp=amp)
    return classification_metrics(out["targets"], out["preds"], out["probs"], num_classes=out["probs"].shape[1])


def write_predictions_csv(path, paths, targets, probs):
    """CSV ``path,target,pred,prob_0..prob_{C-1}`` (DESIGN.md), one row per image."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    probs = torch.as_tensor(probs)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "target", "pred"] + [f"prob_{c}" for c in range(probs.shape[1])])
        for p, t, row in zip(paths, torch.as_tensor(targets).tolist(), probs.tolist()):
            w.writerow([p, t, int(np.argmax(row))] + [f"{v:.6f}" for v in row])


# --------------------------------------------------------------------------- explanations

def occlusion_explanation(model, image, class_idx, patch=16, stride=8, batch_size=32):
    """Occlusion map `(H, W)`: relative drop of the probability of ``class_idx`` when a
    ``patch``² window of `image (3, H, W)` is set to the mean colour (used for ViTs)."""
    model.eval()

    def prob(x):
        return torch.softmax(model(x).float(), 1)[:, class_idx:class_idx + 1]
    return occlusion_map(prob, image, patch=patch, stride=stride, batch_size=batch_size)


def grad_cam(model, image, class_idx):
    """Grad-CAM (Selvaraju et al. 2017) on the last ResNet stage: `image (3, H, W)` -> `(H, W)`
    in [0, 1]. Channel weights = spatial mean of d logit / d activation; the map is the ReLU
    of the weighted sum, upsampled bilinearly. ``model.encoder`` must be a ResNet encoder
    (its ``forward`` is the global average of ``forward_features(x)[-1]``)."""
    model.eval()
    with torch.enable_grad():
        fmap = model.encoder.forward_features(image[None])[-1]  # (1, C, h, w)
        logit = model.head(fmap.mean((2, 3)))[0, class_idx]
        grad, = torch.autograd.grad(logit, fmap)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * fmap).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return cam / cam.max().clamp(min=1e-12)


def explanation(model, image, class_idx):
    """Grad-CAM for ResNets, occlusion for ViTs (no conv feature map to weight): `(H, W)`."""
    from gissl.models import is_vit
    if is_vit(getattr(model.encoder, "architecture", "")):
        return occlusion_explanation(model, image, class_idx)
    return grad_cam(model, image, class_idx)


# --------------------------------------------------------------------------- pictures

def to_display(image, mean, std):
    """Normalised `(3, H, W)` -> `(H, W, 3)` uint8 RGB."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return ((image.detach().cpu().float() * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def prediction_picture(rgb, heat, top, true_name, path, title=""):
    """Save a picture: the image, the image with the heat map over it, and below them the
    top classes with probabilities and the true class.

    rgb: `(H, W, 3)` uint8; heat: `(H, W)`; top: ``[(class name, probability), ...]``.
    """
    h, w = rgb.shape[:2]
    scale = max(1, 256 // max(h, w))  # small inputs are enlarged so the text fits
    img = Image.fromarray(rgb).resize((w * scale, h * scale), Image.NEAREST)
    overlay = Image.blend(img, Image.fromarray(heat_colours(heat)).resize(img.size, Image.BILINEAR), 0.45)
    font = text_font(14)
    black, green, red = (0, 0, 0), (0, 120, 0), (180, 0, 0)
    lines = ([(title, black)] if title else []) + [(f"true: {true_name}", black)] + \
            [(f"{i + 1}. {name}  {p:.3f}", green if name == true_name else (red if i == 0 else black))
             for i, (name, p) in enumerate(top)]
    pad, line_h = 8, 18
    canvas = Image.new("RGB", (2 * img.width + 3 * pad, img.height + 2 * pad + line_h * len(lines) + pad), "white")
    canvas.paste(img, (pad, pad))
    canvas.paste(overlay, (img.width + 2 * pad, pad))
    draw = ImageDraw.Draw(canvas)
    for i, (line, colour) in enumerate(lines):
        draw.text((pad, img.height + 2 * pad + i * line_h), line, fill=colour, font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def confusion_png(cm, class_names, path, title="confusion matrix (rows: true, columns: predicted)"):
    """Save the confusion matrix `(C, C)` as a PNG: cells shaded by row-normalised rate, with counts."""
    cm = torch.as_tensor(cm).long()
    n = cm.shape[0]
    rates = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    cell = max(28, min(60, 600 // max(n, 1)))
    font = text_font(max(9, cell // 3))
    label_w = 8 + 7 * max(len(f"{i} {c}") for i, c in enumerate(class_names))
    top_pad = 30
    title_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=text_font(12))) + 16
    size = (max(title_w, label_w + n * cell + 10), top_pad + n * cell + 24)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 8), title, fill=(0, 0, 0), font=text_font(12))
    for i in range(n):
        draw.text((4, top_pad + i * cell + cell // 3), f"{i} {class_names[i]}", fill=(0, 0, 0), font=text_font(11))
        draw.text((label_w + i * cell + cell // 3, top_pad + n * cell + 4), str(i), fill=(0, 0, 0), font=text_font(11))
        for j in range(n):
            shade = int(255 - 200 * float(rates[i, j]))
            x0, y0 = label_w + j * cell, top_pad + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text((x0 + 4, y0 + cell // 3), str(int(cm[i, j])), fill=(0, 0, 0) if shade > 120 else (255, 255, 255),
                      font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def dataset_paths(dataset):
    """Image file path of every sample of a ``ClassificationDataset``, in index order."""
    return [os.fspath(s["image"]) for s in dataset.samples]


# --------------------------------------------------------------------------- scripts

def add_arguments(parser, stage):
    """Classification flags: ``--split`` (every stage: the test split must be the training run's)
    and, for training, the SSL-transfer study's finetune protocol (:func:`_protocol_flags`)."""
    parser.add_argument("--split", default="random", choices=["random", "stratified"],
                        help="random = SSL4GIE's unstratified 80/10/10 split (rare classes may miss val/test); "
                             "stratified = 80/10/10 within each class")
    medical.add_dataset_arguments(parser)
    if stage == "train":
        _protocol_flags(parser)
    return parser


def _float_list(text):
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers, e.g. 1e-1,1e-4") \
            from None


def _protocol_flags(parser):
    recipe = RECIPES["transfer-finetune"]
    g = parser.add_argument_group("finetune protocol (the SSL-transfer study's with --recipe transfer-finetune)")
    g.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="named settings, each applied unless its flag is given: transfer-finetune = the "
                        "SSL-transfer study's finetune protocol: " + ", ".join(
                            f"--{k.replace('_', '-')} {v}" for k, v in recipe.items()))
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd-nesterov"],
                   help="adamw (SSL4GIE's) or SGD with Nesterov momentum 0.9 (the transfer study's)")
    g.add_argument("--augment", default="ssl4gie", choices=["ssl4gie", "transfer"],
                   help="training augmentation: ssl4gie = colour jitter, blur, flips, rotation; transfer = "
                        "RandomResizedCrop (scale 0.08-1) + horizontal flip")
    g.add_argument("--class-weights", dest="class_weights", default="train", choices=["train", "none"],
                   help="cross-entropy class weights: train = N / (C * N_c) from the training split (SSL4GIE's "
                        "formula); none = plain cross-entropy (the transfer study's)")
    g.add_argument("--val-metric", dest="val_metric", default="macro_f1", choices=list(VAL_METRICS),
                   help="validation score that selects the best checkpoint (and the search point)")
    g.add_argument("--steps", type=int, default=None, metavar="N",
                   help="train for N optimiser steps instead of --epochs, the learning rate on a cosine "
                        "from --learning-rate to --learning-rate-scheduler-minimum over the steps (no warm-up); "
                        f"the recipe: {recipe['steps']}")
    g.add_argument("--eval-every-steps", dest="eval_every_steps", type=int, default=None, metavar="N",
                   help="with --steps: validate and checkpoint every N steps (and at the last step); default "
                        f"only at the last step; the recipe: {recipe['eval_every_steps']}")
    g.add_argument("--early-stopping-patience", dest="early_stopping_patience", type=int, default=0, metavar="K",
                   help="with --steps: stop after K consecutive checks below the best validation score (a tie "
                        "counts as better) and keep the best check's weights; 0 = never stop early; the recipe: "
                        f"{recipe['early_stopping_patience']}")
    g.add_argument("--search", action="store_true",
                   help="with --steps: train every --search-lrs x --search-wds point on the train split "
                        "(early stopping on val), choose the best validation score, refit it the same way and "
                        "score it once on the test split (which nothing touches before)")
    g.add_argument("--search-lrs", dest="search_lrs", type=_float_list, default=[1e-1, 1e-4], metavar="LRS",
                   help="comma-separated learning rates of --search (the study's logspace(-4, -1, 2))")
    g.add_argument("--search-wds", dest="search_wds", type=_float_list, default=[0.0, 1e-6, 1e-3], metavar="WDS",
                   help="comma-separated weight decays of --search (the study's 0 and logspace(-6, -3, 2)), "
                        "divided by each point's learning rate unless --search-wd-scale absolute")
    g.add_argument("--search-wd-scale", dest="search_wd_scale", default="per-lr", choices=["per-lr", "absolute"],
                   help="per-lr = the study's grid: weight decay = value / lr (lr x wd, the decay per step, is "
                        "what the grid spaces); absolute = the values as given")


def recipe_values(recipe, given=()):
    """The flag values of ``recipe`` (a :data:`RECIPES` name, or None) that the command line did
    not give (``given``: flag destinations), e.g. ``{"steps": 5000, ...}``."""
    if recipe is None:
        return {}
    if recipe not in RECIPES:
        raise UserError(f"unknown --recipe '{recipe}'; choose from {', '.join(sorted(RECIPES))}")
    return {k: v for k, v in RECIPES[recipe].items() if k not in given}


def check_protocol(*, steps, search, eval_every_steps, early_stopping_patience):
    """Flag combinations of the finetune protocol that cannot work (UserError naming the flag)."""
    if search and not steps:
        raise UserError("--search trains each grid point with the step-based protocol: add --steps N "
                        "(or --recipe transfer-finetune)")
    if (eval_every_steps or early_stopping_patience) and not steps:
        raise UserError("--eval-every-steps and --early-stopping-patience need --steps N (or --recipe "
                        "transfer-finetune)")


def check_dataset(dataset, data_root, *, labels=None, split="random"):
    """The dataset flags agree: ``--dataset folder`` and the medical presets need ``--data-root``
    (there is no built-in copy), ``--dataset csv`` needs ``--labels``, and a medical dataset is
    split by patient (no ``--split``)."""
    if dataset == "folder" and not data_root:
        raise UserError("--dataset folder needs --data-root DIR holding one sub-folder per class")
    if labels and dataset != "csv":
        raise UserError(f"--labels is read by --dataset csv only, not --dataset {dataset}")
    if dataset == "csv" and not labels:
        raise UserError("--dataset csv needs --labels FILE.csv (one row per image: a path and a label column)")
    if dataset == "csv" and not os.path.isfile(labels):
        raise UserError(f"--labels '{labels}' does not exist")
    if dataset in medical.READERS and not data_root:
        raise UserError(f"--dataset {dataset} has no built-in synthetic copy: pass --data-root DIR, the folder "
                        "as downloaded (layouts: docs/transfer-study.md, 'Datasets as downloaded')")
    if dataset in medical.MEDICAL_DATASETS and split != "random":
        raise UserError(f"--split {split} is for HyperKvasir and class folders; --dataset {dataset} is "
                        "split by patient (docs/transfer-study.md, 'Datasets as downloaded'): drop --split")


def datasets(dataset, root, *, image_size=224, split="random", skip_bad=False, augment_train=True,
             augment="ssl4gie", medical_options=None):
    """``({split: dataset}, class names)`` of any classification ``dataset``: HyperKvasir and
    class folders as :func:`build_datasets`, a medical one (``gissl.data.medical``, its
    ``read_medical`` keywords in ``medical_options``) split by patient."""
    if dataset not in medical.MEDICAL_DATASETS:
        return build_datasets(dataset, root, image_size=image_size, split=split, skip_bad=skip_bad,
                              augment_train=augment_train, augment=augment)
    ds, classes = medical.build_medical_datasets(dataset, root, image_size=image_size, seed=42, skip_bad=skip_bad,
                                                 augment_train=augment_train, **(medical_options or {}))
    return _with_augment(ds, image_size, augment_train, augment), classes


def build_model(encoder, *, num_classes):
    """:class:`Classifier`: ``encoder`` + a linear head over ``num_classes`` classes."""
    return Classifier(encoder, num_classes)


def render_predictions(model, dataset, classes, device, *, folder, label, positions=None):
    """One :func:`prediction_picture` per test image at ``positions`` (default all), saved as
    ``<folder>/test{i}_{label}.png``. Returns the list of (image path, picture path)."""
    from gissl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from gissl.pictures import select_positions
    written = []
    for i in select_positions(positions, len(dataset)):
        sample = dataset[i]
        image = sample["image"].to(device)
        with torch.inference_mode():
            probs = torch.softmax(model(image[None]).float(), 1)[0].cpu()
        top = probs.topk(min(3, len(classes)))
        heat = explanation(model, image, int(top.indices[0])).cpu()
        path = dataset.samples[i]["image"]
        out = prediction_picture(to_display(image, IMAGENET_MEAN, IMAGENET_STD), heat,
                                 [(classes[c], float(p)) for p, c in zip(top.values, top.indices)],
                                 classes[int(sample["label"])], Path(folder) / f"test{i}_{label}.png",
                                 title=Path(path).name)
        written.append((os.fspath(path), os.fspath(out)))
    return written
