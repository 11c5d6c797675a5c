"""Official image–text checkpoints: a SLIP file in the exact layout facebookresearch/SLIP
``main.py`` writes, built from independent reference modules (timm's ViT as SLIP's visual
tower, open_clip's QuickGELU text tower, torch.nn's SimCLR head), gives in gissl the zero-shot
logits of SLIP's ``eval_zeroshot.py`` procedure run on the reference modules; its image tower
loads as an encoder; OpenAI CLIP / open_clip state dicts load their text tower and are refused
as image encoders with the reason."""
import argparse
import collections

import pytest
import torch
import torch.nn as nn

from gissl.checkpoint import describe_checkpoint
from gissl.errors import CheckpointError
from gissl.models import build_encoder, load_pretrained
from gissl.models.clip import CLIPModel, image_encoder_state, load_clip, load_text_tower
from gissl.tokenizer import ClipTokenizer

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

CLASSES = ["polyp", "normal cecum", "ulcerative colitis"]
TEMPLATES = ["an endoscopy image of {}.", "a photo of {} in the colon."]


def _open_clip_text(width=64, layers=2, heads=1, embed_dim=64):
    # open_clip's CLIP with QuickGELU (SLIP's and OpenAI's text MLP); only its text tower is used.
    vision = {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32}
    text = {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers}
    model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("transformer.", "ln_final")):
                p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(3.5)
    return model


def _simclr_head(in_dim, mlp_dim=32, out_dim=16):
    # SLIP models.py _build_mlp (SyncBatchNorm has BatchNorm1d's state dict).
    return nn.Sequential(collections.OrderedDict([
        ("layer1", nn.Linear(in_dim, mlp_dim)), ("bn1", nn.BatchNorm1d(mlp_dim)), ("relu1", nn.ReLU()),
        ("layer2", nn.Linear(mlp_dim, mlp_dim)), ("bn2", nn.BatchNorm1d(mlp_dim)), ("relu2", nn.ReLU()),
        ("layer3", nn.Linear(mlp_dim, out_dim))]))


