"""SSL wrappers: MAE masking, position embeddings, heads, one optimiser step per method, export."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gissl import losses
from gissl.engine import build_optimizer
from gissl.models import build_encoder, load_pretrained
from gissl.ssl import (FRAMEWORKS, build_ssl_model, cosine_momentum, export_encoder, recipe,
                       warmup_cosine)
from gissl.ssl.augment import VIEWS
from gissl.ssl.mae import patchify, random_masking, sincos_pos_embed, unpatchify
from gissl.ssl.simsiam import FPN

SIZE = 64  # 4x4 ViT patches; ResNet maps 16/8/4/2
SMALL = {  # heads shrunk for CPU; the architecture of each head is unchanged
    "mocov3": dict(dim=16, mlp_dim=32),
    "barlowtwins": dict(proj_dims=(32, 32, 32)),
    "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "simsiam": dict(dim=32, pred_dim=8),
    "fpsiam": dict(fpn_channels=16, dim=32, pred_dim=8),
}


def _model(framework, arch, **kw):
    torch.manual_seed(0)
    encoder = build_encoder(arch, img_size=SIZE)
    return build_ssl_model(framework, encoder, **{**SMALL[framework], **kw})


def test_random_masking_keeps_exactly_a_quarter():
    ids_keep, mask, ids_restore = random_masking(3, 16, 0.75)
    assert ids_keep.shape == (3, 4)
    assert mask.sum(1).tolist() == [12, 12, 12]
    for n in range(3):  # kept patches are exactly the unmasked ones
        assert sorted(ids_keep[n].tolist()) == torch.nonzero(mask[n] == 0).flatten().tolist()
    # ids_restore undoes the shuffle: the [kept, removed] mask puts 0 back where patches were kept
    shuffled = torch.cat([torch.zeros(3, 4), torch.ones(3, 12)], dim=1)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), mask)
    with pytest.raises(Exception, match="mask ratio"):
        random_masking(1, 16, 1.0)


def test_mae_encoder_sees_visible_patches_and_loss_is_on_masked_only():
    model = _model("mae", "vit_t")
    imgs = torch.randn(2, 3, SIZE, SIZE)
    g = torch.Generator().manual_seed(1)
    latent, mask, ids_restore = model.forward_encoder(imgs, generator=g)
    assert latent.shape == (2, 1 + 4, 192) and mask.sum().item() == 2 * 12
    pred = model.forward_decoder(latent, ids_restore, (4, 4))
    assert pred.shape == (2, 16, 16 * 16 * 3)
    target = patchify(imgs, 16)
    masked = mask.bool()
    by_hand = ((pred[masked] - target[masked]) ** 2).mean()
    assert losses.masked_patch_mse(pred, target, mask).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # The same random draw through forward() gives the same loss.
    torch.manual_seed(5)
    expected = model(imgs)["mse"]
    torch.manual_seed(5)
    latent, mask, ids_restore = model.forward_encoder(imgs)
    pred = model.forward_decoder(latent, ids_restore, (4, 4))
    assert expected.item() == pytest.approx(losses.masked_patch_mse(pred, target, mask).item(), rel=1e-5)
    # Fixed sin-cos position embedding, not trained.
    assert not model.encoder.pos_embed.requires_grad
    assert torch.allclose(model.encoder.pos_embed, sincos_pos_embed(4, 4, 192))


def test_sincos_and_patchify():
    emb = sincos_pos_embed(3, 5, 8)
    assert emb.shape == (1, 16, 8) and torch.all(emb[0, 0] == 0)
    row, col = 2, 3  # token 1 + 2*5 + 3; omega_k = 10000^(-k/2) for dim 8
    tok = emb[0, 1 + row * 5 + col]
    want = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
            math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    assert torch.allclose(tok, torch.tensor(want), atol=1e-6)
    imgs = torch.randn(2, 3, 32, 48)
    x = patchify(imgs, 16)
    assert x.shape == (2, 6, 768)
    assert torch.equal(x[0, 1].reshape(16, 16, 3), imgs[0, :, :16, 16:32].permute(1, 2, 0))
    assert torch.equal(unpatchify(x, 16, 2, 3), imgs)


def test_fpn_outputs_p2_and_p5():
    fpn = FPN([8, 16, 32, 64], channels=4)
    feats = [torch.randn(2, c, s, s) for c, s in zip([8, 16, 32, 64], [16, 8, 4, 2])]
    p2, p5 = fpn(feats)
    assert p2.shape == (2, 4, 16, 16) and p5.shape == (2, 4, 2, 2)
    # P2 carries top-down context: changing C5 changes P2
    feats2 = [f.clone() for f in feats]
    feats2[3] += 1
    assert not torch.allclose(fpn(feats2)[0], p2)


@pytest.mark.parametrize("framework,arch", [
    ("mocov3", "resnet18"), ("mocov3", "vit_t"), ("barlowtwins", "resnet18"),
    ("mae", "vit_t"), ("simsiam", "resnet18"), ("fpsiam", "resnet18")])
def test_one_pretraining_step(framework, arch):
    model = _model(framework, arch)
    r = recipe(framework, arch)
    kw = {"betas": r["betas"]} if "betas" in r else {}
    opt = build_optimizer(model, lr=0.05 if r["optimizer"] != "adamw" else 1e-3,
                          weight_decay=r["weight_decay"], kind=r["optimizer"], **kw)
    views = (torch.randn(4, 3, SIZE, SIZE),) if framework == "mae" else \
        (torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    out = model(*views)
    total = sum(out.values())
    assert torch.isfinite(total)
    total.backward()
    opt.step()
    after = model.encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("weight") for k in changed), "the encoder did not train"
    if framework == "mocov3":
        assert all(p.grad is None for p in model.momentum_encoder.parameters())
        m_before = [p.clone() for p in model.momentum_encoder.parameters()]
        model.update_momentum(0.9)
        p0, pm0, pm1 = next(model.encoder.parameters()), m_before[0], next(model.momentum_encoder.parameters())
        assert torch.allclose(pm1, 0.9 * pm0 + 0.1 * p0)


def test_mocov3_temperature_and_frozen_patch_embed():
    assert _model("mocov3", "resnet18").temperature == 1.0
    vit = _model("mocov3", "vit_t", stop_grad_patch_embed=True)
    assert vit.temperature == pytest.approx(0.2)
    assert not any(p.requires_grad for p in vit.encoder.patch_embed.parameters())
    assert len(vit.projector) == 3 * 2 + 2  # 3 linear layers (2 hidden with BN+ReLU, last BN)


def test_fpsiam_weighting():
    model = _model("fpsiam", "resnet18", lam=0.3)
    model.eval()  # BN in eval: the two terms are deterministic functions of the views
    x = torch.randn(4, 3, SIZE, SIZE)
    out = model(x, x)
    assert set(out) == {"local", "global"}
    # Identical views: each level's loss is -mean cos(p, z) in [-1, 1], scaled by lam / 1-lam.
    assert -0.3 - 1e-5 <= out["local"].item() <= 0.3 + 1e-5
    assert -0.7 - 1e-5 <= out["global"].item() <= 0.7 + 1e-5


@pytest.mark.parametrize("framework,arch", [("mocov3", "vit_t"), ("fpsiam", "resnet18")])
def test_export_loads_strictly(tmp_path, framework, arch):
    model = _model(framework, arch)
    state = export_encoder(model.state_dict())
    torch.save(state, tmp_path / "encoder.pth")
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "checkpoint.pth")
    for name in ("encoder.pth", "checkpoint.pth"):
        enc = build_encoder(arch, img_size=SIZE)
        load_pretrained(enc, tmp_path / name, framework)
        for k, v in enc.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_views_and_schedules():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    for framework, make in VIEWS.items():
        views = make(SIZE)(img)
        assert len(views) == (1 if framework == "mae" else 2)
        assert all(v.shape == (3, SIZE, SIZE) and v.dtype == torch.float32 for v in views)
    # --color-strength 0: no colour transform at all (colour is diagnostic in endoscopy)
    plain = repr(VIEWS["mocov3"](SIZE, color=0.0).transforms[1])
    assert "ColorJitter" not in plain and "Grayscale" not in plain and "Solarize" not in plain
    assert "ColorJitter" in repr(VIEWS["mocov3"](SIZE).transforms[1])
    lr = warmup_cosine(1.0, epochs=10, warmup_epochs=2, min_lr=0.1)
    assert lr(0) == 0 and lr(1) == pytest.approx(0.5) and lr(2) == pytest.approx(1.0)
    assert lr(6) == pytest.approx(0.55) and lr(10) == pytest.approx(0.1)
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert set(FRAMEWORKS) == {"mocov3", "barlowtwins", "mae", "simsiam", "fpsiam"}
    with pytest.raises(Exception, match="does not train"):
        recipe("mae", "resnet18")
