"""SSL4GIE's ViT detectors, read by eval / predict ``--weights FILE``.

The reference is re-derived here from SSL4GIE's description (Sanderson & Matuszewski 2024;
docs/ssl4gie-study.md §3.3-3.4), independently of gissl's code: timm's VisionTransformer with
its CLS token deleted, the attention of blocks 0, 1, 3, 4, 6, 7, 9, 10 replaced by attention
inside 16×16-token windows gathered by a token permutation (and scattered back by its
inverse), the 14×14 position grid resized to 64×64 bilinearly with corners aligned, a ViTDet-like
pyramid whose LayerNorms span (C, H, W), and torchvision's FasterRCNN with its defaults and the
transform fixed to 1024×1024. The file is saved as SSL4GIE's train_detection.py saves it. ViT-Ti
width keeps it small; the 1024-px canvas is fixed by the LayerNorm shapes.
"""
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gissl import cli, detection
from gissl.checkpoint import describe_checkpoint
from gissl.errors import CheckpointError, UserError

timm = pytest.importorskip("timm")

CANVAS, GRID, WIDTH, HEADS = 1024, 64, 192, 3
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class _WindowedAttention(nn.Module):
    """Attention inside non-overlapping 16×16-token windows: tokens permuted window by window,
    attention per window, permuted back; no relative position bias."""

    def __init__(self, dim, num_heads, window=16):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):  # timm's Block passes these
        b, n, c = x.shape
        side, w = int(n ** 0.5), self.window
        idx = torch.arange(n).reshape(side, side)
        perm = torch.cat([idx[i:i + w, j:j + w].reshape(-1) for i in range(0, side, w) for j in range(0, side, w)])
        windows = n // (w * w)
        qkv = self.qkv(x[:, perm]).reshape(b, windows, w * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5).softmax(-1)
        out = (attn @ v).transpose(2, 3).reshape(b, n, c)
        return self.proj(out[:, torch.argsort(perm)])


def _ln_head(dim, side):
    return [nn.Conv2d(dim, 256, 1), nn.LayerNorm((256, side, side)), nn.Conv2d(256, 256, 3, padding=1),
            nn.LayerNorm((256, side, side))]


class _ReferenceBackbone(nn.Module):
    """SSL4GIE's ViT detection backbone: the ViT's final-normed patch tokens -> 64×64 map ->
    fpn1 (/32), fpn2 (/16), fpn3 (/8), fpn4 (/4) + "pool"."""

    def __init__(self):
        super().__init__()
        self.vit = timm.models.vision_transformer.VisionTransformer(
            img_size=224, patch_size=16, embed_dim=WIDTH, depth=12, num_heads=HEADS)
        self.vit.head = nn.Identity()
        del self.vit.cls_token
        self.vit.patch_embed.img_size = (CANVAS, CANVAS)
        for i in (0, 1, 3, 4, 6, 7, 9, 10):
            self.vit.blocks[i].attn = _WindowedAttention(WIDTH, HEADS)
        d = WIDTH
        self.fpn = nn.ModuleDict({
            "fpn1": nn.Sequential(nn.MaxPool2d(2), *_ln_head(d, GRID // 2)),
            "fpn2": nn.Sequential(*_ln_head(d, GRID)),
            "fpn3": nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), *_ln_head(d, 2 * GRID)),
            "fpn4": nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.LayerNorm((d, 2 * GRID, 2 * GRID)), nn.GELU(),
                                  nn.ConvTranspose2d(d, d, 2, 2), *_ln_head(d, 4 * GRID))})
        self.out_channels = 256

    def forward(self, x):
        v = self.vit
        t = v.patch_embed(x)
        pos = v.pos_embed[:, 1:].transpose(1, 2).reshape(1, WIDTH, 14, 14)
        pos = F.interpolate(pos, size=(GRID, GRID), mode="bilinear", align_corners=True)
        t = t + pos.reshape(1, WIDTH, GRID * GRID).transpose(1, 2)
        for blk in v.blocks:
            t = blk(t)
        m = v.norm(t).transpose(1, 2).reshape(x.shape[0], WIDTH, GRID, GRID)
        f = self.fpn
        l1, l2, l3, l4 = f["fpn1"](m), f["fpn2"](m), f["fpn3"](m), f["fpn4"](m)
        return OrderedDict([("0", l4), ("1", l3), ("2", l2), ("3", l1),
                            ("pool", F.max_pool2d(l1, kernel_size=1, stride=2, padding=0))])

    def ssl4gie_state(self):
        """SSL4GIE's names: the ViT's at the top of ``backbone.`` beside ``fpn.fpn1`` ..."""
        return {**self.vit.state_dict(), **{"fpn." + k: v for k, v in self.fpn.state_dict().items()}}