def _slip_file(path, visual, model_name, text_model, embed_dim=64):
    """Write ``path`` as SLIP main.py's save_on_master does, from reference modules."""
    image_projection = torch.randn(visual.num_features, embed_dim) * visual.num_features ** -0.5
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state["image_projection"] = image_projection
    state.update({k: v for k, v in text_model.state_dict().items()
                  if k.startswith(("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                                   "text_projection", "logit_scale"))})
    state.update({f"image_mlp.{k}": v for k, v in _simclr_head(visual.num_features).state_dict().items()})
    state = {f"module.{k}": v for k, v in state.items()}  # saved from the DDP wrapper
    params = [v.clone().requires_grad_() for v in state.values() if v.is_floating_point()]
    args = argparse.Namespace(model=model_name, ssl_mlp_dim=32, ssl_emb_dim=16, ssl_scale=1.0, ssl_temp=0.1,
                              lr=3e-3, wd=0.1, betas=(0.9, 0.98), epochs=25, batch_size=64, output_dir="/out")
    torch.save({"epoch": 25, "state_dict": state, "optimizer": torch.optim.AdamW(params).state_dict(),
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0},
                "best_acc1": 31.5, "args": args}, path)
    return image_projection


def _reference_zeroshot(visual, image_projection, text_model, images, tokenizer):
    # SLIP eval_zeroshot.py validate_zeroshot, on the reference modules.
    with torch.no_grad():
        text_features = []
        for label in CLASSES:
            emb = text_model.encode_text(tokenizer([t.format(label) for t in TEMPLATES]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(dim=0)
            text_features.append(emb / emb.norm(dim=-1, keepdim=True))
        text_features = torch.stack(text_features)
        image_features = visual(images) @ image_projection
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        return image_features @ text_features.t()


def _gissl_zeroshot(model, images, tokenizer):
    with torch.no_grad():
        text = []
        for label in CLASSES:
            emb = model.encode_text(tokenizer([t.format(label) for t in TEMPLATES]), normalize=True).mean(0)
            text.append(torch.nn.functional.normalize(emb, dim=-1))
        return model.encode_image(images, normalize=True) @ torch.stack(text).t()


@pytest.fixture(scope="module")
def slip(tmp_path_factory):
    torch.manual_seed(0)
    visual = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    text_model = _open_clip_text()
    path = tmp_path_factory.mktemp("slip") / "slip_vitt16.pt"
    projection = _slip_file(path, visual, "SLIP_VITT16", text_model)
    return path, visual, projection, text_model


def test_slip_file_zero_shot_logits_equal_reference(slip):
    path, visual, projection, text_model = slip
    reference_tok = pytest.importorskip("open_clip.tokenizer").SimpleTokenizer()
    ours_tok = ClipTokenizer.from_file(pytest.importorskip("open_clip.tokenizer").default_bpe())
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    model, info = load_clip(path)
    model.eval()
    assert isinstance(model, CLIPModel) and info["layout"] == "slip" and info["architecture"] == "vit_t"
    assert info["epoch"] == 25 and sorted(info["image_mlp"])[0] == "bn1.bias"
    expected = _reference_zeroshot(visual, projection, text_model, images, reference_tok)
    torch.testing.assert_close(_gissl_zeroshot(model, images, ours_tok), expected, rtol=1e-4, atol=1e-5)
    assert float(model.logit_scale.detach()) == pytest.approx(3.5)
    image_emb, text_emb, scale = model(images[:1], ours_tok(["a polyp"]))
    assert image_emb.shape == text_emb.shape == (1, 64) and float(scale.detach()) == pytest.approx(torch.e ** 3.5, rel=1e-5)


def test_slip_image_tower_is_an_encoder(slip):
    path, visual, _, _ = slip
    arch, state = image_encoder_state(path)
    assert arch == "vit_t"
    encoder = build_encoder(arch).eval()
    encoder.load_state_dict(state, strict=True)
    again = build_encoder("vit_t").eval()
    info = load_pretrained(again, path)  # the --checkpoint loader finds module.visual.
    assert info["prefix"] == "module.visual."
    assert describe_checkpoint(path)["layout"] == "slip"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), visual(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(again(x), visual(x), rtol=1e-4, atol=1e-5)


def test_slip_vit_s_is_moco_v3s_12_heads(tmp_path):
    # SLIP's ViT-S is MoCo v3's vit_small (12 heads); the head count is not in the weights.
    torch.manual_seed(0)
    visual = timm.create_model("vit_small_patch16_224", num_heads=12, depth=1, num_classes=0)
    path = tmp_path / "slip_vits16.pt"
    _slip_file(path, visual, "SLIP_VITS16", _open_clip_text(width=64, layers=1, heads=1))
    assert image_encoder_state(path)[0] == "vit_s"
    with pytest.raises(CheckpointError, match="12 attention heads"):
        load_pretrained(build_encoder("vit_s"), path)


def test_openai_clip_state_dict_text_tower_and_refusal(tmp_path):
    torch.manual_seed(0)
    reference = _open_clip_text(width=64, layers=2, heads=1, embed_dim=32)
    path = tmp_path / "openai_clip.pt"
    torch.save(reference.state_dict(), path)  # visual.conv1 / class_embedding / ln_pre / proj, text at top level
    tower, scale = load_text_tower(path)
    tokens = ClipTokenizer.from_file(pytest.importorskip("open_clip.tokenizer").default_bpe())(["a small polyp", ""])
    with torch.no_grad():
        torch.testing.assert_close(tower.eval()(tokens), reference.encode_text(tokens), rtol=1e-5, atol=1e-5)
    assert float(scale) == pytest.approx(3.5)
    assert describe_checkpoint(path)["layout"] == "openai-clip"
    with pytest.raises(CheckpointError, match="ln_pre"):
        image_encoder_state(path)
    with pytest.raises(CheckpointError, match="ln_pre"):
        load_pretrained(build_encoder("vit_t"), path)


def test_gissl_clip_state_round_trip(tmp_path):
    model = CLIPModel(build_encoder("resnet18"), embed_dim=32, vocab_size=600, text_width=64, text_layers=1,
                      text_heads=2)
    path = tmp_path / "clip.pth"
    torch.save({"model": model.state_dict(), "text_config": model.text_config,
                "args": {"arch": "resnet18", "ss_framework": "clip"}}, path)
    again, info = load_clip(path)
    assert info["layout"] == "gissl" and info["architecture"] == "resnet18"
    assert again.text_config == model.text_config
    images, tokens = torch.randn(2, 3, 32, 32), torch.tensor([[598, 5, 599, 0], [598, 599, 0, 0]])
    model.eval(), again.eval()
    with torch.no_grad():
        for a, b in zip(model(images, tokens), again(images, tokens)):
            torch.testing.assert_close(a, b)
    assert image_encoder_state(path)[0] == "resnet18"
    # pretrain.py's layout: image tower under "encoder.", SimCLR head beside it, sizes in "args",
    # the tokenizer under "extra"
    tokenizer = ClipTokenizer.learn(["a small polyp", "a large polyp"] * 3, vocab_size=600)
    wrapped = {(f"encoder.{k[7:]}" if k.startswith("visual.") else k): v for k, v in model.state_dict().items()}
    wrapped.update({f"image_mlp.{k}": v for k, v in _simclr_head(512).state_dict().items()})
    torch.save({"model": wrapped, "extra": {"tokenizer": tokenizer.state_dict()}, "epoch": 3,
                "args": {"arch": "resnet18", "ss_framework": "slip", "image_size": 32, "text_heads": 2,
                         "text_width": 64, "text_layers": 1, "embed_dim": 32}}, path)
    again, info = load_clip(path)
    assert ClipTokenizer.from_state(info["tokenizer"]).merges == tokenizer.merges and info["image_mlp"]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(images, tokens)[0], model(images, tokens)[0])
