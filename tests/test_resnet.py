"""ResNet encoders: torchvision's names without fc, pooled output equal to torchvision's."""
import pytest
import torch
import torchvision

from gissl.models import build_encoder


@torch.no_grad()
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_pooled_output_equals_torchvision(arch):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None)
    ref.fc = torch.nn.Identity()
    ref.eval()
    ours = build_encoder(arch).eval()
    state = ref.state_dict()
    assert list(ours.state_dict()) == list(state)  # same names, same order, no fc.*
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 96)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert ours(x).shape == (2, ours.embed_dim)


@torch.no_grad()
@pytest.mark.parametrize("size", [(224, 224), (256, 256), (224, 320)])
def test_forward_features_shapes(size):
    enc = build_encoder("resnet18").eval()
    feats = enc.forward_features(torch.randn(1, 3, *size))
    assert enc.feature_strides == [4, 8, 16, 32] and enc.feature_dims == [64, 128, 256, 512]
    assert [tuple(f.shape) for f in feats] == [
        (1, c, size[0] // s, size[1] // s) for c, s in zip(enc.feature_dims, enc.feature_strides)]


def test_resnet50_attributes():
    enc = build_encoder("resnet50")
    assert enc.embed_dim == 2048 and enc.feature_dims == [256, 512, 1024, 2048]
    assert enc.architecture == "resnet50" and not any(k.startswith("fc.") for k in enc.state_dict())


@torch.no_grad()
def test_resnext101_32x4d_equals_timm():
    """#17: ResNeXt-101 32x4d (SSCD's sscd_disc_large trunk) has timm's ``resnext101_32x4d`` names
    and, given timm's weights, its pooled features and stage maps."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnext101_32x4d", pretrained=False, num_classes=0).eval()
    for m in ref.modules():  # timm zeroes each block's last BN scale: the residual branches would do nothing
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = build_encoder("resnext101_32x4d").eval()
    state = ref.state_dict()
    assert list(ours.state_dict()) == list(state)  # same names, same order, no fc.*
    assert ours.layer1[0].conv2.weight.shape == (128, 4, 3, 3) and ours.layer4[0].conv2.groups == 32
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    want = ref.forward_features(x)
    assert want.shape == (2, 2048, 2, 2) and want.abs().max() > 0.1
    feats = ours.forward_features(x)
    torch.testing.assert_close(feats[-1], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert ours.feature_dims == [256, 512, 1024, 2048] and ours.embed_dim == 2048
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s)
                                               for c, s in zip(ours.feature_dims, ours.feature_strides)]
