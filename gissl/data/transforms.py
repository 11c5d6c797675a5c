"""Per-task transforms with SSL4GIE's augmentation ranges (docs/ssl4gie-study.md §2.2-2.5).

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


def _adjust_hue(img, hue_factor):
    """HSV hue shift by ``hue_factor`` turns, the same result as torchvision's ``adjust_hue``
    (each pixel keeps its max and min, its hue angle moves) without the full RGB->HSV->RGB
    round trip and without ``torch.where`` (slow on CPU): ~5x faster at 224 px.
    img: (..., 3, H, W) float in [0, 1]."""
    r, g, b = img.unbind(-3)
    mx = torch.maximum(torch.maximum(r, g), b)
    chroma = mx - torch.minimum(torch.minimum(r, g), b)
    inv = chroma.clamp_min(1e-12).reciprocal_()  # grey pixels: numerator 0, hue 0 as torchvision
    # which channel is the max picks the hue formula; ties go to r, then g (torchvision's order)
    m_r = (mx == r).to(img.dtype)
    m_g = (mx == g).to(img.dtype).mul_(1 - m_r)
    m_b = 1 - m_r - m_g
    h6 = (m_r * (g - b) + m_g * (b - r) + m_b * (r - g)).mul_(inv).add_(2 * m_g + 4 * m_b)  # sextants
    # R, G, B = f(5), f(3), f(1) with f(n) = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + h6') mod 6
    n = torch.tensor([5.0, 3.0, 1.0], dtype=img.dtype).view(3, 1, 1) + 6 * hue_factor
    k = h6.unsqueeze(-3) + n
    k = k - 6 * torch.floor(k * (1 / 6))
    return mx.unsqueeze(-3) - chroma.unsqueeze(-3) * torch.minimum(k, 4 - k).clamp_(0, 1)


class ColorJitter(v2.Transform):
    """torchvision ColorJitter (same factor ranges, same random order of the four operations,
    image only) with a faster exact hue step (``_adjust_hue``). Input: float image in [0, 1]."""

    def __init__(self, brightness, contrast, saturation, hue):
        super().__init__()
        self.brightness = (max(0.0, 1 - brightness), 1 + brightness)
        self.contrast = (max(0.0, 1 - contrast), 1 + contrast)
        self.saturation = (max(0.0, 1 - saturation), 1 + saturation)
        self.hue = (-hue, hue)

    def make_params(self, flat_inputs):
        u = [float(torch.empty(1).uniform_(*r)) for r in (self.brightness, self.contrast, self.saturation, self.hue)]
        return {"order": torch.randperm(4).tolist(), "factors": u}

    def transform(self, inpt, params):
        if not _image_only(inpt):
            return inpt
        out = inpt.as_subclass(torch.Tensor)
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, _adjust_hue)
        for i in params["order"]:
            out = ops[i](out, params["factors"][i])
        return tv_tensors.wrap(out, like=inpt)


def color_jitter():
    # docs/ssl4gie-study.md §2.2-2.5: the same jitter in all four tasks.
    return ColorJitter(brightness=0.4, contrast=0.5, saturation=0.25, hue=0.01)


def _image_only(inpt):
    """True for the image (to be transformed), False for masks/boxes (passed through). The
    photometric transforms here work on float tensors only: anything else is a pipeline error."""
    if isinstance(inpt, (tv_tensors.Mask, tv_tensors.BoundingBoxes)):
        return False
    if not isinstance(inpt, torch.Tensor) or not inpt.is_floating_point():
        raise UserError(f"gissl transforms expect a float image tensor in [0, 1], got {type(inpt).__name__}"
                        f"{'' if not isinstance(inpt, torch.Tensor) else ' of dtype ' + str(inpt.dtype)}; "
                        f"put v2.ToImage() and v2.ToDtype(torch.float32, scale=True) before them")
    return True


class GaussianBlur(v2.Transform):
    """Gaussian blur of the image only (masks, depth and boxes pass through), sigma ~ U(lo, hi)
    per call, reflect padding like torchvision's. Separable (two 1-D passes) and truncated at
    5 sigma: at most 2 x 11 taps per pixel instead of torchvision's 25 x 25 = 625, which made it
    the most expensive op of the reference pipeline."""

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
        sigma = params["sigma"]
        # Taps beyond 5 sigma weigh < 4e-6 of the centre: dropping them changes no 8-bit value and
        # makes the reference's 25-tap kernel (sigma <= 2) 11 taps at most.
        half = min(self.kernel_size // 2, max(0, math.ceil(5 * sigma)))
        if half == 0:
            return inpt
        x = torch.arange(-half, half + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = (kernel / kernel.sum()).tolist()
        img = inpt.as_subclass(torch.Tensor).reshape(-1, *inpt.shape[-2:])
        h, w = img.shape[-2:]
        mode = "reflect" if half < min(h, w) else "replicate"  # reflect needs pad < size
        # one fused in-place multiply-add per tap and pass (cheaper than conv2d at these sizes)
        padded = F.pad(img[None], (half, half, 0, 0), mode=mode)[0]
        out = padded[..., :w] * kernel[0]
        for i in range(1, 2 * half + 1):
            out.add_(padded[..., i:i + w], alpha=kernel[i])
        padded = F.pad(out[None], (0, 0, half, half), mode=mode)[0]
        out = padded[..., :h, :] * kernel[0]
        for i in range(1, 2 * half + 1):
            out.add_(padded[..., i:i + h, :], alpha=kernel[i])
        return tv_tensors.wrap(out.reshape(inpt.shape), like=inpt)


def gaussian_blur(scale=1.0):
    """The reference's GaussianBlur((25, 25), (0.001, 2.0)); ``scale`` = working size / 224."""
    k = max(1, int(round(25 * scale)) // 2 * 2 + 1)
    return GaussianBlur(k, (0.001 * scale, 2.0 * scale))


class RandomRot90(v2.Transform):
    """With probability p rotate 90 degrees counter-clockwise, as the reference's detection
    ``torch.rot90(x, dims=[1, 2])`` (docs/ssl4gie-study.md §2.3): a box (x1, y1, x2, y2) on a W-wide image
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


def _inverse_affine(angle, translate, scale, shear):
    """Inverse of torchvision's affine map about the image centre (``F.affine`` convention:
    R(angle) S(scale) SHy SHx then translate), as [a, b, c, d, e, f]: src = (a x + b y + c,
    d x + e y + f) with coordinates relative to the image centre."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]  # det of the RSS part is 1
    tx, ty = translate
    m[2] = -(m[0] * tx + m[1] * ty)
    m[5] = -(m[3] * tx + m[4] * ty)
    return m


