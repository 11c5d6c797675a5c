"""Readers for every on-disk dataset format (file lists, pairing by name stem, up-front checks)
and the torch Datasets / per-task builders that apply SSL4GIE's splits and transforms.

Readers return lists of dict samples holding file paths (and ``size`` = (W, H) from the
header check); Datasets decode, resize and augment. Every reader checks each file's header and
pairing before any training starts and reports all problems at once (``report_bad``).
"""

import csv
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from gissl.data import transforms as T
from gissl.data.images import (check_image, is_image_file, load_depth, load_mask, open_rgb,
                               report_bad)
from gissl.data.splits import split_indices, stratified_split_indices
from gissl.errors import DataError, UserError

__all__ = [
    "kvasir_seg", "kvasir_boxes", "cvc_clinicdb", "image_mask_folders", "hyperkvasir_labelled",
    "class_folder", "image_folder", "c3vd", "polyp_twin",
    "HYPERKVASIR_CLASSES", "HYPERKVASIR_LAYOUT", "C3VD_VAL_VIDEOS", "C3VD_TEST_VIDEOS",
    "ClassificationDataset", "SegmentationDataset", "DepthDataset", "DetectionDataset",
    "UnlabelledDataset",
    "build_classification_datasets", "build_segmentation_datasets", "build_depth_datasets",
    "build_detection_datasets", "build_unlabelled_dataset",
    "SEGMENTATION_DATASETS", "CLASSIFICATION_DATASETS",
    "to_image_tensor", "decode_resized", "resize_mask",
]

# Class-id order of the reference (docs/ssl4gie-study.md §2.2): tract folders sorted (lower-gi-tract before
# upper-gi-tract), then class folders as ``sorted(glob(sf + "*/"))`` returns them, i.e. sorted
# WITH the trailing "/" -- "-" sorts before "/", so "ulcerative-colitis-grade-1-2/" comes before
# "ulcerative-colitis-grade-1/" and "barretts-short-segment/" before "barretts/" (a plain sort
# would swap those two; the reference code's order is used here).
_HK_FOLDERS = {
    ("lower-gi-tract", "anatomical-landmarks"): ("cecum", "ileum", "retroflex-rectum"),
    ("upper-gi-tract", "anatomical-landmarks"): ("pylorus", "retroflex-stomach", "z-line"),
    ("lower-gi-tract", "pathological-findings"): (
        "hemorrhoids", "polyps", "ulcerative-colitis-grade-0-1", "ulcerative-colitis-grade-1",
        "ulcerative-colitis-grade-1-2", "ulcerative-colitis-grade-2", "ulcerative-colitis-grade-2-3",
        "ulcerative-colitis-grade-3"),
    ("upper-gi-tract", "pathological-findings"): ("barretts", "barretts-short-segment", "esophagitis-a",
                                                  "esophagitis-b-d"),
}
# (tract, category folder, class folder) per class id
HYPERKVASIR_LAYOUT = {
    subset: [(tract, cat, c) for (tract, cat), classes in sorted(_HK_FOLDERS.items()) if cat == category
             for c in sorted(classes, key=lambda name: name + "/")]
    for subset, category in (("anatomical", "anatomical-landmarks"), ("pathological", "pathological-findings"))
}
HYPERKVASIR_CLASSES = {k: [c for _, _, c in v] for k, v in HYPERKVASIR_LAYOUT.items()}
CLASSIFICATION_DATASETS = {"Hyperkvasir_anatomical": "anatomical", "Hyperkvasir_pathological": "pathological"}
SEGMENTATION_DATASETS = ("Kvasir", "CVC")

# Reference per-video split of C3VD (docs/ssl4gie-study.md §2.5); test order = this order.
C3VD_TEST_VIDEOS = ("trans_t2_b_under_review/t2v2", "cecum_t4_b_under_review/c4v3")
C3VD_VAL_VIDEOS = ("trans_t4_a_under_review/t4v1", "cecum_t2_c_under_review/c2v3")


# --- listing helpers ---------------------------------------------------------------------------

def _require_dir(path, what):
    if not os.path.isdir(path):
        raise DataError(f"{what} folder not found: {path}")
    return path


def _list_images(folder):
    """Image files directly in ``folder``, sorted by file name (the reference's sorted glob)."""
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if is_image_file(f) and os.path.isfile(os.path.join(folder, f))]


def _walk_images(folder):
    out = []
    for d, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.join(d, f) for f in sorted(files) if is_image_file(f)]
    return out


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _by_stem(files, bad):
    stems = {}
    for f in files:
        s = _stem(f)
        if s in stems:
            bad.append(f"{f}: same name stem as {stems[s]} (ambiguous pairing)")
        else:
            stems[s] = f
    return stems


