"""Datasets for gissl: readers for every on-disk format, SSL4GIE splits and augmentations.

Task scripts normally need one call (reference split + reference transforms applied)::

    from gissl.data import build_segmentation_datasets
    ds = build_segmentation_datasets("Kvasir", root, image_size=224)   # dict(train=, val=, test=)

Builders (each returns ``dict(train=Dataset, val=Dataset, test=Dataset)``; train gets the
reference train augmentation, val/test the eval transform; ``skip_bad=True`` skips unreadable or
mis-paired files with one warning listing them, otherwise one ``DataError`` names them):

- ``build_classification_datasets(dataset, root, image_size=224, split="random"|"stratified",
  seed=42, skip_bad=False)`` -- dataset ``Hyperkvasir_anatomical`` (6 classes) or
  ``Hyperkvasir_pathological`` (12). Each dataset has ``.classes`` (names, reference class-id
  order) and ``.labels`` ((N,) int64 numpy). Sample ``{"image": (3,S,S) float normalised,
  "label": int64 scalar tensor, "index": int}``.
- ``build_segmentation_datasets(dataset, root, image_size=224, seed=42, original=False,
  skip_bad=False)`` -- ``Kvasir`` or ``CVC``. Sample ``{"image": (3,S,S), "mask": (1,S,S) float
  {0,1}, "index"}``; with ``original=True`` (val/test only) also ``"mask_orig": (1,h,w) bool`` and
  ``"path"``.
- ``build_depth_datasets(root, image_size=224, val_videos=None, test_videos=None, original=False,
  skip_bad=False)`` -- C3VD, per-video split (reference videos by default). Sample
  ``{"image": (3,S,S), "depth": (1,S,S) float mm (0 = invalid), "index"}``; with ``original=True``
  also ``"depth_orig": (1,h,w) float mm`` and ``"path"``. Images are padded to a centred square
  (black / depth 0) before resizing, like the reference; map an (S,S) prediction back to the
  original frame with ``from_square(pred, h, w)``.
- ``build_detection_datasets(root, fixed_size=None, seed=42, skip_bad=False)`` -- Kvasir-SEG boxes.
  Sample ``{"image": (3,H,W) float in [0,1] (NOT normalised), "target": {"boxes": (n,4) float32
  xyxy, "labels": (n,) int64 (all 1)}, "index", "path", "meta"}``; ``fixed_size=F`` (ViT path,
  reference F=1024) pads an image larger than F to a multiple of the smallest integer k that
  fits, shrinks it by exactly 1/k (reference: k=2) and zero-pads it centred to F x F;
  ``meta`` = ``{"orig_size": (h, w), "size": (h', w'), "k": k, "scale": (1/k, 1/k),
  "offset": (left, top), "canvas": (Hc, Wc)}`` (x_canvas = x / k + left; exact for val/test,
  train samples are augmented after scaling). ``unpad_boxes(boxes, meta)`` maps predicted
  canvas boxes back to original pixels (float32, clipped); ``pad_boxes`` is its exact inverse.
  Labels: 1 = polyp (0 = background); same file order and split as segmentation on Kvasir.
- ``build_unlabelled_dataset(root, transform=None, decode_size=None, skip_bad=False)`` -- any
  flat or nested image folder (HyperKvasir unlabelled). ``transform(PIL RGB image)`` is the
  view-transform; the sample is its result when that is a tuple/list of views, else
  ``{"image": result, "index"}``. ``decode_size`` (pixels, short side) enables fast reduced-scale
  JPEG decoding.

- ``build_caption_datasets(root, format="auto", seed=42, skip_bad=False)`` -- image–caption
  pairs (``gissl.data.captions``: ``captions.csv``, ROCO, MedSLIP ``selected_pairs.txt``, COCO
  captions JSON), split by image: dict(train=, val=, test=) of ``[{"image", "captions", "size"}]``;
  ``CaptionDataset(samples, views, tokenize)`` yields ``(*views, tokens (L,))`` for CLIP / SLIP.

Readers (list of dict samples with file paths and ``"size": (W, H)``; validate pairing by name
stem and every file's header up front):

- ``kvasir_seg(root, skip_bad=False)`` -> ``[{"image", "mask"}]`` (``images/`` + ``masks/``).
- ``kvasir_boxes(root, skip_bad=False)`` -> ``[{"image", "boxes": (n,4) float32 xyxy}]`` from
  ``kavsir_bboxes.json`` or ``bounding-boxes.json``.
- ``cvc_clinicdb(root, skip_bad=False)`` -> ``[{"image", "mask"}]`` (``Original/`` +
  ``Ground Truth/``).
- ``image_mask_folders(image_dir, mask_dir, skip_bad=False)`` -> ``[{"image", "mask"}]``.
- ``hyperkvasir_labelled(root, subset, skip_bad=False)`` -> ``[{"image", "label"}]``;
  ``subset`` ``"anatomical"`` / ``"pathological"``; ``HYPERKVASIR_CLASSES[subset]`` the names.
- ``class_folder(root, skip_bad=False)`` -> ``([{"image", "label"}], class_names)``.
- ``image_folder(root, skip_bad=False)`` -> ``[{"image"}]`` (recursive, sorted).
- ``c3vd(root, split=None, val_videos=None, test_videos=None, skip_bad=False)`` ->
  ``[{"image", "depth", "video", "frame"}]`` (split ``"train"|"val"|"test"|None`` = all);
  ``C3VD_VAL_VIDEOS``, ``C3VD_TEST_VIDEOS`` are the reference's.
- ``polyp_twin(root)`` -> ``{"queries": [paths], "references": [paths], "matches": [(q, r)]}``
  (EndoFinder's DISC2021-style retrieval layout).

Datasets (torch ``Dataset``; take a reader's sample list): ``ClassificationDataset``,
``SegmentationDataset``, ``DepthDataset``, ``DetectionDataset``, ``UnlabelledDataset``.
Building blocks for other datasets: ``decode_resized(path, (W, H), exact=False) -> PIL RGB``
(fast JPEG draft decode + bicubic resize for training; ``exact``: full decode first, the
reference's pixels, which the val/test datasets use), ``to_image_tensor(pil) -> tv_tensors.Image (3,H,W) float [0,1]``,
``resize_mask(bool (H,W), (W, H)) -> bool``.

Medical datasets (``gissl.data.medical``, the SSL-transfer study's, as downloaded):
``MEDICAL_DATASETS`` (``csv``, ``CheXpert``, ``ChestX-ray14``, ``MontgomeryCXR``,
``ShenzhenCXR``, ``EyePACS``, ``iChallenge_AMD``, ``iChallenge_PM``, ``BACH``),
``read_medical(dataset, root, ...) -> (samples, classes)``,
``build_medical_datasets(dataset, root, image_size=224, ...) -> (dict(train=, val=, test=), classes)``
(split by patient); ``build_classification_datasets`` accepts these names too.

Splits: ``split_indices(n, seed=42) -> (train, val, test)`` (SSL4GIE's, equal to sklearn's
two-step ``train_test_split``), ``stratified_split_indices(labels, seed=42)``.

Transforms (``gissl.data.transforms``): ``IMAGENET_MEAN``, ``IMAGENET_STD``, ``normalize``,
``classification_transform``, ``segmentation_transform``, ``depth_transform``,
``detection_transform``, ``GaussianBlur``, ``RandomAffine``, ``ColorJitter``, ``RandomRot90``,
``from_square``, ``fixed_size_geometry``, ``pad_boxes``, ``unpad_boxes``.
Images (``gissl.data.images``): ``open_rgb(path, size=None)``, ``load_mask(path, size=None,
resize=False)``, ``load_depth(path)`` (mm), ``check_image(path) -> (W, H)``,
``report_bad(problems, skip_bad, what)``.
Synthetic data (``gissl.data.synthetic``, ``captions`` among them: HyperKvasir classes and polyp
frames with captions saying what is drawn): ``synthetic_root(dataset, num=None, seed=0)``,
``generate(dataset, out, num=None, seed=0)``.
"""

from gissl.data.splits import split_indices, stratified_split_indices  # noqa: F401

from gissl.data.datasets import *  # noqa: F401,F403,E402
from gissl.data.transforms import from_square, pad_boxes, unpad_boxes  # noqa: F401,E402
from gissl.data.medical import MEDICAL_DATASETS, build_medical_datasets, read_medical  # noqa: F401,E402
from gissl.data.captions import (CAPTION_FORMATS, CaptionDataset, build_caption_datasets,  # noqa: F401,E402
                                 read_captions)
