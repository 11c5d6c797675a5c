"""DPT decoder (Ranftl et al., "Vision Transformers for Dense Prediction", ICCV 2021) for
polyp segmentation and colonoscopy depth, as SSL4GIE builds it (docs/ssl4gie-study.md §3.5).

    encoder.forward_features(x) -> 4 maps -> reassemble -> project to 256 ch -> 4 fusion blocks -> head

Segmentation and depth differ by the head only (and by BatchNorm inside the fusion blocks'
residual units, which the reference uses for segmentation only). The same decoder serves both
encoder families: a ViT gives four stride-16 token maps (blocks 2/5/8/11, CLS token dropped =
DPT's "ignore" readout) that the reassemble stage resamples to strides 4/8/16/32; a ResNet's
four stages already have those strides, so its reassemble stage is empty and the stage maps go
straight to the 3×3 projections. Every module built here takes part in ``forward`` (DDP needs
no ``find_unused_parameters``): unlike the reference, the deepest fusion block has no unused
first residual unit.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gissl.errors import UserError

TARGET_STRIDES = (4, 8, 16, 32)
FUSION_CHANNELS = 256  # DPT / SSL4GIE `fusion_features`


class ResidualConvUnit(nn.Module):
    """ReLU → 3×3 conv → [BN] → ReLU → 3×3 conv → [BN], plus the input. ``(N, C, H, W)`` in and out."""

    def __init__(self, channels, use_bn):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not use_bn)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not use_bn)
        self.bn1 = nn.BatchNorm2d(channels) if use_bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(channels) if use_bn else nn.Identity()

    def forward(self, x):
        out = self.bn1(self.conv1(F.relu(x)))
        out = self.bn2(self.conv2(F.relu(out)))
        return out + x


class FusionBlock(nn.Module):
    """One DPT fusion step: ``out = RCU2(previous + RCU1(skip))``, upsampled, 1×1 conv.

    The deepest block has no ``previous`` and therefore no ``skip_unit`` (the reference
    builds one and never uses it). ``size`` is the spatial size to upsample to (×2 of the
    input when the image side is a multiple of 32).
    """

    def __init__(self, channels, use_bn, has_previous):
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels, use_bn) if has_previous else None
        self.unit = ResidualConvUnit(channels, use_bn)
        self.out_conv = nn.Conv2d(channels, channels, 1)

    def forward(self, skip, previous=None, size=None):
        x = skip if previous is None else previous + self.skip_unit(skip)
        x = self.unit(x)
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def _resample(channels, in_stride, out_stride):
    """Module taking a stride-``in_stride`` map to stride ``out_stride`` (DPT reassemble).

    Upsampling uses a transposed conv with kernel = stride = the factor (DPT: k4 s4, k2 s2);
    downsampling by 2 a 3×3 stride-2 conv (DPT's 4th level), repeated for larger factors.
    """
    if in_stride == out_stride:
        return nn.Identity()
    if in_stride > out_stride:
        factor = in_stride // out_stride
        if factor * out_stride != in_stride:
            raise UserError(f"DPT cannot resample stride {in_stride} to {out_stride}: not an integer factor")
        return nn.ConvTranspose2d(channels, channels, factor, stride=factor)
    factor = out_stride // in_stride
    steps = int(round(math.log2(factor)))
    if 2 ** steps * in_stride != out_stride:
        raise UserError(f"DPT cannot resample stride {in_stride} to {out_stride}: not a power-of-two factor")
    return nn.Sequential(*[nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(steps)])


class Reassemble(nn.Module):
    """Map the encoder's four feature maps to strides 4/8/16/32.

    ``in_dims``/``in_strides``: per-level channels and strides of ``forward_features``.
    When a level already has its target stride and no projection width is asked for, the
    level passes through unchanged (ResNet). Otherwise it gets a 1×1 conv to
    ``reassemble_dims[i]`` followed by the resampling (ViT: 768 → 96/192/384/768 for ViT-B).
    """

    def __init__(self, in_dims, in_strides, reassemble_dims=None):
        super().__init__()
        if len(in_dims) != 4 or len(in_strides) != 4:
            raise UserError(f"DPT needs 4 feature levels, the encoder gives {len(in_dims)}")
        levels, out_dims = [], []
        for i, (dim, stride, target) in enumerate(zip(in_dims, in_strides, TARGET_STRIDES)):
            width = None if reassemble_dims is None else reassemble_dims[i]
            if width is None and stride == target:
                levels.append(nn.Identity())
                out_dims.append(dim)
                continue
            width = dim if width is None else width
            levels.append(nn.Sequential(nn.Conv2d(dim, width, 1), _resample(width, stride, target)))
            out_dims.append(width)
        self.levels = nn.ModuleList(levels)
        self.out_dims = out_dims

    def forward(self, features):
        return [level(f) for level, f in zip(self.levels, features)]


class SegmentationHead(nn.Module):
    """3×3 conv → BN → ReLU → Dropout(0.1) → 1×1 conv to logits → bilinear ×2 (docs/ssl4gie-study.md §3.5)."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x, size):
        x = self.classifier(self.dropout(F.relu(self.bn(self.conv(x)))))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


DEPTH_OUTPUTS = ("linear", "sigmoid")


class DepthHead(nn.Module):
    """3×3 conv 256→128 → bilinear ×2 → 3×3 conv → 32 → ReLU → 1×1 conv → 1 [→ sigmoid].

    ``output="linear"`` (default) leaves the last conv unbounded, as the relative-depth heads
    of MiDaS (Ranftl et al., TPAMI 2020) trained with the same scale-and-shift-invariant loss:
    that loss fits its own scale and shift, so it pins neither the level nor the range of the
    output, and the depth range belongs after the alignment (``gissl.depth`` clamps the
    aligned depth to the sensor's range). ``output="sigmoid"`` is SSL4GIE's head (output in
    [0, 1]); under that loss its level drifts freely, and as the sigmoid saturates the loss's
    gradient with respect to the logits grows like 1/(σ'·spread), so one Adam step can push
    every logit far into saturation: a constant output of exactly 1.0 (or 0) whose gradient is
    exactly zero from then on. The reference interpolates with ``align_corners=True``.
    """

    def __init__(self, channels, output="linear"):
        super().__init__()
        if output not in DEPTH_OUTPUTS:
            raise UserError(f"unknown depth output '{output}'; choose from {', '.join(DEPTH_OUTPUTS)}")
        self.output = output
        self.conv1 = nn.Conv2d(channels, channels // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(channels // 2, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 1, 1)

    def forward(self, x, size):
        x = F.interpolate(self.conv1(x), size=size, mode="bilinear", align_corners=True)
        x = F.relu(self.conv2(x))
        # The last layer runs in fp32 even under autocast: bf16 keeps 8 significant bits, so
        # nearby depths would collapse to one value and the scale-and-shift fit of the
        # resulting flat map carries no structure (and no gradient).
        with torch.autocast(x.device.type, enabled=False):
            out = self.conv3(x.float())
            return torch.sigmoid(out) if self.output == "sigmoid" else out


class DPT(nn.Module):
    """Encoder + DPT decoder. ``forward(x (N, 3, H, W)) -> (N, K, H, W)``.

    ``task="segmentation"``: K = ``num_classes`` logits. ``task="depth"``: K = 1, unbounded
    relative depth (metric or aligned by the caller). H and W should be multiples
    of 32 (and of the ViT patch size); other sizes work but the last maps are resized.

    The encoder must offer ``forward_features`` (4 maps), ``feature_dims`` and
    ``feature_strides`` (``gissl.models.build_encoder``). Encoder parameters that
    ``forward_features`` never reaches (a ViT's final norm, blocks after the last tapped one)
    are frozen here, so no parameter is left without a gradient under DDP.
    """

    def __init__(self, encoder, task="segmentation", num_classes=1, features=FUSION_CHANNELS,
                 depth_output="linear"):
        super().__init__()
        if task not in ("segmentation", "depth"):
            raise UserError(f"unknown DPT task '{task}'; choose segmentation or depth")
        self.task = task
        self.encoder = encoder
        dims, strides = list(encoder.feature_dims), list(encoder.feature_strides)
        reassemble_dims = None
        if len(set(strides)) == 1:
            # Plain ViT: all levels share one stride. DPT-Base widths 96/192/384/768 for
            # embed_dim 768, i.e. D/8, D/4, D/2, D (scaled the same way for vit_s / vit_t).
            reassemble_dims = [dims[i] // d for i, d in enumerate((8, 4, 2, 1))]
            # resample relative to the token grid (x4, x2, x1, x1/2, as DPT) whatever the patch
            # size: a 14-px grid (ViT-H/14) has no whole-number factor to strides 4..32
            strides = [16] * 4
        self.reassemble = Reassemble(dims, strides, reassemble_dims)
        use_bn = task == "segmentation"  # SSL4GIE: `use_bn = dense == "seg"`
        self.project = nn.ModuleList(
            nn.Conv2d(d, features, 3, padding=1, bias=False) for d in self.reassemble.out_dims)
        self.fusion = nn.ModuleList(FusionBlock(features, use_bn, has_previous=i < 3) for i in range(4))
        self.head = SegmentationHead(features, num_classes) if use_bn else DepthHead(features, depth_output)
        _freeze_unused_vit_parts(encoder)

    def forward(self, x):
        size = x.shape[-2:]
        feats = self.reassemble(self.encoder.forward_features(x))
        feats = [proj(f) for proj, f in zip(self.project, feats)]
        # fusion[3] takes the stride-32 map alone, fusion[2..0] add the next finer level.
        out = self.fusion[3](feats[3], size=feats[2].shape[-2:])
        out = self.fusion[2](feats[2], out, size=feats[1].shape[-2:])
        out = self.fusion[1](feats[1], out, size=feats[0].shape[-2:])
        out = self.fusion[0](feats[0], out)
        return self.head(out, size)


def _freeze_unused_vit_parts(encoder):
    """Freeze what a ViT's ``forward_features`` skips: the final norm and any later blocks."""
    out_indices = getattr(encoder, "out_indices", None)
    if out_indices is None:
        return
    unused = [encoder.norm] if hasattr(encoder, "norm") else []
    unused += list(encoder.blocks)[max(out_indices) + 1:]
    for module in unused:
        module.requires_grad_(False)
