"""What the two dense tasks, segmentation and depth, share: the decoder on a gissl encoder
(``--decoder``, ``--decoder-channels``), and the loop that runs a model over an evaluation loader.

Decoders: ``dpt`` (DPT, any encoder; docs/ssl4gie-study.md §3.5) for both tasks, and the ones
SSL4GIE used for its ResNet-50 rows (docs/ssl4gie-study.md §3.1): ``deeplabv3plus`` for
segmentation, ``residual`` (its residual U-Net decoder) for depth.
"""
import torch

from gissl.engine import autocast
from gissl.errors import UserError
from gissl.models.deeplab import DeepLabV3Plus
from gissl.models.dpt import DPT, FUSION_CHANNELS
from gissl.models.residual_depth import ResidualDepth

DECODERS = {
    "dpt": "DPT (Ranftl et al. 2021), any encoder",
    "deeplabv3plus": "DeepLabV3+ (Chen et al. 2018) with smp's names, ResNets only (SSL4GIE's ResNet segmentation)",
    "residual": "SSL4GIE's residual U-Net decoder with its names, ResNets only (SSL4GIE's ResNet depth)",
}
TASK_DECODERS = {"segmentation": ("dpt", "deeplabv3plus"), "depth": ("dpt", "residual")}


def add_arguments(parser, stage, task):
    """``--decoder`` and ``--decoder-channels`` (every stage: eval and predict read them from the
    checkpoint); ``task`` ("segmentation" or "depth") picks the decoder choices."""
    choices = TASK_DECODERS[task]
    default = "" if stage == "train" else "; default: the checkpoint's"
    parser.add_argument("--decoder", default="dpt", choices=choices,
                        help="dense decoder: " + "; ".join(f"{d} = {DECODERS[d]}" for d in choices) + default)
    parser.add_argument("--decoder-channels", dest="decoder_channels", type=int, default=FUSION_CHANNELS,
                        help="width of the DPT fusion blocks or of DeepLabV3+'s ASPP (256 = DPT/SSL4GIE/"
                             "DeepLabV3+); 64 trains several times faster on a CPU; the residual decoder's "
                             "widths follow the ResNet stages" + default)
    return parser


def build_decoder(encoder, task, *, decoder="dpt", decoder_channels=FUSION_CHANNELS, depth_output="linear"):
    """``encoder`` + the ``decoder`` for ``task`` ("segmentation": (N, 1, S, S) logits; "depth":
    (N, 1, S, S) relative depth, ``depth_output`` "linear" or "sigmoid")."""
    if decoder not in TASK_DECODERS[task]:
        raise UserError(f"--decoder {decoder} does not apply to {task}; choose from {', '.join(TASK_DECODERS[task])}")
    if decoder == "deeplabv3plus":
        return DeepLabV3Plus(encoder, channels=decoder_channels)
    if decoder == "residual":
        if decoder_channels != FUSION_CHANNELS:
            raise UserError(f"--decoder-channels {decoder_channels} does not apply to --decoder residual, whose "
                            f"widths follow the ResNet stages; drop --decoder-channels or use --decoder dpt")
        return ResidualDepth(encoder, depth_output=depth_output)
    kwargs = {"depth_output": depth_output} if task == "depth" else {}
    return DPT(encoder, task=task, features=decoder_channels, **kwargs)


def predict_logits(model, images, device, amp=True):
    """Model output in fp32 for ``images`` (N, 3, S, S), under autocast: (N, K, S, S)."""
    with torch.inference_mode(), autocast(device, amp):
        return model(images.to(device, non_blocking=True)).float()


def batched_outputs(model, loader, device, amp=True):
    """Yield ``(output (N, K, S, S) fp32 on the CPU, batch)`` for every batch of ``loader``,
    the model in eval mode; the per-image scoring at original size is the caller's."""
    model.eval()
    for batch in loader:
        yield predict_logits(model, batch["image"], device, amp).cpu(), batch
