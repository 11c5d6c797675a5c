"""Data for polyp retrieval: two-view training samples with their polyp masks, image lists for
descriptor extraction, and a built-in synthetic query / reference set (EndoFinder's Polyp-Twin
layout, docs/endofinder-retrieval.md §1.9) made of augmented copies of synthetic polyps.

Reading and pairing are ``gissl.data``'s (``kvasir_seg``, ``cvc_clinicdb``, ``image_folder``,
``polyp_twin``: images and masks paired by file stem). The augmentation follows SSCD's
"ADVANCED" set (docs/endofinder-retrieval.md §1.6) without its AugLy text / emoji overlays (they need font
files), and geometric steps move image and mask together through ``torchvision.transforms.v2``
with the same random parameters; masks use nearest interpolation (the reference re-drew the
rotation angle for the mask and rotated it bilinearly, docs/endofinder-retrieval.md §6 items 18-19).
"""
import csv
import os
import shutil
import tempfile

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from gissl.data import image_folder, kvasir_seg, cvc_clinicdb, polyp_twin
from gissl.data.datasets import _resize_mask, _resized_rgb, _to_tensor
from gissl.data.images import load_mask
from gissl.data.transforms import GaussianBlur, normalize
from gissl.errors import DataError, UserError

TRAIN_DATASETS = ("Kvasir", "CVC", "Hyperkvasir_unlabelled")
SYNTHETIC_VERSION = 1


class RandomRotation90s(v2.Transform):
    """Rotate by 90, 180 or 270 degrees with probability p (SSCD ADVANCED, p = 0.05), jointly."""

    def __init__(self, p=0.05):
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs):
        return {"k": int(torch.randint(1, 4, (1,))) if bool(torch.rand(1) < self.p) else 0}

    def transform(self, inpt, params):
        if params["k"] == 0:
            return inpt
        return tv_tensors.wrap(torch.rot90(inpt, params["k"], dims=(-2, -1)), like=inpt)


def view_transform(image_size, min_scale=0.08, strength=1.0):
    """One SSCD-style view of (Image float [0,1] (3,H,W), Mask (1,H,W)) -> same, normalised.

    Geometric (joint): hflip 0.5, rotate 90/180/270 p=0.05, rotate U(0, 360) p=0.05,
    RandomResizedCrop(scale (min_scale, 1), ratio (3/4, 4/3)). Image only: ColorJitter
    (0.8, 0.8, 0.8, 0.2) p=0.8, grayscale p=0.2, Gaussian blur p=0.5 (PIL radius 1-5 at 224 px,
    i.e. sigma scaled with the size), JPEG quality U(1, 100) p=0.2, ImageNet normalisation.
    ``strength`` < 1 scales the photometric ranges (jitter, grey probability, blur) down.
    """
    s = image_size / 224
    j = 0.8 * strength
    lo = max(1.0 * s, 0.1)
    blur = GaussianBlur(max(3, int(10 * s) * 2 + 1), (lo, max(5.0 * s * strength, lo)))
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        RandomRotation90s(0.05),
        v2.RandomApply([v2.RandomRotation(180)], p=0.05),
        v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomApply([v2.ColorJitter(j, j, j, 0.2 * strength)], p=0.8),
        v2.RandomGrayscale(0.2 * strength),
        v2.RandomApply([blur], p=0.5),
        v2.RandomApply([_Jpeg()], p=0.2),
        normalize(),
    ])


class _Jpeg(v2.Transform):
    """JPEG re-encoding at a random quality U(1, 100) of the image only (SSCD ADVANCED)."""

    def make_params(self, flat_inputs):
        return {"quality": int(torch.randint(1, 101, (1,)))}

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask) or not isinstance(inpt, torch.Tensor):
            return inpt
        u8 = (inpt.clamp(0, 1) * 255).round().to(torch.uint8)
        out = v2.functional.jpeg(u8, params["quality"]).float() / 255
        return tv_tensors.wrap(out, like=inpt)


def training_samples(dataset, root, skip_bad=False, use_masks=True):
    """``[{"image", "mask"?}]`` for training: Kvasir / CVC with their polyp masks (paired by
    stem), or any image folder (``Hyperkvasir_unlabelled``) without masks."""
    if dataset == "Kvasir":
        samples = kvasir_seg(root, skip_bad)
    elif dataset == "CVC":
        samples = cvc_clinicdb(root, skip_bad)
    elif dataset == "Hyperkvasir_unlabelled":
        samples = image_folder(root, skip_bad)
    else:
        raise UserError(f"unknown retrieval training dataset '{dataset}'; choose from {', '.join(TRAIN_DATASETS)}")
    if not use_masks:
        samples = [{"image": s["image"]} for s in samples]
    return samples


