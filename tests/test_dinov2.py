"""DINOv2 ViTs (issue #17 item 1) and DINO / DINOv2 checkpoint files (item 2).

The six DINOv2 encoders equal timm's ``vit_*_patch14[_reg4]_dinov2`` given the same weights (names,
order, parameter counts, CLS output and the four tapped maps at small sizes, i.e. through timm's
``dynamic_img_size`` position-embedding resampling). Files are written as the official code writes
them: Meta's ``dinov2_vits14[_reg4]_pretrain.pth`` state dicts (converted by timm's own
``checkpoint_filter_fn`` for the reference), DINO's ``main_dino.py`` ``checkpoint.pth`` (DDP student,
teacher, AdamW / SGD state after a step with NumPy learning rates, ``'args'`` Namespace, ``dino_loss``,
``fp16_scaler``) and DINOv2's ``{"teacher": ...}`` evaluation checkpoint with FSDP block chunks.
Large models are built on the meta device as in tests/test_model_zoo.py.
"""
import argparse

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402

from gissl.errors import CheckpointError, UserError  # noqa: E402
from gissl.models import ARCHITECTURES, build_encoder, family, imagenet_class_file, is_vit, load_pretrained  # noqa: E402
from gissl.models.detection import build_detector  # noqa: E402
from gissl.models.dpt import DPT  # noqa: E402
from gissl.report import list_id  # noqa: E402

TIMM_NAMES = {"vit_s14_dinov2": "vit_small_patch14_dinov2", "vit_s14_reg4_dinov2": "vit_small_patch14_reg4_dinov2",
              "vit_b14_dinov2": "vit_base_patch14_dinov2", "vit_b14_reg4_dinov2": "vit_base_patch14_reg4_dinov2",
              "vit_l14_dinov2": "vit_large_patch14_dinov2", "vit_l14_reg4_dinov2": "vit_large_patch14_reg4_dinov2"}
# timm's counts with num_classes=0 (reg4: + 4 × D register tokens, - D for the CLS position)
PARAMS = {"vit_s14_dinov2": 22_056_192, "vit_s14_reg4_dinov2": 22_057_344, "vit_b14_dinov2": 86_579_712,
          "vit_b14_reg4_dinov2": 86_582_016, "vit_l14_dinov2": 304_367_616, "vit_l14_reg4_dinov2": 304_370_688}
TAPS = {"s": (2, 5, 8, 11), "b": (2, 5, 8, 11), "l": (4, 11, 17, 23)}
# non-square inputs: 4×6 and 3×4 token grids, resampled from the 37×37 grid of 518 px
INPUTS = {"s": (2, 3, 56, 84), "b": (2, 3, 56, 84), "l": (1, 3, 42, 56)}


def _fill(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.normal_(1.0 if norm_weight else 0.0, 0.02, generator=generator)


def _pair(arch):
    with torch.device("meta"):
        ref = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0, dynamic_img_size=True)
        ours = build_encoder(arch)
    ref.to_empty(device="cpu")
    _fill(ref, 0)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval(), ref.eval()


