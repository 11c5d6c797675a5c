"""Bad data at every entry point (issue #10 item 4).

Copies of tiny built-in synthetic datasets get broken files: truncated, zero-byte, text under
an image name, PNG with damaged data, image/mask or frame/depth of different sizes, unpaired
files, boxes outside the image or of zero area, box JSONs of the wrong shape, a labels folder
with one class, an image folder with no images. Without ``--skip-bad-files`` each training
script (and pretrain.py) stops with exit code 2 and one ``error:`` naming the file(s) before
anything is written; with it the bad files are skipped with a warning that counts and names
them, and training runs on the rest. Files pair by name stem, so a sample is never mis-paired.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import gissl.data as D
from gissl import cli
from gissl.data.synthetic import generate
from gissl.errors import DataError
from gissl.retrieval_data import write_synthetic_twins
from test_bad_checkpoints import SMALL, assert_nothing_written, error_lines, run_script

DATASETS = (("Kvasir", 12), ("CVC", 12), ("Hyperkvasir_anatomical", 2), ("Hyperkvasir_unlabelled", 6),
            ("C3VD", 2))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Unbroken tiny datasets (generated once); tests break copies of them."""
    base = tmp_path_factory.mktemp("pristine")
    roots = {name: Path(generate(name, str(base / name), num=num, seed=0)) for name, num in DATASETS}
    roots["twin"] = Path(write_synthetic_twins(str(base / "twin"), str(roots["Kvasir"]), num_refs=4,
                                               num_queries=2, num_distractors=2))
    return roots


def copy(pristine, name, tmp_path):
    return Path(shutil.copytree(pristine[name], tmp_path / name))


# entry point: script, dataset it reads, its flags, a function root -> the image file to break
ENTRY_POINTS = {
    "classification": ("train_classification.py", "Hyperkvasir_anatomical",
                       ["--dataset", "Hyperkvasir_anatomical"],
                       lambda r: sorted(r.glob("labeled-images/*/*/*/*.jpg"))[0]),
    "segmentation-Kvasir": ("train_segmentation.py", "Kvasir", ["--dataset", "Kvasir"],
                            lambda r: sorted((r / "images").iterdir())[0]),
    "segmentation-CVC": ("train_segmentation.py", "CVC", ["--dataset", "CVC"],
                         lambda r: r / "Original" / "3.tif"),
    "depth": ("train_depth.py", "C3VD", [],
              lambda r: sorted(r.glob("cecum_t1_a_under_review/c1v1/*_color.png"))[0]),
    "detection": ("train_detection.py", "Kvasir", ["--dataset", "Kvasir", "--proposals", "16",
                                                    "--roi-samples", "8", "--image-size", "64"],
                  lambda r: sorted((r / "images").iterdir())[0]),
    "retrieval": ("train_retrieval.py", "Kvasir", ["--dataset", "Kvasir", "--val-root", "{twin}"],
                  lambda r: sorted((r / "images").iterdir())[0]),
    "pretrain": ("pretrain.py", "Hyperkvasir_unlabelled", ["--dataset", "folder", "--ss-framework", "barlowtwins",
                                                           "--mlp-dim", "32"],
                 lambda r: sorted(r.glob("unlabeled-images/images/*.jpg"))[0]),
}


def train(entry, root, pristine, out, *extra):
    script, _, flags, _ = ENTRY_POINTS[entry]
    argv = SMALL + ["--architecture", "resnet18"] + [f.format(twin=pristine["twin"]) for f in flags]
    return run_script(script, argv + ["--data-root", root, "--output-dir", out, *extra])


def damage_png_data(path):
    """Flip bytes inside the compressed data of a PNG; its header and IEND stay intact."""
    data = bytearray(Path(path).read_bytes())
    start = data.index(b"IDAT") + 40
    data[start:start + 16] = bytes(255 - b for b in data[start:start + 16])
    Path(path).write_bytes(bytes(data))


BREAK = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zero_byte": lambda p: p.write_bytes(b""),
    "text": lambda p: p.write_text("this is not an image\n"),
}
PROBLEM = {"truncated": "truncated", "zero_byte": "empty file", "text": "not a readable image"}


