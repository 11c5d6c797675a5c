"""Picture helpers shared by every task's ``predict_*.py``: fonts, captions, panels, colour maps,
and where a prediction picture goes.

Pictures are PIL images; masks and maps are ``(h, w)`` tensors or arrays at the original
image size. A picture of test image ``i`` is saved as ``test{i}_{label}.png`` (the reference's
name), ``label`` being the run name without its dataset part (:func:`picture_label`).
"""
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from gissl.errors import UserError

# Colour map anchors (matplotlib's "magma" sampled at 0, 1/8, ..., 1), interpolated linearly.
_MAGMA = np.array([(0, 0, 4), (28, 16, 68), (79, 18, 123), (129, 37, 129), (181, 54, 122),
                   (229, 80, 100), (251, 135, 97), (254, 194, 135), (252, 253, 191)], np.float32)


def text_font(size):
    """PIL's default font at ``size`` px (the fixed bitmap font where Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 or without FreeType: one fixed-size bitmap font
        return ImageFont.load_default()


def caption(image, text, corner="top"):
    """Write ``text`` on a dark box in a corner of a PIL image (in place); returns the image."""
    draw = ImageDraw.Draw(image)
    font = text_font(max(12, image.height // 18))
    box = draw.textbbox((0, 0), text, font=font)
    w, h = box[2] - box[0] + 8, box[3] - box[1] + 8
    y = 0 if corner == "top" else image.height - h
    draw.rectangle([0, y, w, y + h], fill=(0, 0, 0))
    draw.text((4 - box[0], y + 4 - box[1]), text, fill=(255, 255, 255), font=font)
    return image


def hstack(images, gap=4):
    """Place PIL images side by side on a white strip (tops aligned)."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(im.height for im in images)), (255, 255, 255))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def with_bar(image, bar):
    """``image`` with ``bar`` (e.g. :func:`scale_bar`) under it."""
    out = Image.new("RGB", (image.width, image.height + bar.height + 2), (255, 255, 255))
    out.paste(image, (0, 0))
    out.paste(bar, (0, image.height + 2))
    return out


def outline(mask, width):
    """(h, w) bool mask -> its boundary band of about ``width`` px (dilation minus the mask)."""
    m = mask[None, None].float()
    grown = F.max_pool2d(m, 2 * width + 1, stride=1, padding=width)
    return (grown[0, 0] > 0) & ~mask


def colourize(values, vmax, invalid=None):
    """(h, w) array -> (h, w, 3) uint8 magma colours; 0 → dark, ``vmax`` and beyond → bright
    (saturating). ``invalid`` pixels are black."""
    x = np.clip(np.asarray(values, np.float32) / vmax, 0, 1) * (len(_MAGMA) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_MAGMA) - 2)
    frac = (x - lo)[..., None]
    rgb = _MAGMA[lo] * (1 - frac) + _MAGMA[lo + 1] * frac
    if invalid is not None:
        rgb[invalid] = 0
    return rgb.round().astype(np.uint8)


def heat_colours(heat):
    """`(H, W)` values -> `(H, W, 3)` uint8 blue→red ("jet"-like), scaled to the map's range."""
    heat = torch.as_tensor(heat, dtype=torch.float32)
    span = heat.max() - heat.min()
    # a flat map (e.g. Grad-CAM on a 1×1 last stage) is shown flat, not as amplified noise
    v = (heat - heat.min()) / span if span > 1e-6 * heat.abs().max().clamp(min=1e-12) else torch.zeros_like(heat)
    rgb = torch.stack([(1.5 - (4 * v - 3).abs()), (1.5 - (4 * v - 2).abs()), (1.5 - (4 * v - 1).abs())], -1)
    return (rgb.clamp(0, 1) * 255).to(torch.uint8).numpy()


def scale_bar(width, vmax, label, near_bright=False, saturates=False):
    """A horizontal colour bar from 0 (left) to ``vmax`` (right) with its end values, as a PIL
    image ``width`` px wide; ``near_bright`` uses the depth panels' reversed colours."""
    ramp = np.linspace(0, vmax, width)[None].repeat(10, 0)
    bar = Image.fromarray(colourize(vmax - ramp if near_bright else ramp, vmax))
    font = text_font(12)
    out = Image.new("RGB", (width, 30), (255, 255, 255))
    out.paste(bar, (0, 0))
    draw = ImageDraw.Draw(out)
    draw.text((1, 12), "0", fill=(0, 0, 0), font=font)
    draw.text((width // 2, 12), label, fill=(0, 0, 0), font=font, anchor="ma")
    draw.text((width - 1, 12), f"{vmax:.0f}{'+' if saturates else ''}", fill=(0, 0, 0), font=font, anchor="ra")
    return out


def picture_label(run_name):
    """The reference's prediction-file label: the run name without its dataset part."""
    return run_name.rsplit("-dataset_", 1)[0]


def select_positions(positions, n):
    """Test positions ``positions`` (0-based, from ``--idx``; ``None`` = all ``n``), checked."""
    if positions is None:
        return list(range(n))
    bad = [i for i in positions if not 0 <= i < n]
    if bad:
        raise UserError(f"--idx {','.join(map(str, bad))} outside the test split (0..{n - 1})")
    return list(positions)


def save_picture(picture, folder, position, label):
    """Save ``picture`` (PIL) as ``<folder>/test{position}_{label}.png``; returns the path as str."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"test{position}_{label}.png"
    picture.save(path)
    return os.fspath(path)