@torch.no_grad()
@pytest.mark.parametrize("arch", sorted(TIMM_NAMES))
def test_dinov2_equals_timm(arch):
    ours, ref = _pair(arch)
    size = arch[4]
    assert list(ours.state_dict()) == list(ref.state_dict())  # timm's names, timm's order
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == PARAMS[arch]
    regs = 4 if "reg4" in arch else 0
    assert ours.num_prefix_tokens == ref.num_prefix_tokens == 1 + regs and ours.patch_size == 14
    assert ours.pos_embed.shape == ref.pos_embed.shape == (1, (0 if regs else 1) + 37 * 37, ours.embed_dim)
    assert ours.out_indices == TAPS[size] and ours.feature_strides == [14] * 4
    assert isinstance(ours.blocks[0].ls1.gamma, nn.Parameter)
    torch.manual_seed(1)
    x = torch.randn(*INPUTS[size])
    final, expected = ref.forward_intermediates(x, indices=list(TAPS[size]), norm=False)
    torch.testing.assert_close(ours(x), ref.forward_head(final), atol=1e-5, rtol=1e-5)
    feats = ours.forward_features(x)
    n, _, h, w = x.shape
    assert [tuple(f.shape) for f in feats] == [(n, ours.embed_dim, h // 14, w // 14)] * 4
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)


def test_registered_names_families_and_report_ids():
    assert set(TIMM_NAMES) <= set(ARCHITECTURES)
    assert all(is_vit(a) and family(a) == "vit" for a in TIMM_NAMES)
    assert list_id("vit_s14_reg4_dinov2", "ImageNet_class", None, "kvasir") == "VTsD2R_IN_SL_kvasir"
    assert list_id("vit_l14_dinov2", "random", None, "kvasir") == "VTlD2_NA_NA_kvasir"


# --- Meta's released files -----------------------------------------------------------------------

def _meta_state(reference, regs):
    """The state dict facebookresearch/dinov2's DinoVisionTransformer saves (hub ``dinov2_vits14`` /
    ``dinov2_vits14_reg``: block_chunks=0, LayerScale), in its order: cls_token, pos_embed
    (CLS position first), register_tokens, mask_token (1, D), patch_embed, blocks, norm."""
    timm_state = reference.state_dict()
    dim = timm_state["cls_token"].shape[-1]
    generator = torch.Generator().manual_seed(7)
    out = {}
    if regs:  # timm folded the CLS position into cls_token: split it off again
        cls_pos = torch.randn(1, 1, dim, generator=generator) * 0.02
        out["cls_token"] = timm_state["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, timm_state["pos_embed"]], dim=1)
        out["register_tokens"] = timm_state["reg_token"]
    else:
        out["cls_token"], out["pos_embed"] = timm_state["cls_token"], timm_state["pos_embed"]
    out["mask_token"] = torch.zeros(1, dim)
    out.update({k: v for k, v in timm_state.items() if k not in ("cls_token", "pos_embed", "reg_token")})
    return out


@torch.no_grad()
@pytest.mark.parametrize("arch, file", [("vit_s14_dinov2", "dinov2_vits14_pretrain.pth"),
                                        ("vit_s14_reg4_dinov2", "dinov2_vits14_reg4_pretrain.pth")])
def test_meta_release_loads_as_timm_converts_it(tmp_path, arch, file):
    torch.manual_seed(0)
    source = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0)
    _fill(source, 3)
    meta = _meta_state(source, "reg4" in arch)
    assert ("register_tokens" in meta) == ("reg4" in arch) and meta["pos_embed"].shape[1] == 1 + 37 * 37
    torch.save(meta, tmp_path / file)
    # the reference: timm's own conversion of Meta's file (what pretrained=True does)
    ref = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(meta), ref), strict=True)
    enc = build_encoder(arch, "ImageNet_class", checkpoint=str(tmp_path / file)).eval()
    x = torch.randn(2, 3, 70, 56)
    final, expected = ref.forward_intermediates(x, indices=[2, 5, 8, 11], norm=False)
    torch.testing.assert_close(enc(x), ref.forward_head(final), atol=1e-5, rtol=1e-5)
    for f, e in zip(enc.forward_features(x), expected):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)
    # timm's converted state dict (what timm saves / puts on the Hugging Face hub) loads bit for bit
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    info = load_pretrained(build_encoder(arch), tmp_path / "timm.pth")
    assert info["dropped"] == []


def test_meta_file_found_in_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"vit_small_patch14_reg4_dinov2\.lvd142m\.pth \(or \.safetensors\)"):
        imagenet_class_file("vit_s14_reg4_dinov2")
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    source = timm.create_model(TIMM_NAMES["vit_s14_reg4_dinov2"], pretrained=False, num_classes=0)
    torch.save(_meta_state(source, 4), folder / "dinov2_vits14_reg4_pretrain.pth")
    enc = build_encoder("vit_s14_reg4_dinov2", "ImageNet_class")  # torch.hub's file name for Meta's release
    torch.testing.assert_close(enc.reg_token, source.reg_token)


def test_meta_register_file_into_plain_model_is_refused(tmp_path):
    source = timm.create_model(TIMM_NAMES["vit_s14_reg4_dinov2"], pretrained=False, num_classes=0)
    torch.save(_meta_state(source, 4), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    with pytest.raises(CheckpointError, match="does not fit encoder vit_s14_dinov2.*reg_token"):
        build_encoder("vit_s14_dinov2", "ImageNet_class", checkpoint=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))


# --- DINO (v1) main_dino.py checkpoint.pth -------------------------------------------------------------

def _dino_head_state(in_dim, out_dim, generator, hidden=64, bottleneck=32):
    """DINOHead(in_dim, out_dim) of facebookresearch/dino vision_transformer.py, use_bn=False, nlayers=3:
    mlp = Linear, GELU, Linear, GELU, Linear; last_layer = weight_norm(Linear(bottleneck, out_dim, bias=False))
    with weight_g filled with 1 (widths shrunk from 2048/256/65536 to keep the file small)."""
    shapes = {"mlp.0.weight": (hidden, in_dim), "mlp.0.bias": (hidden,), "mlp.2.weight": (hidden, hidden),
              "mlp.2.bias": (hidden,), "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
              "last_layer.weight_g": (out_dim, 1), "last_layer.weight_v": (out_dim, bottleneck)}
    state = {k: torch.randn(*s, generator=generator) * 0.02 for k, s in shapes.items()}
    state["last_layer.weight_g"] = torch.ones(out_dim, 1)
    return state