def _check_one(path):
    try:
        return check_image(path), None
    except DataError as e:
        return None, str(e)


def _check_all(paths):
    """``check_image`` for many files -> {path: (size or None, problem or None)}. Threads, because
    the header and tail reads wait on storage (network file systems, 100k HyperKvasir files)."""
    paths = list(paths)
    if len(paths) < 64:
        return {p: _check_one(p) for p in paths}
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(paths, pool.map(_check_one, paths)))


def _checked(path, bad, checked=None):
    """Size of ``path`` from ``checked`` (``_check_all``) or a fresh check; a problem goes to
    ``bad`` and gives None."""
    size, problem = checked[path] if checked is not None and path in checked else _check_one(path)
    if problem:
        bad.append(problem)
    return size


def _first_existing(root, candidates):
    for c in candidates:
        if all(os.path.isdir(os.path.join(root, c, sub)) for sub in candidates[c]):
            return os.path.normpath(os.path.join(root, c))
    return None


# --- readers -----------------------------------------------------------------------------------

def image_mask_folders(image_dir, mask_dir, skip_bad=False, what=None):
    """Pair ``image_dir/<stem>.*`` with ``mask_dir/<stem>.*`` by name stem.

    Returns ``[{"image": path, "mask": path, "size": (W, H)}]`` sorted by image file name.
    Problems reported: missing/empty folders, an image without a mask or a mask without an image,
    ambiguous stems, unreadable files, mask size different from image size.
    """
    what = what or f"{image_dir} + {mask_dir}"
    _require_dir(image_dir, "image")
    _require_dir(mask_dir, "mask")
    images, masks = _list_images(image_dir), _list_images(mask_dir)
    if not images:
        raise DataError(f"no images found in {image_dir}")
    bad = []
    image_by, mask_by = _by_stem(images, bad), _by_stem(masks, bad)
    samples = []
    checked = _check_all([p for st, p in image_by.items() if st in mask_by]
                         + [p for st, p in mask_by.items() if st in image_by])
    for stem, img in image_by.items():
        if stem not in mask_by:
            bad.append(f"{img}: no mask with the same name in {mask_dir}")
            continue
        size, msize = _checked(img, bad, checked), _checked(mask_by[stem], bad, checked)
        if size is None or msize is None:
            continue
        if size != msize:
            bad.append(f"{mask_by[stem]}: mask is {msize[0]}x{msize[1]} but its image {img} is {size[0]}x{size[1]}")
            continue
        samples.append({"image": img, "mask": mask_by[stem], "size": size})
    bad += [f"{m}: mask without an image in {image_dir}" for s, m in mask_by.items() if s not in image_by]
    report_bad(bad, skip_bad, what)
    if not samples:
        raise DataError(f"no usable image/mask pairs in {what}")
    return samples


def kvasir_seg(root, skip_bad=False):
    """Kvasir-SEG: ``root/images/*`` + ``root/masks/*`` (JPEG masks). Also accepts the folder
    that contains ``Kvasir-SEG/`` or HyperKvasir's ``segmented-images/``."""
    base = _first_existing(root, {".": ("images", "masks"), "Kvasir-SEG": ("images", "masks"),
                                  "segmented-images": ("images", "masks")})
    if base is None:
        raise DataError(f"Kvasir-SEG not found under {root}: expected {root}/images and {root}/masks")
    return image_mask_folders(os.path.join(base, "images"), os.path.join(base, "masks"), skip_bad,
                              what=f"Kvasir-SEG at {base}")


def cvc_clinicdb(root, skip_bad=False):
    """CVC-ClinicDB: ``root/Original/*`` + ``root/Ground Truth/*`` (.tif, .png or .bmp). Also
    accepts copies with a ``PNG/`` or ``TIF/`` level or a ``CVC-ClinicDB/`` folder."""
    sub = ("Original", "Ground Truth")
    base = _first_existing(root, {".": sub, "CVC-ClinicDB": sub, "PNG": sub, "TIF": sub,
                                  "CVC-ClinicDB/PNG": sub, "CVC-ClinicDB/TIF": sub})
    if base is None:
        raise DataError(f"CVC-ClinicDB not found under {root}: expected {root}/Original and "
                        f"{root}/Ground Truth")
    return image_mask_folders(os.path.join(base, "Original"), os.path.join(base, "Ground Truth"),
                              skip_bad, what=f"CVC-ClinicDB at {base}")


_BOX_FILES = ("kavsir_bboxes.json", "bounding-boxes.json")