class RandomAffine(v2.Transform):
    """``v2.RandomAffine`` / ``v2.RandomRotation`` with nearest interpolation and fill 0, same
    parameter sampling and geometry as torchvision (checked against ``F.affine`` in the tests),
    but the source-pixel map is computed once per call and gathered for the image and every
    mask, instead of one ``grid_sample`` per tensor. Boxes go through ``F.affine``.

    rotation_only: angle ~ U(-degrees, degrees) with ``F.rotate``'s sign convention.
    """

    def __init__(self, degrees, translate=None, scale=None, shear=None, rotation_only=False):
        super().__init__()
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, scale, shear
        self.rotation_only = rotation_only

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        angle = float(torch.empty(1).uniform_(-self.degrees, self.degrees))
        tx = ty = 0
        if self.translate is not None:  # torchvision rounds the pixel shift
            tx = int(round(float(torch.empty(1).uniform_(-self.translate[0] * w, self.translate[0] * w))))
            ty = int(round(float(torch.empty(1).uniform_(-self.translate[1] * h, self.translate[1] * h))))
        scale = float(torch.empty(1).uniform_(*self.scale)) if self.scale is not None else 1.0
        shear = (float(torch.empty(1).uniform_(*self.shear)) if self.shear is not None else 0.0, 0.0)
        if self.rotation_only:
            angle = -angle  # F.rotate(x, a) == F.affine(x, -a) in torchvision's matrix convention
            params = {"angle": -angle}
        else:
            params = {"angle": angle, "translate": [tx, ty], "scale": scale, "shear": list(shear)}
        m = _inverse_affine(angle, (tx, ty), scale, shear)
        ys = torch.arange(h, dtype=torch.float32) - (h - 1) * 0.5
        xs = torch.arange(w, dtype=torch.float32) - (w - 1) * 0.5
        sx = torch.round(m[0] * xs[None, :] + m[1] * ys[:, None] + m[2] + (w - 1) * 0.5)
        sy = torch.round(m[3] * xs[None, :] + m[4] * ys[:, None] + m[5] + (h - 1) * 0.5)
        valid = ((sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)).float()
        index = ((sy * w + sx) * valid).long().flatten()  # out-of-image pixels read pixel 0, then x 0
        return dict(params, index=index, valid=valid.flatten(), size=(h, w))

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            if self.rotation_only:
                return TF.rotate(inpt, params["angle"])
            return TF.affine(inpt, angle=params["angle"], translate=params["translate"], scale=params["scale"],
                             shear=params["shear"])
        if not isinstance(inpt, torch.Tensor) or tuple(inpt.shape[-2:]) != params["size"]:
            return inpt
        flat = inpt.as_subclass(torch.Tensor).reshape(-1, params["index"].numel())
        out = torch.index_select(flat, 1, params["index"]).mul_(params["valid"].to(flat.dtype))  # fill 0
        return tv_tensors.wrap(out.reshape(inpt.shape), like=inpt)


