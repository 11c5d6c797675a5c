import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from gissl.data import transforms as T


def _box_scene(h=96, w=128, box=(30, 20, 70, 50)):
    """An image whose bright rectangle, mask and box are the same object."""
    x1, y1, x2, y2 = box
    mask = torch.zeros(1, h, w)
    mask[:, y1:y2, x1:x2] = 1
    img = tv_tensors.Image(0.15 + 0.7 * mask.repeat(3, 1, 1))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY", canvas_size=(h, w))
    return img, tv_tensors.Mask(mask), boxes


def _bounds(m):
    ys, xs = torch.nonzero(m[0] > 0.5, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_separable_blur_equals_torchvision():
    x = torch.rand(3, 40, 52)
    blur = T.GaussianBlur(25, (1.3, 1.3))
    for sigma in (0.001, 0.7, 1.3, 2.0):
        ours = blur.transform(tv_tensors.Image(x), {"sigma": sigma})
        ref = TF.gaussian_blur(x, [25, 25], [sigma, sigma])
        torch.testing.assert_close(ours.as_subclass(torch.Tensor), ref, atol=1e-5, rtol=0)
    m = tv_tensors.Mask(torch.ones(1, 40, 52))
    assert blur.transform(m, {"sigma": 1.3}) is m  # masks are never blurred
    assert T.gaussian_blur(1.0).kernel_size == 25 and T.gaussian_blur(1.0).sigma == (0.001, 2.0)
    assert T.gaussian_blur(0.5).kernel_size == 13


@pytest.mark.parametrize("seed", range(12))
def test_detection_boxes_follow_image(seed):
    torch.manual_seed(seed)
    img, mask, boxes = _box_scene()
    out_img, out_mask, out_boxes = T.detection_transform(train=True)(img, mask, boxes)
    # the box still bounds the object exactly, and the image's bright region is the mask
    torch.testing.assert_close(out_boxes[0].as_subclass(torch.Tensor), _bounds(out_mask))
    assert out_img.shape[-2:] == out_mask.shape[-2:] == out_boxes.canvas_size
    bright = out_img.mean(0) > out_img.mean()
    assert (bright == (out_mask[0] > 0.5)).float().mean() > 0.97


def test_rot90_matches_reference_formula():
    img, mask, boxes = _box_scene()
    rot = T.RandomRot90(p=1.0)
    o_img, o_mask, o_box = rot(img, mask, boxes)
    torch.testing.assert_close(o_img.as_subclass(torch.Tensor), torch.rot90(img, 1, dims=[1, 2]).as_subclass(torch.Tensor))
    x1, y1, x2, y2 = boxes[0].tolist()
    w = img.shape[-1]
    assert o_box[0].tolist() == [y1, w - x2, y2, w - x1]  # docs/ssl4gie-study.md §2.3
    torch.testing.assert_close(o_box[0].as_subclass(torch.Tensor), _bounds(o_mask))


@pytest.mark.parametrize("seed", range(8))
def test_segmentation_mask_follows_image(seed):
    torch.manual_seed(seed)
    img, mask, boxes = _box_scene(112, 112, (35, 30, 80, 70))
    out_img, out_mask, out_boxes = T.segmentation_transform(112, train=True)(img, mask, boxes)
    mean = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    raw = out_img * std + mean
    on = out_mask[0] > 0.5
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    if on.sum() > 20:
        # the object (mask) is brighter than everything else in the image
        assert raw.mean(0)[on].mean() > raw.mean(0)[~on].mean() + 0.2
        b = out_boxes[0]
        mb = _bounds(out_mask)
        # the affine-transformed box (hull of the moved corners) contains the moved mask
        assert b[0] <= mb[0] + 1 and b[1] <= mb[1] + 1 and b[2] >= mb[2] - 1 and b[3] >= mb[3] - 1


def test_segmentation_affine_fills_black():
    # the affine runs before Normalize with fill 0: black, not the reference's -1.0 grey
    tr = T.segmentation_transform(64, train=True)
    assert isinstance(tr.transforms[-2], T.RandomAffine) and isinstance(tr.transforms[-1], v2.Normalize)
    shrink = T.RandomAffine(45, scale=(0.5, 0.5))
    img, mask, _ = _box_scene(64, 64, (10, 10, 50, 50))
    img, mask = shrink(img, mask)
    out = tr.transforms[-1](img)
    black = tr.transforms[-1](tv_tensors.Image(torch.zeros(3, 1, 1)))
    torch.testing.assert_close(out[:, 0, 0], black[:, 0, 0])
    assert mask[0, 0, 0] == 0


@pytest.mark.parametrize("seed", range(4))
def test_affine_equals_torchvision(seed):
    torch.manual_seed(seed)
    x = torch.rand(3, 50, 64)
    img = tv_tensors.Image(x)
    aff = T.RandomAffine(180, translate=(1 / 8, 1 / 8), scale=(0.5, 1.5), shear=(-22.5, 22.5))
    p = aff.make_params([img])
    ref = TF.affine(x, angle=p["angle"], translate=p["translate"], scale=p["scale"], shear=p["shear"],
                    interpolation=v2.InterpolationMode.NEAREST, fill=0)
    assert (aff.transform(img, p) == ref).float().mean() > 0.999
    rot = T.RandomAffine(180, rotation_only=True)
    p = rot.make_params([img])
    ref = TF.rotate(x, p["angle"], interpolation=v2.InterpolationMode.NEAREST, fill=0)
    assert (rot.transform(img, p) == ref).float().mean() > 0.999


@pytest.mark.parametrize("hue", [0.01, -0.01, 0.003, 0.4])
def test_hue_equals_torchvision(hue):
    x = torch.rand(3, 40, 40)
    x[:, :4, :4] = 0.5  # grey: no hue
    torch.testing.assert_close(T._adjust_hue(x, hue), TF.adjust_hue(x, hue), atol=1e-5, rtol=0)
    cj = T.color_jitter()
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.5, 1.5), (0.75, 1.25), (-0.01, 0.01))