class _MultiCrop(nn.Module):
    """DINO's MultiCropWrapper: ``backbone`` (its fc / head set to Identity) and ``head``."""

    def __init__(self, backbone, head_state):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Module()
        for k, v in head_state.items():  # the head's parameters under their DINOHead names
            *path, leaf = k.split(".")
            mod = self.head
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, nn.Parameter(v.clone()))


def _dino_args(arch, optimizer):
    """main_dino.py's argparse Namespace (get_args_parser defaults + init_distributed_mode's fields)."""
    return argparse.Namespace(
        arch=arch, patch_size=16, out_dim=128, norm_last_layer=True, momentum_teacher=0.996, use_bn_in_head=False,
        warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, use_fp16=True,
        weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=64, epochs=100,
        freeze_last_layer=1, lr=0.0005, warmup_epochs=10, min_lr=1e-06, optimizer=optimizer, drop_path_rate=0.1,
        global_crops_scale=(0.4, 1.0), local_crops_number=8, local_crops_scale=(0.05, 0.4),
        data_path="/path/to/imagenet/train/", output_dir=".", saveckp_freq=20, seed=0, num_workers=10,
        dist_url="env://", local_rank=0, rank=0, world_size=8, gpu=0)


def _write_dino_checkpoint(path, make_backbone, arch, optimizer_name):
    """checkpoint.pth exactly as main_dino.py's save_dict after epoch 1: student = DDP(MultiCropWrapper)
    state ('module.' prefix); teacher the bare wrapper, or DDP too where the model has BatchNorm (SyncBN);
    the optimizer after one step with NumPy-scheduled lr / weight_decay (vit_utils.cosine_scheduler)."""
    generator = torch.Generator().manual_seed(11)
    student, teacher = make_backbone(), make_backbone()
    with torch.no_grad():
        for p in teacher.parameters():  # the EMA teacher differs from the student
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    dim = student.embed_dim if hasattr(student, "cls_token") else 2048  # ViT-S 384, ResNet-50 2048
    student = _MultiCrop(student, _dino_head_state(dim, 128, generator))
    teacher = _MultiCrop(teacher, _dino_head_state(dim, 128, generator))
    batchnorm = any(isinstance(m, nn.BatchNorm2d) for m in student.modules())
    # get_params_groups: biases and norms unregularized
    regularized = [p for n, p in student.named_parameters() if not (n.endswith(".bias") or p.dim() == 1)]
    not_regularized = [p for n, p in student.named_parameters() if n.endswith(".bias") or p.dim() == 1]
    groups = [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups) if optimizer_name == "adamw" else \
        torch.optim.SGD(groups, lr=0, momentum=0.9)
    lr_schedule, wd_schedule = np.linspace(0, 0.0005, 10), np.linspace(0.04, 0.4, 10)
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr_schedule[3]
        if i == 0:
            group["weight_decay"] = wd_schedule[3]
    for p in student.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    save = {"student": {"module." + k: v for k, v in student.state_dict().items()},
            "teacher": {("module." if batchnorm else "") + k: v for k, v in teacher.state_dict().items()},
            "optimizer": optimizer.state_dict(), "epoch": 1, "args": _dino_args(arch, optimizer_name),
            "dino_loss": {"center": torch.randn(1, 128, generator=generator)},
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 1250}}
    torch.save(save, path)
    return student.backbone, teacher.backbone


def _vit_small():
    # DINO vision_transformer.py vit_small has these names (head = Identity); dynamic_img_size for small inputs
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)


def _resnet50():
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()  # MultiCropWrapper: backbone.fc, backbone.head = nn.Identity(), nn.Identity()
    return model


