"""Detection backbones and the Faster R-CNN built on gissl encoders (tiny sizes, CPU)."""
import pytest
import torch
import torch.nn as nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from gissl.errors import UserError
from gissl.models import build_encoder
from gissl.models.detection import SimpleFeaturePyramid, build_backbone, build_detector

# few proposals / sampled RoIs keep a CPU train step well under a second
SMALL = dict(rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32, rpn_pre_nms_top_n_test=64,
             rpn_post_nms_top_n_test=32, rpn_batch_size_per_image=64, box_batch_size_per_image=32)


def test_resnet_fpn_shapes_strides_and_frozen_batchnorm():
    backbone = build_backbone(build_encoder("resnet18"), batchnorm="frozen")
    out = backbone(torch.randn(2, 3, 128, 96))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for (name, fmap), stride in zip(out.items(), (4, 8, 16, 32, 64)):
        assert fmap.shape == (2, 256, -(-128 // stride), -(-96 // stride)), name
    assert backbone.out_channels == 256
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.body.modules()) == 20
    trainable = build_backbone(build_encoder("resnet18"), batchnorm="train")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in trainable.body.modules()) == 20
    with pytest.raises(UserError):
        build_backbone(build_encoder("resnet18"), batchnorm="sometimes")


def test_frozen_batchnorm_keeps_the_encoder_function():
    encoder = build_encoder("resnet18").eval()
    for m in encoder.modules():  # non-trivial statistics so the copy is actually checked
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = encoder.forward_features(x)[1]
        got = build_backbone(encoder, batchnorm="frozen").body(x)["1"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_vit_simple_pyramid_shapes_strides_and_windows():
    encoder = build_encoder("vit_t")
    backbone = build_backbone(encoder, window_size=4)
    assert encoder.window_blocks == [0, 1, 3, 4, 6, 7, 9, 10]  # global in the tapped 2/5/8/11
    out = backbone(torch.randn(1, 3, 128, 192))
    for (name, fmap), stride in zip(out.items(), (4, 8, 16, 32, 64)):
        assert fmap.shape == (1, 256, 128 // stride, 192 // stride), name
    # per-channel LayerNorm: the pyramid's size does not depend on the input size (the
    # reference's (C, H, W) LayerNorms had ~114 M parameters for ViT-B at 1024 px)
    n_params = sum(p.numel() for p in SimpleFeaturePyramid(768).parameters())
    assert n_params < 10_000_000


def test_densenet_fpn_is_torchvisions_fpn_over_its_four_stages():
    """DenseNet-121 detection (#17): torchvision's FeaturePyramidNetwork + LastLevelMaxPool on the
    tensors torchvision's densenet121 computes after denseblock1..3 and ReLU(norm5), frozen BN."""
    import torchvision
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
    torch.manual_seed(0)
    ref = torchvision.models.densenet121().eval()
    encoder = build_encoder("densenet121")
    encoder.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("classifier.")})
    backbone = build_backbone(encoder, batchnorm="frozen").eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    fpn = FeaturePyramidNetwork([256, 512, 1024, 1024], 256, extra_blocks=LastLevelMaxPool()).eval()
    fpn.load_state_dict(backbone.fpn.state_dict())
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        maps, h = [], x
        for name, module in ref.features.named_children():
            h = module(h)
            if name in ("denseblock1", "denseblock2", "denseblock3"):
                maps.append(h)
        maps.append(torch.relu(h))
        want = fpn(dict((str(i), m) for i, m in enumerate(maps)))
        got = backbone(x)
    assert list(got) == ["0", "1", "2", "3", "pool"] and backbone.out_channels == 256
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_patch14_vit_sees_the_canvas_at_its_16_px_token_grid():
    """DINOv2 (patch 14, registers) detection (#17): the ViT gets the canvas scaled by 14/16, so the
    pyramid's strides are exactly 4..64 of the canvas; CLS and register tokens are dropped."""
    torch.manual_seed(0)
    encoder = build_encoder("vit_s14_reg4_dinov2", img_size=112).eval()
    backbone = build_backbone(encoder, window_size=4).eval()
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        out = backbone(x)
        scaled = torch.nn.functional.interpolate(x, size=(112, 168), mode="bilinear", align_corners=False)
        tokens = encoder.forward_tokens(scaled)[:, 5:]  # 1 CLS + 4 registers first
        want = backbone.fpn(tokens.transpose(1, 2).reshape(1, -1, 8, 12))
    for (name, fmap), stride in zip(out.items(), (4, 8, 16, 32, 64)):
        assert fmap.shape == (1, 256, 128 // stride, 192 // stride), name
        torch.testing.assert_close(fmap, want[name])


def test_resnet50_detector_has_torchvision_parameter_names():
    ours = build_detector(build_encoder("resnet50"), batchnorm="train")
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    assert ours.state_dict().keys() == reference.state_dict().keys()


def _batch():
    images = [torch.rand(3, 48, 64), torch.rand(3, 48, 64)]
    images[0][:, 10:30, 15:45] = torch.tensor([0.9, 0.2, 0.2])[:, None, None]  # a "polyp"
    targets = [{"boxes": torch.tensor([[15.0, 10.0, 45.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # no polyp
    return images, targets


@pytest.mark.parametrize("arch", ["resnet18", "vit_t", "densenet121", "vit_s14_reg4_dinov2"])
def test_train_step_returns_the_four_losses_and_reduces_their_sum(arch):
    torch.manual_seed(0)
    model = build_detector(build_encoder(arch), fixed_size=64, min_size=48, max_size=64, **SMALL)
    images, targets = _batch()
    if arch.startswith("vit"):  # the ViT path expects the dataset's fixed square canvas
        images = [torch.nn.functional.pad(im, (0, 0, 8, 8)) for im in images]
        targets[0]["boxes"] = targets[0]["boxes"] + torch.tensor([0.0, 8.0, 0.0, 8.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    sums = []
    for _ in range(3):
        torch.manual_seed(1)  # same RPN/RoI sampling each step: a fixed objective
        losses = model(images, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        sums.append(total.item())
    assert sums[-1] < sums[0]
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert out[0]["boxes"].shape[1] == 4 and len(out[0]["boxes"]) <= 100


def test_vit_canvas_must_be_a_multiple_of_64():
    with pytest.raises(UserError, match="multiple of 64"):
        build_detector(build_encoder("vit_t"), fixed_size=96)