def kvasir_boxes(root, skip_bad=False):
    """Kvasir-SEG detection: ``root/images/*`` and the box JSON (``kavsir_bboxes.json`` as in
    the Kvasir-SEG zip, or ``bounding-boxes.json`` as in HyperKvasir). JSON key = image stem,
    ``{"height", "width", "bbox": [{"label", "xmin", "ymin", "xmax", "ymax"}]}``.

    Returns ``[{"image", "boxes": (n, 4) float32 xyxy original pixels, "size": (W, H)}]``
    sorted by file name. A box reaching past the image border is clipped to the image, with one
    warning naming the images; an image missing from the JSON, an entry of the wrong shape, a
    size different from the JSON's, or a box with zero area (also after clipping: a box wholly
    outside the image) is a bad file (reported; skipped with ``skip_bad``), so no degenerate box
    ever reaches the detector's loss.
    """
    base = _first_existing(root, {".": ("images",), "Kvasir-SEG": ("images",), "segmented-images": ("images",)})
    if base is None:
        raise DataError(f"Kvasir-SEG not found under {root}: expected {root}/images")
    json_path = next((os.path.join(base, f) for f in _BOX_FILES if os.path.isfile(os.path.join(base, f))), None)
    if json_path is None:
        raise DataError(f"no box file in {base}: expected {' or '.join(_BOX_FILES)}")
    try:
        with open(json_path) as f:
            table = json.load(f)
        if not isinstance(table, dict):
            raise ValueError("top level is not an object keyed by image name")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read box file {json_path}: {e}") from None
    images = _list_images(os.path.join(base, "images"))
    if not images:
        raise DataError(f"no images found in {base}/images")
    bad, samples, clipped = [], [], []
    checked = _check_all(img for img in images if _stem(img) in table)
    for img in images:
        entry = table.get(_stem(img))
        if entry is None:
            bad.append(f"{img}: not in {json_path}")
            continue
        size = _checked(img, bad, checked)
        if size is None:
            continue
        w, h = size
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("bbox", []), list):
                raise ValueError('expected {"height": H, "width": W, "bbox": [{"xmin": ..., "ymin": ..., '
                                 f'"xmax": ..., "ymax": ...}}, ...]}}, found {json.dumps(entry)[:80]}')
            if "width" in entry and "height" in entry and (int(entry["width"]), int(entry["height"])) != (w, h):
                raise ValueError(f"JSON says {entry['width']}x{entry['height']}, image is {w}x{h}")
            raw = np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in entry.get("bbox", [])],
                           dtype=np.float32).reshape(-1, 4)
            boxes = np.clip(raw, 0, [w, h, w, h]).astype(np.float32)
            if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
                raise ValueError(f"box with zero area (inside the {w}x{h} image, after clipping) in "
                                 f"{raw.tolist()}")
        except (KeyError, TypeError, ValueError) as e:
            bad.append(f"{img}: bad entry in {json_path}: {e if not isinstance(e, KeyError) else f'no key {e}'}")
            continue
        if not np.array_equal(boxes, raw):
            clipped.append(os.path.basename(img))
        samples.append({"image": img, "boxes": boxes, "size": size})
    if clipped:
        warnings.warn(f"{json_path}: clipped boxes reaching past the image border of {len(clipped)} image(s): "
                      f"{', '.join(clipped[:5])}{' ...' if len(clipped) > 5 else ''}", stacklevel=2)
    report_bad(bad, skip_bad, f"Kvasir-SEG boxes at {base}")
    if not samples:
        raise DataError(f"no usable images with boxes in {base}")
    return samples


def _labelled_images_root(root):
    for c in (root, os.path.join(root, "labeled-images"), os.path.join(root, "hyper-kvasir", "labeled-images")):
        if os.path.isdir(os.path.join(c, "lower-gi-tract")) or os.path.isdir(os.path.join(c, "upper-gi-tract")):
            return c
    raise DataError(f"HyperKvasir labelled images not found under {root}: expected "
                    f"{root}/labeled-images/{{lower,upper}}-gi-tract/...")


def hyperkvasir_labelled(root, subset, skip_bad=False):
    """HyperKvasir ``labeled-images/<tract>/<category>/<class>/*.jpg``.

    subset: ``"anatomical"`` (6 classes) or ``"pathological"`` (12), ids in the reference order
    (``HYPERKVASIR_CLASSES[subset]``). Returns ``[{"image", "label", "size"}]``.
    """
    if subset not in HYPERKVASIR_LAYOUT:
        raise UserError(f"unknown HyperKvasir subset {subset!r}; choose from {', '.join(HYPERKVASIR_LAYOUT)}")
    base = _labelled_images_root(root)
    bad, listed = [], []
    for label, (tract, category, cls) in enumerate(HYPERKVASIR_LAYOUT[subset]):
        folder = os.path.join(base, tract, category, cls)
        if not os.path.isdir(folder):
            bad.append(f"{folder}: class folder missing (class {label} '{cls}')")
            continue
        files = _list_images(folder)
        if not files:
            bad.append(f"{folder}: class folder has no images (class {label} '{cls}')")
        listed += [(f, label) for f in files]
    checked = _check_all(f for f, _ in listed)
    samples = [{"image": f, "label": label, "size": size} for f, label in listed
               if (size := _checked(f, bad, checked)) is not None]
    report_bad(bad, skip_bad, f"HyperKvasir {subset} at {base}")
    if not samples:
        raise DataError(f"no images for HyperKvasir {subset} under {base}")
    _require_two_classes(samples, HYPERKVASIR_CLASSES[subset], base)
    return samples


