"""Built-in synthetic endoscopy datasets in the real on-disk formats.

``python -m gissl.data.synthetic --dataset Kvasir --out DIR [--num N] [--seed S]`` writes one
dataset; ``synthetic_root(dataset)`` generates it once under a cache folder and returns its root
(task scripts use it when ``--data-root`` is omitted).

Rendering model (vectorised numpy, a few ms per image): the camera looks down a tube of radius
~15 mm with haustral folds, lit by a point light at the camera (intensity ~ cos / distance^2),
so shading, vignetting and the dark far lumen all follow from one depth map (the C3VD depth
targets are that same map). The mucosa has a pink albedo with vessel-like lines and bumps
fixed to the tube surface (they move consistently across the frames of a video), specular
highlights where the wet surface faces the light, and black corners like an endoscope aperture.
Polyps are shaded domes with lobed outlines whose mask and box are exact. HyperKvasir classes
differ by visible motifs (shaft of a retroflexed scope, pylorus ring, z-line boundary, ulcer
spots, erosion streaks, ...), see ``_CLASS_STYLES``; their colour varies per image, not per class.

Formats (as downloaded): Kvasir-SEG ``images/*.jpg``, ``masks/*.jpg`` (RGB JPEG), ``kavsir_bboxes.json``;
CVC-ClinicDB ``Original/N.tif``, ``Ground Truth/N.tif``; HyperKvasir
``labeled-images/<tract>/<category>/<class>/*.jpg``; HyperKvasir unlabelled: flat folder of JPEGs;
C3VD ``<sequence>/<video>/{N}_color.png`` + ``{N}_depth.tiff`` (uint16, 0..65535 = 0..100 mm);
captions: ``captions.csv`` (``image,caption``, two captions per image) + ``images/*.jpg``, HyperKvasir
classes and polyp frames whose captions say what is drawn (class, polyp present, size, location).
"""

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image

from gissl.errors import UserError

VERSION = 4  # bump when the rendering changes so cached copies are regenerated
DATASETS = ("Kvasir", "CVC", "Hyperkvasir_anatomical", "Hyperkvasir_pathological", "Hyperkvasir_unlabelled", "C3VD",
            "captions")
# --num meaning per dataset: images (Kvasir, CVC, unlabelled), images per class (HyperKvasir),
# frames per video (C3VD), captioned images (captions).
DEFAULT_NUM = {"Kvasir": 200, "CVC": 100, "Hyperkvasir_anatomical": 40, "Hyperkvasir_pathological": 40,
               "Hyperkvasir_unlabelled": 300, "C3VD": 12, "captions": 600}
_C3VD_TRAIN_VIDEOS = ("cecum_t1_a_under_review/c1v1", "sigmoid_t3_a_under_review/s3v1",
                      "desc_t4_a_under_review/d4v1", "trans_t1_a_under_review/t1v1")

_F32 = np.float32


# --- procedural textures -----------------------------------------------------------------------

def _waves(rng, n, max_m, w_range):
    """Random sinusoid bank on the tube surface: integer angular frequencies keep it periodic."""
    return (rng.integers(1, max_m + 1, n) * rng.choice([-1, 1], n), rng.uniform(*w_range, n),
            rng.uniform(0, 2 * np.pi, n), rng.uniform(0.5, 1.0, n))


def _eval_waves(waves, theta, s):
    """Sum of the bank's sinusoids at surface coordinates (theta, s); evaluated on every other
    pixel and upsampled (the field is smooth; sharp vessel lines come from thresholding it)."""
    m, w, phase, amp = waves
    h, wd = theta.shape
    th, ss = theta[::2, ::2], s[::2, ::2]
    out = np.zeros(th.shape, _F32)
    for k in range(len(m)):
        out += _F32(amp[k]) * np.sin(_F32(m[k]) * th + _F32(w[k]) * ss + _F32(phase[k]))
    out /= _F32(np.sqrt(0.5 * (amp ** 2).sum()))  # unit variance
    return np.asarray(Image.fromarray(out, "F").resize((wd, h), Image.BILINEAR,
                                                       box=(0, 0, wd / 2, h / 2)))


