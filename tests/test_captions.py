"""Image–caption readers (gissl.data.captions) on tiny trees in each dataset's own layout:
captions.csv, ROCO (captions.txt + dlinks.txt + images/<PMC id>_<figure>), MedSLIP's
selected_pairs.txt, COCO captions JSON (checked against pycocotools' own reading of the file);
bad rows named in one error or skipped with a warning; the built-in captioned synthetic set."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from gissl.data.captions import CaptionDataset, build_caption_datasets, detect_format, read_captions
from gissl.data.synthetic import generate
from gissl.errors import DataError
from gissl.ssl.augment import slip_views


def _jpg(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, quality=90)


def _csv_tree(root):
    for i, name in enumerate(("frames/a.jpg", "frames/b.jpg", "c.jpg")):
        _jpg(os.path.join(root, name), i)
    (root / "captions.csv").write_text('image,caption\nframes/a.jpg,a polyp in the cecum\n'
                                       'frames/b.jpg,"z-line, no polyp"\nframes/a.jpg,second caption of a\n'
                                       'c.jpg,pylorus\n', encoding="utf-8")


def test_captions_csv_groups_captions_per_image(tmp_path):
    _csv_tree(tmp_path)
    samples = read_captions(str(tmp_path))
    assert detect_format(str(tmp_path)) == "csv"
    assert [os.path.relpath(s["image"], tmp_path) for s in samples] == ["frames/a.jpg", "frames/b.jpg", "c.jpg"]
    assert samples[0]["captions"] == ["a polyp in the cecum", "second caption of a"]
    assert samples[1]["captions"] == ["z-line, no polyp"] and samples[0]["size"] == (24, 20)


def test_roco_layout_with_dlinks(tmp_path):
    # data/<split>/radiology/ of razorx89/roco-dataset, images saved by its fetch script as <PMC id>_<figure>
    (tmp_path / "captions.txt").write_text("ROCO_00001\t Axial CT of the abdomen.\n"
                                           "ROCO_00006\t Coronal MRI showing a mass\n", encoding="utf-8")
    (tmp_path / "dlinks.txt").write_text(
        "ROCO_00001\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/cb/dd/PMC4327453.tar.gz -P /path/to/Dir"
        "\tAMJCR-07-552-g002.jpg\n"
        "ROCO_00006\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/b5/0c/PMC4085828.tar.gz -P /path/to/Dir"
        "\tgr1.jpg\n", encoding="utf-8")
    _jpg(str(tmp_path / "images" / "PMC4327453_AMJCR-07-552-g002.jpg"))
    _jpg(str(tmp_path / "images" / "PMC4085828_gr1.jpg"))
    samples = read_captions(str(tmp_path))
    assert detect_format(str(tmp_path)) == "roco"
    assert [os.path.basename(s["image"]) for s in samples] == ["PMC4327453_AMJCR-07-552-g002.jpg", "PMC4085828_gr1.jpg"]
    assert [s["captions"] for s in samples] == [["Axial CT of the abdomen."], ["Coronal MRI showing a mass"]]


def test_medslip_pairs(tmp_path):
    (tmp_path / "selected_pairs.txt").write_text("PMC1_f1 Mammogram showing calcifications\nPMC2_f3 Chest x-ray\n",
                                                 encoding="utf-8")
    _jpg(str(tmp_path / "images" / "PMC1_f1.jpg"))
    _jpg(str(tmp_path / "images" / "PMC2_f3.jpg"))
    samples = read_captions(str(tmp_path), format="medslip")
    assert [s["captions"] for s in samples] == [["Mammogram showing calcifications"], ["Chest x-ray"]]


def test_coco_captions_equal_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    images = [{"id": 139, "file_name": "000000000139.jpg", "height": 20, "width": 24},
              {"id": 285, "file_name": "000000000285.jpg", "height": 20, "width": 24}]
    anns = [{"image_id": 285, "id": 1, "caption": "A big bear."}, {"image_id": 139, "id": 2, "caption": "A room."},
            {"image_id": 285, "id": 3, "caption": "A brown bear sitting."}]
    os.makedirs(tmp_path / "annotations")
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    for i, im in enumerate(images):
        _jpg(str(tmp_path / "train2017" / im["file_name"]), i)
    samples = read_captions(str(tmp_path))
    coco = COCO(str(path))
    by_file = {coco.imgs[i]["file_name"]: [a["caption"] for a in coco.imgToAnns[i]] for i in coco.imgs}
    assert {os.path.basename(s["image"]): s["captions"] for s in samples} == by_file
    assert all(os.path.isfile(s["image"]) for s in samples)


def test_bad_rows_named_or_skipped(tmp_path):
    _csv_tree(tmp_path)
    (tmp_path / "broken.jpg").write_text("not an image")
    with open(tmp_path / "captions.csv", "a", encoding="utf-8") as f:
        f.write("missing.jpg,an image that is not there\nc.jpg,\nbroken.jpg,unreadable\n")
    with pytest.raises(DataError) as e:
        read_captions(str(tmp_path))
    text = str(e.value)
    assert "3 bad file(s)" in text and "missing.jpg" in text and "broken.jpg" in text and "empty caption" in text
    assert "--skip-bad-files" in text
    with pytest.warns(UserWarning, match="skipping 3 bad"):
        samples = read_captions(str(tmp_path), skip_bad=True)
    assert len(samples) == 3 and samples[2]["captions"] == ["pylorus"]
    with pytest.raises(DataError, match="no image–caption files"):
        read_captions(str(tmp_path / "frames"))


def test_synthetic_captions_describe_images_and_dataset_yields_views(tmp_path):
    root = generate("captions", str(tmp_path / "a"), num=12, seed=0)
    again = generate("captions", str(tmp_path / "b"), num=12, seed=0)
    text = open(os.path.join(root, "captions.csv"), encoding="utf-8").read()
    assert text == open(os.path.join(again, "captions.csv"), encoding="utf-8").read()  # deterministic
    samples = read_captions(root)
    assert len(samples) == 12 and all(len(s["captions"]) == 2 for s in samples)
    assert "polyp" in text and ("cecum" in text or "pylorus" in text or "z line" in text)
    splits = build_caption_datasets(root)
    assert sum(len(v) for v in splits.values()) == 12 and not {s["image"] for s in splits["train"]} & \
        {s["image"] for s in splits["test"]}
    ds = CaptionDataset(splits["train"], slip_views(32), lambda texts: np.array([[len(texts[0])]]))
    clip_view, v1, v2, tokens = ds[0]
    assert clip_view.shape == v1.shape == (3, 32, 32) and int(tokens[0]) in {len(c) for c in ds.samples[0]["captions"]}
