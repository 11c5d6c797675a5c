"""Polyp segmentation: the task logic behind ``train_/eval_/predict_segmentation.py``.

Model: encoder + DPT decoder with a one-logit segmentation head (ssl4gie.md §3.5; the
reference used DeepLabV3+ for ResNets, gissl uses DPT for both encoder families).
Loss: SSL4GIE's soft Dice (§4.2), optionally plus BCE. Evaluation (§5.3): logits resized
bilinearly to each image's original size, thresholded at 0.5 after sigmoid, per-image Dice,
IoU, precision, recall averaged over images, without the ε/ε artefact
(``gissl.metrics.segmentation_scores``). Validation during training uses the same
original-resolution protocol on the validation split (the reference selected on 224-px
resized masks and also looked at test every epoch, §8 items 12-13).

A few helpers here are shared with ``gissl.depth``: the ``--print-list`` format, the
prediction-picture layout and the evaluation loader.
"""
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_segmentation_masks

from gissl import cli
from gissl.engine import autocast, build_optimizer, fit, freeze, make_loader, prepare_for_eval
from gissl.errors import UserError
from gissl.losses import soft_dice
from gissl.metrics import segmentation_scores, summarize_segmentation
from gissl.models.dpt import DPT, FUSION_CHANNELS
from gissl.ssl.schedule import warmup_cosine

DATASETS = ("Kvasir", "CVC")
GT_COLOUR = (255, 214, 0)      # amber outline for the ground truth
PRED_COLOUR = (0, 200, 83)     # green overlay for the prediction


def add_dense_arguments(parser):
    """Flags shared by the segmentation and depth scripts: ``--decoder-channels`` (all stages)
    and ``--cosine`` (training)."""
    parser.add_argument("--decoder-channels", dest="decoder_channels", type=int, default=FUSION_CHANNELS,
                        help="width of the DPT fusion blocks (256 = DPT/SSL4GIE); 64 trains several "
                             "times faster on a CPU. Eval/predict need the value used in training")
    if parser.get_default("stage") == "train":
        parser.add_argument("--cosine", action="store_true",
                            help="decay the learning rate per step on a half-cosine to "
                                 "--learning-rate-scheduler-minimum (instead of SSL4GIE's plateau "
                                 "scheduler); steadier short runs")
    return parser


def add_arguments(parser):
    """Segmentation flags."""
    add_dense_arguments(parser)
    if parser.get_default("stage") == "train":
        parser.add_argument("--bce-weight", dest="bce_weight", type=float, default=0.0,
                            help="add this weight × binary cross-entropy to the soft Dice loss "
                                 "(0 = soft Dice only, as SSL4GIE); 0.5-1 can speed up early training")
    return parser


def build_dpt_model(args, task, **kwargs):
    """Encoder (from the model flags) + DPT decoder for ``task`` ("segmentation" or "depth"),
    further ``DPT`` keywords in ``kwargs``; the encoder is frozen with ``--frozen`` (pass
    ``model.encoder`` to ``fit(frozen=...)``)."""
    model = DPT(cli.encoder_from_args(args, img_size=args.image_size), task=task,
                features=args.decoder_channels, **kwargs)
    if getattr(args, "frozen", False) and args.stage == "train":
        freeze(model.encoder)
    return model


def build_segmentation_model(args):
    """Encoder + DPT with a one-logit segmentation head."""
    return build_dpt_model(args, "segmentation")


