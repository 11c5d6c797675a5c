"""Image–caption pairs for image–text pretraining (CLIP, SLIP) and retrieval evaluation.

Readers (each returns ``[{"image": path, "captions": [str, ...], "size": (W, H)}]``, one entry
per image in file order, several captions per image allowed; every image's header is checked up
front and every bad row reported at once, as the other readers in ``gissl.data.datasets``):

- ``captions_csv(root)``: ``root/captions.csv`` with a header ``image,caption``; image paths
  relative to ``root``; an image may have several rows.
- ``roco(root)``: ROCO (Pelka et al. 2018, razorx89/roco-dataset) split folder, e.g.
  ``data/train/radiology``: ``captions.txt`` (``ROCO_xxxxx<TAB> caption``), ``dlinks.txt``
  (``ROCO_xxxxx<TAB>wget ... PMCnnn.tar.gz ...<TAB><figure>.jpg``) and ``images/`` where the
  fetch script saves ``<PMCnnn>_<figure>.jpg``. Without ``dlinks.txt`` the image is
  ``images/<ROCO id>.jpg``.
- ``medslip_pairs(root)``: MedSLIP's ``selected_pairs.txt`` (``<image_id> <caption>`` per line),
  images at ``root/images/<image_id>.jpg``.
- ``coco_captions(root)``: COCO-captions JSON (``images`` with ``id``/``file_name``,
  ``annotations`` with ``image_id``/``caption``), ``root/annotations/captions_*.json`` or a
  ``*.json`` in ``root``; images at ``root/<file_name>``, ``root/images/<file_name>`` or
  ``root/<train2017>/<file_name>`` (the folder named like the JSON's split).

``read_captions(root, format="auto")`` picks the reader (``CAPTION_FORMATS``);
``build_caption_datasets`` splits by image with ``split_indices`` (train / val / test, so a
retrieval test split is never trained on) into :class:`CaptionDataset`.
"""
import csv
import glob
import json
import os

import torch

from gissl.data.images import report_bad
from gissl.data.splits import split_indices
from gissl.errors import DataError, UserError

CAPTION_FORMATS = ("auto", "csv", "roco", "medslip", "coco")


def _pairs_to_samples(pairs, bad, what, skip_bad):
    """``[(image path, caption, where)]`` -> checked samples grouped by image (first-seen order).
    ``where`` names the row in a problem message."""
    from gissl.data.datasets import _check_all
    by_image, order = {}, []
    for path, caption, where in pairs:
        caption = (caption or "").strip()
        if not caption:
            bad.append(f"{where}: empty caption for {path}")
            continue
        if path not in by_image:
            by_image[path] = []
            order.append(path)
        by_image[path].append(caption)
    checked = _check_all(order)
    samples = []
    for path in order:
        size, problem = checked[path]
        if problem:
            bad.append(problem)
        else:
            samples.append({"image": path, "captions": by_image[path], "size": size})
    report_bad(bad, skip_bad, what)
    if not samples:
        raise DataError(f"no usable image–caption pairs in {what}")
    return samples


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def captions_csv(root, skip_bad=False):
    """``root/captions.csv`` (``image,caption`` header; paths relative to ``root``)."""
    path = os.path.join(root, "captions.csv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected a header line 'image,caption', found {reader.fieldnames}")
        pairs, bad = [], []
        for line, row in enumerate(reader, start=2):
            if not row.get("image"):
                bad.append(f"{path}:{line}: no image path")
                continue
            pairs.append((os.path.join(root, row["image"]), row.get("caption"), f"{path}:{line}"))
    return _pairs_to_samples(pairs, bad, f"captions at {path}", skip_bad)


def _roco_images(root, bad):
    """ROCO id -> image path, from ``dlinks.txt`` (``<PMC id>_<figure file>``) when present."""
    dlinks = os.path.join(root, "dlinks.txt")
    if not os.path.isfile(dlinks):
        return None
    out = {}
    for line, text in enumerate(_read_text(dlinks), start=1):
        parts = text.rstrip("\n").split("\t")
        if not text.strip():
            continue
        archive = [w for w in parts[1].split() if w.endswith(".tar.gz")] if len(parts) >= 3 else []
        if not archive:
            bad.append(f"{dlinks}:{line}: expected '<id><TAB>wget ... PMCnnn.tar.gz ...<TAB><file>'")
            continue
        pmc = os.path.basename(archive[0])[:-len(".tar.gz")]
        out[parts[0].strip()] = os.path.join(root, "images", f"{pmc}_{parts[-1].strip()}")
    return out


def roco(root, skip_bad=False):
    """ROCO split folder: ``captions.txt`` + ``images/`` (+ ``dlinks.txt`` naming the files)."""
    path = os.path.join(root, "captions.txt")
    bad = []
    names = _roco_images(root, bad)
    pairs = []
    for line, text in enumerate(_read_text(path), start=1):
        if not text.strip():
            continue
        if "\t" not in text:
            bad.append(f"{path}:{line}: expected '<ROCO id><TAB><caption>'")
            continue
        rid, caption = text.split("\t", 1)
        rid = rid.strip()
        image = names.get(rid) if names is not None else os.path.join(root, "images", rid + ".jpg")
        if image is None:
            bad.append(f"{path}:{line}: {rid} is not in dlinks.txt (its image file is unknown)")
            continue
        pairs.append((image, caption, f"{path}:{line}"))
    return _pairs_to_samples(pairs, bad, f"ROCO at {root}", skip_bad)