def _require_two_classes(samples, classes, root):
    # a classifier of one class learns nothing and scores perfectly: refuse rather than "train"
    present = sorted({s["label"] for s in samples})
    if len(present) < 2:
        names = ", ".join(repr(classes[i]) for i in present)
        raise DataError(f"only one class has usable images under {root} ({names}); classification needs "
                        f"images of at least two classes (expected {', '.join(classes)})")


def class_folder(root, skip_bad=False):
    """Generic classification folder ``root/<class>/**/<image>``: classes are the sorted
    sub-folders. Returns ``(samples [{"image", "label", "size"}], class_names)``."""
    _require_dir(root, "dataset")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise DataError(f"no class sub-folders in {root}: expected {root}/<class name>/<images>")
    bad, listed = [], []
    for label, c in enumerate(classes):
        files = _walk_images(os.path.join(root, c))
        if not files:
            bad.append(f"{os.path.join(root, c)}: class folder has no images")
        listed += [(f, label) for f in files]
    checked = _check_all(f for f, _ in listed)
    samples = [{"image": f, "label": label, "size": size} for f, label in listed
               if (size := _checked(f, bad, checked)) is not None]
    report_bad(bad, skip_bad, root)
    if not samples:
        raise DataError(f"no images found in {root}")
    _require_two_classes(samples, classes, root)
    return samples, classes


def _unlabelled_images_root(root):
    """``root``'s HyperKvasir ``unlabeled-images`` folder when it holds one (``--data-root`` at the
    folder the release was unpacked into, perhaps next to ``labeled-images``), else ``root``."""
    for c in (os.path.join(root, "unlabeled-images"), os.path.join(root, "hyper-kvasir", "unlabeled-images")):
        if os.path.isdir(c):
            return c
    return root


def image_folder(root, skip_bad=False):
    """Every image under ``root`` (flat or nested), sorted by path. For HyperKvasir-unlabelled
    (``unlabeled-images/images/*.jpg``) ``root`` may be ``images``, ``unlabeled-images`` or the
    folder that holds it; only ``unlabeled-images`` is read then, not the labelled release
    unpacked beside it. Returns ``[{"image", "size"}]``."""
    _require_dir(root, "image")
    root = _unlabelled_images_root(root)
    bad, files = [], _walk_images(root)
    checked = _check_all(files)
    samples = [{"image": f, "size": size} for f in files if (size := _checked(f, bad, checked)) is not None]
    report_bad(bad, skip_bad, root)
    if not samples:
        raise DataError(f"no images found in {root} (looked for {', '.join(('.jpg', '.png', '.bmp', '.tif'))} ...); "
                        "point --data-root at the folder that holds the images")
    return samples


_C3VD_COLOR = re.compile(r"^(\d+)_color\.png$", re.IGNORECASE)
_C3VD_DEPTH = re.compile(r"^(\d+)_depth\.tiff?$", re.IGNORECASE)


def _c3vd_videos(root):
    _require_dir(root, "C3VD")
    videos = []
    for seq in sorted(os.listdir(root)):
        sp = os.path.join(root, seq)
        if os.path.isdir(sp) and not seq.startswith("."):
            videos += [f"{seq}/{v}" for v in sorted(os.listdir(sp))
                       if os.path.isdir(os.path.join(sp, v)) and not v.startswith(".")]
    if not videos:
        raise DataError(f"no C3VD videos under {root}: expected {root}/<sequence>/<video>/<N>_color.png")
    return videos


def _resolve_videos(names, videos, root):
    out = []
    for n in names:
        n = n.strip("/")
        hits = [v for v in videos if v == n or v.split("/")[-1] == n]
        if len(hits) != 1:
            raise DataError(f"C3VD video {n!r} {'not found' if not hits else 'is ambiguous'} under {root}; "
                            f"available: {', '.join(videos)}")
        out.append(hits[0])
    return out


