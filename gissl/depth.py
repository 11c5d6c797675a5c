"""Colonoscopy depth: the task logic behind ``train_/eval_/predict_depth.py``.

Model: encoder + DPT decoder (or, as the reference's ResNet rows, its residual decoder:
``--decoder residual``, docs/ssl4gie-study.md §3.2) with an unbounded (``--depth-output linear``, default) or, as
SSL4GIE, a sigmoid depth head (``gissl.models.dpt.DepthHead`` says why the sigmoid collapses),
trained on targets in the reference's unit where 1.0 = 100 mm (C3VD stores 0-100 mm as
0-65535; the reference divided by 65535). Loss: MiDaS scale-and-shift-invariant loss with multi-scale gradient matching,
α = 0.1 (docs/ssl4gie-study.md §4.3), on targets in that unit, so α weighs the two terms as in the reference.

Evaluation (docs/ssl4gie-study.md §5.4), per frame: align the prediction to the ground truth on the network's
square grid (least-squares scale and shift by default; ``median`` scaling or ``none`` = the raw
output read as metric depth), map it back to the original frame (undo the square padding),
clamp to the valid range [0, 100] mm, and measure over valid pixels (ground truth > 0) in
**millimetres** (the reference reported units of 10 mm): RMSE, mean absolute error, median
relative error, mean abs-rel and δ<1.25. The best constant prediction (each frame's mean
valid depth) is scored alongside as a baseline. Validation during training selects on the
same aligned RMSE over the validation videos, and warns when the model's prediction has
become constant (no depth structure left for the alignment to fit).
"""
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gissl import dense, dist
from gissl.data.transforms import from_square
from gissl.errors import UserError
from gissl.losses import align_median, flat_predictions, masked_mse, scale_shift_aligned, scale_shift_invariant
from gissl.metrics import depth_errors
from gissl.models.dpt import DEPTH_OUTPUTS
from gissl.pictures import caption, colourize, hstack, save_picture, scale_bar, select_positions, with_bar

DATASETS = ("C3VD",)
# Weight of the unaligned MSE that holds the output's level and range (see compute_losses).
ANCHOR_WEIGHT = 0.01
DEPTH_UNIT_MM = 100.0   # model / loss unit: 1.0 = 100 mm (C3VD's full 16-bit range, docs/ssl4gie-study.md §2.5)
MAX_DEPTH_MM = 100.0    # predictions are clamped to C3VD's range, as the reference's clamp to [0, 1]
ALIGNMENTS = ("scale-shift", "median", "none")
# Error maps saturate here instead of wrapping around (docs/ssl4gie-study.md §8 item 16); the reference's
# picture scale was |error| × 3.5 in its unit, i.e. full scale at 100 / 3.5 ≈ 28.6 mm.
ERROR_MAX_MM = DEPTH_UNIT_MM / 3.5

# Checkpoints whose stored settings predate --depth-output had SSL4GIE's sigmoid head.
LEGACY_SETTINGS = {"depth_output": "sigmoid"}


def add_arguments(parser, stage):
    """Depth flags: the decoder, its width and head for every stage, the loss weights for training and
    ``--alignment`` for evaluation."""
    dense.add_arguments(parser, stage, "depth")
    parser.add_argument("--depth-output", dest="depth_output", default="linear", choices=DEPTH_OUTPUTS,
                        help="last layer of the depth head: linear (unbounded, as MiDaS; the aligned "
                             "depth is clamped to 0-100 mm afterwards) or sigmoid (SSL4GIE; can "
                             "saturate to a constant map at learning rates around 1e-3)" +
                             ("" if stage == "train" else "; default: the checkpoint's"))
    if stage in ("eval", "predict"):
        parser.add_argument("--alignment", default="scale-shift", choices=ALIGNMENTS,
                            help="how a prediction is fitted to the ground truth before measuring: "
                                 "least-squares scale and shift (SSL4GIE), median scaling (most "
                                 "monocular-depth papers), or none (raw output as metric depth)")
    if stage == "train":
        parser.add_argument("--gradient-weight", dest="gradient_weight", type=float, default=0.1,
                            help="weight α of the multi-scale gradient-matching term (SSL4GIE / MiDaS: 0.1)")
        parser.add_argument("--anchor-weight", dest="anchor_weight", type=float, default=ANCHOR_WEIGHT,
                            help=f"weight of the unaligned MSE (model unit, 1 = 100 mm) added to the "
                                 f"scale-and-shift-invariant loss so that the output's level and range "
                                 f"cannot drift (default {ANCHOR_WEIGHT}; 0 = SSL4GIE's loss alone)")
    return parser


