"""Two-view augmentations of each pretraining recipe, as its paper gives them.

Every view transform takes a PIL RGB image and returns a tuple of normalised (3, S, S)
views, so the unlabelled dataset yields the tuple and the loader collates it into a tuple of
(N, 3, S, S) batches. Pixel-valued parameters (blur kernel and sigma) are given at 224 px
and scale with the working size, as ``gissl.data.transforms`` does.
"""
import torch
from torchvision.transforms import v2

from gissl.data.transforms import REFERENCE_SIZE, GaussianBlur, normalize


class Views:
    """Apply each of ``transforms`` to the same image: PIL image -> tuple of (3, S, S) tensors."""

    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, image):
        return tuple(t(image) for t in self.transforms)


def _blur(image_size, p):
    # BYOL / SimSiam: kernel ~10 % of the image (23 px at 224), sigma ~ U(0.1, 2.0) px at 224.
    scale = image_size / REFERENCE_SIZE
    k = max(3, int(round(23 * scale)) // 2 * 2 + 1)
    return v2.RandomApply([GaussianBlur(k, (0.1 * scale, 2.0 * scale))], p=p)


def _view(image_size, min_scale, jitter, blur_p, solarize_p=0.0, color=1.0):
    # ``color`` scales every colour transform (jitter strengths, grayscale and solarize
    # probabilities): 1 = the paper, 0 = none. Colour is diagnostic in endoscopy (erythema,
    # z-line, bleeding), and invariance to it can remove exactly what a task needs.
    steps = [
        v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
    ]
    if color > 0:
        b, c, s, h = (j * color for j in jitter)
        steps += [v2.RandomApply([v2.ColorJitter(b, c, s, min(h, 0.5))], p=0.8),
                  v2.RandomGrayscale(p=min(0.2 * color, 1.0))]
    if blur_p > 0:
        steps.append(_blur(image_size, blur_p))
    if solarize_p * color > 0:
        steps.append(v2.RandomSolarize(threshold=0.5, p=min(solarize_p * color, 1.0)))
    steps.append(normalize())
    return v2.Compose(steps)


def byol_views(image_size=224, min_scale=0.08, color=1.0):
    """The asymmetric BYOL pair used by MoCo v3 (§4, "we follow BYOL's augmentation") and
    Barlow Twins (§2): crop scale U(0.08, 1), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
    grayscale p=0.2, blur p=1.0 / 0.1, solarize p=0.0 / 0.2."""
    jitter = (0.4, 0.4, 0.2, 0.1)
    return Views(_view(image_size, min_scale, jitter, 1.0, 0.0, color),
                 _view(image_size, min_scale, jitter, 0.1, 0.2, color))


def simsiam_views(image_size=224, min_scale=0.2, color=1.0):
    """SimSiam §A (also FPSiam, docs/fpsiam.md §a.1): two views from one pipeline: crop scale
    U(0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, blur p=0.5, flip."""
    view = _view(image_size, min_scale, (0.4, 0.4, 0.4, 0.1), 0.5, color=color)
    return Views(view, view)


def _crop_view(image_size, min_scale, flip):
    steps = [v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0),
                                  interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    steps += [v2.RandomHorizontalFlip()] if flip else []
    return v2.Compose(steps + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), normalize()])


def mae_views(image_size=224, min_scale=0.2, color=1.0):
    """MAE §A.1: one view, crop scale U(0.2, 1) (bicubic) and flip only (``color`` unused)."""
    return Views(_crop_view(image_size, min_scale, flip=True))


def _ssl_view(image_size, min_scale, color):
    # SLIP §4 / its code (SimCLR's augmentation): crop U(0.08, 1), ColorJitter(0.4, 0.4, 0.4, 0.1)
    # p=0.8, grayscale p=0.2, blur sigma U(0.1, 2) p=0.5, flip.
    return _view(image_size, min_scale, (0.4, 0.4, 0.4, 0.1), 0.5, color=color)


def simclr_views(image_size=224, min_scale=0.08, color=1.0):
    """SimCLR's two views as SLIP trains them (crop U(0.08, 1), colour, grey, blur, flip)."""
    view = _ssl_view(image_size, min_scale, color)
    return Views(view, view)


def clip_views(image_size=224, min_scale=0.5, color=1.0):
    """CLIP's one view in SLIP: crop scale U(0.5, 1), nothing else (``color`` unused)."""
    return Views(_crop_view(image_size, min_scale, flip=False))


def slip_views(image_size=224, min_scale=0.08, color=1.0):
    """SLIP: the CLIP view (crop U(0.5, 1)) and SimCLR's two views (crop U(``min_scale``, 1))."""
    ssl = _ssl_view(image_size, min_scale, color)
    return Views(_crop_view(image_size, 0.5, flip=False), ssl, ssl)


VIEWS = {"mocov3": byol_views, "barlowtwins": byol_views, "mae": mae_views,
         "simsiam": simsiam_views, "fpsiam": simsiam_views,
         "simclr": simclr_views, "clip": clip_views, "slip": slip_views}