def classification_transform(image_size=224, train=False):
    """Train (docs/ssl4gie-study.md §2.2): ColorJitter -> blur 25 -> hflip -> vflip -> rotation U(-180, 180)
    (nearest, black fill) -> Normalize. Eval: Normalize. Input: resized Image in [0, 1]."""
    if not train:
        return normalize()
    return v2.Compose([
        color_jitter(), gaussian_blur(image_size / REFERENCE_SIZE),
        v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
        RandomAffine(180, rotation_only=True),  # nearest, black fill
        normalize(),
    ])


def segmentation_transform(image_size=224, train=False):
    """Train (docs/ssl4gie-study.md §2.4): ColorJitter -> blur 25 -> hflip -> vflip -> affine (always):
    angle U(-180, 180), translate U(-S/8, S/8) px, scale U(0.5, 1.5), x-shear U(-22.5, 22.5),
    nearest -> Normalize. Applied jointly to Image and Mask.

    Fill: the affine runs before Normalize and fills 0, i.e. black image / background mask. The
    reference filled -1.0 after normalisation, a grey that never occurs in endoscopy (docs/ssl4gie-study.md §8 item 17).
    """
    if not train:
        return normalize()
    return v2.Compose([
        color_jitter(), gaussian_blur(image_size / REFERENCE_SIZE),
        v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
        RandomAffine(180, translate=(1 / 8, 1 / 8), scale=(0.5, 1.5), shear=(-22.5, 22.5)),
        normalize(),
    ])


def depth_transform(image_size=224, train=False):
    """Train (docs/ssl4gie-study.md §2.5): ColorJitter -> hflip -> vflip (image and depth) -> Normalize.
    No blur, no rotation. Eval: Normalize."""
    if not train:
        return normalize()
    return v2.Compose([color_jitter(), v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5), normalize()])


def detection_transform(train=False, blur_scale=1.0):
    """Train (docs/ssl4gie-study.md §2.3): ColorJitter -> blur 25 -> rot90 p=0.5 -> hflip -> vflip (the 8
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

    ``fixed_size=None``: unchanged. ``fixed_size=F`` (reference ViT path, F=1024, docs/ssl4gie-study.md
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
