"""Per-task transforms with SSL4GIE's augmentation ranges (ssl4gie.md §2.2-2.5).

Each dataset decodes the image straight to the model's size (JPEG draft + one resize) and the
augmentations below then run on that small image, jointly on image and mask / depth / boxes
through torchvision ``transforms.v2`` and ``tv_tensors``. Inputs: ``tv_tensors.Image`` float in
[0, 1] (3, H, W), with ``tv_tensors.Mask`` (mask or depth) or ``tv_tensors.BoundingBoxes``.

Numbers from the reference, at its 224-px working size: ColorJitter(0.4, 0.5, 0.25, 0.01),
GaussianBlur kernel 25 with sigma ~ U(0.001, 2.0), flips p=0.5, rotation U(-180, 180),
segmentation affine translate U(-S/8, S/8), scale U(0.5, 1.5), x-shear U(-22.5, 22.5).
When ``image_size`` is not 224 the blur kernel and sigma scale with it (same blur relative to
the image); at 224 they are exactly the reference's.
"""

import math

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from gissl.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_SIZE = 224  # the size the reference's pixel-valued parameters (blur kernel) refer to


def normalize():
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def color_jitter():
    # ssl4gie.md §2.2-2.5: the same jitter in all four tasks.
    return v2.ColorJitter(brightness=0.4, contrast=0.5, saturation=0.25, hue=0.01)


def _image_only(inpt):
    return not isinstance(inpt, (tv_tensors.Mask, tv_tensors.BoundingBoxes))