@pytest.mark.parametrize("kind", list(BREAK))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_unreadable_file_stops_before_training(entry, kind, pristine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, name, _, pick = ENTRY_POINTS[entry]
    root = copy(pristine, name, tmp_path)
    bad = pick(root)
    BREAK[kind](bad)
    code, _, err = train(entry, root, pristine, tmp_path / "out")
    assert code == 2 and len(error_lines(err)) == 1, err
    assert f"{bad}: " in err and PROBLEM[kind] in err and "--skip-bad-files" in err, err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_skip_bad_files_trains_on_the_rest(entry, pristine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, name, _, pick = ENTRY_POINTS[entry]
    root = copy(pristine, name, tmp_path)
    bad = pick(root)
    BREAK["truncated"](bad)
    with pytest.warns(UserWarning, match="skipping 1 bad file") as record:
        code, out, err = train(entry, root, pristine, tmp_path / "out", "--skip-bad-files")
    assert code == 0, err
    assert any(str(bad) in str(w.message) for w in record)
    assert any(p.suffix == ".pth" for p in (tmp_path / "out").rglob("*.pth"))


def test_damaged_png_data_is_found_up_front(pristine, tmp_path, monkeypatch):
    """PIL decodes a PNG with a damaged data stream partly and silently once its EXIF lookup
    has failed; the up-front check verifies the chunk checksums instead."""
    monkeypatch.chdir(tmp_path)
    root = copy(pristine, "C3VD", tmp_path)
    bad = ENTRY_POINTS["depth"][3](root)
    damage_png_data(bad)
    code, _, err = train("depth", root, pristine, tmp_path / "out")
    assert code == 2 and f"{bad}: not a readable image (broken PNG file" in err, err
    with pytest.raises(DataError, match="cannot decode image"):
        D.DepthDataset([{"image": str(bad), "depth": str(bad).replace("color.png", "depth.tiff")}])[0]
    assert_nothing_written(tmp_path / "out")


def _damage_jpeg_tables(path):
    # a broken Huffman table: header and end marker intact, so it passes the cheap check, and
    # the decoder fails only when the image is decoded (inside a DataLoader worker)
    data = bytearray(Path(path).read_bytes())
    i = data.index(b"\xff\xc4") + 4
    data[i] = 0xFF if data[i] != 0xFF else 0
    Path(path).write_bytes(bytes(data))


def test_decode_error_in_a_worker_is_one_clear_line(pristine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = copy(pristine, "Kvasir", tmp_path)
    for img in sorted((root / "images").iterdir()):
        _damage_jpeg_tables(img)  # every image, so the first batch surely holds one
    argv = ["--workers", "1"]
    code, _, err = train("segmentation-Kvasir", root, pristine, tmp_path / "out", *argv)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err and "cannot decode image" in lines[0] and str(root / "images") in lines[0]
    assert "replace or remove it" in lines[0]


def test_png_under_a_jpg_name_just_loads(pristine, tmp_path):
    root = copy(pristine, "Kvasir", tmp_path)
    img = sorted((root / "images").iterdir())[0]
    Image.open(img).save(img, format="PNG")  # PNG bytes, .jpg name
    samples = D.kvasir_seg(str(root))
    ds = D.SegmentationDataset(samples, image_size=32)
    i = [s["image"] for s in samples].index(str(img))
    assert ds[i]["image"].shape == (3, 32, 32)


# --- pairing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["segmentation-Kvasir", "segmentation-CVC", "retrieval"])
def test_mask_of_another_size_and_unpaired_files(entry, pristine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = ENTRY_POINTS[entry][1]
    root = copy(pristine, name, tmp_path)
    images, masks = ("images", "masks") if name == "Kvasir" else ("Original", "Ground Truth")
    files = sorted((root / masks).iterdir())
    with Image.open(files[0]) as m:
        m.resize((m.width // 2, m.height // 2)).save(files[0])
    files[1].unlink()  # an image without its mask
    orphan = files[2].with_name("orphan" + files[2].suffix)
    shutil.copy(files[2], orphan)  # a mask without its image
    code, _, err = train(entry, root, pristine, tmp_path / "out")
    assert code == 2 and "3 bad file(s)" in err, err
    assert f"{files[0]}: mask is " in err and f"{root / images / files[1].stem}" in err and "no mask" in err
    assert f"{orphan}: mask without an image" in err
    assert_nothing_written(tmp_path / "out")
    with pytest.warns(UserWarning, match="skipping 3 bad"):
        samples = D.kvasir_seg(str(root), skip_bad=True) if name == "Kvasir" else D.cvc_clinicdb(str(root), True)
    assert len(samples) == 12 - 2
    assert all(Path(s["image"]).stem == Path(s["mask"]).stem for s in samples)  # never mis-paired


def test_depth_map_of_another_size(pristine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = copy(pristine, "C3VD", tmp_path)
    depth = sorted(root.glob("cecum_t1_a_under_review/c1v1/*_depth.tiff"))[0]
    with Image.open(depth) as d:
        d.crop((0, 0, d.width - 8, d.height)).save(depth)
    code, _, err = train("depth", root, pristine, tmp_path / "out")
    assert code == 2 and f"{depth}: depth is 152x128 but its frame is 160x128" in err, err
    with pytest.warns(UserWarning, match="skipping 1 bad"):
        samples = D.c3vd(str(root), "train", skip_bad=True)
    assert str(depth) not in [s["depth"] for s in samples]
    assert all(s["image"].replace("_color.png", "") == s["depth"].replace("_depth.tiff", "") for s in samples)


# --- detection boxes ----------------------------------------------------------------------------

def _edit_boxes(root, edit):
    path = root / "kavsir_bboxes.json"
    table = json.loads(path.read_text())
    table = edit(table)
    path.write_text(json.dumps(table))
    return table


def test_boxes_past_the_border_are_clipped_with_a_warning(pristine, tmp_path):
    root = copy(pristine, "Kvasir", tmp_path)
    first = sorted(json.loads((root / "kavsir_bboxes.json").read_text()))[0]

    def widen(t):
        e = t[first]
        e["bbox"][0].update(xmin=-30, ymin=-5, xmax=e["width"] + 40)
        return t
    table = _edit_boxes(root, widen)
    with pytest.warns(UserWarning, match=f"clipped boxes .* of 1 image.*{first}"):
        samples = D.kvasir_boxes(str(root))
    s = next(s for s in samples if Path(s["image"]).stem == first)
    w, h = table[first]["width"], table[first]["height"]
    assert s["boxes"][0].tolist() == [0, 0, w, table[first]["bbox"][0]["ymax"]] and s["size"] == (w, h)


@pytest.mark.parametrize("kind, problem", [
    ("outside", "zero area"), ("zero_area", "zero area"), ("not_a_dict", "expected {"),
    ("no_xmin", "no key 'xmin'"), ("bbox_not_a_list", "expected {"),
])
def test_bad_box_entries_are_named(kind, problem, pristine, tmp_path):
    root = copy(pristine, "Kvasir", tmp_path)
    first = sorted(json.loads((root / "kavsir_bboxes.json").read_text()))[0]

    def edit(t):
        e, b = t[first], t[first]["bbox"][0]
        if kind == "outside":
            b.update(xmin=e["width"] + 5, xmax=e["width"] + 50)
        elif kind == "zero_area":
            b.update(ymax=b["ymin"])
        elif kind == "not_a_dict":
            t[first] = "polyp"
        elif kind == "no_xmin":
            del b["xmin"]
        else:
            e["bbox"] = {"xmin": 1}
        return t
    _edit_boxes(root, edit)
    with pytest.raises(DataError, match="1 bad file") as e:
        D.kvasir_boxes(str(root))
    assert f"{first}.jpg: bad entry in {root / 'kavsir_bboxes.json'}" in str(e.value) and problem in str(e.value)
    with pytest.warns(UserWarning, match="skipping 1 bad"):
        assert len(D.kvasir_boxes(str(root), skip_bad=True)) == 11


@pytest.mark.parametrize("content, problem", [
    ("[]", "top level is not an object keyed by image name"),
    ('{"a": {"bbox": [}', "Expecting value"),
])
def test_box_json_of_the_wrong_shape(content, problem, pristine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = copy(pristine, "Kvasir", tmp_path)
    (root / "kavsir_bboxes.json").write_text(content)
    code, _, err = train("detection", root, pristine, tmp_path / "out")
    assert code == 2 and len(error_lines(err)) == 1, err
    assert f"cannot read box file {root / 'kavsir_bboxes.json'}" in err and problem in err
    assert_nothing_written(tmp_path / "out")


def test_detection_trains_past_degenerate_boxes_with_skip(pristine, tmp_path, monkeypatch):
    """Zero-area and wholly-outside boxes are dropped with their images, a box past the border
    is clipped: the detector's losses stay finite and training completes."""
    monkeypatch.chdir(tmp_path)
    root = copy(pristine, "Kvasir", tmp_path)
    names = sorted(json.loads((root / "kavsir_bboxes.json").read_text()))

    def edit(t):
        t[names[0]]["bbox"][0].update(ymax=t[names[0]]["bbox"][0]["ymin"])
        t[names[1]]["bbox"][0].update(xmin=-9999)
        t[names[2]]["bbox"][0].update(xmin=t[names[2]]["width"] + 1, xmax=t[names[2]]["width"] + 9)
        return t
    _edit_boxes(root, edit)
    with pytest.warns(UserWarning) as record:
        code, out, err = train("detection", root, pristine, tmp_path / "out", "--skip-bad-files")
    assert code == 0, err
    text = " ".join(str(w.message) for w in record)
    assert "skipping 2 bad file(s)" in text and "clipped boxes" in text and names[1] in text
    log = next((tmp_path / "out").glob("*.jsonl")).read_text()
    assert "nan" not in log.lower()


# --- classes and folders ------------------------------------------------------------------------

def test_labels_folder_with_one_class(pristine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = copy(pristine, "Hyperkvasir_anatomical", tmp_path)
    keep = sorted(root.glob("labeled-images/*/*/*"))[0]
    for d in root.glob("labeled-images/*/*/*"):
        if d != keep:
            shutil.rmtree(d)
    code, _, err = train("classification", root, pristine, tmp_path / "out")
    assert code == 2 and "5 bad file(s)" in err and "class folder missing" in err, err
    code, _, err = train("classification", root, pristine, tmp_path / "out", "--skip-bad-files")
    assert code == 2 and f"only one class has usable images under {root / 'labeled-images'} ('{keep.name}')" in err
    assert_nothing_written(tmp_path / "out")
    # a generic class-folder dataset with a single class folder
    flat = tmp_path / "flat" / "polyps"
    shutil.copytree(keep, flat)
    code, _, err = run_script("train_classification.py", SMALL + ["--architecture", "resnet18", "--dataset", "folder",
                                                                  "--data-root", flat.parent, "--output-dir",
                                                                  tmp_path / "out"])
    assert code == 2 and "only one class has usable images" in err and "'polyps'" in err, err


@pytest.mark.parametrize("entry", ["pretrain", "retrieval"])
def test_folder_without_images(entry, pristine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "unlabelled"
    root.mkdir()
    (root / "notes.txt").write_text("the images are elsewhere")
    extra = ["--dataset", "Hyperkvasir_unlabelled"] if entry == "retrieval" else []
    code, _, err = train(entry, root, pristine, tmp_path / "out", *extra)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and f"no images found in {root}" in lines[0], err
    assert "--data-root" in lines[0]
    assert_nothing_written(tmp_path / "out")


def test_worker_errors_keep_only_the_original_message():
    """``cli.user_message`` strips the worker traceback torch wraps around a re-raised error."""
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError(f"cannot decode image /data/{i}.jpg: broken; replace or remove it")
    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "Traceback" in str(e.value)
    assert cli.user_message(e.value) == "cannot decode image /data/0.jpg: broken; replace or remove it"
    assert cli.user_message(DataError("plain\nmessage")) == "plain\nmessage"



def _coco(root, pristine):
    """A COCO box file over copies of the Kvasir images (one box per image, category 1)."""
    table = json.loads((pristine["Kvasir"] / "kavsir_bboxes.json").read_text())
    shutil.copytree(pristine["Kvasir"] / "images", root)
    images, anns = [], []
    for i, (stem, e) in enumerate(sorted(table.items())):
        images.append({"id": i, "file_name": f"{stem}.jpg", "width": e["width"], "height": e["height"]})
        b = e["bbox"][0]
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                     "bbox": [b["xmin"], b["ymin"], b["xmax"] - b["xmin"], b["ymax"] - b["ymin"]]})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "polyp"}]}


def test_coco_boxes_clipped_dropped_and_bad_entries_named(pristine, tmp_path):
    from gissl import detection as det
    coco = _coco(tmp_path / "images", pristine)
    w, h = coco["images"][0]["width"], coco["images"][0]["height"]
    coco["annotations"][0]["bbox"] = [-20, 5, w + 40, 10]        # past both borders: clipped
    coco["annotations"][1]["bbox"] = [coco["images"][1]["width"] + 5, 5, 30, 30]  # wholly outside: dropped
    coco["annotations"][2]["category_id"] = 9                    # unknown category: a bad file
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="1 bad file") as e:
        det.read_coco(str(tmp_path / "images"), str(path))
    assert coco["images"][2]["file_name"] in str(e.value) and "unknown category 9" in str(e.value)
    with pytest.warns(UserWarning, match="skipping 1 bad"):
        samples, _ = det.read_coco(str(tmp_path / "images"), str(path), skip_bad=True)
    by_id = {s["image_id"]: s for s in samples}
    assert by_id[0]["boxes"].tolist() == [[0, 5, w, 15]] and len(by_id[1]["boxes"]) == 0 and 2 not in by_id


@pytest.mark.parametrize("content, problem", [
    ([], "the top level is not an object with 'images'"),
    ({"images": ["a.jpg"], "categories": [{"id": 1}]}, "'images' and 'annotations' must be lists of objects"),
    ({"images": []}, "no key 'categories'"),
])
def test_coco_json_of_the_wrong_shape(content, problem, pristine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(content))
    code, _, err = run_script("train_detection.py", SMALL + ["--architecture", "resnet18", "--dataset", "coco",
                                                             "--annotations", path, "--data-root", tmp_path,
                                                             "--output-dir", tmp_path / "out"])
    assert code == 2 and len(error_lines(err)) == 1 and f"cannot read COCO annotations {path}: {problem}" in err, err
    assert_nothing_written(tmp_path / "out")


def test_unreadable_retrieval_validation_image(pristine, tmp_path, monkeypatch):
    """train_retrieval validates on --val-root after every epoch: its images are checked up front
    too, and --skip-bad-files drops a bad one together with its ground-truth matches."""
    monkeypatch.chdir(tmp_path)
    twin = copy(pristine, "twin", tmp_path)
    bad = twin / "val_ref" / "R0001.jpg"
    BREAK["truncated"](bad)
    kvasir = pristine["Kvasir"]
    script = ENTRY_POINTS["retrieval"][0]
    argv = SMALL + ["--architecture", "resnet18", "--dataset", "Kvasir", "--data-root", kvasir, "--val-root", twin,
                    "--output-dir", tmp_path / "out"]
    code, _, err = run_script(script, argv)
    assert code == 2 and len(error_lines(err)) == 1 and f"{bad}: not a readable image" in err, err
    assert_nothing_written(tmp_path / "out")
    with pytest.warns(UserWarning, match="skipping 1 bad"):
        data = D.polyp_twin(str(twin), skip_bad=True)
    assert str(bad) not in data["references"] and len(data["references"]) == 3
    assert [(Path(q).stem, Path(r).stem) for q, r in data["matches"]] == [("Q0000", "R0000")]