@torch.no_grad()
def test_dino_vit_small_checkpoint_loads_the_teacher(tmp_path):
    student, teacher = _write_dino_checkpoint(tmp_path / "checkpoint.pth", _vit_small, "vit_small", "adamw")
    assert isinstance(torch.load(tmp_path / "checkpoint.pth", weights_only=False)["optimizer"]["param_groups"][0]["lr"],
                      np.float64)  # what main_dino.py really stores
    enc = build_encoder("vit_s", "ImageNet_class", checkpoint=str(tmp_path / "checkpoint.pth")).eval()
    assert enc.num_heads == 6
    x = torch.randn(2, 3, 64, 48)
    torch.testing.assert_close(enc(x), teacher.eval()(x), atol=1e-5, rtol=1e-5)
    info = load_pretrained(build_encoder("vit_s"), tmp_path / "checkpoint.pth", checkpoint_key="student")
    assert info["prefix"] == "module.backbone."
    enc_student = build_encoder("vit_s")
    load_pretrained(enc_student, tmp_path / "checkpoint.pth", checkpoint_key="student")
    torch.testing.assert_close(enc_student.eval()(x), student.eval()(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="no state dict of tensors under 'ema'"):
        load_pretrained(build_encoder("vit_s"), tmp_path / "checkpoint.pth", checkpoint_key="ema")


@torch.no_grad()
def test_dino_resnet50_checkpoint_loads_the_ddp_teacher(tmp_path):
    _, teacher = _write_dino_checkpoint(tmp_path / "checkpoint.pth", _resnet50, "resnet50", "sgd")
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert next(iter(saved["teacher"])).startswith("module.backbone.")  # SyncBN: the teacher is DDP-wrapped too
    info = load_pretrained(enc := build_encoder("resnet50"), tmp_path / "checkpoint.pth")
    assert info["prefix"] == "module.backbone."
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(enc.eval()(x), teacher.eval()(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_dinov2_teacher_checkpoint_with_block_chunks_loads(tmp_path):
    """dinov2/train/train.py do_test: torch.save({"teacher": model.teacher.state_dict()}, ...), the teacher
    holding backbone (FSDP block_chunks=4: blocks.{chunk}.{i}.), dino_head and ibot_head; 224-px crops."""
    with torch.device("meta"):
        ref = timm.create_model(TIMM_NAMES["vit_s14_reg4_dinov2"], pretrained=False, num_classes=0, img_size=224,
                                dynamic_img_size=True)
    ref.to_empty(device="cpu")
    _fill(ref, 5)
    meta = _meta_state(ref, 4)
    backbone = {}
    for k, v in meta.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 3}.{i}." + k.split(".", 2)[2]
        backbone["backbone." + k] = v
    generator = torch.Generator().manual_seed(2)
    heads = {f"dino_head.{k}": v for k, v in _dino_head_state(384, 64, generator).items()}
    heads.update({f"ibot_head.{k}": v for k, v in _dino_head_state(384, 64, generator).items()})
    torch.save({"teacher": {**backbone, **heads}}, tmp_path / "teacher_checkpoint.pth")
    # img_size=224: the file's own grid (a 518-px model would resample 16² -> 37² on load, then again per input)
    enc = build_encoder("vit_s14_reg4_dinov2", "ImageNet_class", checkpoint=str(tmp_path / "teacher_checkpoint.pth"),
                        img_size=224)
    x = torch.randn(1, 3, 56, 42)
    torch.testing.assert_close(enc.eval()(x), ref.eval().forward_head(ref.forward_features(x)), atol=1e-5, rtol=1e-5)


# --- downstream ----------------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("arch", ["vit_s14_dinov2", "vit_s14_reg4_dinov2"])
def test_dpt_runs_on_dinov2(arch):
    for task, classes in (("segmentation", 2), ("depth", 1)):
        model = DPT(build_encoder(arch), task, num_classes=classes).eval()
        out = model(torch.randn(1, 3, 56, 84))
        assert out.shape == (1, classes, 56, 84) and torch.isfinite(out).all()


def test_detection_runs_on_patch_14():
    model = build_detector(build_encoder("vit_s14_dinov2"), fixed_size=128).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 128, 128))
        out = model([torch.rand(3, 128, 128)])
    assert [f.shape[-1] for f in features.values()] == [32, 16, 8, 4, 2]  # strides 4..64 of the canvas
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_register_models_are_refused_where_tokens_are_built_by_hand():
    """MAE and retrieval's masked pass assemble their own token sequence: with register tokens
    they stop with a named error instead of a shape mismatch; retrieval without masking works."""
    from gissl.errors import UserError
    from gissl.models import build_encoder
    from gissl.retrieval import RetrievalModel
    from gissl.ssl.mae import MAE
    encoder = build_encoder("vit_s14_reg4_dinov2", img_size=56)
    with pytest.raises(UserError, match="register tokens; use --mask-ratio 0"):
        RetrievalModel(encoder)
    with pytest.raises(UserError, match="MAE .*register tokens"):
        MAE(encoder)
    assert RetrievalModel(encoder, mask_ratio=0).mask_ratio == 0