class GaussianBlur(v2.Transform):
    """Gaussian blur of the image only (masks, depth and boxes pass through), sigma ~ U(lo, hi)
    per call, reflect padding like torchvision's. Separable (two 1-D passes): a 25x25 kernel costs
    50 taps per pixel instead of torchvision's 625, the single most expensive reference op."""

    def __init__(self, kernel_size, sigma):
        super().__init__()
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise UserError(f"blur kernel size must be a positive odd number, got {kernel_size}")
        self.kernel_size = kernel_size
        self.sigma = sigma

    def make_params(self, flat_inputs):
        return {"sigma": float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))}

    def transform(self, inpt, params):
        if not _image_only(inpt):
            return inpt
        k = self.kernel_size
        x = torch.linspace(-(k // 2), k // 2, k)
        kernel = torch.exp(-0.5 * (x / params["sigma"]) ** 2)
        kernel = (kernel / kernel.sum()).to(inpt.dtype)
        img = inpt.reshape(-1, 1, *inpt.shape[-2:])
        pad = k // 2
        # reflect padding needs pad < size; tiny images fall back to replicate
        mode = "reflect" if pad < min(img.shape[-2:]) else "replicate"
        img = F.conv2d(F.pad(img, (pad, pad, 0, 0), mode=mode), kernel.view(1, 1, 1, k))
        img = F.conv2d(F.pad(img, (0, 0, pad, pad), mode=mode), kernel.view(1, 1, k, 1))
        return tv_tensors.wrap(img.reshape(inpt.shape), like=inpt)


def gaussian_blur(scale=1.0):
    """The reference's GaussianBlur((25, 25), (0.001, 2.0)); ``scale`` = working size / 224."""
    k = max(1, int(round(25 * scale)) // 2 * 2 + 1)
    return GaussianBlur(k, (0.001 * scale, 2.0 * scale))


class RandomRot90(v2.Transform):
    """With probability p rotate 90 degrees counter-clockwise, as the reference's detection
    ``torch.rot90(x, dims=[1, 2])`` (ssl4gie.md §2.3): a box (x1, y1, x2, y2) on a W-wide image
    becomes (y1, W - x2, y2, W - x1) and the canvas becomes (W, H)."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs):
        return {"apply": bool(torch.rand(1) < self.p)}

    def transform(self, inpt, params):
        if not params["apply"]:
            return inpt
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            h, w = inpt.canvas_size
            x1, y1, x2, y2 = TF.convert_bounding_box_format(
                inpt, new_format=tv_tensors.BoundingBoxFormat.XYXY).unbind(-1)
            out = torch.stack([y1, w - x2, y2, w - x1], dim=-1)
            out = tv_tensors.BoundingBoxes(out, format="XYXY", canvas_size=(w, h))
            return TF.convert_bounding_box_format(out, new_format=inpt.format)
        return tv_tensors.wrap(torch.rot90(inpt, 1, dims=(-2, -1)), like=inpt)


def classification_transform(image_size=224, train=False):
    """Train (ssl4gie.md §2.2): ColorJitter -> blur 25 -> hflip -> vflip -> rotation U(-180, 180)
    (nearest, black fill) -> Normalize. Eval: Normalize. Input: resized Image in [0, 1]."""
    if not train:
        return normalize()
    return v2.Compose([
        color_jitter(), gaussian_blur(image_size / REFERENCE_SIZE),
        v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
        v2.RandomRotation(180, interpolation=v2.InterpolationMode.NEAREST, fill=0),
        normalize(),
    ])


def segmentation_transform(image_size=224, train=False):
    """Train (ssl4gie.md §2.4): ColorJitter -> blur 25 -> hflip -> vflip -> affine (always):
    angle U(-180, 180), translate U(-S/8, S/8) px, scale U(0.5, 1.5), x-shear U(-22.5, 22.5),
    nearest -> Normalize. Applied jointly to Image and Mask.

    Fill: the affine runs before Normalize and fills 0, i.e. black image / background mask. The
    reference filled -1.0 after normalisation, a grey that never occurs in endoscopy (§8 item 17).
    """
    if not train:
        return normalize()
    return v2.Compose([
        color_jitter(), gaussian_blur(image_size / REFERENCE_SIZE),
        v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
        v2.RandomAffine(degrees=180, translate=(1 / 8, 1 / 8), scale=(0.5, 1.5), shear=(-22.5, 22.5),
                        interpolation=v2.InterpolationMode.NEAREST, fill=0),
        normalize(),
    ])


def depth_transform(image_size=224, train=False):
    """Train (ssl4gie.md §2.5): ColorJitter -> hflip -> vflip (image and depth) -> Normalize.
    No blur, no rotation. Eval: Normalize."""
    if not train:
        return normalize()
    return v2.Compose([color_jitter(), v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5), normalize()])


def detection_transform(train=False, blur_scale=1.0):
    """Train (ssl4gie.md §2.3): ColorJitter -> blur 25 -> rot90 p=0.5 -> hflip -> vflip (the 8
    dihedral transforms), jointly on Image and BoundingBoxes; no Normalize (the detector does
    it). ``blur_scale``: working size / original size when the image was shrunk before
    augmentation, so the blur matches the reference's blur of the full image. Eval: identity."""
    if not train:
        return v2.Identity()
    return v2.Compose([
        color_jitter(), gaussian_blur(blur_scale),
        RandomRot90(0.5), v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
    ])


# --- geometry helpers shared by datasets and task scripts -------------------------------------

def square_offsets(h, w):
    """Centred square canvas of side max(h, w) (reference ``make_square``, PIL paste at
    ((side - w) // 2, (side - h) // 2)). Returns (side, left, top)."""
    side = max(h, w)
    return side, (side - w) // 2, (side - h) // 2


def from_square(pred, h, w, mode="bilinear"):
    """Map a prediction on the square-padded, resized frame back to the original frame.

    pred: (..., S, S) tensor for an (h, w) original that was padded to a centred square and
    resized to S (depth datasets). Returns (..., h, w): resized to the square side, pad cropped.
    """
    side, left, top = square_offsets(h, w)
    lead = pred.shape[:-2]
    x = pred.reshape(-1, 1, *pred.shape[-2:]).float()
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    x = F.interpolate(x, size=(side, side), mode=mode, **kw)
    x = x[..., top:top + h, left:left + w]
    return x.reshape(*lead, h, w)


def fixed_size_geometry(h, w, fixed_size=None):
    """Where an (h, w) detection image goes on the model canvas.

    ``fixed_size=None``: unchanged. ``fixed_size=F`` (reference ViT path, F=1024, ssl4gie.md
    §2.3): an image larger than F is padded bottom/right to a multiple of the smallest integer
    factor k that makes it fit and shrunk by exactly 1/k (the reference pads to even and halves:
    k=2 for every Kvasir-SEG image at F=1024), never up-scaled, then zero-padded centred to F x F.
    Returns ``meta = {"orig_size": (h, w), "size": (h', w'), "k": k, "scale": (1/k, 1/k),
    "offset": (left, top), "canvas": (Hc, Wc)}`` with x_canvas = x / k + left.
    """
    if fixed_size is None:
        return {"orig_size": (h, w), "size": (h, w), "k": 1, "scale": (1.0, 1.0), "offset": (0, 0),
                "canvas": (h, w)}
    k = max(1, math.ceil(max(h, w) / fixed_size))
    nh, nw = -(-h // k), -(-w // k)
    left, top = (fixed_size - nw) // 2, (fixed_size - nh) // 2
    return {"orig_size": (h, w), "size": (nh, nw), "k": k, "scale": (1.0 / k, 1.0 / k),
            "offset": (left, top), "canvas": (fixed_size, fixed_size)}


def _box_affine(boxes, meta):
    sx, sy = meta["scale"]
    left, top = meta["offset"]
    s = torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
    o = torch.tensor([left, top, left, top], dtype=torch.float64)
    return s, o


def pad_boxes(boxes, meta):
    """Original-pixel xyxy boxes (n, 4) -> model canvas coordinates (see
    ``fixed_size_geometry``), as float64 so that no precision is lost on the way:
    ``unpad_boxes(pad_boxes(b, m), m)`` returns float32 boxes ``b`` exactly."""
    boxes = torch.as_tensor(boxes)
    s, o = _box_affine(boxes, meta)
    return boxes.double() * s + o


def unpad_boxes(boxes, meta, dtype=torch.float32):
    """Canvas xyxy boxes (n, 4) (e.g. detector predictions) -> original-image pixels, clipped
    to the original image; computed in float64, returned as ``dtype``."""
    boxes = torch.as_tensor(boxes)
    s, o = _box_affine(boxes, meta)
    out = (boxes.double() - o) / s
    h, w = meta["orig_size"]
    out = torch.minimum(out.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float64))
    return out.to(dtype)
