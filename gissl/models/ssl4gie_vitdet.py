"""SSL4GIE's ViT polyp detectors (Sanderson & Matuszewski 2024), rebuilt so that the files its
``train_detection.py`` wrote load and predict as in SSL4GIE (docs/ssl4gie-study.md §3.3, §3.4).

They differ from gissl's own ViT detectors (:mod:`gissl.models.detection`, ViTDet's simple
pyramid with per-channel LayerNorms) in three ways, all fixed by the weights:

- the ViT has no CLS token (deleted) and its 14×14 position grid is resized to the 64×64 token
  grid of the 1024-px canvas bilinearly with ``align_corners=True``, not bicubically;
- windowed attention (16×16-token windows, no relative position bias, no padding, no shift)
  in blocks 0, 1, 3, 4, 6, 7, 9, 10 — the block list is literal, whatever the depth;
- the pyramid (``fpn1``..``fpn4``, strides 32, 16, 8, 4 on the final-normed token map) uses
  biased convs, transposed convs that keep the ViT width, and ``nn.LayerNorm((C, H, W))``
  over channels *and* space with full-shape affine tensors: ~114 M parameters for ViT-B, and
  only a 1024-px canvas fits them (docs/ssl4gie-study.md §8 item 18).

Module names follow SSL4GIE's with the encoder as ``backbone.body`` (as in every gissl
detector), so its ``model_state_dict`` loads strictly after the rename in
:func:`gissl.models.ssl4gie_checkpoints.convert` (``backbone.X`` -> ``backbone.body.X`` for the
ViT, ``backbone.fpn.*`` unchanged, MAE's unused ``decoder_pos_embed`` dropped). The rest is
torchvision's ``FasterRCNN`` with its defaults (SSL4GIE's torchvision 0.10 has the same) and
the transform fixed to the canvas.
"""
from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN

from gissl.errors import UserError
from gissl.models.detection import FIXED_SIZE, FPN_CHANNELS, IMAGENET_MEAN, IMAGENET_STD, WINDOW_SIZE

PATCH = 16
# SSL4GIE's windowed blocks (its WindowedAttention replaces these blocks' attention); the others
# (2, 5, 8, 11 for a 12-block ViT) keep global attention
WINDOW_BLOCKS = (0, 1, 3, 4, 6, 7, 9, 10)


class TokenMap(nn.Module):
    """SSL4GIE's detection ViT: ``forward(x (N, 3, S, S))`` -> (N, D, S/16, S/16), the patch
    tokens after the final LayerNorm. ``patch_embed``, ``pos_embed`` (1, 1 + g², D, the CLS
    position kept but unused), ``blocks`` and ``norm`` are taken from a gissl
    ``VisionTransformer`` (timm names); its CLS token is not."""

    def __init__(self, encoder, canvas=FIXED_SIZE):
        super().__init__()
        if (getattr(encoder, "patch_size", None) != PATCH or getattr(encoder, "reg_token", 0) is not None
                or encoder.num_prefix_pos != 1 or not isinstance(encoder.norm_pre, nn.Identity)):
            name = getattr(encoder, "architecture", type(encoder).__name__)
            raise UserError(f"SSL4GIE's ViT detectors are patch-16 ViTs with a CLS position and no register "
                            f"tokens; {name} is not one (use --architecture vit_b)")
        if encoder.pos_grid[0] != encoder.pos_grid[1]:
            raise UserError(f"SSL4GIE's ViT detectors resize a square position grid, not {encoder.pos_grid}")
        encoder.set_window_attention(WINDOW_SIZE, blocks=[b for b in WINDOW_BLOCKS if b < len(encoder.blocks)])
        self.architecture = encoder.architecture
        self.embed_dim = encoder.embed_dim
        self.grid = canvas // PATCH
        self.pos_grid = encoder.pos_grid[0]
        # attribute order = SSL4GIE's state-dict order (patch_embed after pos_embed, as timm's)
        self.pos_embed = encoder.pos_embed
        self.patch_embed = encoder.patch_embed
        self.blocks = encoder.blocks
        self.norm = encoder.norm

    def position_embedding(self):
        """(1, g², D): the patch part of ``pos_embed`` resized to the canvas grid, bilinear with
        corners aligned (SSL4GIE's ``_pos_embed_interp``)."""
        d, g0 = self.embed_dim, self.pos_grid
        grid = self.pos_embed[:, 1:].transpose(1, 2).reshape(1, d, g0, g0)
        grid = F.interpolate(grid, size=(self.grid, self.grid), mode="bilinear", align_corners=True)
        return grid.reshape(1, d, self.grid * self.grid).transpose(1, 2)

    def forward(self, x):
        n, _, h, w = x.shape
        if h != w or h != self.grid * PATCH:
            raise UserError(f"SSL4GIE's ViT detector takes {self.grid * PATCH}x{self.grid * PATCH} canvases, "
                            f"got {h}x{w}; drop --image-size (its pyramid LayerNorms fix the size)")
        t = self.patch_embed(x) + self.position_embedding()
        for blk in self.blocks:
            t = blk(t, (self.grid, self.grid))
        return self.norm(t).transpose(1, 2).reshape(n, self.embed_dim, self.grid, self.grid)


