"""Image classification: encoder + linear head, and what train / eval / predict share.

SSL4GIE's classification task (docs/ssl4gie-study.md §2.2, §4.2, §5.1) with its bugs fixed: class
weights come from the training split only (docs/ssl4gie-study.md §8 item 11), and the scores are
:func:`gissl.metrics.classification_metrics` (no ε/ε = 1, docs/ssl4gie-study.md §8 item 10).
"""
import csv
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from gissl.engine import autocast
from gissl.errors import UserError
from gissl.pictures import heat_colours, text_font
from gissl.probes import occlusion_map

CLASSIFICATION_DATASETS = ("Hyperkvasir_anatomical", "Hyperkvasir_pathological", "folder")


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

def build_datasets(dataset, root, *, image_size=224, split="random", seed=42, skip_bad=False,
                   augment_train=True):
    """``dict(train=, val=, test=)`` of ``gissl.data.ClassificationDataset`` and the class names.

    ``dataset``: ``Hyperkvasir_anatomical`` / ``Hyperkvasir_pathological`` (reference class ids)
    or ``folder`` (``root/<class>/<images>``, classes in sorted order). ``split``: ``random``
    (SSL4GIE's unstratified split) or ``stratified`` (per class 80/10/10). With
    ``augment_train=False`` the train split gets the eval transform (feature extraction).
    """
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


def make_validate(loader, device, amp=True):
    """``validate(model) -> macro F1`` on ``loader`` (classes present there): the reference's
    model-selection metric (docs/ssl4gie-study.md §4.2), defined without its smoothing; under autocast
    unless ``amp`` is False (``--no-amp``), as training and evaluation."""
    from gissl.metrics import classification_metrics

    def validate(model):
        out = predict(model, loader, device, amp=amp)
        return classification_metrics(out["targets"], out["preds"], num_classes=out["probs"].shape[1])["macro_f1"]
    return validate


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
    """Classification flags: ``--split`` (every stage: the test split must be the training run's)."""
    parser.add_argument("--split", default="random", choices=["random", "stratified"],
                        help="random = SSL4GIE's unstratified 80/10/10 split (rare classes may miss val/test); "
                             "stratified = 80/10/10 within each class")
    return parser


def check_dataset(dataset, data_root):
    """``--dataset folder`` needs ``--data-root`` (there is no built-in class folder)."""
    if dataset == "folder" and not data_root:
        raise UserError("--dataset folder needs --data-root DIR holding one sub-folder per class")


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
