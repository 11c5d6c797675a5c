"""DeepLabV3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic
Image Segmentation", ECCV 2018) on a gissl ResNet, as SSL4GIE built its ResNet-50 segmentation
rows with segmentation_models_pytorch (docs/ssl4gie-study.md §3.6).

    layer4 (output stride 16, dilated) -> ASPP -> separable 3×3 -> ×4 ─┐
    layer1 (stride 4) -> 1×1 conv to 48 ch ─────────────────────────────┴> concat -> separable 3×3
    -> 1×1 conv to logits -> bilinear ×4

Module and parameter names follow smp's ``DeepLabV3Plus`` (``encoder.*``, ``decoder.aspp.*``,
``decoder.block1/2.*``, ``segmentation_head.0.*``), so a state dict of
``smp.DeepLabV3Plus(encoder_name="resnet50")`` (SSL4GIE's finetuned ResNet segmentation models)
loads as it is and gives the same logits.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from gissl.errors import UserError

ATROUS_RATES = (12, 24, 36)   # DeepLabV3+ at output stride 16
HIGHRES_CHANNELS = 48          # the paper's reduction of the stride-4 features
OUTPUT_STRIDE = 16


def _conv_bn_relu(conv, channels):
    return [conv, nn.BatchNorm2d(channels), nn.ReLU()]


class SeparableConv2d(nn.Sequential):
    """Depthwise k×k conv (no bias) then pointwise 1×1 conv: ``0`` and ``1`` as smp names them."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, dilation=1, bias=True):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, dilation=dilation,
                      groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=bias))


class ASPPPooling(nn.Sequential):
    """Image-level branch: global average → 1×1 conv → BN → ReLU, broadcast back to (h, w)."""

    def __init__(self, in_channels, out_channels):
        super().__init__(nn.AdaptiveAvgPool2d(1),
                         *_conv_bn_relu(nn.Conv2d(in_channels, out_channels, 1, bias=False), out_channels))

    def forward(self, x):
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1×1 branch, three separable atrous 3×3 branches
    (``rates``), the image-pooling branch; concatenated, 1×1 conv → BN → ReLU → Dropout(0.5)."""

    def __init__(self, in_channels, out_channels, rates=ATROUS_RATES, dropout=0.5):
        super().__init__()
        branches = [nn.Sequential(*_conv_bn_relu(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                                 out_channels))]
        for rate in rates:
            conv = SeparableConv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False)
            branches.append(nn.Sequential(*_conv_bn_relu(conv, out_channels)))
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            *_conv_bn_relu(nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False), out_channels),
            nn.Dropout(dropout))

    def forward(self, x):
        return self.project(torch.cat([branch(x) for branch in self.convs], 1))


class DeepLabV3PlusDecoder(nn.Module):
    """(stride-4 map (N, C1, H/4, W/4), stride-16 map (N, C4, H/16, W/16)) -> (N, channels, H/4, W/4)."""

    def __init__(self, low_channels, high_channels, channels=256):
        super().__init__()
        self.aspp = nn.Sequential(
            ASPP(high_channels, channels),
            *_conv_bn_relu(SeparableConv2d(channels, channels, 3, padding=1, bias=False), channels))
        self.up = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=True)
        self.block1 = nn.Sequential(
            *_conv_bn_relu(nn.Conv2d(low_channels, HIGHRES_CHANNELS, 1, bias=False), HIGHRES_CHANNELS))
        self.block2 = nn.Sequential(*_conv_bn_relu(
            SeparableConv2d(HIGHRES_CHANNELS + channels, channels, 3, padding=1, bias=False), channels))

    def forward(self, low, high):
        return self.block2(torch.cat([self.up(self.aspp(high)), self.block1(low)], 1))


class DeepLabV3Plus(nn.Module):
    """ResNet encoder + DeepLabV3+: (N, 3, H, W) -> (N, num_classes, H, W) logits.

    The encoder is switched to output stride 16 (``layer4`` dilated by 2, see
    ``ResNetEncoder.set_output_stride``); H and W must be multiples of 16.
    """

    def __init__(self, encoder, num_classes=1, channels=256):
        super().__init__()
        if not hasattr(encoder, "set_output_stride"):
            raise UserError(f"--decoder deeplabv3plus needs a ResNet encoder (resnet18, resnet50), "
                            f"not {getattr(encoder, 'architecture', type(encoder).__name__)}; use --decoder dpt")
        self.encoder = encoder.set_output_stride(OUTPUT_STRIDE)
        dims = encoder.feature_dims
        self.decoder = DeepLabV3PlusDecoder(dims[0], dims[-1], channels)
        # smp's SegmentationHead: a Sequential of the 1×1 conv and the ×4 bilinear upsampling
        self.segmentation_head = nn.Sequential(
            nn.Conv2d(channels, num_classes, 1),
            nn.UpsamplingBilinear2d(scale_factor=4))

    def forward(self, x):
        feats = self.encoder.forward_features(x)
        return self.segmentation_head(self.decoder(feats[0], feats[-1]))