def medslip_pairs(root, skip_bad=False):
    """MedSLIP ``selected_pairs.txt``: ``<image_id> <caption>`` lines, ``images/<id>.jpg``."""
    path = os.path.join(root, "selected_pairs.txt")
    pairs, bad = [], []
    for line, text in enumerate(_read_text(path), start=1):
        if not text.strip():
            continue
        parts = text.strip().split(None, 1)
        image = os.path.join(root, "images", parts[0] + ".jpg")
        pairs.append((image, parts[1] if len(parts) > 1 else "", f"{path}:{line}"))
    return _pairs_to_samples(pairs, bad, f"MedSLIP pairs at {path}", skip_bad)


def _coco_json(root):
    found = sorted(glob.glob(os.path.join(root, "annotations", "captions_*.json"))) or \
        sorted(glob.glob(os.path.join(root, "*.json")))
    if len(found) != 1:
        raise DataError(f"expected one COCO captions JSON in {root} (or {root}/annotations/captions_*.json), "
                        f"found {len(found)}: {', '.join(found) or 'none'}; point --data-root at a folder with one")
    return found[0]


def coco_captions(root, skip_bad=False):
    """COCO-captions JSON (``images`` + ``annotations`` with ``image_id`` and ``caption``)."""
    path = _coco_json(root)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        files = {im["id"]: im["file_name"] for im in data["images"]}
        annotations = list(data["annotations"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO captions file (needs 'images' with id/file_name and "
                        f"'annotations' with image_id/caption): {e}") from None
    split = os.path.splitext(os.path.basename(path))[0].split("_", 1)[-1]  # captions_train2017 -> train2017
    bases = [root, os.path.join(root, "images"), os.path.join(root, split)]
    pairs, bad = [], []
    for i, a in enumerate(annotations):
        where = f"{path}: annotation {i}"
        if not isinstance(a, dict) or a.get("image_id") not in files:
            bad.append(f"{where}: image_id {a.get('image_id') if isinstance(a, dict) else a!r} is not in 'images'")
            continue
        name = files[a["image_id"]]
        image = next((os.path.join(b, name) for b in bases if os.path.isfile(os.path.join(b, name))),
                     os.path.join(root, name))
        pairs.append((image, a.get("caption"), where))
    return _pairs_to_samples(pairs, bad, f"COCO captions at {path}", skip_bad)


_FORMAT_FILES = (("csv", "captions.csv"), ("medslip", "selected_pairs.txt"), ("roco", "captions.txt"))
READERS = {"csv": captions_csv, "roco": roco, "medslip": medslip_pairs, "coco": coco_captions}


def detect_format(root):
    """The caption format of ``root``: the first of captions.csv, selected_pairs.txt,
    captions.txt (ROCO) or a COCO JSON that is there."""
    for fmt, name in _FORMAT_FILES:
        if os.path.isfile(os.path.join(root, name)):
            return fmt
    if glob.glob(os.path.join(root, "annotations", "captions_*.json")) or glob.glob(os.path.join(root, "*.json")):
        return "coco"
    raise DataError(f"no image–caption files in {root}: expected captions.csv, selected_pairs.txt (MedSLIP), "
                    "captions.txt (ROCO) or a COCO captions JSON; or give --caption-format")


def read_captions(root, format="auto", skip_bad=False):
    """Samples ``[{"image", "captions", "size"}]`` of the caption folder ``root``."""
    if not os.path.isdir(root):
        raise DataError(f"caption dataset folder not found: {root}")
    if format not in CAPTION_FORMATS:
        raise UserError(f"unknown --caption-format '{format}'; choose from {', '.join(CAPTION_FORMATS)}")
    fmt = detect_format(root) if format == "auto" else format
    return READERS[fmt](root, skip_bad)


class CaptionDataset(torch.utils.data.Dataset):
    """Image–caption pairs for training: ``sample -> (*views, tokens)``.

    ``transform(PIL RGB) -> tuple of (3, S, S) views`` (CLIP: one view; SLIP: the CLIP view and
    two SSL views); ``tokenize(list of str) -> (1, L) int64``. Each read draws one of the image's
    captions at random (seeded per sample by the loader). ``decode_size``: reduced-scale JPEG
    decoding with this short side.
    """

    def __init__(self, samples, transform, tokenize, decode_size=None):
        from gissl.data.datasets import UnlabelledDataset
        if not samples:
            raise DataError("empty caption split: the folder has too few usable images")
        self.samples, self.tokenize = list(samples), tokenize
        # the image side is an unlabelled dataset: its transform (a ``Views``) returns the tuple
        self.images = UnlabelledDataset(self.samples, transform, decode_size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        captions = self.samples[i]["captions"]
        caption = captions[int(torch.randint(len(captions), ()))] if len(captions) > 1 else captions[0]
        return (*self.images[i], self.tokenize([caption])[0])


def build_caption_datasets(root, *, format="auto", seed=42, skip_bad=False):
    """``dict(train=, val=, test=)`` of sample lists (split by image with ``split_indices``)."""
    samples = read_captions(root, format, skip_bad)
    if len(samples) < 3:
        raise DataError(f"only {len(samples)} usable image(s) in {root}: a train/val/test split needs at least 3")
    return {name: [samples[i] for i in idx] for name, idx in zip(("train", "val", "test"),
                                                                 split_indices(len(samples), seed))}