def build_model(encoder, *, decoder_channels, depth_output="linear", decoder="dpt"):
    """``encoder`` + ``decoder`` (DPT, or SSL4GIE's residual decoder on a ResNet) with a depth
    output (``linear`` or SSL4GIE's ``sigmoid``): (N, 3, S, S) -> (N, 1, S, S) relative depth."""
    return dense.build_decoder(encoder, "depth", decoder=decoder, decoder_channels=decoder_channels,
                               depth_output=depth_output)


def compute_losses(model, batch, alpha=0.1, anchor_weight=ANCHOR_WEIGHT):
    """``{"ssi": loss, "anchor": loss}`` for ``{"image": (N,3,S,S), "depth": (N,1,S,S) mm, 0 = invalid}``.

    ``ssi`` is the MiDaS / SSL4GIE loss. It is blind to the output's level and scale, so an
    unbounded head drifts (means of ±1e3 after a dozen steps at lr 3e-3) and a sigmoid head
    saturates; ``anchor`` = ``anchor_weight`` × the unaligned MSE in the model unit (1 = 100 mm)
    holds both near the target's. ``anchor_weight=0`` is the reference's loss alone."""
    pred = model(batch["image"])
    target = batch["depth"] / DEPTH_UNIT_MM
    losses = {"ssi": scale_shift_invariant(pred, target, alpha=alpha)}
    if anchor_weight > 0:
        losses["anchor"] = anchor_weight * masked_mse(pred, target)
    return losses


def align(pred, target_mm, alignment="scale-shift"):
    """Model output (N, 1, S, S) (relative depth) -> depth in mm fitted to ``target_mm`` (N, 1, S, S).

    ``scale-shift``: least squares over valid pixels (docs/ssl4gie-study.md §5.4); ``median``: scale by the
    ratio of medians; ``none``: the output read in the model unit (1 = 100 mm).
    """
    valid = target_mm > 0
    if alignment == "scale-shift":
        return scale_shift_aligned(pred, target_mm, valid)
    if alignment == "median":
        return align_median(pred, target_mm, valid).view(-1, 1, 1, 1) * pred.float()
    if alignment == "none":
        return pred.float() * DEPTH_UNIT_MM
    raise UserError(f"unknown --alignment '{alignment}'; choose from {', '.join(ALIGNMENTS)}")


def to_original(pred_mm, depth_orig):
    """Aligned (..., S, S) depth -> (..., h, w) on the original frame ``depth_orig`` (..., h, w),
    clamped to [0, 100] mm, 0 where the ground truth is invalid (as the reference)."""
    h, w = depth_orig.shape[-2:]
    out = from_square(pred_mm, h, w)  # a new tensor: clamped and masked in place (a C3VD frame has 1.46 M pixels)
    if out.data_ptr() == pred_mm.data_ptr():
        out = out.clone()
    return out.clamp_(0, MAX_DEPTH_MM).masked_fill_(~(depth_orig > 0), 0)


def evaluate(model, loader, device, alignment="scale-shift", amp=True, keep_depth=False):
    """Per-frame errors (mm) at original resolution over ``loader`` (``original=True`` samples).

    Returns ``depth_errors``'s (N,) tensors (``"constant_rmse"`` is the best constant
    prediction), ``"constant"`` (N,) bool (the raw output is constant over the frame's valid
    pixels, see ``gissl.losses.flat_predictions``), ``"paths"``, and ``"depth"`` (list of (h, w)
    mm arrays) when ``keep_depth``. Every number is computed per frame, so the batch size
    changes none of them.
    """
    errors, paths, depths, constant = [], [], [], []
    for pred, batch in dense.batched_outputs(model, loader, device, amp):
        constant.append(flat_predictions(pred, batch["depth"] > 0))
        aligned = align(pred, batch["depth"], alignment)
        for p, gt, path in zip(aligned, batch["depth_orig"], batch["path"]):
            p = to_original(p, gt)
            errors.append(depth_errors(p[None], gt[None]))
            paths.append(path)
            if keep_depth:
                depths.append(p[0].numpy())
    out = {k: torch.cat([e[k] for e in errors]) for k in errors[0]}
    out["constant"] = torch.cat(constant)
    out["paths"] = paths
    if keep_depth:
        out["depth"] = depths
    return out


