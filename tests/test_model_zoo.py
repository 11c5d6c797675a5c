"""The larger encoders (issue #17): vit_l, vit_h and densenet121 equal timm's / torchvision's
reference given the same weights; feature maps, strides, parameter counts, DPT, flag checks.

Nothing downloads and no large random init runs: both models are built on the meta device, the
reference is filled with random values (timm's scale: N(0, 0.02), LayerNorm weights around 1) and
ours takes the reference's tensors (``load_state_dict(strict=True, assign=True)``: same builder,
names and shapes). That keeps the ~630 M-parameter ViT-H to one 2.5 GB copy and a few seconds.
"""
import re

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

timm = pytest.importorskip("timm")

from gissl.errors import UserError  # noqa: E402
from gissl.models import (ARCHITECTURES, build_encoder, check_combination, family, imagenet_class_file,  # noqa: E402
                          is_vit)
from gissl.models.dpt import DPT  # noqa: E402
from gissl.report import list_id  # noqa: E402

TIMM_NAMES = {"vit_l": "vit_large_patch16_224", "vit_h": "vit_huge_patch14_224"}
# arch: (embed dim, blocks, heads, patch, tapped blocks)
VIT_SHAPES = {"vit_l": (1024, 24, 16, 16, (5, 11, 17, 23)), "vit_h": (1280, 32, 16, 14, (7, 15, 23, 31))}
# Parameters without classifier, as timm / torchvision count them (num_classes=0 / no classifier).
PARAMS = {"vit_l": 303_301_632, "vit_h": 630_764_800, "densenet121": 6_953_856}
# Small non-square inputs: a 2×3 token grid for the ViTs (pos_embed interpolated from 14×14/16×16).
VIT_INPUTS = {"vit_l": (2, 3, 32, 48), "vit_h": (2, 3, 28, 42)}


def _vit_pair(arch):
    """Our encoder and timm's reference, sharing the same random weights, in eval mode."""
    with torch.device("meta"):
        ref = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0, dynamic_img_size=True)
        ours = build_encoder(arch)
    ref.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            norm_weight = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.normal_(1.0 if norm_weight else 0.0, 0.02, generator=generator)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in (*ours.parameters(), *ours.buffers()))
    return ours.eval(), ref.eval()


@pytest.fixture(scope="module")
def vit_l_pair():
    return _vit_pair("vit_l")


@pytest.fixture(scope="module")
def vit_h_pair():
    return _vit_pair("vit_h")


@pytest.fixture(scope="module")
def densenet_pair():
    torch.manual_seed(0)
    ref = torchvision.models.densenet121(weights=None).eval()
    ours = build_encoder("densenet121").eval()  # small: built the ordinary way, own init
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("classifier.")},
                         strict=True)
    return ours, ref


