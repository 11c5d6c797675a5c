import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gissl.data as D
from gissl.data.images import check_image, load_depth, load_mask, open_rgb
from gissl.data.synthetic import generate
from gissl.errors import DataError


# --- hand-made files for the decoding quirks -----------------------------------------------------

def _rgb(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_open_rgb_modes(tmp_path):
    a = _rgb()
    rgba = np.concatenate([a, np.full((40, 60, 1), 255, np.uint8)], -1)
    rgba[:5, :5, 3] = 0  # transparent corner -> black
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(a[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(a).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(a).save(tmp_path / "x.bmp")
    im = open_rgb(tmp_path / "rgba.png")
    assert im.mode == "RGB" and (np.asarray(im)[:5, :5] == 0).all()
    assert np.array_equal(np.asarray(im)[10:, 10:], a[10:, 10:])
    g = np.asarray(open_rgb(tmp_path / "grey.png"))
    assert g.shape == (40, 60, 3) and np.array_equal(g[..., 1], a[..., 0])
    assert np.asarray(open_rgb(tmp_path / "pal.png")).shape == (40, 60, 3)
    g16 = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert np.abs(g16[..., 0].astype(int) - a[..., 0]).max() <= 1  # 16-bit scaled to 8-bit
    assert np.array_equal(np.asarray(open_rgb(tmp_path / "x.bmp")), a)


def test_exif_rotation_and_draft(tmp_path):
    a = np.zeros((40, 60, 3), np.uint8)
    a[:10, :20] = 255  # bright block top-left on disk
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    shown = np.asarray(open_rgb(tmp_path / "rot.jpg"))
    assert shown.shape == (60, 40, 3)  # displayed portrait
    assert check_image(tmp_path / "rot.jpg") == (40, 60)  # (W, H) as displayed
    assert shown[:20, -10:].mean() > 200 and shown[-20:, :10].mean() < 50
    big = Image.fromarray(np.repeat(np.repeat(_rgb(67, 80), 16, 0), 16, 1))  # 1280x1072
    big.save(tmp_path / "big.jpg", quality=90)
    small = open_rgb(tmp_path / "big.jpg", (224, 224))
    assert small.size == (320, 268)  # decoded at 1/4 scale, still >= 224 on both sides
    assert open_rgb(tmp_path / "big.jpg").size == (1280, 1072)


def test_masks_binarised(tmp_path):
    m = np.zeros((50, 50), np.uint8)
    m[10:30, 15:40] = 255
    Image.fromarray(np.repeat(m[..., None], 3, -1)).save(tmp_path / "m.jpg", quality=75)  # Kvasir style
    Image.fromarray((m > 0).astype(np.uint8)).save(tmp_path / "idx.png")  # 0/1 index mask
    Image.fromarray(m).convert("1").save(tmp_path / "bw.bmp")
    for name in ("m.jpg", "idx.png", "bw.bmp"):
        got = load_mask(tmp_path / name)
        assert got.dtype == bool and (got == (m > 0)).mean() > 0.995, name


def test_depth_reading(tmp_path):
    d = np.array([[0, 65535], [32768, 655]], np.uint16)
    Image.fromarray(d).save(tmp_path / "0_depth.tiff")
    mm = load_depth(tmp_path / "0_depth.tiff")
    np.testing.assert_allclose(mm, d / 65535 * 100, rtol=1e-6)
    Image.fromarray(d.astype(np.uint8)).save(tmp_path / "8bit.tiff")
    with pytest.raises(DataError, match="16-bit"):
        load_depth(tmp_path / "8bit.tiff")


# --- readers on generated data -------------------------------------------------------------------

@pytest.fixture(scope="module")
def kvasir(tmp_path_factory):
    return generate("Kvasir", str(tmp_path_factory.mktemp("kv")), num=12, seed=3)


@pytest.fixture(scope="module")
def c3vd_root(tmp_path_factory):
    return generate("C3VD", str(tmp_path_factory.mktemp("c3")), num=3, seed=1)


def test_kvasir_segmentation(kvasir):
    samples = D.kvasir_seg(kvasir)
    assert len(samples) == 12
    for s in samples:
        assert os.path.basename(s["image"]) == os.path.basename(s["mask"])
    ds = D.build_segmentation_datasets("Kvasir", kvasir, image_size=64, original=True)
    assert [len(ds[k]) for k in ("train", "val", "test")] == [10, 1, 1]
    tr = ds["train"][0]
    assert tr["image"].shape == (3, 64, 64) and tr["mask"].shape == (1, 64, 64)
    assert set(tr["mask"].unique().tolist()) <= {0.0, 1.0}
    te = ds["test"][0]
    w, h = ds["test"].samples[0]["size"]
    assert te["mask_orig"].shape == (1, h, w) and te["mask_orig"].dtype == torch.bool
    assert te["path"] == ds["test"].samples[0]["image"]
    # eval mask at 64 px agrees with the original-size mask
    small = torch.nn.functional.interpolate(te["mask_orig"][None].float(), size=(64, 64), mode="area")[0]
    assert ((small > 0.5) == (te["mask"] > 0.5)).float().mean() > 0.97


def test_detection_boxes_bound_masks(kvasir):
    samples = D.kvasir_boxes(kvasir)
    for s in samples:
        m = load_mask(s["image"].replace("images", "masks"))
        ys, xs = np.nonzero(m)
        assert len(s["boxes"]) >= 1
        # JPEG mask after binarisation vs exact box: within a pixel
        lo, hi = s["boxes"][:, :2].min(0), s["boxes"][:, 2:].max(0)
        assert np.abs(lo - [xs.min(), ys.min()]).max() <= 1 and np.abs(hi - [xs.max() + 1, ys.max() + 1]).max() <= 1
    ds = D.build_detection_datasets(kvasir, fixed_size=128)
    for i in range(len(ds["test"])):
        item = ds["test"][i]
        assert item["image"].shape == (3, 128, 128) and item["target"]["labels"].dtype == torch.int64
        assert 0 <= item["image"].min() and item["image"].max() <= 1
        back = D.unpad_boxes(item["target"]["boxes"], item["meta"])
        torch.testing.assert_close(back, torch.as_tensor(ds["test"].samples[i]["boxes"]))
        # the zero padding is outside the boxes, the polyp is inside: the image is black
        # outside the content area
        left, top = item["meta"]["offset"]
        assert item["image"][:, :, :left].abs().sum() == 0 if left > 0 else True
    tr = ds["train"][0]
    assert tr["image"].shape == (3, 128, 128) and tr["target"]["boxes"].shape[1] == 4
    full = D.build_detection_datasets(kvasir)["val"][0]
    w, h = ds["val"].samples[0]["size"]
    assert full["image"].shape == (3, h, w)


def test_segmentation_cvc_bmp_and_png(tmp_path):
    for d in ("Original", "Ground Truth"):
        os.makedirs(tmp_path / d)
    for i in range(1, 11):
        m = np.zeros((30, 40), np.uint8)
        m[5:5 + i, 10:20] = 255
        Image.fromarray(_rgb(30, 40, i)).save(tmp_path / "Original" / f"{i}.bmp")
        Image.fromarray(m).save(tmp_path / "Ground Truth" / f"{i}.png")
    samples = D.cvc_clinicdb(str(tmp_path))
    # paired by stem: 10 sorts after 1 (file-name order), each mask belongs to its image
    assert [os.path.basename(s["image"]) for s in samples][:3] == ["1.bmp", "10.bmp", "2.bmp"]
    for s in samples:
        i = int(os.path.basename(s["image"])[:-4])
        assert load_mask(s["mask"]).sum() == 10 * i


def test_hyperkvasir_class_ids(tmp_path_factory):
    root = generate("Hyperkvasir_pathological", str(tmp_path_factory.mktemp("hk")), num=3, seed=0)
    samples = D.hyperkvasir_labelled(root, "pathological")
    assert len(samples) == 36
    names = D.HYPERKVASIR_CLASSES["pathological"]
    for s in samples:
        assert os.path.basename(os.path.dirname(s["image"])) == names[s["label"]]
    # the reference's id order = sorted glob with trailing "/" over tract then class folders
    ref = sorted(f"{t}/{c}/{k}/" for t, c, k in D.HYPERKVASIR_LAYOUT["pathological"])
    assert [r.split("/")[2] for r in ref] == names
    assert names[3] == "ulcerative-colitis-grade-1-2" and names[4] == "ulcerative-colitis-grade-1"
    assert names[8] == "barretts-short-segment" and names[9] == "barretts"
    assert D.HYPERKVASIR_CLASSES["anatomical"] == ["cecum", "ileum", "retroflex-rectum", "pylorus",
                                                   "retroflex-stomach", "z-line"]
    ds = D.build_classification_datasets("Hyperkvasir_pathological", root, image_size=32, split="stratified")
    assert sorted(set(ds["test"].labels.tolist())) == list(range(12))
    item = ds["train"][0]
    assert item["image"].shape == (3, 32, 32) and item["label"].dtype == torch.int64 and item["label"].ndim == 0
    # a missing class folder is reported by name
    import shutil
    shutil.rmtree(os.path.join(root, "labeled-images", "upper-gi-tract", "pathological-findings", "barretts"))
    with pytest.raises(DataError, match="barretts: class folder missing"):
        D.hyperkvasir_labelled(root, "pathological")


def test_c3vd_split_and_order(c3vd_root):
    test = D.c3vd(c3vd_root, "test")
    assert [s["video"] for s in test] == [D.C3VD_TEST_VIDEOS[0]] * 3 + [D.C3VD_TEST_VIDEOS[1]] * 3
    assert [s["frame"] for s in test] == [0, 1, 2, 0, 1, 2]
    train = D.c3vd(c3vd_root, "train")
    assert len(train) == 4 * 3 and not {s["video"] for s in train} & set(D.C3VD_VAL_VIDEOS + D.C3VD_TEST_VIDEOS)
    other = D.c3vd(c3vd_root, "val", val_videos=["c1v1"], test_videos=["t2v2"])
    assert {s["video"] for s in other} == {"cecum_t1_a_under_review/c1v1"}
    with pytest.raises(DataError, match="not found"):
        D.c3vd(c3vd_root, "val", val_videos=["nope"])
    ds = D.build_depth_datasets(c3vd_root, image_size=32, original=True)
    item = ds["test"][0]
    assert item["image"].shape == (3, 32, 32) and item["depth"].shape == (1, 32, 32)
    assert item["depth_orig"].shape == (1, 128, 160)
    assert 0 < item["depth"].max() <= 100
    # square padding: 16 px bands top and bottom of a 160x128 frame -> 3.2 px at 32, depth 0
    assert (item["depth"][0, :3] == 0).all() and (item["depth"][0, -3:] == 0).all()
    # frames ordered numerically: 10 after 9
    folder = os.path.join(c3vd_root, *D.C3VD_VAL_VIDEOS[0].split("/"))
    for n in (9, 10):
        for suffix in ("color.png", "depth.tiff"):
            src = os.path.join(folder, f"0_{suffix}")
            Image.open(src).save(os.path.join(folder, f"{n}_{suffix}"))
    assert [s["frame"] for s in D.c3vd(c3vd_root, "val")][:5] == [0, 1, 2, 9, 10]


def test_unlabelled_views(tmp_path):
    for i in range(3):
        Image.fromarray(_rgb(100, 120, i)).save(tmp_path / f"{i}.jpg")
    os.makedirs(tmp_path / "sub")
    Image.fromarray(_rgb(50, 50, 9)).save(tmp_path / "sub" / "x.png")
    ds = D.build_unlabelled_dataset(str(tmp_path), transform=lambda im: (im.size, im.size))
    assert len(ds) == 4 and ds[0] == ((120, 100), (120, 100))
    ds = D.build_unlabelled_dataset(str(tmp_path))
    assert ds[3]["image"].shape == (3, 50, 50)
    big = tmp_path / "big"
    os.makedirs(big)
    Image.fromarray(np.repeat(np.repeat(_rgb(67, 80), 16, 0), 16, 1)).save(big / "a.jpg")  # 1280x1072
    fast = D.build_unlabelled_dataset(str(big), decode_size=200)[0]["image"]
    assert fast.shape == (3, 268, 320)  # JPEG decoded at 1/4: short side still >= 200


# --- bad input: one DataError naming the file, or a warning and a skip --------------------------

def _kvasir_copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def _only_error(fn, *args, match):
    with pytest.raises(DataError, match=match) as e:
        fn(*args)
    return str(e.value)


def test_bad_inputs(kvasir, tmp_path):
    assert "folder not found" in _only_error(D.image_mask_folders, str(tmp_path / "no"), str(tmp_path), match="not found")
    os.makedirs(tmp_path / "empty" / "images")
    os.makedirs(tmp_path / "empty" / "masks")
    _only_error(D.kvasir_seg, str(tmp_path / "empty"), match="no images")
    _only_error(D.kvasir_seg, str(tmp_path / "nothing_here"), match="Kvasir-SEG not found")

    root = _kvasir_copy(kvasir, tmp_path / "k")
    imgs = sorted(os.listdir(os.path.join(root, "images")))
    # image without mask, mask without image
    os.remove(os.path.join(root, "masks", imgs[0]))
    Image.fromarray(_rgb()).save(os.path.join(root, "masks", "extra.jpg"))
    msg = _only_error(D.kvasir_seg, root, match="2 bad file")
    assert imgs[0] in msg and "no mask" in msg and "extra.jpg: mask without an image" in msg
    with pytest.warns(UserWarning, match="skipping 2 bad"):
        assert len(D.kvasir_seg(root, skip_bad=True)) == 11
    os.remove(os.path.join(root, "masks", "extra.jpg"))

    # mask of a different size
    Image.fromarray(_rgb(10, 10)).save(os.path.join(root, "masks", imgs[1]))
    assert "mask is 10x10" in _only_error(D.kvasir_seg, root, match=imgs[1])

    # truncated JPEG and a non-image file with an image name
    p = os.path.join(root, "images", imgs[2])
    data = Path(p).read_bytes()
    Path(p).write_bytes(data[: len(data) // 2])
    Path(root, "images", imgs[3]).write_text("not an image")
    msg = _only_error(D.kvasir_boxes, root, match="truncated")
    assert imgs[2] in msg and imgs[3] in msg and "not a readable image" in msg

    # image missing from the box JSON
    root2 = _kvasir_copy(kvasir, tmp_path / "k2")
    table = json.loads(Path(root2, "kavsir_bboxes.json").read_text())
    gone = sorted(table)[0]
    del table[gone]
    os.rename(os.path.join(root2, "kavsir_bboxes.json"), os.path.join(root2, "bounding-boxes.json"))
    Path(root2, "bounding-boxes.json").write_text(json.dumps(table))
    assert "not in" in _only_error(D.kvasir_boxes, root2, match=gone)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert len(D.build_detection_datasets(root2, skip_bad=True)["train"]) == 9
    assert any(gone in str(x.message) for x in w)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")  # PIL, about the garbage TIFF we report
def test_bad_depth_files(c3vd_root, tmp_path):
    import shutil
    root = str(tmp_path / "c")
    shutil.copytree(c3vd_root, root)
    folder = os.path.join(root, *D.C3VD_TEST_VIDEOS[0].split("/"))
    Path(folder, "1_depth.tiff").write_bytes(b"II*\x00garbage")
    os.remove(os.path.join(folder, "2_depth.tiff"))
    Image.fromarray(np.zeros((128, 160), np.uint8)).save(os.path.join(folder, "0_depth.tiff"))
    png = Path(root, *D.C3VD_TEST_VIDEOS[1].split("/"), "1_color.png")
    png.write_bytes(png.read_bytes()[:-200])  # truncated PNG: IEND chunk gone
    msg = _only_error(D.c3vd, root, "test", match="4 bad file")
    assert "1_depth.tiff: not a readable image" in msg and "2_depth.tiff" in msg and "mode 'L'" in msg
    assert "1_color.png: not a readable image (file is truncated (no PNG IEND chunk))" in msg
    with pytest.warns(UserWarning):
        assert len(D.c3vd(root, "test", skip_bad=True)) == 2
    shutil.rmtree(os.path.join(root, *D.C3VD_VAL_VIDEOS[0].split("/")))
    _only_error(D.c3vd, root, "val", match="t4v1.*not found")


def test_many_files_checked_in_threads(tmp_path):
    # above 64 files the header checks run in a thread pool: same result, same order, bad named
    for i in range(80):
        Image.fromarray(_rgb(8, 8 + i % 3, i)).save(tmp_path / f"{i:03d}.png")
    Path(tmp_path / "050.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="050.png"):
        D.image_folder(str(tmp_path))
    with pytest.warns(UserWarning, match="050.png"):
        samples = D.image_folder(str(tmp_path), skip_bad=True)
    assert [os.path.basename(s["image"]) for s in samples] == [f"{i:03d}.png" for i in range(80) if i != 50]
    assert samples[1]["size"] == (9, 8)


def test_eval_images_are_the_references_pixels(tmp_path):
    """Evaluation decodes at full size then resizes, as the reference's Image.open().resize((S, S));
    training may decode a JPEG at reduced scale (draft), which is faster but not the same pixels."""
    import torchvision.transforms.functional as TF
    from gissl.data.datasets import ClassificationDataset, SegmentationDataset
    from gissl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    rng = np.random.default_rng(0)
    arr = (rng.random((300, 420, 3)) * 255).astype(np.uint8)
    path, mask = tmp_path / "a.jpg", tmp_path / "m.png"
    Image.fromarray(arr).save(path, quality=90)
    Image.fromarray(np.zeros((300, 420), np.uint8)).save(mask)
    ref = TF.normalize(TF.to_tensor(Image.open(path).resize((64, 64))), IMAGENET_MEAN, IMAGENET_STD)
    cls = ClassificationDataset([{"image": str(path), "label": 0}], 64, train=False)[0]["image"]
    seg = SegmentationDataset([{"image": str(path), "mask": str(mask)}], 64, train=False, original=True)[0]["image"]
    assert torch.allclose(cls, ref, atol=1e-6) and torch.allclose(seg, ref, atol=1e-6)
    draft = D.decode_resized(str(path), (64, 64))  # the training decode: 1/4-scale draft, then resize
    assert not np.array_equal(np.asarray(draft), np.asarray(Image.open(path).resize((64, 64))))
