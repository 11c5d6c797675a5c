"""Faster R-CNN polyp detectors on gissl encoders (docs/ssl4gie-study.md §3.1, §3.4).

Everything detection-specific except the backbones is torchvision's: ``FasterRCNN`` with its
default RPN/RoI settings (which are the reference's torchvision-0.10 defaults, docs/ssl4gie-study.md §3.4:
anchors 32..512 one size per level × ratios 0.5/1/2, RPN top-n 2000/1000, NMS 0.7, RoIAlign 7×7
on levels 0-3, TwoMLPHead 1024, 100 detections/image, box NMS 0.5), ``BackboneWithFPN`` for
ResNets and ``MultiScaleRoIAlign``/``AnchorGenerator`` through those defaults.

- ResNet (``resnet18``/``resnet50``) and DenseNet-121: the encoder's four stages → torchvision's
  FPN (256 channels, extra max-pooled level). BatchNorm either trains (``batchnorm="train"``) or is
  replaced by ``FrozenBatchNorm2d`` (``"frozen"``, what torchvision does for pretrained
  backbones and what the reference did even for random init, docs/ssl4gie-study.md §8 item 19).
- ViT (``vit_t``/``vit_s``/``vit_b``): ViTDet's simple feature pyramid (Li et al., "Exploring
  Plain Vision Transformer Backbones for Object Detection", ECCV 2022) from the last block's
  map (after the final norm): strides 4, 8, 16, 32 by transposed convs / max-pool, then
  1×1 and 3×3 convs to 256 channels each followed by a per-channel LayerNorm, plus a stride-64
  max-pooled level. The reference's LayerNorms span (C, H, W) (~114 M parameters for ViT-B,
  only valid at 1024 px, docs/ssl4gie-study.md §8 item 18); per-channel ones work at any size. Windowed attention
  (16×16 tokens, docs/ssl4gie-study.md §3.4) in every block except the tapped ones (2/5/8/11) via the encoder's
  ``set_window_attention``; the position embedding is interpolated by the encoder. Patch-14
  ViTs (DINOv2) see the canvas scaled by 14/16, so that their token grid is still the canvas's
  16-px grid. Images are
  zero-padded by the dataset to a fixed square (reference 1024) and the model transform keeps
  that size (``fixed_size``).
"""
from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from gissl.errors import UserError

FPN_CHANNELS = 256  # docs/ssl4gie-study.md §3.4: out_channels 256 for both backbones
WINDOW_SIZE = 16  # tokens per window side (docs/ssl4gie-study.md §3.4: 16×16 windows)
FIXED_SIZE = 1024  # the reference's padded canvas for ViT detectors (docs/ssl4gie-study.md §2.3)
TOKEN_STRIDE = 16  # canvas pixels per token of the map the simple pyramid resamples
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # normalisation happens inside the torchvision transform
IMAGENET_STD = [0.229, 0.224, 0.225]


def freeze_batchnorm(module):
    """Replace every ``BatchNorm2d`` in ``module`` by a ``FrozenBatchNorm2d`` holding the same
    statistics and affine values (in place; parameter/buffer names are unchanged)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def _apply_batchnorm(encoder, batchnorm):
    """``batchnorm="frozen"``: ``encoder``'s BatchNorms become ``FrozenBatchNorm2d`` (in place); "train": kept."""
    if batchnorm not in ("train", "frozen"):
        raise UserError(f"batchnorm must be 'train' or 'frozen', got {batchnorm!r}")
    return freeze_batchnorm(encoder) if batchnorm == "frozen" else encoder


def resnet_fpn_backbone(encoder, *, batchnorm="train"):
    """torchvision ``BackboneWithFPN`` over a gissl ResNet encoder's layer1..layer4.

    ``backbone(x (N, 3, H, W))`` -> OrderedDict ``"0".."3"`` (N, 256, H/4..H/32, ...) and
    ``"pool"`` (N, 256, H/64, W/64); ``backbone.body`` holds the encoder's modules under their
    torchvision names (``conv1``, ``layer1``, ...).
    """
    _apply_batchnorm(encoder, batchnorm)
    return BackboneWithFPN(
        encoder, return_layers={f"layer{i + 1}": str(i) for i in range(4)},
        in_channels_list=list(encoder.feature_dims), out_channels=FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool())


