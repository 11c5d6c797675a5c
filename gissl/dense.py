"""What the two dense tasks, segmentation and depth, share: the DPT model on a gissl encoder,
its flag, and the loop that runs a model over an evaluation loader."""
import torch

from gissl.engine import autocast
from gissl.models.dpt import DPT, FUSION_CHANNELS


def add_arguments(parser, stage):
    """``--decoder-channels`` (every stage: eval and predict read it from the checkpoint)."""
    parser.add_argument("--decoder-channels", dest="decoder_channels", type=int, default=FUSION_CHANNELS,
                        help="width of the DPT fusion blocks (256 = DPT/SSL4GIE); 64 trains several "
                             "times faster on a CPU" + ("" if stage == "train" else
                                                        "; default: the checkpoint's"))
    return parser


def build_dpt(encoder, task, *, decoder_channels=FUSION_CHANNELS, **kwargs):
    """``encoder`` + DPT decoder for ``task`` ("segmentation" or "depth"); further ``DPT``
    keywords in ``kwargs``."""
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