def _head(dim, side, out=FPN_CHANNELS):
    # 1×1 conv -> LayerNorm over (C, H, W) -> 3×3 conv -> LayerNorm over (C, H, W), biased convs
    return [nn.Conv2d(dim, out, 1), nn.LayerNorm((out, side, side)),
            nn.Conv2d(out, out, 3, padding=1), nn.LayerNorm((out, side, side))]


class FullLayerNormPyramid(nn.Module):
    """SSL4GIE's ``ViTDet_FPN`` on a (N, D, g, g) token map: OrderedDict ``"0"`` (N, 256, 4g, 4g)
    from ``fpn4``, ``"1"`` (2g) from ``fpn3``, ``"2"`` (g) from ``fpn2``, ``"3"`` (g/2) from
    ``fpn1`` and ``"pool"`` (g/4, torchvision's LastLevelMaxPool of "3")."""

    def __init__(self, dim, grid=FIXED_SIZE // PATCH):
        super().__init__()
        g = grid
        self.fpn1 = nn.Sequential(nn.MaxPool2d(2), *_head(dim, g // 2))
        self.fpn2 = nn.Sequential(*_head(dim, g))
        self.fpn3 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), *_head(dim, 2 * g))
        self.fpn4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.LayerNorm((dim, 2 * g, 2 * g)), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2), *_head(dim, 4 * g))

    def forward(self, x):
        out = OrderedDict([("0", self.fpn4(x)), ("1", self.fpn3(x)), ("2", self.fpn2(x)), ("3", self.fpn1(x))])
        out["pool"] = F.max_pool2d(out["3"], kernel_size=1, stride=2, padding=0)
        return out


class SSL4GIEViTDetBackbone(nn.Module):
    """``body`` (:class:`TokenMap`) + ``fpn`` (:class:`FullLayerNormPyramid`):
    ``forward(x (N, 3, S, S))`` -> OrderedDict of 5 maps, strides 4..64, ``out_channels`` 256."""

    def __init__(self, encoder, canvas=FIXED_SIZE):
        super().__init__()
        self.body = TokenMap(encoder, canvas)
        self.fpn = FullLayerNormPyramid(encoder.embed_dim, canvas // PATCH)
        self.out_channels = FPN_CHANNELS

    def forward(self, x):
        return self.fpn(self.body(x))


def build_ssl4gie_detector(encoder, *, num_classes=2, canvas=FIXED_SIZE, **kwargs):
    """torchvision ``FasterRCNN`` on SSL4GIE's ViT detection backbone built from a gissl ViT
    ``encoder`` (its patch embedding, position embedding, blocks and final norm are reused).

    ``canvas``: the square input side; SSL4GIE's weights fit 1024 only. Input: list of
    (3, canvas, canvas) float images in [0, 1] (the dataset zero-pads to the canvas, as
    SSL4GIE's); eval mode -> list of ``{"boxes", "labels", "scores"}``. ``kwargs`` go to
    ``FasterRCNN`` (e.g. ``box_score_thresh``).
    """
    if canvas % 64:
        raise UserError(f"canvas {canvas} px must be a multiple of 64 (SSL4GIE's ViT detectors: 1024)")
    backbone = SSL4GIEViTDetBackbone(encoder, canvas)
    # SSL4GIE sets transform.fixed_size = (1024, 1024); the padded canvas is then not resized
    kwargs.update(min_size=canvas, max_size=canvas, fixed_size=(canvas, canvas))
    return FasterRCNN(backbone, num_classes=num_classes, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                      **kwargs)