def _smooth_noise(rng, h, w, cells):
    """Image-space smooth noise, unit-ish variance: a random grid upsampled bicubically."""
    g = rng.standard_normal((max(2, int(cells * h / w)), max(2, int(cells)))).astype(_F32)
    return np.asarray(Image.fromarray(g, "F").resize((w, h), Image.BICUBIC))


class _Scene:
    """Tube geometry for one view. vp: vanishing point (lumen centre) in pixels."""

    def __init__(self, rng, h, w, vp=None, radius=None, folds=None, z_offset=0.0, waves=None, zmax=100.0):
        self.h, self.w = h, w
        y, x = np.mgrid[0:h, 0:w].astype(_F32)
        self.x, self.y = x, y
        if vp is None:  # lumen in view half of the time, otherwise a wall view
            vp = (rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h) if rng.random() < 0.6 else \
                (rng.uniform(-0.6, 1.6) * w, rng.uniform(-0.6, 1.6) * h)
        vp = (float(vp[0]), float(vp[1]))
        self.vp = vp
        f = 0.55 * max(h, w)
        u, v = (x - vp[0]) / f, (y - vp[1]) / f
        rho = np.sqrt(u * u + v * v) + 1e-3
        self.theta = np.arctan2(v, u)
        r0 = radius if radius is not None else rng.uniform(12, 18)
        amp, period, phase = folds if folds is not None else (rng.uniform(0.05, 0.18), rng.uniform(12, 25), rng.uniform(0, 6.3))
        z0 = r0 / rho
        ang = 2 * np.pi * (z0 + z_offset) / period + phase
        amp = amp / (1 + z0 / 25)  # distant folds fade out instead of aliasing into rings
        rad = r0 * (1 + amp * np.sin(ang))
        drdz = r0 * amp * 2 * np.pi / period * np.cos(ang)
        z = rad / rho
        # cosine between the inward wall normal and the ray back to the camera / light
        cos = (rho - drdz) / (np.sqrt(1 + rho * rho) * np.sqrt(1 + drdz * drdz))
        self.cos = np.clip(cos, 0.03, 1.0).astype(_F32)
        self.depth = np.minimum(z, zmax).astype(_F32)  # mm along the optical axis
        self.far = z >= zmax
        self.s = (z + z_offset).astype(_F32)  # surface coordinate along the tube
        dist2 = z * z * (1 + rho * rho)
        # diffuse term plus some inter-reflection so fold shadows are not pitch black
        light = (0.3 + 0.7 * self.cos) * (r0 * r0 * 1.3) / dist2
        self.light = (1 - np.exp(-1.8 * light)).astype(_F32)
        self.waves = waves if waves is not None else (_waves(rng, 10, 8, (0.05, 0.4)), _waves(rng, 10, 14, (0.2, 0.9)))

    def mucosa(self, rng, tint, vessels=1.0):
        """Albedo (h, w, 3): pink base, low-frequency mottling, dark-red vessel lines."""
        mottle = _eval_waves(self.waves[0], self.theta, self.s)
        lines = _eval_waves(self.waves[1], self.theta, self.s)
        vessel = np.exp(-(lines / 0.12) ** 2) * vessels
        base = np.array([0.86, 0.42, 0.36], _F32) * np.asarray(tint, _F32)
        alb = base[None, None] * (1 + 0.10 * mottle)[..., None]
        alb = alb * (1 - 0.35 * vessel[..., None] * np.array([0.4, 1.0, 0.9], _F32))
        alb = alb * (1 + 0.05 * _smooth_noise(rng, self.h, self.w, max(4, self.w // 12)))[..., None]
        return alb

    def shade(self, rng, albedo, aperture=True, specular=True):
        img = albedo * self.light[..., None]
        if specular:  # wet highlights: bumps that face the light
            bumps = _smooth_noise(rng, self.h, self.w, max(6, self.w // 10))
            spec = np.clip((bumps - 2.0) * 3, 0, 1) * np.clip((self.cos - 0.6) * 3, 0, 1) * (self.light > 0.5)
            img = img * (1 - spec[..., None]) + spec[..., None] * 1.0
        # lens vignetting, then the black corners of the endoscope's circular field stop
        rr = ((self.x - self.w / 2) / (self.w / 2)) ** 2 + ((self.y - self.h / 2) / (self.h / 2)) ** 2
        img = img * (1 - 0.25 * rr)[..., None]
        if aperture:
            img = img * np.clip((1.32 - np.sqrt(rr)) * 25, 0, 1)[..., None]
        return np.clip(img, 0, 1)


def _blob(rng, h, w, cx, cy, radius, aspect=None, lobes=0.1):
    """Lobed elliptic outline around (cx, cy): returns (mask bool, height in [0, 1]), both
    (h, w). Only the window that can contain the blob is computed."""
    ang = rng.uniform(0, np.pi)
    a = aspect if aspect is not None else rng.uniform(0.7, 1.0)
    coef = [(rng.uniform(0, lobes), rng.uniform(0, 6.3)) for _ in range(4)]
    reach = radius * (1 + 4 * lobes) + 2
    x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 1)
    y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 1)
    mask, hgt = np.zeros((h, w), bool), np.zeros((h, w), _F32)
    if x0 >= x1 or y0 >= y1:
        return mask, hgt
    y, x = np.mgrid[y0:y1, x0:x1].astype(_F32)
    dx, dy = x - _F32(cx), y - _F32(cy)
    c, s_ = _F32(np.cos(ang)), _F32(np.sin(ang))
    rx = (dx * c + dy * s_) / _F32(radius)
    ry = (-dx * s_ + dy * c) / _F32(radius * a)
    phi = np.arctan2(ry, rx)
    edge = np.ones_like(phi)
    for k, (ck, pk) in zip((2, 3, 4, 5), coef):
        edge += _F32(ck) * np.cos(_F32(k) * phi + _F32(pk))
    rr = np.sqrt(rx * rx + ry * ry) / edge
    mask[y0:y1, x0:x1] = rr < 1
    hgt[y0:y1, x0:x1] = np.sqrt(np.clip(1 - rr * rr, 0, 1))
    return mask, hgt


def _polyp(rng, img, light, cx, cy, radius):
    """Paint a polyp (shaded dome, redder and paler than the mucosa) into img in place;
    returns its exact mask (h, w) bool."""
    h, w = img.shape[:2]
    mask, hgt = _blob(rng, h, w, cx, cy, radius)
    if not mask.any():
        return mask
    ys, xs = np.nonzero(mask)
    win = (slice(max(0, ys.min() - 1), ys.max() + 2), slice(max(0, xs.min() - 1), xs.max() + 2))
    m, hg = mask[win], hgt[win]
    gy, gx = np.gradient(hg * _F32(radius * 0.6))
    nz = 1 / np.sqrt(1 + gx * gx + gy * gy)
    lam = np.clip((-0.35 * gx - 0.35 * gy) * nz + 0.87 * nz, 0, 1)  # light a little from top-left
    tint = np.array([1.0, rng.uniform(0.45, 0.7), rng.uniform(0.45, 0.65)], _F32) * _F32(rng.uniform(0.85, 1.05))
    tex = 1 + 0.08 * _smooth_noise(rng, m.shape[0], m.shape[1], max(3, m.shape[1] // 8))
    local = _F32(max(float(np.median(light[mask])), 0.45))
    col = tint[None, None] * (local * (0.35 + 0.75 * lam) * tex)[..., None]
    spec = np.clip((nz - 0.985) * 60, 0, 1) * (hg > 0.3)
    col = col * (1 - spec[..., None]) + spec[..., None]
    sub = img[win]
    sub[m] = np.clip(col[m], 0, 1)
    return mask


def _spots(rng, img, n, radius, color, strength=0.85):
    h, w = img.shape[:2]
    for _ in range(n):
        m, hgt = _blob(rng, h, w, rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h,
                       radius * rng.uniform(0.6, 1.3), lobes=0.25)
        a = (np.clip(hgt * 3, 0, 1) * strength)[..., None]
        img[:] = img * (1 - a) + a * np.asarray(color, _F32) * (0.6 + 0.4 * img.mean(-1, keepdims=True) / max(img.mean(), 1e-3))


def _streaks(rng, img, scene, n, width, color):
    """Linear erosions radiating from the lumen (oesophagitis)."""
    for _ in range(n):
        t0 = rng.uniform(-np.pi, np.pi)
        d = np.angle(np.exp(1j * (scene.theta - t0)))
        a = (np.exp(-(d / width) ** 2) * (scene.depth < 40) * 0.8)[..., None]
        img[:] = img * (1 - a) + a * np.asarray(color, _F32) * scene.light[..., None]


def _shaft(rng, img):
    """The endoscope's own shaft seen in retroflexion: a dark glossy band from one edge."""
    h, w = img.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(_F32)
    side = rng.integers(4)
    ex, ey = [(0.5 * w, h), (0.5 * w, 0), (0, 0.5 * h), (w, 0.5 * h)][side]
    ex += rng.uniform(-0.2, 0.2) * w if side < 2 else 0
    ey += rng.uniform(-0.2, 0.2) * h if side >= 2 else 0
    tx, ty = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    dx, dy = tx - ex, ty - ey
    L = np.hypot(dx, dy)
    t = np.clip(((x - ex) * dx + (y - ey) * dy) / (L * L), 0, 1)
    dist = np.hypot(x - ex - t * dx, y - ey - t * dy)
    rad = 0.16 * min(h, w) * (1.2 - 0.5 * t)
    inside = dist < rad
    prof = np.sqrt(np.clip(1 - (dist / rad) ** 2, 0, 1))
    col = (0.12 + 0.25 * prof ** 4)[..., None] * np.array([1, 1, 1.05], _F32)
    img[inside] = col[inside]


def _zline(rng, img, scene, pale, tongues):
    """Squamo-columnar boundary ring: near (pale squamous) vs far (red gastric); Barrett's adds
    salmon 'tongues' reaching towards the camera."""
    zb = rng.uniform(25, 40)
    edge = zb * (1 + 0.08 * np.sin(3 * scene.theta + rng.uniform(0, 6)))
    if tongues:
        k = rng.integers(2, 4)
        edge = edge * (1 - tongues * np.clip(np.cos(k * scene.theta + rng.uniform(0, 6)), 0, 1) ** 3)
    near = (scene.depth < edge)[..., None]
    img[:] = np.where(near, img * np.asarray(pale, _F32), img)


def _pylorus(rng, img, scene):
    h, w = img.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(_F32)
    cx, cy = scene.vp
    if not (0 <= cx < w and 0 <= cy < h):
        cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    r = np.hypot(x - cx, y - cy) / (0.12 * min(h, w))
    ring = np.exp(-((r - 1.6) / 0.5) ** 2)[..., None]
    img[:] = img * (1 + 0.5 * ring) * np.clip(r, 0.05, 1)[..., None] ** 0.7


# class id -> (motif, parameter); the same id order as gissl.data.HYPERKVASIR_CLASSES. Classes
# differ by structure only: the mucosa's tint (white balance, light, patient) is drawn per image
# from one distribution for every class (``_random_tint``). Version 2 tied a tint to each class,
# a global-colour shortcut that real HyperKvasir does not offer: any random network read it off,
# and the SSL papers' colour augmentations trained it away.
_CLASS_STYLES = {
    "anatomical": [("fold", 0), ("villi", 0), ("shaft", 0), ("pylorus", 0), ("shaft_rugae", 0), ("zline", 0)],
    "pathological": [("hemorrhoids", 0), ("polyp", 0)] + [("ulcer", g) for g in (0.5, 1.5, 1.0, 2.5, 2.0, 3.0)]
    + [("barrett", 0.2), ("barrett", 0.45),  # short segment, barretts
       ("erosion", 2), ("erosion", 6)],
}


def _random_tint(rng):
    """Per-image multiplier of the pink base albedo (R, G, B): white balance and light vary."""
    return (1.0, rng.uniform(0.8, 1.25), rng.uniform(0.7, 1.25))


def render_class_image(rng, h, w, subset, label):
    """One HyperKvasir-like image (h, w, 3) uint8 of class ``label``."""
    motif, p = _CLASS_STYLES[subset][label]
    tint = _random_tint(rng)
    lumen = motif in ("pylorus", "zline", "barrett", "erosion", "ulcer")
    vp = (rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h) if lumen else None
    folds = (rng.uniform(0.25, 0.35), rng.uniform(6, 9), rng.uniform(0, 6)) if motif == "shaft_rugae" else None
    scene = _Scene(rng, h, w, vp=vp, folds=folds)
    alb = scene.mucosa(rng, tint, vessels=0.3 if motif == "ulcer" else 1.0)
    if motif == "villi":
        alb = alb * (1 + 0.18 * _smooth_noise(rng, h, w, w // 4))[..., None]
    img = scene.shade(rng, alb)
    if motif == "fold":  # appendiceal orifice: a dark crescent
        m, hgt = _blob(rng, h, w, rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, 0.18 * min(h, w), aspect=0.25)
        img[m] *= 0.35
    elif motif in ("shaft", "shaft_rugae"):
        _shaft(rng, img)
    elif motif == "pylorus":
        _pylorus(rng, img, scene)
    elif motif == "zline":
        _zline(rng, img, scene, (1.15, 1.5, 1.55), 0)
    elif motif == "barrett":
        _zline(rng, img, scene, (1.15, 1.5, 1.55), p)
    elif motif == "erosion":
        _streaks(rng, img, scene, int(p), 0.06 + 0.03 * (p > 3), (0.95, 0.1, 0.1))
    elif motif == "ulcer":
        _spots(rng, img, int(2 * p) + 1, 0.03 * min(h, w) * (1 + p / 3), (0.95, 0.92, 0.85))
    elif motif == "hemorrhoids":
        _spots(rng, img, 3, 0.12 * min(h, w), (0.45, 0.25, 0.55), strength=0.7)
        _shaft(rng, img)
    elif motif == "polyp":
        _polyp(rng, img, scene.light, rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h,
               rng.uniform(0.12, 0.25) * min(h, w))
    return _to_uint8(img)


def _to_uint8(img):
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_polyp_image(rng, h, w, n_polyps=1, aperture=True):
    """Colonoscopy frame with polyps. Returns (image (h, w, 3) uint8, mask (h, w) bool,
    boxes [[xmin, ymin, xmax, ymax]] in pixel-edge coordinates, one per polyp)."""
    scene = _Scene(rng, h, w)
    img = scene.shade(rng, scene.mucosa(rng, (1.0, rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1))), aperture=aperture)
    mask = np.zeros((h, w), bool)
    boxes = []
    placed = []
    for _ in range(n_polyps):
        for _try in range(20):  # keep polyps apart so each box bounds exactly one blob
            radius = rng.uniform(0.12, 0.28) * min(h, w)
            cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
            if all(np.hypot(cx - px, cy - py) > 1.6 * (radius + pr) for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        m = _polyp(rng, img, scene.light, cx, cy, radius)
        if not m.any():
            continue
        mask |= m
        ys, xs = np.nonzero(m)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    return _to_uint8(img), mask, boxes


# --- dataset writers ---------------------------------------------------------------------------

def _name(rng):
    # Kvasir-SEG / HyperKvasir file names are 25-char ids like "cju0qkwl35piu0993l0dewei2"
    return "c" + "".join(rng.choice(list("0123456789abcdefghijklmnopqrstuvwxyz"), 24))


def _write_kvasir(out, num, rng):
    os.makedirs(os.path.join(out, "images"))
    os.makedirs(os.path.join(out, "masks"))
    table = {}
    for _ in range(num):
        h, w = int(rng.integers(256, 360)), int(rng.integers(300, 400))
        img, mask, boxes = render_polyp_image(rng, h, w, n_polyps=1 + int(rng.random() < 0.1))
        stem = _name(rng)
        Image.fromarray(img).save(os.path.join(out, "images", stem + ".jpg"), quality=90)
        # Kvasir-SEG masks are RGB JPEGs (soft edges after compression)
        Image.fromarray(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, -1)).save(
            os.path.join(out, "masks", stem + ".jpg"), quality=90)
        table[stem] = {"height": h, "width": w, "bbox": [
            {"label": "polyp", "xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3]} for b in boxes]}
    with open(os.path.join(out, "kavsir_bboxes.json"), "w") as f:
        json.dump(table, f)


def _write_cvc(out, num, rng):
    os.makedirs(os.path.join(out, "Original"))
    os.makedirs(os.path.join(out, "Ground Truth"))
    for i in range(1, num + 1):
        img, mask, _ = render_polyp_image(rng, 216, 288, aperture=False)
        Image.fromarray(img).save(os.path.join(out, "Original", f"{i}.tif"), compression="tiff_deflate")
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out, "Ground Truth", f"{i}.tif"),
                                                          compression="tiff_deflate")


def _write_hyperkvasir(out, num, rng, subset):
    from gissl.data.datasets import HYPERKVASIR_LAYOUT  # the reference's folder names and class order
    for label, (tract, category, cls) in enumerate(HYPERKVASIR_LAYOUT[subset]):
        folder = os.path.join(out, "labeled-images", tract, category, cls)
        os.makedirs(folder)
        for _ in range(num):
            h, w = int(rng.integers(224, 272)), int(rng.integers(272, 320))
            Image.fromarray(render_class_image(rng, h, w, subset, label)).save(
                os.path.join(folder, _name(rng) + ".jpg"), quality=90)


def _write_unlabelled(out, num, rng):
    from gissl.data.datasets import HYPERKVASIR_LAYOUT
    # hyper-kvasir-unlabeled-images.zip unpacks to unlabeled-images/images/*.jpg
    out = os.path.join(out, "unlabeled-images", "images")
    os.makedirs(out)
    for _ in range(num):
        h, w = int(rng.integers(224, 300)), int(rng.integers(280, 360))
        if rng.random() < 0.3:
            img = render_polyp_image(rng, h, w)[0]
        else:
            subset = "anatomical" if rng.random() < 0.5 else "pathological"
            img = render_class_image(rng, h, w, subset, int(rng.integers(len(HYPERKVASIR_LAYOUT[subset]))))
        Image.fromarray(img).save(os.path.join(out, _name(rng) + ".jpg"), quality=90)


def _write_c3vd(out, num, rng):
    from gissl.data.datasets import C3VD_TEST_VIDEOS, C3VD_VAL_VIDEOS
    h, w = 128, 160
    for video in _C3VD_TRAIN_VIDEOS + C3VD_VAL_VIDEOS + C3VD_TEST_VIDEOS:
        folder = os.path.join(out, *video.split("/"))
        os.makedirs(folder)
        vrng = np.random.default_rng(rng.integers(1 << 31))
        radius, folds = vrng.uniform(12, 18), (vrng.uniform(0.05, 0.18), vrng.uniform(12, 25), vrng.uniform(0, 6.3))
        waves = (_waves(vrng, 10, 8, (0.05, 0.4)), _waves(vrng, 10, 14, (0.2, 0.9)))
        vp0, vp1 = vrng.uniform(0.25, 0.75, 2) * (w, h), vrng.uniform(0.25, 0.75, 2) * (w, h)
        tint = (1.0, vrng.uniform(0.9, 1.1), vrng.uniform(0.9, 1.1))
        for n in range(num):
            t = n / max(1, num - 1)
            vp = tuple(vp0 * (1 - t) + vp1 * t)  # camera advances and turns smoothly
            scene = _Scene(vrng, h, w, vp=vp, radius=radius, folds=folds, z_offset=1.5 * n, waves=waves)
            img = scene.shade(vrng, scene.mucosa(vrng, tint), aperture=False)
            depth = np.round(scene.depth / 100.0 * 65535).astype(np.uint16)
            depth[scene.far] = 0  # beyond the rendered range: invalid, as C3VD's 0
            Image.fromarray(_to_uint8(img)).save(os.path.join(folder, f"{n}_color.png"))
            Image.fromarray(depth).save(os.path.join(folder, f"{n}_depth.tiff"))


def class_phrase(name):
    """A class folder name as words in a caption or prompt: ``"retroflex-rectum"`` -> ``"retroflex rectum"``."""
    return name.replace("-", " ")


def _where(cx, cy, w, h):
    """Location words of a point in a w x h image: 'upper left' ... 'centre' ... 'lower right'."""
    col = ("left", "", "right")[min(int(3 * cx / w), 2)]
    row = ("upper", "", "lower")[min(int(3 * cy / h), 2)]
    return " ".join(p for p in (row, col) if p) or "centre"


def _polyp_captions(rng, mask, box, h, w):
    area = mask.mean()
    size = "small" if area < 0.075 else ("medium-sized" if area < 0.11 else "large")  # terciles
    where = _where((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, w, h)
    return [f"colonoscopy image of a {size} polyp in the {where} of the frame",
            f"a {size} colorectal polyp, {where}, seen at colonoscopy"]


def _class_captions(rng, subset, cls, tract):
    words, organ = class_phrase(cls), "upper gi tract" if tract.startswith("upper") else "lower gi tract"
    if subset == "anatomical":
        first = [f"endoscopy image of the {words}", f"a view of the {words}, an anatomical landmark"]
    else:
        first = [f"endoscopy image showing {words}", f"pathological finding: {words}"]
    second = f"{words} in the {organ}" + ("" if cls == "polyps" else ", no polyp")
    return [first[int(rng.integers(2))], second]


def _write_captions(out, num, rng):
    """HyperKvasir-class frames (anatomical 40 %, pathological 35 %) and Kvasir-like polyp frames
    (25 %), each with two captions naming what was drawn."""
    from gissl.data.datasets import HYPERKVASIR_LAYOUT
    os.makedirs(os.path.join(out, "images"))
    rows = []
    for i in range(num):
        h, w = int(rng.integers(192, 224)), int(rng.integers(224, 256))
        u = rng.random()
        if u < 0.25:
            img, mask, boxes = render_polyp_image(rng, h, w)
            captions = _polyp_captions(rng, mask, boxes[0], h, w) if boxes else                 ["colonoscopy image of the colon wall, no polyp", "normal colon mucosa, no polyp"]
        else:
            subset = "anatomical" if u < 0.65 else "pathological"
            label = int(rng.integers(len(HYPERKVASIR_LAYOUT[subset])))
            tract, _, cls = HYPERKVASIR_LAYOUT[subset][label]
            img = render_class_image(rng, h, w, subset, label)
            captions = _class_captions(rng, subset, cls, tract)
        name = f"images/{i:05d}.jpg"
        Image.fromarray(img).save(os.path.join(out, name), quality=90)
        rows += [(name, c) for c in captions]
    with open(os.path.join(out, "captions.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)


def generate(dataset, out, num=None, seed=0):
    """Write ``dataset`` in its real on-disk format into ``out`` (created; must not exist or be
    empty). Deterministic in (dataset, num, seed). Returns ``out``."""
    if dataset not in DATASETS:
        raise UserError(f"unknown synthetic dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    num = DEFAULT_NUM[dataset] if num is None else int(num)
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"output folder {out} is not empty; choose a new folder")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng([seed, DATASETS.index(dataset)])
    if dataset == "Kvasir":
        _write_kvasir(out, num, rng)
    elif dataset == "CVC":
        _write_cvc(out, num, rng)
    elif dataset == "Hyperkvasir_anatomical":
        _write_hyperkvasir(out, num, rng, "anatomical")
    elif dataset == "Hyperkvasir_pathological":
        _write_hyperkvasir(out, num, rng, "pathological")
    elif dataset == "Hyperkvasir_unlabelled":
        _write_unlabelled(out, num, rng)
    elif dataset == "captions":
        _write_captions(out, num, rng)
    else:
        _write_c3vd(out, num, rng)
    return out


def cache_dir():
    """``$GISSL_CACHE/synthetic`` or ``~/.cache/gissl/synthetic``."""
    base = os.environ.get("GISSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gissl")
    return os.path.join(base, "synthetic")


def synthetic_root(dataset, num=None, seed=0):
    """Root folder of the built-in synthetic ``dataset``, generated on first use.

    Safe when several processes (e.g. torchrun ranks) call it at once: each generates into its
    own temporary folder and renames it into place; the first rename wins, the others discard
    their copy (generation is deterministic, so all copies are identical).
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown synthetic dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    num = DEFAULT_NUM[dataset] if num is None else int(num)
    parent = cache_dir()
    final = os.path.join(parent, f"{dataset}-n{num}-s{seed}-v{VERSION}")
    if os.path.isdir(final):
        return final
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{dataset}-", dir=parent)
    try:
        generate(dataset, tmp, num, seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gissl.data.synthetic",
                                description="Write a synthetic endoscopy dataset in its real on-disk format.")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--out", required=True, help="output folder (created; must be new or empty)")
    p.add_argument("--num", type=int, default=None,
                   help="images (Kvasir, CVC, unlabelled), images per class (HyperKvasir) or frames per "
                        f"video (C3VD), captioned images (captions); defaults {DEFAULT_NUM}")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        print(generate(a.dataset, a.out, a.num, a.seed))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