@torch.no_grad()
@pytest.mark.parametrize("arch", ["vit_l", "vit_h"])
def test_vit_equals_timm(arch, request):
    ours, ref = request.getfixturevalue(f"{arch}_pair")
    dim, depth, heads, patch, taps = VIT_SHAPES[arch]
    assert (ours.embed_dim, len(ours.blocks), ours.num_heads, ours.patch_size) == (dim, depth, heads, patch)
    assert ours.blocks[0].mlp.fc1.out_features == 4 * dim and ours.architecture == arch
    assert ours.out_indices == taps and ours.feature_dims == [dim] * 4 and ours.feature_strides == [patch] * 4
    torch.manual_seed(1)
    x = torch.randn(*VIT_INPUTS[arch])
    # One reference pass: timm's forward is forward_head(forward_features(x)), and
    # forward_intermediates runs the same patch embed, blocks and final norm, keeping the taps.
    final, expected = ref.forward_intermediates(x, indices=list(taps), norm=False)
    torch.testing.assert_close(ours(x), ref.forward_head(final), atol=1e-5, rtol=1e-5)
    feats = ours.forward_features(x)
    n, _, height, width = x.shape
    assert [tuple(f.shape) for f in feats] == [(n, dim, height // patch, width // patch)] * 4
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["vit_l", "vit_h"])
def test_vit_full_size_parameters(arch, request):
    ours, ref = request.getfixturevalue(f"{arch}_pair")
    assert list(ours.state_dict()) == list(ref.state_dict())  # timm's names, timm's order
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == PARAMS[arch]
    assert ours.pos_embed.shape == (1, 1 + (224 // ours.patch_size) ** 2, ours.embed_dim)


def test_vit_h_needs_multiples_of_14():
    with torch.device("meta"):
        enc = build_encoder("vit_h")
    with pytest.raises(UserError, match="not a multiple of the ViT patch size 14"):
        enc(torch.randn(1, 3, 32, 32, device="meta"))
    with pytest.raises(UserError, match="not a multiple of the patch size 14"):
        build_encoder("vit_h", img_size=256)


@torch.no_grad()
def test_densenet121_equals_torchvision(densenet_pair):
    ours, ref = densenet_pair
    assert list(ours.state_dict()) == [k for k in ref.state_dict() if not k.startswith("classifier.")]
    assert sum(p.numel() for p in ours.parameters()) == PARAMS["densenet121"]
    assert ref.classifier.in_features == ours.embed_dim == 1024 and ours.architecture == "densenet121"
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 96)
    # torchvision's forward up to the classifier input: ReLU(norm5) -> global average pool
    pooled = create_feature_extractor(ref, {"flatten": "pooled"})(x)["pooled"]
    torch.testing.assert_close(ours(x), pooled, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_densenet121_features_are_torchvisions_tensors(densenet_pair):
    ours, ref = densenet_pair
    assert ours.feature_dims == [256, 512, 1024, 1024] and ours.feature_strides == [4, 8, 16, 32]
    # the dense blocks' concatenated outputs and the ReLU after norm5, as torchvision's forward computes them
    nodes = ["features.denseblock1.cat", "features.denseblock2.cat", "features.denseblock3.cat", "relu"]
    extractor = create_feature_extractor(ref, {name: str(i) for i, name in enumerate(nodes)})
    torch.manual_seed(4)
    x = torch.randn(1, 3, 64, 96)
    feats = ours.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(ours.feature_dims, ours.feature_strides)]
    for f, e in zip(feats, extractor(x).values()):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("arch, size", [("vit_l", (32, 64)), ("densenet121", (64, 64))])
def test_dpt_segmentation_runs(arch, size, request):
    encoder = request.getfixturevalue("densenet_pair" if arch == "densenet121" else f"{arch}_pair")[0]
    model = DPT(encoder, "segmentation", num_classes=2).eval()
    out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 2, *size) and torch.isfinite(out).all()
    if arch == "densenet121":  # strides 4/8/16/32 are DPT's targets: no reassemble resampling
        assert all(isinstance(level, torch.nn.Identity) for level in model.reassemble.levels)


@torch.no_grad()
def test_dpt_segmentation_runs_on_vit_h(vit_h_pair):
    # the token grid is resampled x4 / x2 / x1 / x1/2 as for 16-px patches (strides 3.5 ... 28)
    model = DPT(vit_h_pair[0], "segmentation", num_classes=2).eval()
    out = model(torch.randn(1, 3, 56, 56))
    assert out.shape == (1, 2, 56, 56) and torch.isfinite(out).all()


def test_registered_with_families_and_report_ids():
    assert {"vit_l", "vit_h", "densenet121"} <= set(ARCHITECTURES)
    assert family("vit_l") == family("vit_h") == "vit" and is_vit("vit_h")
    assert family("densenet121") == "densenet" and not is_vit("densenet121")
    assert list_id("densenet121", "random", None, "kvasir") == "DN121_NA_NA_kvasir"
    assert list_id("vit_l", "ImageNet_class", None, "kvasir") == "VTl_IN_SL_kvasir"
    assert list_id("vit_h", "Hyperkvasir", "mae", "kvasir") == "VTh_HK_MA_kvasir"


@pytest.mark.parametrize("framework", ["mocov3", "barlowtwins", "mae", "simsiam", "fpsiam"])
def test_no_ssl_framework_trains_densenet(framework):
    with pytest.raises(UserError, match=f"--ss-framework {framework} does not apply to --architecture "
                                        f"densenet121: {framework} trains .* encoders, not densenet121"):
        check_combination("densenet121", "Hyperkvasir", framework, "x.pth")


@pytest.mark.parametrize("arch", ["vit_l", "vit_h"])
def test_vit_frameworks_accept_the_large_vits(arch):
    for framework in ("mae", "mocov3"):
        check_combination(arch, "Hyperkvasir", framework, "x.pth")
    with pytest.raises(UserError, match="barlowtwins trains resnet encoders"):
        check_combination(arch, "Hyperkvasir", "barlowtwins", "x.pth")


def test_densenet_refuses_vit_options():
    with pytest.raises(UserError, match="needs a ViT; densenet121 is not one"):
        build_encoder("densenet121", window_size=4)
    with pytest.raises(UserError, match="densenet121, which is not a ViT"):
        build_encoder("densenet121", num_heads=4)


def test_imagenet_class_files_are_named(tmp_path, monkeypatch):
    # imagenet_class_file is what build_encoder(arch, "ImageNet_class") looks the file up with
    # (called directly: build_encoder would first build the 300-630 M-parameter ViT)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="needs the file densenet121-a639ec97.pth in .*download "
                                        "https://download.pytorch.org/models/densenet121-a639ec97.pth"):
        build_encoder("densenet121", "ImageNet_class")
    for arch, name in (("vit_l", "vit_large_patch16_224.augreg_in21k_ft_in1k"),
                       ("vit_h", "vit_huge_patch14_224.orig_in21k")):
        with pytest.raises(UserError, match=re.escape(f"{name}.pth (or .safetensors)")):
            imagenet_class_file(arch)


def test_densenet_trunk_file_loads(tmp_path, densenet_pair):
    path = tmp_path / "densenet121_trunk.pth"
    torch.save(densenet_pair[0].state_dict(), path)
    enc = build_encoder("densenet121", "ImageNet_class", checkpoint=str(path))
    torch.testing.assert_close(enc.features.norm5.weight, densenet_pair[0].features.norm5.weight)


def test_densenet_torchvision_file_layout_loads(tmp_path, densenet_pair):
    legacy = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$")
    state = {legacy.sub(r"\1.\2.\3", k): v for k, v in densenet_pair[1].state_dict().items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in state and "classifier.weight" in state
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(state, path)
    enc = build_encoder("densenet121", "ImageNet_class", checkpoint=str(path))
    torch.testing.assert_close(enc.features.norm5.weight, densenet_pair[0].features.norm5.weight)


def test_readme_lists_every_architecture():
    import pathlib

    from gissl.models import ARCHITECTURES
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text.split("<!-- architectures -->", 1)[1].split("<!-- end: architectures -->", 1)[0]
    listed = re.findall(r"^\| `([a-z0-9_]+)` \|", table, flags=re.M)
    assert sorted(listed) == sorted(ARCHITECTURES) and len(listed) == len(set(listed)), listed