class TwoViewDataset(Dataset):
    """One instance per image, two augmented views (SSCD: each image is its own class).

    Sample: ``{"image": (2, 3, S, S), "mask": (2, 1, S, S) float {0, 1} (zeros when the
    image has no mask: random masking), "has_mask": bool, "index": int}``.
    """

    def __init__(self, samples, image_size=224, min_scale=0.08, strength=1.0):
        if not samples:
            raise DataError("the retrieval training set is empty")
        self.samples = list(samples)
        self.image_size = image_size
        self.transform = view_transform(image_size, min_scale, strength)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        # decode a little larger than the crop so RandomResizedCrop keeps detail
        size = int(self.image_size * 1.25)
        img = _to_tensor(_resized_rgb(s["image"], (size, size)))
        if s.get("mask"):
            mask = torch.from_numpy(_resize_mask(load_mask(s["mask"]), (size, size)))[None].float()
        else:
            mask = torch.zeros(1, size, size)
        mask = tv_tensors.Mask(mask)
        views = [self.transform(img, mask) for _ in range(2)]
        return {"image": torch.stack([v[0].as_subclass(torch.Tensor) for v in views]),
                "mask": torch.stack([v[1].as_subclass(torch.Tensor) for v in views]),
                "has_mask": bool(s.get("mask")), "index": i}


class ImageListDataset(Dataset):
    """Paths -> ``{"image": (3, S, S) normalised, "index": int}`` for descriptor extraction
    (square resize as EndoFinder's evaluation, docs/endofinder-retrieval.md §2)."""

    def __init__(self, paths, image_size=224):
        self.paths, self.image_size = list(paths), image_size
        self.norm = normalize()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = _to_tensor(_resized_rgb(self.paths[i], (self.image_size, self.image_size)))
        return {"image": self.norm(img).as_subclass(torch.Tensor), "index": i}


# ---------------------------------------------------------------------------------------------
# Built-in synthetic query / reference set
# ---------------------------------------------------------------------------------------------

def write_synthetic_twins(out, source_root, num_refs=120, num_queries=60, num_distractors=20, seed=0):
    """Write a Polyp-Twin style set into ``out`` from the images of a Kvasir-layout folder.

    References: the first ``num_refs`` polyp images (``val_ref/R0000.jpg`` ...). Queries: an
    augmented copy (crop of >= 35 % area, flip, rotation, colour, blur, JPEG) of each of the
    first ``num_queries`` references (``val_query/Q0000.jpg`` ...), listed in
    ``val_groundtruth_matches.csv``, plus ``num_distractors`` copies of images that are not in
    the reference set (no ground truth; they only add false positives, as in DISC2021).
    """
    samples = kvasir_seg(source_root)
    need = num_refs + num_distractors
    if len(samples) < need:
        raise UserError(f"the synthetic twin set needs {need} source images, {source_root} has {len(samples)}")
    os.makedirs(os.path.join(out, "val_query"))
    os.makedirs(os.path.join(out, "val_ref"))
    torch.manual_seed(seed)
    size = 256
    aug = v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomRotation(30),
        v2.RandomResizedCrop(size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.ColorJitter(0.3, 0.3, 0.3, 0.05),
        v2.RandomApply([GaussianBlur(9, (0.5, 1.5))], p=0.5),
        v2.RandomApply([_Jpeg()], p=0.5),
    ])

    def save(t, path):
        a = (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(a).save(path, quality=92)

    for r in range(num_refs):
        shutil.copyfile(samples[r]["image"], os.path.join(out, "val_ref", f"R{r:04d}.jpg"))
    sources = list(range(num_queries)) + list(range(num_refs, num_refs + num_distractors))
    with open(os.path.join(out, "val_groundtruth_matches.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "reference_id"])
        for q, src in enumerate(sources):
            img = _to_tensor(_resized_rgb(samples[src]["image"], (size, size)))
            save(aug(img), os.path.join(out, "val_query", f"Q{q:04d}.jpg"))
            if src < num_refs:
                w.writerow([f"Q{q:04d}", f"R{src:04d}"])
    return out


def synthetic_twin_root(num_refs=120, num_queries=60, num_distractors=20, seed=1):
    """Root of the built-in synthetic query / reference set, generated once and cached.

    Its polyps come from a synthetic Kvasir generated with ``seed`` (default 1), disjoint from
    the default training set (seed 0), so training never sees an evaluation polyp.
    """
    from gissl.data.synthetic import cache_dir, synthetic_root
    source = synthetic_root("Kvasir", num=num_refs + num_distractors, seed=seed)
    final = os.path.join(cache_dir(), f"PolypTwin-r{num_refs}-q{num_queries}-d{num_distractors}"
                                      f"-s{seed}-v{SYNTHETIC_VERSION}")
    if os.path.isdir(final):
        return final
    tmp = tempfile.mkdtemp(prefix=".PolypTwin-", dir=cache_dir())
    try:
        write_synthetic_twins(os.path.join(tmp, "set"), source, num_refs, num_queries, num_distractors, seed)
        try:
            os.rename(os.path.join(tmp, "set"), final)
        except OSError:
            if not os.path.isdir(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def twin_set(root, skip_bad=False):
    """``polyp_twin(root, skip_bad)`` as ids: ``{"queries": [paths], "references": [paths],
    "query_ids": [stems], "reference_ids": [stems], "matches": [(query stem, ref stem)]}``."""
    data = polyp_twin(root, skip_bad)
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]  # noqa: E731
    if not data["matches"]:
        raise DataError(f"{root}/val_groundtruth_matches.csv is missing or lists no pairs; the "
                        "copy-detection metrics need ground-truth (query, reference) pairs")
    return {"queries": data["queries"], "references": data["references"],
            "query_ids": [stem(p) for p in data["queries"]],
            "reference_ids": [stem(p) for p in data["references"]],
            "matches": [(stem(q), stem(r)) for q, r in data["matches"]]}