def _reference():
    from torchvision.models.detection import FasterRCNN
    torch.manual_seed(0)
    backbone = _ReferenceBackbone()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial position table and full-shape LayerNorm affine tensors
        backbone.vit.pos_embed.copy_(0.2 * torch.randn(backbone.vit.pos_embed.shape, generator=g))
        for m in backbone.fpn.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    model = FasterRCNN(backbone, num_classes=2, image_mean=MEAN, image_std=STD)
    model.transform.fixed_size = (CANVAS, CANVAS)
    return model.eval()


def _ssl4gie_state(ref, mae=True):
    """``model_state_dict`` as SSL4GIE's FasterRCNN holds it (torchvision 0.10's RPN conv name)."""
    state = {}
    for k, v in ref.state_dict().items():
        if k.startswith("backbone."):
            continue
        state[k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")] = v
    state.update({"backbone." + k: v for k, v in ref.backbone.ssl4gie_state().items()})
    if mae:  # ViT_from_MAE keeps MAE's decoder position embedding
        state["backbone.decoder_pos_embed"] = torch.zeros(1, 197, 128)
    return state


def _save(path, state):
    """``torch.save`` of the dict SSL4GIE's train_detection.py saves (the optimiser state is
    AdamW's layout before its first step: a full one would triple this 118 M-value file)."""
    params = [nn.Parameter(torch.zeros(1))]
    torch.save({"epoch": 3, "model_state_dict": state,
                "optimizer_state_dict": torch.optim.AdamW(params, lr=1e-4).state_dict(),
                "scaler_state_dict": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                      "growth_interval": 2000, "_growth_tracker": 3},
                "loss": 0.5, "val_perf": 0.4, "test_perf": torch.tensor(0.35).item(),
                "py_state": random.getstate(), "np_state": np.random.get_state(),
                "torch_state": torch.get_rng_state()}, path)
    return path


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    ref = _reference()
    state = _ssl4gie_state(ref)
    assert "rpn.head.conv.weight" in state and "backbone.fpn.fpn4.7.weight" in state
    assert "backbone.cls_token" not in state and state["backbone.fpn.fpn4.5.weight"].shape == (256, 256, 256)
    path = _save(tmp_path_factory.mktemp("ssl4gie") / "vit_b-Hyperkvasir_mae_init-frozen_False-dataset_Kvasir.pth",
                 state)
    yield ref, path
    path.unlink()  # 450 MB: not left in pytest's kept temporary folders


def _gissl_model(path, flags=()):
    """The model eval_detection.py rebuilds from ``--weights path`` alone (no data needed)."""
    import eval_detection
    args = eval_detection.get_args(["--weights", str(path), "--workers", "0", *flags])
    state, path = cli.finetuned(args, cli.model_flags(detection.build_model, num_classes=None),
                                legacy=detection.LEGACY_SETTINGS)
    cli.call(detection.check_settings, args)
    return cli.finetuned_model(args, detection.build_model, state, path, torch.device("cpu"), num_classes=2), args