def train_dense(args, model, ds, device, compute_losses, validate, metric_mode, metric_name=None):
    """``gissl.engine.fit`` with the shared flags, for the segmentation and depth scripts.

    ds: dict(train=, val=) datasets; validate: ``validate(model) -> float`` on the val split,
    named ``metric_name`` in the JSON-lines log.
    Returns fit's result dict."""
    if args.cosine and args.learning_rate_scheduler:
        raise UserError("--cosine and --learning-rate-scheduler are two learning-rate schedules; pick one")
    lr_schedule = None
    if args.cosine:
        lr_schedule = warmup_cosine(args.learning_rate, args.epochs, min_lr=args.learning_rate_scheduler_minimum)
    train_loader = make_loader(ds["train"], batch_size=args.batch_size, train=True, workers=args.workers,
                               seed=args.seed, device=device)
    return fit(model, train_loader=train_loader, compute_losses=compute_losses,
               optimizer=build_optimizer(model, args.learning_rate, weight_decay=args.weight_decay),
               device=device, run_dir=cli.output_dir(args), run_name=cli.run_name(args), args=args,
               epochs=args.epochs, validate=validate, metric_mode=metric_mode, metric_name=metric_name,
               lr_scheduler=args.learning_rate_scheduler, lr_min=args.learning_rate_scheduler_minimum,
               accum_iter=args.accum_iter, clip_grad=args.clip_grad, amp=not args.no_amp,
               frozen=[model.encoder] if args.frozen else [], lr_schedule=lr_schedule)


def compute_losses(model, batch, bce_weight=0.0):
    """``{"dice_loss": soft Dice loss [, "bce": weight·BCE]}`` for a batch ``{"image": (N,3,S,S),
    "mask": (N,1,S,S)}``. The key names a loss (1 - soft Dice), not the Dice metric, which the
    logs record under ``val`` with ``"metric": "dice"``."""
    logits = model(batch["image"])
    losses = {"dice_loss": soft_dice(logits, batch["mask"])}
    if bce_weight:
        losses["bce"] = bce_weight * F.binary_cross_entropy_with_logits(logits.float(), batch["mask"].float())
    return losses


def predict_logits(model, images, device, amp=True):
    """Model logits in fp32 for ``images`` (N, 3, S, S), under autocast; (N, 1, S, S)."""
    with torch.inference_mode(), autocast(device, amp):
        return model(images.to(device, non_blocking=True)).float()


def to_original(logits, size):
    """(1, S, S) logits -> (1, h, w) bool mask: bilinear resize of the logits, then sigmoid > 0.5."""
    return F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0] > 0


def evaluate(model, loader, device, amp=True, keep_masks=False):
    """Per-image scores at original resolution over ``loader`` (samples built with ``original=True``).

    Returns ``{"dice", "iou", "precision", "recall": (N,) float64, "both_empty", "target_empty":
    (N,) bool, "paths": [str]}`` in loader order, plus ``"masks"`` (list of (h, w) bool) when
    ``keep_masks``. Batching does not change any number: each image is resized and scored alone.
    """
    model.eval()
    scores, paths, masks = [], [], []
    for batch in loader:
        logits = predict_logits(model, batch["image"], device, amp).cpu()
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


def datasets(args, original=False):
    """dict(train=, val=, test=) for ``--dataset`` (built-in synthetic data without ``--data-root``)."""
    from gissl.data import build_segmentation_datasets
    return build_segmentation_datasets(args.dataset, cli.data_root(args), image_size=args.image_size,
                                       original=original, skip_bad=args.skip_bad_files)


def loader(dataset, args, device):
    """Ordered loader over all of ``dataset`` for evaluation/prediction (batch ``--batch-size``)."""
    return make_loader(dataset, batch_size=args.batch_size, train=False, workers=args.workers, device=device)


def load_model(args, device, build=build_segmentation_model):
    """The finetuned model of this run (``Trained models/<task>/<name>.pth``), eval mode."""
    model = build(args)
    cli.load_trained(model, args)
    return prepare_for_eval(model, device, getattr(args, "compile", False))


# --------------------------------------------------------------------------- reporting

_ARCH_IDS = {"resnet50": "RN", "vit_b": "VT", "resnet18": "RN18", "vit_s": "VTs", "vit_t": "VTt"}
_PRETRAINING_IDS = {"Hyperkvasir": "HK", "ImageNet_self": "IN", "ImageNet_class": "IN", "random": "NA"}
_FRAMEWORK_IDS = {"mocov3": "MC", "barlowtwins": "BT", "mae": "MA", "simsiam": "SS", "fpsiam": "FP"}


