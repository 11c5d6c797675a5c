"""SSL4GIE's residual depth decoder for ResNets (Sanderson & Matuszewski 2024; docs/ssl4gie-study.md
§3.2): a U-Net of bottleneck residual blocks over the four ResNet stages, then DPT's depth head.

    layer4 ─ level(c3) ─ level(c2) ─ level(c1) ─ ×2, 3×3 conv, ×2, 3×3 conv, ReLU, 1×1 conv [sigmoid]
    layer3 ──┘   layer2 ──┘   layer1 ──┘

Each level takes the coarser map (2c channels), reduces it by a 1×1 conv + BN to c channels,
upsamples it ×2 (bilinear, align_corners=True), concatenates the finer stage (c channels) and
runs 3 bottleneck blocks (the first a "fusion" block with a projected identity path, 2c → c).
Module and parameter names are SSL4GIE's (``decoder_levels.*``, ``output_conv.*``), so its
released ResNet depth models load with the trunk's keys moved under ``encoder.``.
"""
import torch
import torch.nn as nn

from gissl.errors import UserError
from gissl.models.dpt import DEPTH_OUTPUTS

BLOCKS_PER_LEVEL = 3


class DecoderBlock(nn.Module):
    """Bottleneck residual block ``relu(process(x) + identity(x))`` with c/4 inner channels.

    ``fusion``: the input has 2c channels (upsampled + skip) and the identity path is a 1×1
    conv + BN to c; otherwise the input has c channels and the identity is the input.
    """

    def __init__(self, channels, fusion=False):
        super().__init__()
        in_channels = 2 * channels if fusion else channels
        inner = channels // 4
        self.identity = (nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.BatchNorm2d(channels))
                         if fusion else nn.Identity())
        self.process = nn.Sequential(
            nn.Conv2d(in_channels, inner, 1), nn.BatchNorm2d(inner), nn.ReLU(),
            nn.Conv2d(inner, inner, 3, padding=1), nn.BatchNorm2d(inner), nn.ReLU(),
            nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.process(x) + self.identity(x))


class DecoderLevel(nn.Module):
    """(coarse (N, 2c, h, w), fine (N, c, 2h, 2w)) -> (N, c, 2h, 2w)."""

    def __init__(self, channels, n_blocks=BLOCKS_PER_LEVEL):
        super().__init__()
        self.chan_reduce = nn.Sequential(nn.Conv2d(2 * channels, channels, 1), nn.BatchNorm2d(channels))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.blocks = nn.Sequential(DecoderBlock(channels, fusion=True),
                                    *[DecoderBlock(channels) for _ in range(1, n_blocks)])

    def forward(self, coarse, fine):
        return self.blocks(torch.cat((self.up(self.chan_reduce(coarse)), fine), 1))


class ResidualDepth(nn.Module):
    """ResNet encoder + SSL4GIE's residual decoder: (N, 3, H, W) -> (N, 1, H, W) relative depth.

    ``depth_output``: ``"sigmoid"`` is SSL4GIE's (output in [0, 1]); ``"linear"`` drops the
    sigmoid (see ``gissl.models.dpt.DepthHead`` for why). H and W must be multiples of 32.
    For ResNet-50 the widths are SSL4GIE's (levels 1024/512/256, head 256 → 128 → 32 → 1);
    other ResNets scale them with their stages.
    """

    def __init__(self, encoder, depth_output="linear"):
        super().__init__()
        dims = list(getattr(encoder, "feature_dims", []))
        if not hasattr(encoder, "set_output_stride") or any(b != 2 * a for a, b in zip(dims, dims[1:])):
            raise UserError(f"--decoder residual needs a ResNet encoder (resnet18, resnet50), not "
                            f"{getattr(encoder, 'architecture', type(encoder).__name__)}; use --decoder dpt")
        if depth_output not in DEPTH_OUTPUTS:
            raise UserError(f"unknown --depth-output '{depth_output}'; choose from {', '.join(DEPTH_OUTPUTS)}")
        self.encoder = encoder
        self.depth_output = depth_output
        self.decoder_levels = nn.ModuleList(DecoderLevel(c) for c in reversed(dims[:3]))
        c = dims[0]
        # SSL4GIE's indices: 0 up, 1 conv, 2 up, 3 conv, 4 ReLU, 5 conv (its 6, the sigmoid, is applied
        # in forward so that the last conv can run in fp32)
        self.output_conv = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(c, c // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(c // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1))

    def forward(self, x):
        feats = self.encoder.forward_features(x)
        out = self.decoder_levels[0](feats[3], feats[2])
        out = self.decoder_levels[1](out, feats[1])
        out = self.decoder_levels[2](out, feats[0])
        out = self.output_conv[:5](out)
        # fp32 last layer under autocast, as gissl.models.dpt.DepthHead (bf16 would flatten the map)
        with torch.autocast(x.device.type, enabled=False):
            out = self.output_conv[5](out.float())
            return torch.sigmoid(out) if self.depth_output == "sigmoid" else out
