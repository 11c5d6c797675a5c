import hashlib
import json
import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

import gissl.data as D
from gissl.data import synthetic as S
from gissl.data.images import load_mask
from gissl.errors import UserError


def _digest(root):
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            h.update(os.path.relpath(os.path.join(d, f), root).encode())
            with open(os.path.join(d, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_kvasir_format_and_exact_boxes(tmp_path):
    root = S.generate("Kvasir", str(tmp_path / "k"), num=6, seed=0)
    assert sorted(os.listdir(root)) == ["images", "kavsir_bboxes.json", "masks"]
    table = json.loads((tmp_path / "k" / "kavsir_bboxes.json").read_text())
    assert len(table) == 6
    for stem, entry in table.items():
        img = Image.open(os.path.join(root, "images", stem + ".jpg"))
        mask_im = Image.open(os.path.join(root, "masks", stem + ".jpg"))
        assert img.format == mask_im.format == "JPEG" and mask_im.mode == "RGB"  # as Kvasir-SEG
        assert (entry["width"], entry["height"]) == img.size == mask_im.size
        assert 256 <= img.size[1] < 360 and 300 <= img.size[0] < 400
        m = load_mask(os.path.join(root, "masks", stem + ".jpg"))
        assert 0.005 < m.mean() < 0.5
        for b in entry["bbox"]:
            assert b["label"] == "polyp" and b["xmax"] > b["xmin"] and b["ymax"] > b["ymin"]


def test_render_polyp_mask_and_box_exact():
    rng = np.random.default_rng(0)
    for _ in range(5):
        img, mask, boxes = S.render_polyp_image(rng, 120, 150, n_polyps=2)
        assert img.shape == (120, 150, 3) and img.dtype == np.uint8 and mask.shape == (120, 150)
        ys, xs = np.nonzero(mask)
        assert [min(b[0] for b in boxes), min(b[1] for b in boxes)] == [xs.min(), ys.min()]
        assert [max(b[2] for b in boxes), max(b[3] for b in boxes)] == [xs.max() + 1, ys.max() + 1]
        # endoscopy-like: reddish tissue, black aperture corners
        tissue = img[mask == 0]
        assert tissue[:, 0].mean() > tissue[:, 2].mean() + 15
        assert img[0, 0].max() == 0


def test_all_formats_and_determinism(tmp_path):
    cvc = S.generate("CVC", str(tmp_path / "cvc"), num=8, seed=1)
    assert len(D.cvc_clinicdb(cvc)) == 8
    assert sorted(os.listdir(os.path.join(cvc, "Original")))[:2] == ["1.tif", "2.tif"]
    assert Image.open(os.path.join(cvc, "Ground Truth", "1.tif")).mode == "L"

    anat = S.generate("Hyperkvasir_anatomical", str(tmp_path / "an"), num=2, seed=1)
    assert os.path.isdir(os.path.join(anat, "labeled-images", "upper-gi-tract", "anatomical-landmarks", "z-line"))
    assert [s["label"] for s in D.hyperkvasir_labelled(anat, "anatomical")] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]

    c3 = S.generate("C3VD", str(tmp_path / "c3"), num=2, seed=1)
    videos = D.c3vd(c3)
    assert {s["video"] for s in videos} >= set(D.C3VD_VAL_VIDEOS + D.C3VD_TEST_VIDEOS)
    assert len({s["video"] for s in videos}) == 8
    d = Image.open(videos[0]["depth"])
    assert d.mode.startswith("I;16") and d.format == "TIFF" and d.size == (160, 128)
    assert os.path.basename(videos[1]["image"]) == "1_color.png"

    # same seed -> identical bytes; another seed -> different data
    again = S.generate("CVC", str(tmp_path / "cvc2"), num=8, seed=1)
    other = S.generate("CVC", str(tmp_path / "cvc3"), num=8, seed=2)
    assert _digest(cvc) == _digest(again) != _digest(other)


def test_depth_consistent_with_shading(tmp_path):
    c3 = S.generate("C3VD", str(tmp_path / "c3"), num=1, seed=0)
    s = D.c3vd(c3, "test")[0]
    depth = np.asarray(Image.open(s["depth"])).astype(np.float64)
    grey = np.asarray(Image.open(s["image"]).convert("L")).astype(np.float64)
    valid = depth > 0
    # light falls off with distance: nearer tissue is brighter
    r = np.corrcoef(np.log(depth[valid]), grey[valid])[0, 1]
    assert r < -0.6
    assert (grey[~valid].mean() if (~valid).any() else 0) < grey[valid].mean()


def _colour_features(img):
    # rotation/flip-invariant: per-channel intensity quantiles and chromaticity quantiles
    x = img.reshape(-1, 3).astype(np.float32) / 255
    bright = x[x.sum(1) > 0.3]
    chroma = bright / bright.sum(1, keepdims=True)
    q = np.linspace(0.05, 0.95, 10)
    return np.concatenate([np.quantile(x, q, axis=0).ravel(), 3 * np.quantile(chroma, q, axis=0).ravel()])


@pytest.mark.parametrize("subset", ["anatomical", "pathological"])
def test_classes_are_learnable(subset):
    # nearest class mean on simple colour statistics already beats chance by far
    rng = np.random.default_rng(0)
    n_cls = len(D.HYPERKVASIR_CLASSES[subset])

    def feats(n):
        x, y = [], []
        for label in range(n_cls):
            for _ in range(n):
                x.append(_colour_features(S.render_class_image(rng, 80, 96, subset, label)))
                y.append(label)
        return np.array(x), np.array(y)

    xtr, ytr = feats(6)
    xte, yte = feats(3)
    means = np.stack([xtr[ytr == c].mean(0) for c in range(n_cls)])
    pred = ((xte[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yte).mean() > 3.0 / n_cls, (pred, yte)


def _race(cache, q):
    os.environ["GISSL_CACHE"] = cache
    q.put(S.synthetic_root("CVC", num=6, seed=5))


def test_synthetic_root_cached_and_race_safe(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(cache, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    roots = {q.get(timeout=5) for _ in procs}
    assert len(roots) == 1 and all(p.exitcode == 0 for p in procs)
    root = roots.pop()
    assert root.startswith(os.path.join(cache, "synthetic")) and len(D.cvc_clinicdb(root)) == 6
    # no temporary folders left behind
    assert os.listdir(os.path.join(cache, "synthetic")) == [os.path.basename(root)]
    monkeypatch.setenv("GISSL_CACHE", cache)
    mtime = os.path.getmtime(root)
    assert S.synthetic_root("CVC", num=6, seed=5) == root and os.path.getmtime(root) == mtime


def test_cli(tmp_path, capsys):
    assert S.main(["--dataset", "CVC", "--out", str(tmp_path / "o"), "--num", "3", "--seed", "1"]) == 0
    assert len(os.listdir(tmp_path / "o" / "Original")) == 3
    assert S.main(["--dataset", "CVC", "--out", str(tmp_path / "o"), "--num", "3"]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown synthetic dataset"):
        S.synthetic_root("Kvasirr")


def test_unlabelled_is_in_the_hyperkvasir_release_layout(tmp_path):
    # hyper-kvasir-unlabeled-images.zip unpacks to unlabeled-images/images/*.jpg
    un = S.generate("Hyperkvasir_unlabelled", str(tmp_path / "un"), num=5, seed=1)
    assert os.listdir(un) == ["unlabeled-images"]
    assert os.listdir(os.path.join(un, "unlabeled-images")) == ["images"]
    files = sorted(os.listdir(os.path.join(un, "unlabeled-images", "images")))
    assert len(files) == 5 and all(f.endswith(".jpg") for f in files)
    # --data-root at the unpack folder, at unlabeled-images or at images: the same five images;
    # the labelled release unpacked beside it is not read
    S.generate("Hyperkvasir_anatomical", os.path.join(un, "labelled"), num=1, seed=1)
    os.rename(os.path.join(un, "labelled", "labeled-images"), os.path.join(un, "labeled-images"))
    want = [os.path.join(un, "unlabeled-images", "images", f) for f in files]
    for root in (un, os.path.join(un, "unlabeled-images"), os.path.join(un, "unlabeled-images", "images")):
        assert [s["image"] for s in D.image_folder(root)] == want, root
        assert len(D.build_unlabelled_dataset(root)) == 5