def test_eval_detection_gives_the_reference_detections(reference_file, tmp_path):
    """eval_detection.load (also predict_detection.py's) on the file alone, then gissl's
    predict on a Kvasir test image: the reference's pyramid and detections on the same canvas."""
    import eval_detection
    from gissl.data.synthetic import generate
    from gissl.data.transforms import unpad_boxes
    ref, path = reference_file
    data = generate("Kvasir", str(tmp_path / "kv"), num=10, seed=3)
    args = eval_detection.get_args(["--weights", str(path), "--workers", "0", "--data-root", str(data)])
    ds, model = eval_detection.load(args, torch.device("cpu"))
    assert (args.arch, args.pyramid, args.image_size, args.window_size) == ("vit_t", "ssl4gie", CANVAS, 16)
    windowed = [i for i, b in enumerate(model.backbone.body.blocks) if b.attn.window_size == 16]
    assert windowed == [0, 1, 3, 4, 6, 7, 9, 10]
    loader = detection.eval_loader(torch.utils.data.Subset(ds["test"], [0]), architecture=args.arch,
                                   image_size=args.image_size, batch_size=1)
    batch = next(iter(loader))
    canvas, meta = batch["images"][0], batch["meta"][0]
    assert canvas.shape == (3, CANVAS, CANVAS)
    pyramids = []
    hooks = [m.backbone.register_forward_hook(lambda _m, _i, out: pyramids.append(out)) for m in (ref, model)]
    try:
        with torch.no_grad():
            want, = ref([canvas])
        # in the reference's memory format (gissl keeps convs channels-last, whose other float
        # rounding can reorder near-tied proposals of random weights)
        got, = detection.predict(model.to(memory_format=torch.contiguous_format), loader, torch.device("cpu"))[0]
    finally:
        for h in hooks:
            h.remove()
    for name, w, g in zip(("0", "1", "2", "3", "pool"), pyramids[0].values(), pyramids[1].values()):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"level {name}: {m}")
    want["boxes"] = unpad_boxes(want["boxes"], meta)  # canvas -> original pixels, as gissl's predict
    assert len(want["boxes"]) > 0 and len(got["boxes"]) == len(want["boxes"])
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-3)


def test_inspect_names_the_ssl4gie_vit_detector(reference_file):
    d = describe_checkpoint(str(reference_file[1]))
    assert d["layout"] == "ssl4gie-finetuned" and "train_detection.py" in d["what"]
    assert "a ViT detector" in d["what"] and "--pyramid ssl4gie" in d["what"]
    assert d["encoder"]["prefix"] == "backbone." and "ViT-T/16" in d["encoder"]["holds"]


def test_bad_settings_export_and_files_are_refused(reference_file, tmp_path):
    import export
    path = reference_file[1]
    args = export.get_args(["--task", "detection", "--weights", str(path), "--output", str(tmp_path / "d.onnx")])
    with pytest.raises(UserError, match="SSL4GIE's ViT detectors .* does not write to ONNX"):
        export.load(args)
    assert not (tmp_path / "d.onnx").exists()
    with pytest.raises(UserError, match="1024-px canvas only"):
        _gissl_model(path, ["--image-size", "512"])
    with pytest.raises(UserError, match="--window-size 8 contradicts"):
        _gissl_model(path, ["--window-size", "8"])
    # gissl's own ViT detector files (no stored --pyramid) are ViTDet's
    gissl_file = tmp_path / "gissl.pth"
    torch.save({"model": {}, "args": {"task": "detection", "arch": "vit_t", "image_size": 256}, "epoch": 1}, gissl_file)
    with pytest.raises(UserError, match="--pyramid ssl4gie contradicts .* --pyramid vitdet"):
        _gissl_model(gissl_file, ["--pyramid", "ssl4gie"])
    # a ViT detector whose pyramid is not made for the 1024-px canvas
    small = {"backbone.blocks.0.attn.qkv.weight": torch.zeros(9, 3),
             "backbone.patch_embed.proj.weight": torch.zeros(192, 3, 16, 16),
             "backbone.fpn.fpn2.1.weight": torch.zeros(256, 16, 16),
             "roi_heads.box_predictor.cls_score.weight": torch.zeros(2, 4)}
    with pytest.raises(CheckpointError, match="1024-px canvas"):
        _gissl_model(_save(tmp_path / "small.pth", small))