@pytest.mark.parametrize("seed", range(6))
def test_depth_flips_jointly(seed):
    torch.manual_seed(seed)
    h = w = 64
    depth = torch.arange(h * w, dtype=torch.float32).view(1, h, w)
    img = tv_tensors.Image((depth / depth.max()).repeat(3, 1, 1))
    out_img, out_depth = T.depth_transform(64, train=True)(img, tv_tensors.Mask(depth))
    # whichever flips happened, the image's grey ramp and the depth ramp still agree
    a, b = out_img.mean(0).flatten(), out_depth[0].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9
    assert sorted(out_depth.flatten().tolist()) == sorted(depth.flatten().tolist())


def test_classification_transform_shapes():
    torch.manual_seed(0)
    img = tv_tensors.Image(torch.rand(3, 64, 64))
    out = T.classification_transform(64, train=True)(img)
    assert out.shape == (3, 64, 64)
    ev = T.classification_transform(64, train=False)(img)
    torch.testing.assert_close(ev[0], (img[0] - 0.485) / 0.229)


@pytest.mark.parametrize("h,w,fixed", [(1072, 1920, 1024), (1071, 1351, 1024), (529, 622, 1024),
                                       (300, 700, 256), (300, 700, None)])
def test_pad_unpad_boxes_roundtrip(h, w, fixed):
    meta = T.fixed_size_geometry(h, w, fixed)
    if fixed:
        assert max(meta["size"]) <= fixed and meta["canvas"] == (fixed, fixed)
    if (h, w, fixed) == (1072, 1920, 1024):  # reference: halve, then centre on 1024
        assert meta["size"] == (536, 960) and meta["offset"] == (32, 244)
    if (h, w, fixed) == (1071, 1351, 1024):  # reference pads to even first: ceil
        assert meta["size"] == (536, 676)
    boxes = torch.tensor([[10, 20, 300, 250], [0, 0, w, h], [5.5, 7.5, 17, 29.5]], dtype=torch.float32)
    back = T.unpad_boxes(T.pad_boxes(boxes, meta), meta)
    assert torch.equal(back, boxes)
    rnd = torch.rand(200, 4) * min(h, w)
    assert torch.equal(T.unpad_boxes(T.pad_boxes(rnd, meta), meta), rnd)


def test_from_square_inverts_square_padding():
    h, w = 30, 50
    x = torch.rand(1, h, w)
    side, left, top = T.square_offsets(h, w)
    sq = torch.zeros(1, side, side)
    sq[:, top:top + h, left:left + w] = x
    torch.testing.assert_close(T.from_square(sq, h, w, mode="nearest"), x)
    assert T.from_square(torch.rand(2, 1, 16, 16), h, w).shape == (2, 1, h, w)


def test_photometric_transforms_reject_non_float_images():
    from PIL import Image
    from gissl.errors import UserError
    pil = Image.new("RGB", (8, 8))
    for t in (T.color_jitter(), T.gaussian_blur()):
        with pytest.raises(UserError, match="float image tensor"):
            t(pil)
        with pytest.raises(UserError, match="uint8"):
            t(tv_tensors.Image(torch.zeros(3, 8, 8, dtype=torch.uint8)))
