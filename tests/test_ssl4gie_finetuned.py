"""SSL4GIE's finetuned checkpoints, read by eval / predict ``--weights FILE``.

Each file is written as SSL4GIE's train_<task>.py writes it (``epoch``, ``model_state_dict``,
``optimizer_state_dict``, ``scaler_state_dict``, ``loss``, ``val_perf``, ``test_perf``,
``py_state``, ``np_state``, ``torch_state``), ``model_state_dict`` taken from independent
reference models with SSL4GIE's module names: timm's ViT and torchvision's ResNet with its
``lin_head``, smp's DeepLabV3Plus, a transcription of SSL4GIE's DPT_decoder (Models/DPT_decoder.py)
and of its residual depth decoder, and torchvision's Faster R-CNN under torchvision 0.10's names.
The model gissl rebuilds from the file alone must give the reference's outputs. Tiny sizes:
vit_t / resnet18 at 64 px.
"""
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from gissl import cli
from gissl import classification as cls
from gissl import depth, detection, segmentation
from gissl.checkpoint import describe_checkpoint
from gissl.errors import CheckpointError
from test_residual_depth import _reference as _residual_reference  # SSL4GIE's ResNet depth model

timm = pytest.importorskip("timm")
smp = pytest.importorskip("segmentation_models_pytorch")

SIZE = 64
X = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def _randomise_norms(model):
    """Non-trivial BatchNorm statistics and affine values, so every buffer takes part."""
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model.eval()


