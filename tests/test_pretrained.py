"""Pretrained weights: every checkpoint layout loads (values equal), wrong files fail clearly."""
import os

import pytest
import torch

from gissl.errors import CheckpointError, UserError
from gissl.models import build_encoder, describe_state_dict, load_pretrained
from gissl.models.resnet import BasicBlock, ResNetEncoder
from gissl.models.vit import VisionTransformer, resample_pos_embed


def _weights(arch, seed):
    torch.manual_seed(seed)
    return build_encoder(arch).state_dict()


def _small(arch):
    """A narrow encoder of the same family (the layouts do not depend on width; keeps files small)."""
    if arch.startswith("vit"):
        return VisionTransformer(embed_dim=32, depth=12, num_heads=2, img_size=64, architecture=arch)
    return ResNetEncoder(BasicBlock, [1, 1, 1, 1], arch)


def _projector(arch):
    """Keys a source file carries beside the encoder: MoCo v3 projector (ResNet fc.*, ViT head.*)."""
    name = "fc" if arch.startswith("resnet") else "head"
    return {f"{name}.0.weight": torch.randn(16, 8), f"{name}.1.weight": torch.ones(16),
            f"{name}.1.running_mean": torch.zeros(16), f"{name}.3.weight": torch.randn(4, 16)}