def list_id(args):
    """SSL4GIE's ``--print-list`` variable name ``{A}_{D}_{F}_{dataset}`` (ssl4gie.md §5.3):
    RN/VT for ResNet50/ViT-B (RN18, VTs, VTt for the small ones); HK/IN + MC/BT/MA for SSL,
    IN_SL for supervised ImageNet, NA_NA for random."""
    if args.pretraining == "ImageNet_class":
        framework = "SL"
    elif args.pretraining == "random":
        framework = "NA"
    else:
        framework = _FRAMEWORK_IDS.get(args.ss_framework, "NA")
    return f"{_ARCH_IDS[args.arch]}_{_PRETRAINING_IDS[args.pretraining]}_{framework}_{args.dataset}"


def print_list(args, values):
    """Print per-image values as SSL4GIE's Python-list literal (stdout only)."""
    print(f"{list_id(args)} = [")
    for v in values:  # an undefined score (no polyp, none predicted) stays a valid Python literal
        print(f"    {float(v)}," if v == v else '    float("nan"),')
    print("]", flush=True)


def save_masks(folder, paths, masks):
    """One PNG per image (0/255, original size) named by the image's stem. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for path, mask in zip(paths, masks):
        Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(folder / (Path(path).stem + ".png"))
    return folder


def picture_label(args):
    """The reference's prediction-file label: the run name without the dataset part (§6)."""
    return cli.run_name(args).rsplit("-dataset_", 1)[0]


def selected_positions(args, n):
    """Test positions from ``--idx`` (0-based, checked against the split size) or all ``n``."""
    idx = getattr(args, "idx_list", None)
    if idx is None:
        return list(range(n))
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise UserError(f"--idx {','.join(map(str, bad))} outside the test split (0..{n - 1})")
    return idx


# --------------------------------------------------------------------------- pictures

def text_font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def caption(image, text, corner="top"):
    """Write ``text`` on a dark box in a corner of a PIL image (in place); returns the image."""
    draw = ImageDraw.Draw(image)
    font = text_font(max(12, image.height // 18))
    box = draw.textbbox((0, 0), text, font=font)
    w, h = box[2] - box[0] + 8, box[3] - box[1] + 8
    y = 0 if corner == "top" else image.height - h
    draw.rectangle([0, y, w, y + h], fill=(0, 0, 0))
    draw.text((4 - box[0], y + 4 - box[1]), text, fill=(255, 255, 255), font=font)
    return image


def hstack(images, gap=4):
    """Place PIL images side by side on a white strip (tops aligned)."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(im.height for im in images)), (255, 255, 255))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def outline(mask, width):
    """(h, w) bool mask -> its boundary band of about ``width`` px (dilation minus the mask)."""
    m = mask[None, None].float()
    grown = F.max_pool2d(m, 2 * width + 1, stride=1, padding=width)
    return (grown[0, 0] > 0) & ~mask


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


def render_predictions(args, model, dataset, device, amp=True):
    """Write one panel per selected test image to ``Predictions/segmentation-<dataset>/``.

    File names ``test{i}_{label}.png`` (i = test position, as the reference). Returns the list
    of (test image path, picture path).
    """
    from gissl.data.images import open_rgb
    out_dir = cli.predictions_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = picture_label(args)
    written = []
    for i in selected_positions(args, len(dataset)):
        sample = dataset[i]
        logits = predict_logits(model, sample["image"][None], device, amp)[0].cpu()
        target = sample["mask_orig"][0]
        pred = to_original(logits, target.shape)[0]
        dice = segmentation_scores(pred[None], target[None])["dice"].item()
        picture = segmentation_panel(open_rgb(sample["path"]), target, pred, dice)
        path = out_dir / f"test{i}_{label}.png"
        picture.save(path)
        written.append((sample["path"], os.fspath(path)))
    return written
