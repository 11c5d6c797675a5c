"""Polyp segmentation: the task logic behind ``train_/eval_/predict_segmentation.py``.

Model: encoder + DPT decoder with a one-logit segmentation head (docs/ssl4gie-study.md §3.5) for
both encoder families, or, as the reference's ResNet rows, ``--decoder deeplabv3plus``
(docs/ssl4gie-study.md §3.6).
Loss: SSL4GIE's soft Dice (docs/ssl4gie-study.md §4.2), optionally plus BCE. Evaluation
(docs/ssl4gie-study.md §5.3): logits resized bilinearly to each image's original size, thresholded at
0.5 after sigmoid, per-image Dice, IoU, precision, recall averaged over images, without the
ε/ε artefact (``gissl.metrics.segmentation_scores``). Validation during training uses the
same original-resolution protocol on the validation split (the reference selected on 224-px
resized masks and also looked at test every epoch, docs/ssl4gie-study.md §8 items 12-13).
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import draw_segmentation_masks

from gissl import dense
from gissl.losses import soft_dice
from gissl.metrics import segmentation_scores, summarize_segmentation
from gissl.pictures import caption, hstack, outline, save_picture, select_positions

DATASETS = ("Kvasir", "CVC")
GT_COLOUR = (255, 214, 0)      # amber outline for the ground truth
PRED_COLOUR = (0, 200, 83)     # green overlay for the prediction


def add_arguments(parser, stage):
    """Segmentation flags: the decoder and its width, and ``--bce-weight`` for training."""
    dense.add_arguments(parser, stage, "segmentation")
    if stage == "train":
        parser.add_argument("--bce-weight", dest="bce_weight", type=float, default=0.0,
                            help="add this weight × binary cross-entropy to the soft Dice loss "
                                 "(0 = soft Dice only, as SSL4GIE); 0.5-1 can speed up early training")
    return parser


def build_model(encoder, *, decoder_channels, decoder="dpt"):
    """``encoder`` + ``decoder`` (DPT, or DeepLabV3+ on a ResNet) with one logit:
    (N, 3, S, S) -> (N, 1, S, S) logits."""
    return dense.build_decoder(encoder, "segmentation", decoder=decoder, decoder_channels=decoder_channels)


def compute_losses(model, batch, bce_weight=0.0):
    """``{"dice_loss": soft Dice loss [, "bce": weight·BCE]}`` for a batch ``{"image": (N,3,S,S),
    "mask": (N,1,S,S)}``. The key names a loss (1 - soft Dice), not the Dice metric, which the
    logs record under ``val`` with ``"metric": "dice"``."""
    logits = model(batch["image"])
    losses = {"dice_loss": soft_dice(logits, batch["mask"])}
    if bce_weight:
        losses["bce"] = bce_weight * F.binary_cross_entropy_with_logits(logits.float(), batch["mask"].float())
    return losses


def to_original(logits, size):
    """(1, S, S) logits -> (1, h, w) bool mask: bilinear resize of the logits, then sigmoid > 0.5."""
    return F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0] > 0


def evaluate(model, loader, device, amp=True, keep_masks=False):
    """Per-image scores at original resolution over ``loader`` (samples built with ``original=True``).

    Returns ``{"dice", "iou", "precision", "recall": (N,) float64, "both_empty", "target_empty":
    (N,) bool, "paths": [str]}`` in loader order, plus ``"masks"`` (list of (h, w) bool) when
    ``keep_masks``. Batching does not change any number: each image is resized and scored alone.
    """
    scores, paths, masks = [], [], []
    for logits, batch in dense.batched_outputs(model, loader, device, amp):
        for lg, target, path in zip(logits, batch["mask_orig"], batch["path"]):
            pred = to_original(lg, target.shape[-2:])
            scores.append(segmentation_scores(pred[None], target[None]))
            paths.append(path)
            if keep_masks:
                masks.append(pred[0])
    out = {k: torch.cat([s[k] for s in scores]) for k in scores[0]}
    out["paths"] = paths
    if keep_masks:
        out["masks"] = masks
    return out


def make_validate(loader, device, amp=True):
    """``validate(model) -> mean Dice`` on the validation split at original resolution."""
    def validate(model):
        return summarize_segmentation(evaluate(model, loader, device, amp))["Dice"]
    return validate


def save_masks(folder, paths, masks):
    """One PNG per image (0/255, original size) named by the image's stem. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for path, mask in zip(paths, masks):
        Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(folder / (Path(path).stem + ".png"))
    return folder



# --------------------------------------------------------------------------- pictures

def segmentation_panel(image, target, pred, dice):
    """Input | input + ground-truth outline | input + predicted mask (and GT outline) with its Dice.

    image: PIL RGB at original size; target, pred: (h, w) bool. Returns one PIL image.
    """
    img = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    width = max(1, min(img.shape[-2:]) // 120)
    gt_line = outline(target, width)
    with_gt = draw_segmentation_masks(img, gt_line, alpha=1.0, colors=GT_COLOUR)
    with_pred = draw_segmentation_masks(img, pred, alpha=0.45, colors=PRED_COLOUR)
    with_pred = draw_segmentation_masks(with_pred, gt_line, alpha=1.0, colors=GT_COLOUR)

    def pil(t):
        return Image.fromarray(t.permute(1, 2, 0).numpy())
    score = "Dice n/a (no polyp, none predicted)" if np.isnan(dice) else f"Dice {dice:.3f}"
    return hstack([caption(image.copy(), "input"), caption(pil(with_gt), "ground truth"),
                   caption(pil(with_pred), f"prediction  {score}")])


def render_predictions(model, dataset, device, *, folder, label, positions=None, amp=True):
    """Write one panel per test image at ``positions`` (default all) to ``folder`` as
    ``test{i}_{label}.png`` (i = test position, as the reference). Returns the list of
    (test image path, picture path)."""
    from gissl.data.images import open_rgb
    written = []
    for i in select_positions(positions, len(dataset)):
        sample = dataset[i]
        logits = dense.predict_logits(model, sample["image"][None], device, amp)[0].cpu()
        target = sample["mask_orig"][0]
        pred = to_original(logits, target.shape)[0]
        dice = segmentation_scores(pred[None], target[None])["dice"].item()
        picture = segmentation_panel(open_rgb(sample["path"]), target, pred, dice)
        written.append((sample["path"], save_picture(picture, folder, i, label)))
    return written