def _ssl4gie_file(path, model, state=None):
    """``torch.save`` of the dict SSL4GIE's train scripts save (train_*.py, best epoch)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # lr 0: the weights stay, the optimiser state is filled as after a step
    torch.save({"epoch": 7, "model_state_dict": model.state_dict() if state is None else state,
                "optimizer_state_dict": optimizer.state_dict(),
                "scaler_state_dict": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                      "growth_interval": 2000, "_growth_tracker": 3},
                "loss": 0.25, "val_perf": 0.8, "test_perf": 0.75, "py_state": random.getstate(),
                "np_state": np.random.get_state(), "torch_state": torch.get_rng_state()}, path)
    return path


def _gissl_model(script, task_module, path, flags=(), **known):
    """The model an eval script rebuilds from ``--weights path`` alone (cli.finetuned + finetuned_model)."""
    args = script.get_args(["--weights", str(path), "--workers", "0", "--no-amp", *flags])
    legacy = getattr(task_module, "LEGACY_SETTINGS", None)
    names = ("split",) if task_module is cls else cli.model_flags(task_module.build_model, **known)
    state, path = cli.finetuned(args, names, legacy=legacy)
    kwargs = {} if task_module is detection else {"encoder_kwargs": dict(img_size=args.image_size)}
    return cli.finetuned_model(args, task_module.build_model, state, path, torch.device("cpu"), **kwargs,
                               **known), args


# --------------------------------------------------------------------------- classification

class _ViTClassifier(nn.Module):
    """SSL4GIE's VisionTransformer_from_Any(head=True): timm ViT, head = Identity, lin_head on the
    CLS token after the final norm."""

    def __init__(self, n_class):
        super().__init__()
        self.vit = timm.models.vision_transformer.VisionTransformer(
            img_size=SIZE, patch_size=16, embed_dim=192, depth=12, num_heads=3)
        self.vit.head = nn.Identity()
        self.lin_head = nn.Linear(192, n_class)

    def forward(self, x):
        return self.lin_head(self.vit.forward_features(x)[:, 0])

    def ssl4gie_state(self, mae=False):
        state = {**self.vit.state_dict(), **{"lin_head." + k: v for k, v in self.lin_head.state_dict().items()}}
        if mae:  # ViT_from_MAE keeps MAE's decoder position embedding
            state["decoder_pos_embed"] = torch.zeros(1, 1 + (SIZE // 16) ** 2, 128)
        return state


@pytest.mark.parametrize("mae", [False, True], ids=["timm", "mae"])
def test_vit_classifier(tmp_path, mae):
    import eval_classification
    torch.manual_seed(0)
    ref = _ViTClassifier(6).eval()
    path = _ssl4gie_file(tmp_path / "vit_b-Hyperkvasir_mae_init-frozen_False-dataset_Hyperkvasir_anatomical.pth",
                         ref, ref.ssl4gie_state(mae))
    model, args = _gissl_model(eval_classification, cls, path, num_classes=6)
    assert args.arch == "vit_t" and args.image_size == SIZE
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-5, atol=1e-5)


def test_resnet_classifier(tmp_path):
    import eval_classification
    torch.manual_seed(0)
    trunk = _randomise_norms(torchvision.models.resnet18())
    trunk.fc = nn.Identity()  # SSL4GIE's ResNet_from_Any: fc = Identity, then lin_head
    lin_head = nn.Linear(512, 12)
    ref = nn.ModuleDict({"trunk": trunk, "lin_head": lin_head}).eval()
    state = {**trunk.state_dict(), **{"lin_head." + k: v for k, v in lin_head.state_dict().items()}}
    path = _ssl4gie_file(tmp_path / "resnet50-ImageNet_class_init-frozen_False.pth", ref, state)
    model, args = _gissl_model(eval_classification, cls, path, ["--image-size", str(SIZE)], num_classes=12)
    assert args.arch == "resnet18"
    with torch.no_grad():
        torch.testing.assert_close(model(X), lin_head(trunk(X)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- DPT (ViT seg / depth)

class _RCU(nn.Module):  # DPT_decoder.ResidualConvUnit_custom, ReLU activation
    def __init__(self, f, bn):
        super().__init__()
        self.bn = bn
        self.conv1 = nn.Conv2d(f, f, 3, padding=1, bias=not bn)
        self.conv2 = nn.Conv2d(f, f, 3, padding=1, bias=not bn)
        if bn:
            self.bn1, self.bn2 = nn.BatchNorm2d(f), nn.BatchNorm2d(f)

    def forward(self, x):
        out = self.conv1(F.relu(x))
        out = self.bn1(out) if self.bn else out
        out = self.conv2(F.relu(out))
        out = self.bn2(out) if self.bn else out
        return out + x


class _Fusion(nn.Module):  # DPT_decoder.FeatureFusionBlock_custom (expand False, align_corners True)
    def __init__(self, f, bn):
        super().__init__()
        self.out_conv = nn.Conv2d(f, f, 1)
        self.resConfUnit1, self.resConfUnit2 = _RCU(f, bn), _RCU(f, bn)

    def forward(self, *xs):
        out = xs[0]
        if len(xs) == 2:
            out = out + self.resConfUnit1(xs[1])
        out = F.interpolate(self.resConfUnit2(out), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(out)


class _SSL4GIEDPT(nn.Module):
    """SSL4GIE's DPT_decoder(dense="seg" | "depth", use_readout="ignore") with its module names, on
    a timm ViT's blocks 2/5/8/11; widths scaled to the ViT (features D/8, D/4, D/2, D)."""

    def __init__(self, dense, d=192, fusion=32, grid=SIZE // 16):
        super().__init__()
        f = [d // 8, d // 4, d // 2, d]
        self.grid = grid
        self.act_postprocess12 = nn.Sequential(nn.Conv2d(d, f[0], 1), nn.ConvTranspose2d(f[0], f[0], 4, stride=4))
        self.act_postprocess22 = nn.Sequential(nn.Conv2d(d, f[1], 1), nn.ConvTranspose2d(f[1], f[1], 2, stride=2))
        self.act_postprocess32 = nn.Sequential(nn.Conv2d(d, f[2], 1))
        self.act_postprocess42 = nn.Sequential(nn.Conv2d(d, f[3], 1), nn.Conv2d(f[3], f[3], 3, stride=2, padding=1))
        for i in range(4):
            setattr(self, f"layer{i + 1}_rn", nn.Conv2d(f[i], fusion, 3, padding=1, bias=False))
            setattr(self, f"refinenet{i + 1}", _Fusion(fusion, dense == "seg"))
        if dense == "depth":
            self.output_conv = nn.Sequential(
                nn.Conv2d(fusion, fusion // 2, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear",
                                                                          align_corners=True),
                nn.Conv2d(fusion // 2, 32, 3, padding=1), nn.ReLU(True), nn.Conv2d(32, 1, 1), nn.Sigmoid())
        else:
            self.output_conv = nn.Sequential(
                nn.Conv2d(fusion, fusion, 3, padding=1, bias=False), nn.BatchNorm2d(fusion), nn.ReLU(True),
                nn.Dropout(0.1), nn.Conv2d(fusion, 1, 1), nn.Upsample(scale_factor=2, mode="bilinear",
                                                                       align_corners=True))

    def forward(self, activations):
        maps = [a[:, 1:].transpose(1, 2).unflatten(2, (self.grid, self.grid)) for a in activations]
        l1, l2, l3, l4 = (getattr(self, f"act_postprocess{i + 1}2")(m) for i, m in enumerate(maps))
        l1, l2, l3, l4 = (getattr(self, f"layer{i + 1}_rn")(m) for i, m in enumerate((l1, l2, l3, l4)))
        path = self.refinenet4(l4)
        path = self.refinenet3(path, l3)
        path = self.refinenet2(path, l2)
        path = self.refinenet1(path, l1)
        return self.output_conv(path)


class _ViTDense(nn.Module):
    """SSL4GIE's ViT with ``dense`` set: blocks 2/5/8/11 (before the final norm) -> ``decoder``."""

    def __init__(self, dense):
        super().__init__()
        self.vit = timm.models.vision_transformer.VisionTransformer(
            img_size=SIZE, patch_size=16, embed_dim=192, depth=12, num_heads=3)
        self.vit.head = nn.Identity()
        self.decoder = _SSL4GIEDPT(dense)

    def forward(self, x):
        x = self.vit._pos_embed(self.vit.patch_embed(x))
        taps = []
        for i, block in enumerate(self.vit.blocks):
            x = block(x)
            if i in (2, 5, 8, 11):
                taps.append(x)
        return self.decoder(taps)

    def ssl4gie_state(self):
        return {**self.vit.state_dict(), **{"decoder." + k: v for k, v in self.decoder.state_dict().items()},
                "decoder_pos_embed": torch.zeros(1, 1 + (SIZE // 16) ** 2, 128)}


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_vit_dpt(tmp_path, task):
    import eval_depth
    import eval_segmentation
    torch.manual_seed(0)
    ref = _randomise_norms(_ViTDense("seg" if task == "segmentation" else "depth"))
    path = _ssl4gie_file(tmp_path / f"vit_b-{task}.pth", ref, ref.ssl4gie_state())
    script, module = (eval_segmentation, segmentation) if task == "segmentation" else (eval_depth, depth)
    model, args = _gissl_model(script, module, path)
    assert (args.arch, args.decoder, args.decoder_channels, args.image_size) == ("vit_t", "dpt", 32, SIZE)
    if task == "depth":
        assert args.depth_output == "sigmoid"
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- ResNet seg / depth

def test_resnet_deeplabv3plus_segmentation(tmp_path):
    import eval_segmentation
    torch.manual_seed(0)
    ref = _randomise_norms(smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, classes=1))
    path = _ssl4gie_file(tmp_path / "resnet50-Hyperkvasir_mocov3_init-frozen_False-dataset_Kvasir.pth", ref)
    model, args = _gissl_model(eval_segmentation, segmentation, path, ["--image-size", str(SIZE)])
    assert (args.arch, args.decoder, args.decoder_channels) == ("resnet18", "deeplabv3plus", 256)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-5, atol=1e-5)


def test_resnet_residual_depth(tmp_path):
    import eval_depth
    ref = _residual_reference("resnet18")
    path = _ssl4gie_file(tmp_path / "resnet50-ImageNet_self_mocov3_init-frozen_False-dataset_C3VD.pth", ref)
    model, args = _gissl_model(eval_depth, depth, path, ["--image-size", str(SIZE)])
    assert (args.arch, args.decoder, args.depth_output) == ("resnet18", "residual", "sigmoid")
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- detection

def _torchvision_010_names(state):
    """torchvision >= 0.13 names -> the 0.10 names SSL4GIE's files hold (convs not yet wrapped)."""
    out = {}
    for k, v in state.items():
        for old in ("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks."):
            if k.startswith(old):
                k = k.replace(".0.weight", ".weight").replace(".0.bias", ".bias")
        out[k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")] = v
    return out


def test_resnet_faster_rcnn(tmp_path):
    import eval_detection
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    ref = _randomise_norms(FasterRCNN(backbone, num_classes=2, min_size=64, max_size=107,
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]))
    state = _torchvision_010_names(ref.state_dict())
    assert "rpn.head.conv.weight" in state and "backbone.fpn.inner_blocks.0.weight" in state
    assert not any(k.endswith("num_batches_tracked") for k in state)  # FrozenBatchNorm2d
    path = _ssl4gie_file(tmp_path / "resnet50-random_init-frozen_False-dataset_Kvasir.pth", ref, state)
    model, args = _gissl_model(eval_detection, detection, path, ["--image-size", "64"], num_classes=2)
    assert (args.arch, args.batchnorm) == ("resnet18", "frozen")
    images = list(torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        batch = ref.transform(images)[0].tensors
        for w, g in zip(ref.backbone(batch).values(), model.backbone(batch).values()):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        # gissl keeps detector weights channels-last (faster convs, other float rounding), which
        # with random weights reorders near-tied proposals; in the reference's memory format the
        # detections are the same
        want, got = ref(images), model.to(memory_format=torch.contiguous_format)(images)
    for w, g in zip(want, got):
        assert len(w["boxes"]) > 0 and len(g["boxes"]) == len(w["boxes"])
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(g[key], w[key], rtol=1e-4, atol=1e-3)


def test_incomplete_vit_detector_and_wrong_task_are_refused(tmp_path):
    # SSL4GIE's ViT detectors load (tests/test_ssl4gie_vitdet.py); one without its pyramid does not
    import eval_detection
    import eval_segmentation
    vit_det = {"backbone.blocks.0.attn.qkv.weight": torch.zeros(9, 3), "backbone.fpn.fpn1.1.weight": torch.zeros(1),
               "roi_heads.box_predictor.cls_score.weight": torch.zeros(2, 4)}
    path = _ssl4gie_file(tmp_path / "vit.pth", nn.Linear(1, 1), vit_det)
    with pytest.raises(CheckpointError, match="not of a detection model .a ViT without SSL4GIE's ViTDet_FPN"):
        _gissl_model(eval_detection, detection, path, num_classes=2)
    ref = _ViTClassifier(3)
    path = _ssl4gie_file(tmp_path / "cls.pth", ref, ref.ssl4gie_state())
    with pytest.raises(CheckpointError, match="not of a segmentation model"):
        _gissl_model(eval_segmentation, segmentation, path)


def test_inspect_names_the_layout_and_the_encoder_loads_as_a_checkpoint(tmp_path):
    from gissl.models import build_encoder
    torch.manual_seed(0)
    ref = _randomise_norms(_ViTDense("depth"))
    path = _ssl4gie_file(tmp_path / "vit_b-depth.pth", ref, ref.ssl4gie_state())
    d = describe_checkpoint(str(path))
    assert d["layout"] == "ssl4gie-finetuned" and "train_depth.py" in d["what"]
    assert d["encoder"]["architecture"] == "vit_t" and d["encoder"]["prefix"] == ""
    # --checkpoint: its encoder transfers (decoder, decoder_pos_embed dropped)
    encoder = build_encoder("vit_t", pretraining="Hyperkvasir", ss_framework="mae", checkpoint=str(path),
                            img_size=SIZE)
    torch.testing.assert_close(encoder.state_dict()["blocks.3.attn.qkv.weight"],
                               ref.vit.state_dict()["blocks.3.attn.qkv.weight"])


# --------------------------------------------------------------------------- the scripts

def _run(module, monkeypatch, argv):
    import sys
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    module.main(module.get_args())


def test_scripts_evaluate_predict_and_export_ssl4gie_files(tmp_path, monkeypatch, capsys):
    """eval / predict / export.py (ONNX, checked with onnxruntime) on SSL4GIE files alone: the
    DeepLabV3+ segmentation model and the residual depth model."""
    import eval_segmentation
    import export
    import predict_segmentation
    from gissl.data.synthetic import generate
    torch.manual_seed(0)
    seg_file = _ssl4gie_file(tmp_path / "resnet50-random_init-frozen_False-dataset_Kvasir.pth",
                             _randomise_norms(smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None)))
    depth_file = _ssl4gie_file(tmp_path / "resnet50-random_init-frozen_False-dataset_C3VD.pth",
                               _residual_reference("resnet18"))
    data = generate("Kvasir", str(tmp_path / "kv"), num=12, seed=3)
    monkeypatch.chdir(tmp_path)
    common = ["--weights", str(seg_file), "--image-size", str(SIZE), "--workers", "0", "--data-root", str(data)]
    _run(eval_segmentation, monkeypatch, common)
    assert "Dice: " in (tmp_path / "eval_results.txt").read_text()
    _run(predict_segmentation, monkeypatch, common + ["--idx", "0"])
    assert len(list((tmp_path / "Predictions").rglob("test0_*.png"))) == 1
    for task, path in (("segmentation", seg_file), ("depth", depth_file)):
        capsys.readouterr()
        _run(export, monkeypatch, ["--task", task, "--weights", str(path), "--image-size", str(SIZE),
                                   "--output", str(tmp_path / f"{task}.onnx"), "--check"])
        assert "onnxruntime vs PyTorch" in capsys.readouterr().out