def c3vd(root, split=None, val_videos=None, test_videos=None, skip_bad=False):
    """C3VD ``root/<sequence>/<video>/{N}_color.png`` + ``{N}_depth.tiff`` (16-bit).

    split: ``"train"``, ``"val"``, ``"test"`` or None (all videos). Val/test videos default to
    the reference's (``C3VD_VAL_VIDEOS``, ``C3VD_TEST_VIDEOS``); give names as
    ``"sequence/video"`` or just ``"video"``. Train = every other video. Frames are ordered by
    their number, videos in the given order (train: sorted).
    Returns ``[{"image", "depth", "video", "frame", "size"}]``.
    """
    videos = _c3vd_videos(root)
    val = _resolve_videos(C3VD_VAL_VIDEOS if val_videos is None else val_videos, videos, root)
    test = _resolve_videos(C3VD_TEST_VIDEOS if test_videos is None else test_videos, videos, root)
    both = set(val) & set(test)
    if both:
        raise UserError(f"C3VD videos {sorted(both)} are in both the val and the test split")
    chosen = {"train": [v for v in videos if v not in val and v not in test], "val": val, "test": test,
              None: videos}
    if split not in chosen:
        raise UserError(f"unknown C3VD split {split!r}; choose train, val or test")
    bad, samples = [], []
    for video in chosen[split]:
        folder = os.path.join(root, *video.split("/"))
        colors, depths = {}, {}
        for f in os.listdir(folder):
            if (m := _C3VD_COLOR.match(f)):
                colors[int(m.group(1))] = os.path.join(folder, f)
            elif (m := _C3VD_DEPTH.match(f)):
                depths[int(m.group(1))] = os.path.join(folder, f)
        if not colors:
            bad.append(f"{folder}: no <N>_color.png frames")
        bad += [f"{depths[n]}: depth map without a colour frame" for n in sorted(set(depths) - set(colors))]
        checked = _check_all([colors[n] for n in colors if n in depths] + [depths[n] for n in depths if n in colors])
        for n in sorted(colors):
            if n not in depths:
                bad.append(f"{colors[n]}: no matching {n}_depth.tiff")
                continue
            size, dsize = _checked(colors[n], bad, checked), _checked(depths[n], bad, checked)
            if size is None or dsize is None:
                continue
            if size != dsize:
                bad.append(f"{depths[n]}: depth is {dsize[0]}x{dsize[1]} but its frame is {size[0]}x{size[1]}")
                continue
            with Image.open(depths[n]) as im:
                mode = im.mode
            if not (mode.startswith("I;16") or mode == "I"):
                bad.append(f"{depths[n]}: depth map is PIL mode {mode!r}, expected a 16-bit TIFF")
                continue
            samples.append({"image": colors[n], "depth": depths[n], "video": video, "frame": n, "size": size})
    report_bad(bad, skip_bad, f"C3VD at {root}")
    if not samples:
        raise DataError(f"no usable C3VD frames for split {split!r} under {root}")
    return samples


def polyp_twin(root, skip_bad=False):
    """EndoFinder's retrieval evaluation layout (docs/endofinder-retrieval.md §1.9): ``root/val_query/``,
    ``root/val_ref/``, ``root/val_groundtruth_matches.csv`` (``Qxxxx,Ryyyy`` lines, optional
    header). Returns ``{"queries": [paths], "references": [paths], "matches": [(query_path,
    reference_path)]}``; a CSV id without a file and an unreadable image are errors (checked
    here, before any training: train_retrieval validates on this set after every epoch);
    ``skip_bad`` drops the unreadable images and the matches that name them."""
    qdir, rdir = (_require_dir(os.path.join(root, d), "Polyp-Twin " + d) for d in ("val_query", "val_ref"))
    queries, refs = _list_images(qdir), _list_images(rdir)
    bad = []
    checked = _check_all(queries + refs)
    unreadable = {p for p in queries + refs if _checked(p, bad, checked) is None}
    queries, refs = [p for p in queries if p not in unreadable], [p for p in refs if p not in unreadable]
    if not queries or not refs:
        report_bad(bad, skip_bad, f"Polyp-Twin at {root}")
        raise DataError(f"Polyp-Twin at {root}: val_query/ and val_ref/ must both contain images")
    qs, rs = {_stem(p): p for p in queries}, {_stem(p): p for p in refs}
    gone = {_stem(p) for p in unreadable}
    csv_path = os.path.join(root, "val_groundtruth_matches.csv")
    matches = []
    if os.path.isfile(csv_path):
        with open(csv_path, newline="") as f:
            for row in csv.reader(f):
                if len(row) < 2 or row[0].strip().lower() == "query_id":
                    continue
                q, r = row[0].strip(), row[1].strip()
                if q in gone or r in gone:
                    continue  # its unreadable image is reported above
                if q not in qs or r not in rs:
                    bad.append(f"{csv_path}: match {q},{r} names a file that is not in val_query/ or val_ref/")
                    continue
                matches.append((qs[q], rs[r]))
    report_bad(bad, skip_bad, f"Polyp-Twin at {root}")
    return {"queries": queries, "references": refs, "matches": matches}