def _out_convs(in_ch, out_ch):
    # ViTDet: 1×1 conv → LN → 3×3 conv → LN, convs without bias because a norm follows
    return [nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch, eps=1e-6),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), LayerNorm2d(out_ch, eps=1e-6)]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple pyramid: one (N, D, h, w) stride-16 map -> OrderedDict of
    ``"0".."3"`` (N, 256, 4h, 4w) / (2h, 2w) / (h, w) / (h/2, w/2) and ``"pool"`` (h/4, w/4)."""

    def __init__(self, dim, out_channels=FPN_CHANNELS):
        super().__init__()
        self.stages = nn.ModuleList([
            # stride 4: two stride-2 transposed convs (ViTDet halves the width each time)
            nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2, eps=1e-6),
                          nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
                          *_out_convs(dim // 4, out_channels)),
            nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), *_out_convs(dim // 2, out_channels)),
            nn.Sequential(*_out_convs(dim, out_channels)),
            nn.Sequential(nn.MaxPool2d(2, stride=2), *_out_convs(dim, out_channels)),
        ])

    def forward(self, x):
        out = OrderedDict((str(i), stage(x)) for i, stage in enumerate(self.stages))
        # torchvision's LastLevelMaxPool: max_pool2d(kernel 1, stride 2) of the coarsest level
        out["pool"] = F.max_pool2d(out["3"], 1, 2, 0)
        return out


class ViTDetBackbone(nn.Module):
    """A gissl ViT + simple feature pyramid. ``forward(x (N, 3, H, W))`` with H, W multiples of
    64 -> OrderedDict of 5 maps with strides 4, 8, 16, 32, 64 and ``out_channels`` = 256.

    ``body`` is the encoder (timm parameter names), ``fpn`` the pyramid, mirroring
    ``BackboneWithFPN`` so ``model.backbone.body`` is the encoder for every architecture.
    """

    def __init__(self, encoder, *, window_size=WINDOW_SIZE):
        super().__init__()
        self.body = encoder
        # global attention stays in the tapped blocks 2/5/8/11 (blocks=None), windows elsewhere
        encoder.set_window_attention(window_size, blocks=None)
        self.fpn = SimpleFeaturePyramid(encoder.embed_dim)
        self.out_channels = FPN_CHANNELS

    def forward(self, x):
        h, w = x.shape[-2] // TOKEN_STRIDE, x.shape[-1] // TOKEN_STRIDE
        p = self.body.patch_size
        if p != TOKEN_STRIDE:
            # a patch-14 ViT (DINOv2) sees the canvas scaled by 14/16, so that its token grid is the
            # canvas's 16-px grid and the pyramid's strides 4..64 stay exact canvas strides (the
            # anchor generator and RoIAlign need them); bilinear without antialias, which ONNX exports
            x = F.interpolate(x, size=(h * p, w * p), mode="bilinear", align_corners=False)
        tokens = self.body.forward_tokens(x)  # (N, prefix + h*w, D) after the final LayerNorm
        # CLS (and register) tokens dropped
        grid = tokens[:, self.body.num_prefix_tokens:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return self.fpn(grid)


class FeaturesWithFPN(nn.Module):
    """torchvision's FPN over any encoder's four ``forward_features`` maps (strides 4..32), e.g.
    DenseNet-121's: ``forward(x (N, 3, H, W))`` -> OrderedDict ``"0".."3"`` (N, 256, H/4..H/32, ...)
    and ``"pool"`` (H/64). Named as ``BackboneWithFPN`` (``body`` = the encoder, ``fpn``)."""

    def __init__(self, encoder):
        super().__init__()
        self.body = encoder
        self.fpn = FeaturePyramidNetwork(list(encoder.feature_dims), FPN_CHANNELS, extra_blocks=LastLevelMaxPool())
        self.out_channels = FPN_CHANNELS

    def forward(self, x):
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body.forward_features(x))))


def build_backbone(encoder, *, batchnorm="train", window_size=WINDOW_SIZE):
    """The detection backbone for a gissl encoder (ResNet, DenseNet -> FPN, ViT -> simple pyramid)."""
    if hasattr(encoder, "blocks"):
        return ViTDetBackbone(encoder, window_size=window_size)
    if hasattr(encoder, "layer4"):
        return resnet_fpn_backbone(encoder, batchnorm=batchnorm)
    if list(getattr(encoder, "feature_strides", [])) == [4, 8, 16, 32]:
        return FeaturesWithFPN(_apply_batchnorm(encoder, batchnorm))
    raise UserError(f"no detection backbone for encoder {type(encoder).__name__}; "
                    "use a ResNet, DenseNet or ViT from gissl.models.build_encoder")


def build_detector(encoder, *, num_classes=2, batchnorm="train", window_size=WINDOW_SIZE,
                   fixed_size=None, min_size=800, max_size=1333, **kwargs):
    """torchvision ``FasterRCNN`` on a gissl encoder (docs/ssl4gie-study.md §3.1, §3.4).

    ``num_classes`` counts the background (2 = polyp + background, the reference's).
    ResNet: images are resized by the model so the short side is ``min_size`` and the long side
    at most ``max_size`` (reference 800/1333). ViT: ``fixed_size`` (reference 1024, default when
    None) is the side of the square canvas the dataset pads images to; it must be a multiple of
    64 so the stride-64 level is exact. Other keyword arguments go to ``FasterRCNN`` (e.g.
    ``box_score_thresh``, ``rpn_post_nms_top_n_test``). Input in train mode: list of
    (3, H, W) float images in [0, 1] and targets ``{"boxes": (n, 4) xyxy, "labels": (n,)}``
    (n may be 0) -> dict of the 4 losses; in eval mode -> list of ``{"boxes", "labels", "scores"}``.
    """
    backbone = build_backbone(encoder, batchnorm=batchnorm, window_size=window_size)
    if isinstance(backbone, ViTDetBackbone):
        fixed_size = FIXED_SIZE if fixed_size is None else int(fixed_size)
        if fixed_size % 64:
            raise UserError(f"ViT detector canvas {fixed_size} px must be a multiple of 64 "
                            "(e.g. 256, 512, 1024) so that every pyramid level has an exact stride")
        # the canvas is already fixed_size² after padding: resizing is then the identity
        kwargs.update(min_size=fixed_size, max_size=fixed_size, fixed_size=(fixed_size, fixed_size))
    else:
        kwargs.update(min_size=min_size, max_size=max_size)
    return FasterRCNN(backbone, num_classes=num_classes, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD, **kwargs)