def _prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def _mae_decoder(dim=192):
    return {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, dim),
            "decoder_pos_embed": torch.zeros(1, 197, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
            "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.randn(768, 32)}


def _layouts(arch, enc, other):
    """(file name, object) for every layout; ``enc`` is what must load, ``other`` a second copy."""
    yield "moco_official.pth.tar", {  # MoCo v3 as released: DDP prefixes, momentum copy, predictor
        "epoch": 300, "arch": arch, "optimizer": {"state": {}, "param_groups": []},
        "state_dict": {**_prefixed("module.base_encoder.", {**enc, **_projector(arch)}),
                       **_prefixed("module.momentum_encoder.", {**other, **_projector(arch)}),
                       "module.predictor.0.weight": torch.randn(4, 4)}}
    yield "moco_extracted_with_projector.pth", {**enc, **_projector(arch)}
    yield "moco_extracted.pth", dict(enc)
    yield "torchvision_or_timm.pth", {**enc, ("fc" if arch.startswith("resnet") else "head") + ".weight":
                                      torch.randn(10, 4), ("fc" if arch.startswith("resnet") else "head") + ".bias":
                                      torch.randn(10)}
    yield "state_dict.safetensors", dict(enc)
    yield "encoder.pth", dict(enc)  # gissl pretrain.py export
    yield "checkpoint.pth", {  # gissl pretrain.py training checkpoint: SSL wrapper state
        "model": {**_prefixed("encoder.", enc), **_prefixed("momentum_encoder.", other),
                  "projector.0.weight": torch.randn(4, 4), "predictor.0.weight": torch.randn(4, 4)},
        "optimizer": {}, "epoch": 3, "args": {"arch": arch}}
    yield "finetuned.pth", {"model": {**_prefixed("encoder.", enc), "head.weight": torch.randn(3, 4)},
                            "epoch": 1, "best_metric": 0.5}
    if arch.startswith("vit"):
        yield "mae_full.pth", {"model": {**enc, **_mae_decoder(32)}, "epoch": 799, "args": {}}
        yield "mae_pretrain_vit.pth", {"model": dict(enc)}
    else:
        yield "barlowtwins_resnet50.pth", dict(enc)


def _save(obj, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("arch", ["resnet18", "vit_t"])
def test_every_layout_loads_the_encoder_values(arch, tmp_path):
    torch.manual_seed(0)
    enc, other = _small(arch).state_dict(), _small(arch).state_dict()
    model = _small(arch)
    for name, obj in _layouts(arch, enc, other):
        _save(obj, tmp_path / name)
        for v in model.state_dict().values():
            v.zero_()
        load_pretrained(model, tmp_path / name, "mocov3")
        loaded = model.state_dict()
        for k, v in enc.items():
            assert torch.equal(loaded[k], v), f"{name}: {k} differs"


def test_build_encoder_loads_ssl_checkpoint(tmp_path):
    enc = _weights("vit_t", 1)
    torch.save({"model": {**enc, **_mae_decoder()}}, tmp_path / "mae.pth")
    model = build_encoder("vit_t", "Hyperkvasir", "mae", str(tmp_path / "mae.pth"))
    assert torch.equal(model.blocks[5].mlp.fc1.weight, enc["blocks.5.mlp.fc1.weight"])


def test_pos_embed_of_other_grid_is_interpolated(tmp_path):
    enc = _weights("vit_t", 1)
    enc["pos_embed"] = torch.randn(1, 1 + 16 * 16, 192)  # trained at 256 px
    torch.save(enc, tmp_path / "vit256.pth")
    model = build_encoder("vit_t")  # 224 px: 14x14 grid
    load_pretrained(model, tmp_path / "vit256.pth")
    torch.testing.assert_close(model.pos_embed.data, resample_pos_embed(enc["pos_embed"], (16, 16), (14, 14)))


def test_old_torchvision_file_without_num_batches_tracked(tmp_path):
    enc = {k: v for k, v in _weights("resnet18", 1).items() if not k.endswith("num_batches_tracked")}
    torch.save(enc, tmp_path / "resnet18-5c106cde.pth")
    load_pretrained(build_encoder("resnet18"), tmp_path / "resnet18-5c106cde.pth")


def test_resnet_file_given_to_vit_b_says_so(tmp_path):
    torch.save({"state_dict": _prefixed("module.base_encoder.", _weights("resnet18", 1))}, tmp_path / "r.pth.tar")
    with pytest.raises(CheckpointError, match="holds a ResNet-18 \\(conv1/layer1..4 keys\\) under "
                                              "'module.base_encoder.', not a ViT") as err:
        build_encoder("vit_b", "ImageNet_self", "mocov3", str(tmp_path / "r.pth.tar"))
    assert "missing keys (150): cls_token, pos_embed" in str(err.value)


def test_describe_resnet50_and_vit():
    import torchvision
    assert describe_state_dict(torchvision.models.resnet50().state_dict())[1].startswith("a ResNet-50 ")
    assert describe_state_dict(_weights("vit_t", 0)) == ("vit", "a ViT-T/16 (192-d, 12 blocks; "
                                                                "cls_token/pos_embed/blocks keys)")


def test_wrong_width_vit_names_shapes(tmp_path):
    torch.save(_weights("vit_s", 1), tmp_path / "vit_s.pth")
    with pytest.raises(CheckpointError, match="holds a ViT-S/16 \\(384-d.*does not match vit_t.*mis-shaped keys "
                                              "\\(\\d+\\): cls_token \\(file \\(1, 1, 384\\), model \\(1, 1, 192\\)\\)"):
        load_pretrained(build_encoder("vit_t"), tmp_path / "vit_s.pth")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    enc = _weights("vit_t", 1)
    del enc["blocks.3.mlp.fc1.weight"]
    enc["blocks.0.attn.rel_pos_h"] = torch.zeros(3)
    torch.save({"model": enc}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): blocks.3.mlp.fc1.weight\\. "
                                              "unexpected keys \\(1\\): blocks.0.attn.rel_pos_h"):
        load_pretrained(build_encoder("vit_t"), tmp_path / "bad.pth")


def test_truncated_file_is_refused(tmp_path):
    torch.save(_weights("resnet18", 1), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(build_encoder("resnet18"), tmp_path / "cut.pth")


def test_nan_weights_are_refused(tmp_path):
    enc = _weights("resnet18", 1)
    enc["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(enc, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="NaN/Inf values in 1 encoder tensor\\(s\\) \\(layer2.0.conv1.weight\\)"):
        load_pretrained(build_encoder("resnet18"), tmp_path / "nan.pth")


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would call open(marker, "w"), creating the file
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"state_dict": _weights("resnet18", 1), "x": _RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_pretrained(build_encoder("resnet18"), tmp_path / "evil.pth")
    assert not os.path.exists(marker)


def test_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="holds no state dict of tensors \\(found: epoch, args\\)"):
        load_pretrained(build_encoder("resnet18"), tmp_path / "meta.pth")


@pytest.mark.parametrize("args, message", [
    (("vit_x",), "unknown architecture 'vit_x'; choose from densenet121, resnet18, resnet50, resnext101_32x4d, vit_b, vit_b14_dinov2, "
                  "vit_b14_reg4_dinov2, vit_b16_clip, vit_b32_clip, vit_h, vit_l, vit_l14_clip, vit_l14_dinov2, "
                  "vit_l14_reg4_dinov2, vit_s, vit_s14_dinov2, vit_s14_reg4_dinov2, vit_t"),
    (("vit_t", "Hyperkvasir", "mae", None), "give both --ss-framework .* and --checkpoint PATH"),
    (("vit_t", "ImageNet_self", None, "x.pth"), "give both --ss-framework"),
    (("resnet50", "Hyperkvasir", "mae", "x.pth"), "mae trains vit encoders, not resnet50; use --architecture vit_b / "
                                                  "vit_b14_dinov2 / vit_b14_reg4_dinov2 / vit_b16_clip / vit_b32_clip / vit_h / vit_l / "),
    (("vit_b", "Hyperkvasir", "barlowtwins", "x.pth"), "barlowtwins trains resnet encoders, not vit_b"),
    (("vit_b", "Hyperkvasir", "simsiam", "x.pth"), "simsiam trains resnet encoders"),
    (("vit_b", "Hyperkvasir", "fpsiam", "x.pth"), "fpsiam trains resnet encoders"),
    (("vit_b", "Hyperkvasir", "dino", "x.pth"), "unknown --ss-framework 'dino'"),
    (("vit_b", "ImageNet_clas"), "unknown pretraining 'ImageNet_clas'"),
    (("resnet18", "random", None, "x.pth"), "--checkpoint given with --pretraining random"),
    (("resnet18", "ImageNet_class", "mocov3"), "--ss-framework is only used with"),
])
def test_build_encoder_combination_errors(args, message):
    with pytest.raises(UserError, match=message):
        build_encoder(*args)


def test_mocov3_accepts_both_families_and_missing_file_is_named(tmp_path):
    for arch in ("resnet18", "vit_t"):
        with pytest.raises(CheckpointError, match="does not exist"):
            build_encoder(arch, "Hyperkvasir", "mocov3", str(tmp_path / "nope.pth"))


def test_imagenet_class_from_hub_cache_or_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    folder = os.path.join(str(tmp_path / "torch"), "hub", "checkpoints")
    with pytest.raises(UserError, match=f"needs the file resnet18-f37072fd.pth in {folder}"):
        build_encoder("resnet18", "ImageNet_class")
    with pytest.raises(UserError, match="vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth \\(or .safetensors\\)"):
        build_encoder("vit_t", "ImageNet_class")
    os.makedirs(folder)
    enc = _weights("resnet18", 1)
    torch.save({**enc, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)},
               os.path.join(folder, "resnet18-f37072fd.pth"))
    assert torch.equal(build_encoder("resnet18", "ImageNet_class").conv1.weight, enc["conv1.weight"])
    vit = _weights("vit_t", 1)
    _save({**vit, "head.weight": torch.randn(1000, 192), "head.bias": torch.randn(1000)},
          os.path.join(folder, "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"))
    assert torch.equal(build_encoder("vit_t", "ImageNet_class").cls_token, vit["cls_token"])
    # --checkpoint overrides the cache
    mine = {k: v + 1 if v.is_floating_point() else v for k, v in enc.items()}
    torch.save(mine, tmp_path / "mine.pth")
    assert torch.equal(build_encoder("resnet18", "ImageNet_class", checkpoint=str(tmp_path / "mine.pth")).conv1.weight,
                       mine["conv1.weight"])