# --- datasets ----------------------------------------------------------------------------------

def to_image_tensor(pil):
    """PIL RGB -> tv_tensors.Image float32 (3, H, W) in [0, 1]."""
    # planar (C, H, W) memory before the float ops: plane-wise ops on an interleaved layout are slower
    a = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return tv_tensors.Image(a.float().div_(255.0))


def decode_resized(path, size, exact=False):
    """Decode and resize to ``size`` = (W, H), bicubic like the reference.

    Training decodes JPEGs straight to >= size (``Image.draft``, several times faster);
    ``exact`` (evaluation) decodes at full size first, as the reference's
    ``Image.open(path).resize(size)``, so test inputs are the reference's pixels exactly.
    """
    im = open_rgb(path, None if exact else size)
    return im if im.size == tuple(size) else im.resize(tuple(size), Image.BICUBIC)


def resize_mask(mask, size):
    """(H, W) bool -> (H', W') bool: bilinear/area on 0/255 then threshold 0.5 (smooth edges,
    no bicubic overshoot, binary target)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    if im.size != tuple(size):
        im = im.resize(tuple(size), Image.BILINEAR)
    return np.asarray(im) >= 128


# older private names, still imported by other gissl modules
_to_tensor, _resized_rgb, _resize_mask = to_image_tensor, decode_resized, resize_mask


def _plain(t):
    return t.as_subclass(torch.Tensor)


class _SampleDataset(Dataset):
    def __init__(self, samples):
        if not samples:
            raise DataError("empty dataset split: the folder has too few usable samples")
        self.samples = list(samples)

    def __len__(self):
        return len(self.samples)


class ClassificationDataset(_SampleDataset):
    """samples ``[{"image", "label"}]`` -> ``{"image": (3,S,S), "label": int64, "index"}``.
    Images are resized to S x S (aspect not kept, as the reference) before augmentation."""

    def __init__(self, samples, image_size=224, train=False, classes=None, transform=None):
        super().__init__(samples)
        self.image_size, self.train = image_size, train
        self.classes = list(classes) if classes is not None else None
        self.labels = np.array([s["label"] for s in self.samples], dtype=np.int64)
        self.transform = transform or T.classification_transform(image_size, train)

    def __getitem__(self, i):
        s = self.samples[i]
        size = (self.image_size, self.image_size)
        img = self.transform(to_image_tensor(decode_resized(s["image"], size, exact=not self.train)))
        return {"image": _plain(img), "label": torch.tensor(s["label"], dtype=torch.int64), "index": i}


class SegmentationDataset(_SampleDataset):
    """samples ``[{"image", "mask"}]`` -> ``{"image": (3,S,S), "mask": (1,S,S) float {0,1},
    "index"}``, plus ``"mask_orig": (1,h,w) bool`` and ``"path"`` when ``original``."""

    def __init__(self, samples, image_size=224, train=False, original=False, transform=None):
        super().__init__(samples)
        self.image_size, self.original, self.train = image_size, original, train
        self.transform = transform or T.segmentation_transform(image_size, train)

    def __getitem__(self, i):
        s = self.samples[i]
        size = (self.image_size, self.image_size)
        img = to_image_tensor(decode_resized(s["image"], size, exact=not self.train))
        if self.original:
            full = load_mask(s["mask"])
            small = resize_mask(full, size)
        else:
            small = load_mask(s["mask"], size, resize=True)
        mask = tv_tensors.Mask(torch.from_numpy(small)[None].float())
        img, mask = self.transform(img, mask)
        out = {"image": _plain(img), "mask": _plain(mask), "index": i}
        if self.original:
            out["mask_orig"] = torch.from_numpy(full)[None]
            out["path"] = s["image"]
        return out


def _square(pil, fill):
    w, h = pil.size
    side, left, top = T.square_offsets(h, w)
    if side == w == h:
        return pil
    canvas = Image.new(pil.mode, (side, side), fill)
    canvas.paste(pil, (left, top))
    return canvas


class DepthDataset(_SampleDataset):
    """samples ``[{"image", "depth"}]`` -> ``{"image": (3,S,S), "depth": (1,S,S) float mm (0 =
    invalid), "index"}`` (+ ``"depth_orig": (1,h,w)`` mm and ``"path"`` when ``original``).

    Like the reference, frames are padded to a centred square (black; depth 0 = invalid) and
    resized (image bicubic, depth nearest so no depth is invented across edges);
    ``transforms.from_square`` maps an (S,S) prediction back to (h,w).
    """

    def __init__(self, samples, image_size=224, train=False, original=False, transform=None):
        super().__init__(samples)
        self.image_size, self.original = image_size, original
        self.transform = transform or T.depth_transform(image_size, train)

    def __getitem__(self, i):
        s = self.samples[i]
        size = (self.image_size, self.image_size)
        img = _square(open_rgb(s["image"]), (0, 0, 0)).resize(size, Image.BICUBIC)
        full = load_depth(s["depth"])
        depth = _square(Image.fromarray(full, "F"), 0.0).resize(size, Image.NEAREST)
        depth = tv_tensors.Mask(torch.from_numpy(np.array(depth, dtype=np.float32))[None])
        img, depth = self.transform(to_image_tensor(img), depth)
        out = {"image": _plain(img), "depth": _plain(depth), "index": i}
        if self.original:
            out["depth_orig"] = torch.from_numpy(full)[None]
            out["path"] = s["image"]
        return out


class DetectionDataset(_SampleDataset):
    """samples ``[{"image", "boxes", "size"}]`` -> ``{"image": (3,H,W) float [0,1] (not
    normalised), "target": {"boxes": (n,4) float32 xyxy, "labels": (n,) int64 ones}, "index",
    "path", "meta"}``.

    ``fixed_size=F``: shrink by an integer factor to fit and zero-pad centred to F x F (see
    ``transforms.fixed_size_geometry``); the shrink happens before augmentation (fast decode) and
    the blur is scaled to match, the padding after it. ``meta`` maps boxes back with
    ``unpad_boxes`` (meaningful for un-augmented, i.e. val/test, samples).
    """

    def __init__(self, samples, fixed_size=None, train=False, transform=None):
        super().__init__(samples)
        self.fixed_size, self.train, self._transform = fixed_size, train, transform

    def _decode(self, path, meta):
        k = meta["k"]
        if k == 1:
            return open_rgb(path)
        h, w = meta["orig_size"]
        nh, nw = meta["size"]
        im = open_rgb(path, (nw, nh))  # may come back at 1/2, 1/4 or 1/8 scale (JPEG draft)
        d = w / im.size[0]  # original pixels per decoded pixel
        # Pad bottom/right to a multiple of k (black, as the reference's 1-px pad to even size),
        # then resample so that output pixel j covers original pixels [j*k, (j+1)*k) exactly.
        bw, bh = nw * k / d, nh * k / d
        canvas = Image.new("RGB", (int(np.ceil(bw)), int(np.ceil(bh))), (0, 0, 0))
        canvas.paste(im, (0, 0))
        return canvas.resize((nw, nh), Image.BICUBIC, box=(0, 0, bw, bh))

    def __getitem__(self, i):
        s = self.samples[i]
        w, h = s["size"]
        meta = T.fixed_size_geometry(h, w, self.fixed_size)
        img = to_image_tensor(self._decode(s["image"], meta))
        nh, nw = meta["size"]
        boxes = tv_tensors.BoundingBoxes(T.pad_boxes(torch.as_tensor(s["boxes"]), dict(meta, offset=(0, 0))).float(),
                                         format="XYXY", canvas_size=(nh, nw))
        transform = self._transform or T.detection_transform(self.train, blur_scale=1.0 / meta["k"])
        img, boxes = transform(img, boxes)
        img, boxes = _plain(img), _plain(boxes).float()
        if self.fixed_size is not None:
            F_ = self.fixed_size
            ih, iw = img.shape[-2:]
            left, top = (F_ - iw) // 2, (F_ - ih) // 2
            canvas = img.new_zeros(3, F_, F_)
            canvas[:, top:top + ih, left:left + iw] = img
            img = canvas
            boxes = boxes + torch.tensor([left, top, left, top], dtype=boxes.dtype)
            meta = dict(meta, offset=(left, top))
        target = {"boxes": boxes.reshape(-1, 4), "labels": torch.ones(len(boxes), dtype=torch.int64)}
        return {"image": img, "target": target, "index": i, "path": s["image"], "meta": meta}


class UnlabelledDataset(_SampleDataset):
    """Images for pretraining. samples: reader output or a list of paths.

    ``transform(PIL RGB) -> tensor or tuple of views``; a tuple/list is returned as is, anything
    else as ``{"image": out, "index"}`` (no transform: float (3,H,W) in [0,1]).
    ``decode_size``: decode JPEGs at reduced scale with the short side still >= this many pixels.
    """

    def __init__(self, samples, transform=None, decode_size=None):
        super().__init__([s if isinstance(s, dict) else {"image": s} for s in samples])
        self.transform, self.decode_size = transform, decode_size

    def __getitem__(self, i):
        s = self.samples[i]
        size = None
        if self.decode_size and "size" in s:
            w, h = s["size"]
            r = self.decode_size / min(w, h)
            size = (max(1, int(np.ceil(w * r))), max(1, int(np.ceil(h * r)))) if r < 1 else None
        img = open_rgb(s["image"], size)
        out = self.transform(img) if self.transform is not None else _plain(to_image_tensor(img))
        if isinstance(out, (tuple, list)):
            return tuple(out)
        return {"image": out, "index": i}


# --- builders ----------------------------------------------------------------------------------

def _split(samples, idx):
    return [samples[i] for i in idx]


def build_classification_datasets(dataset, root, image_size=224, split="random", seed=42, skip_bad=False,
                                  **medical_options):
    """HyperKvasir classification. ``split="random"``: the reference's unstratified
    ``split_indices``; ``"stratified"``: per-class 80/10/10. Returns dict(train=, val=, test=) of
    ClassificationDataset (each with ``.classes`` and ``.labels``). A dataset of
    ``gissl.data.medical.MEDICAL_DATASETS`` is read by that module (``medical_options``: its
    ``read_medical`` keywords) and split by patient instead."""
    from gissl.data import medical  # imports this module
    if dataset in medical.MEDICAL_DATASETS:  # the transfer study's datasets, patient-wise split
        return medical.build_medical_datasets(dataset, root, image_size=image_size, seed=seed, skip_bad=skip_bad,
                                              **medical_options)[0]
    if dataset not in CLASSIFICATION_DATASETS:
        raise UserError(f"unknown classification dataset {dataset!r}; choose from "
                        f"{', '.join(list(CLASSIFICATION_DATASETS) + list(medical.MEDICAL_DATASETS))}")
    subset = CLASSIFICATION_DATASETS[dataset]
    samples = hyperkvasir_labelled(root, subset, skip_bad)
    if split == "random":
        idx = split_indices(len(samples), seed)
    elif split == "stratified":
        idx = stratified_split_indices([s["label"] for s in samples], seed)
    else:
        raise UserError(f"unknown split {split!r}; choose random (reference) or stratified")
    classes = HYPERKVASIR_CLASSES[subset]
    return {name: ClassificationDataset(_split(samples, ix), image_size, train=name == "train", classes=classes)
            for name, ix in zip(("train", "val", "test"), idx)}


def build_segmentation_datasets(dataset, root, image_size=224, seed=42, original=False, skip_bad=False):
    """Kvasir-SEG or CVC-ClinicDB with the reference split; ``original=True`` adds the
    original-resolution mask and path to val/test samples (for eval/predict scripts)."""
    readers = {"Kvasir": kvasir_seg, "CVC": cvc_clinicdb}
    if dataset not in readers:
        raise UserError(f"unknown segmentation dataset {dataset!r}; choose from {', '.join(readers)}")
    samples = readers[dataset](root, skip_bad)
    tr, va, te = split_indices(len(samples), seed)
    return {"train": SegmentationDataset(_split(samples, tr), image_size, train=True),
            "val": SegmentationDataset(_split(samples, va), image_size, original=original),
            "test": SegmentationDataset(_split(samples, te), image_size, original=original)}


def build_depth_datasets(root, image_size=224, val_videos=None, test_videos=None, original=False, skip_bad=False):
    """C3VD with the reference per-video split (overridable by video names)."""
    kw = dict(val_videos=val_videos, test_videos=test_videos, skip_bad=skip_bad)
    return {"train": DepthDataset(c3vd(root, "train", **kw), image_size, train=True),
            "val": DepthDataset(c3vd(root, "val", **kw), image_size, original=original),
            "test": DepthDataset(c3vd(root, "test", **kw), image_size, original=original)}


def build_detection_datasets(root, fixed_size=None, seed=42, skip_bad=False):
    """Kvasir-SEG boxes with the reference split (same file order and split as segmentation,
    hence the same test images). ``fixed_size``: None (ResNet path) or e.g. 1024 (ViT path)."""
    samples = kvasir_boxes(root, skip_bad)
    tr, va, te = split_indices(len(samples), seed)
    return {"train": DetectionDataset(_split(samples, tr), fixed_size, train=True),
            "val": DetectionDataset(_split(samples, va), fixed_size),
            "test": DetectionDataset(_split(samples, te), fixed_size)}


def build_unlabelled_dataset(root, transform=None, decode_size=None, skip_bad=False):
    """Every image under ``root`` for pretraining; see UnlabelledDataset."""
    return UnlabelledDataset(image_folder(root, skip_bad), transform, decode_size)