def constant_warning(out, frames="frames"):
    """A ``warning: ...`` line when some frame's prediction is constant, else ``None``.

    out: :func:`evaluate`'s result; frames: what was evaluated ("validation frames"). A
    constant map carries no depth: the scale-and-shift fit returns the best constant depth,
    and the scale-and-shift-invariant loss gives such a model no gradient, so it stays there.
    """
    n, k = len(out["constant"]), int(out["constant"].sum())
    if k == 0:
        return None
    return (f"warning: the depth model predicts a constant depth map for {k} of {n} {frames}: it has "
            "collapsed (a constant map gets no gradient from the scale-and-shift-invariant loss), or in "
            "the first epochs its BatchNorm statistics have not settled yet; those frames score as the "
            "best constant depth. If it persists, train with --depth-output linear (the default), a lower "
            "--learning-rate, or --cosine")


def summarize(out, alignment):
    """Frame means in the reference's keys (RMSE, Relative Error, Absolute Error) plus δ, abs-rel,
    the constant baseline and the unit."""
    def mean(t):
        return float(np.nanmean(t.numpy()))
    return {"RMSE": mean(out["rmse"]), "Relative Error": mean(out["rel_median"]),
            "Absolute Error": mean(out["abs"]), "Abs-rel": mean(out["abs_rel"]),
            "Delta<1.25": mean(out["delta1"]), "Constant-depth RMSE": mean(out["constant_rmse"]),
            "Constant-prediction frames": int(out["constant"].sum()),
            "Alignment": alignment, "Frames": len(out["paths"]),
            "Units": "mm (RMSE, Absolute Error, Constant-depth RMSE); the others are ratios"}


def make_validate(loader, device, amp=True):
    """``validate(model) -> mean aligned RMSE (mm)`` on the validation videos (lower is better);
    prints :func:`constant_warning` to stderr when the prediction has become constant."""
    def validate(model):
        out = evaluate(model, loader, device, "scale-shift", amp)
        warning = constant_warning(out, "validation frames")
        if warning and dist.is_main_process():
            print(warning, file=sys.stderr, flush=True)
        return float(np.nanmean(out["rmse"].numpy()))
    return validate


def frame_name(path, root):
    """``<sequence>/<video>/<N>`` of a C3VD colour frame, relative to the data root."""
    rel = Path(os.path.relpath(path, root))
    return rel.parent / rel.name.replace("_color.png", "")


def save_depths(folder, root, paths, depths):
    """One ``<sequence>/<video>/<N>_depth.npy`` (float32 mm, original size) per frame."""
    folder = Path(folder)
    for path, depth in zip(paths, depths):
        target = folder / f"{frame_name(path, root)}_depth.npy"
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, depth.astype(np.float32))
    return folder


# --------------------------------------------------------------------------- pictures

def depth_panel(image, gt_mm, pred_mm, rmse):
    """Input | ground truth | prediction (one colour map, near = bright) | |error| (saturating).

    image: PIL RGB at original size; gt_mm, pred_mm: (h, w) arrays in mm (0 = invalid).
    """
    invalid = gt_mm <= 0
    vmax = float(max(gt_mm.max(), 1.0))
    # near = bright, as the reference's picture (colour of vmax - depth)
    gt = Image.fromarray(colourize(vmax - gt_mm, vmax, invalid))
    pred = Image.fromarray(colourize(vmax - np.clip(pred_mm, 0, vmax), vmax, invalid))
    err = Image.fromarray(colourize(np.abs(pred_mm - gt_mm), ERROR_MAX_MM, invalid))
    w = image.width
    depth_bar = scale_bar(w, vmax, "depth (mm)", near_bright=True)
    error_bar = scale_bar(w, ERROR_MAX_MM, "|error| (mm)", saturates=True)
    blank = Image.new("RGB", (w, depth_bar.height), (255, 255, 255))
    return hstack([with_bar(caption(image.copy(), "input"), blank),
                   with_bar(caption(gt, "ground truth"), depth_bar),
                   with_bar(caption(pred, f"prediction  RMSE {rmse:.2f} mm"), depth_bar),
                   with_bar(caption(err, "absolute error"), error_bar)])


def render_predictions(model, dataset, device, *, folder, label, positions=None, alignment="scale-shift",
                       amp=True):
    """Write one panel per test frame at ``positions`` (default all) to ``folder`` as
    ``test{i}_{label}.png``. Returns the list of (frame path, picture path)."""
    from gissl.data.images import open_rgb
    written = []
    for i in select_positions(positions, len(dataset)):
        sample = dataset[i]
        pred = dense.predict_logits(model, sample["image"][None], device, amp).cpu()
        gt = sample["depth_orig"]
        p = to_original(align(pred, sample["depth"][None], alignment)[0], gt)
        rmse = depth_errors(p[None], gt[None])["rmse"].item()
        picture = depth_panel(open_rgb(sample["path"]), gt[0].numpy(), p[0].numpy(), rmse)
        written.append((sample["path"], save_picture(picture, folder, i, label)))
    return written
