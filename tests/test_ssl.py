"""SSL wrappers: MAE masking, position embeddings, heads, one optimiser step per method, export."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gissl import losses
from gissl.optim import build_optimizer
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
    row, col = 2, 3  # token 1 + 2*5 + 3; omega_k = 10000^(-k/2) for dim 8; column half first (MAE)
    tok = emb[0, 1 + row * 5 + col]
    want = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
            math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    assert torch.allclose(tok, torch.tensor(want), atol=1e-6)
    imgs = torch.randn(2, 3, 32, 48)
    x = patchify(imgs, 16)
    assert x.shape == (2, 6, 768)
    assert torch.equal(x[0, 1].reshape(16, 16, 3), imgs[0, :, :16, 16:32].permute(1, 2, 0))
    assert torch.equal(unpatchify(x, 16, 2, 3), imgs)


def _official_mae_pos_embed(dim, grid):
    """The official MAE ``util/pos_embed.py`` definition, re-derived: per-axis 1-D embeddings
    with omega = 1 / 10000^(i / (D/4)), sin then cos; the grid is ``np.meshgrid(grid_w, grid_h)``
    so the first half encodes the column; a zero row for the CLS token."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.arange(grid, dtype=np.float64)
    first, second = np.meshgrid(g, g)  # (w, h): first[i, j] = j, the column
    emb = np.concatenate([one_axis(dim // 2, first), one_axis(dim // 2, second)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def _official_mocov3_pos_embed(dim, grid):
    """The official MoCo v3 ``vits.py`` ``build_2d_sincos_position_embedding``, re-derived:
    ``torch.meshgrid(grid_w, grid_h)`` with its default "ij" indexing, omega = 1 / 10000^(i/(D/4)),
    channels [sin(w), cos(w), sin(h), cos(h)], then a zero CLS row."""
    g = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(g, g, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ow, oh = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega
    emb = torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).numpy()


def test_sincos_pos_embed_matches_official_mae_and_mocov3():
    ref = _official_mae_pos_embed(32, 6)
    assert np.allclose(sincos_pos_embed(6, 6, 32)[0].numpy(), ref, atol=1e-6)
    mae = _model("mae", "vit_t")  # 64 px / 16 = 4x4 grid, encoder and decoder
    assert np.allclose(mae.encoder.pos_embed[0].numpy(), _official_mae_pos_embed(mae.encoder.embed_dim, 4),
                       atol=1e-6)
    moco = _model("mocov3", "vit_t")
    assert np.allclose(moco.encoder.pos_embed[0].numpy(),
                       _official_mocov3_pos_embed(moco.encoder.embed_dim, 4), atol=1e-6)


def _official_mocov3_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """facebookresearch/moco-v3 ``_build_mlp``, re-derived from its definition: bias-free
    Linear layers, BN + ReLU after every hidden one, BatchNorm1d(affine=False) after the last
    one when ``last_bn``."""
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(torch.nn.Linear(input_dim if i == 0 else mlp_dim, output_dim if last else mlp_dim,
                                      bias=False))
        if not last:
            layers += [torch.nn.BatchNorm1d(mlp_dim), torch.nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(torch.nn.BatchNorm1d(output_dim, affine=False))
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("arch", ["resnet18", "vit_t"])
def test_mocov3_heads_and_loss_match_official(arch):
    model = _model("mocov3", arch)
    vit = arch.startswith("vit")
    dim, mlp_dim, t = SMALL["mocov3"]["dim"], SMALL["mocov3"]["mlp_dim"], model.temperature
    # MoCo_ResNet: projector 2 layers, predictor 2 layers without last BN;
    # MoCo_ViT: projector 3 layers, predictor 2 layers with last BN.
    projector = _official_mocov3_mlp(3 if vit else 2, model.encoder.embed_dim, mlp_dim, dim)
    momentum_projector = _official_mocov3_mlp(3 if vit else 2, model.encoder.embed_dim, mlp_dim, dim)
    predictor = _official_mocov3_mlp(2, dim, mlp_dim, dim, last_bn=vit)
    # strict: same parameter and buffer names as the official heads (``fc.N.*`` / ``head.N.*``,
    # ``predictor.N.*``)
    projector.load_state_dict(model.projector.state_dict())
    momentum_projector.load_state_dict(model.momentum_projector.state_dict())
    predictor.load_state_dict(model.predictor.state_dict())

    def ctr(q, k):  # the official contrastive_loss
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
        return torch.nn.functional.cross_entropy(q @ k.t() / t, torch.arange(q.shape[0])) * 2 * t

    torch.manual_seed(1)
    x1, x2 = torch.randn(6, 3, SIZE, SIZE), torch.randn(6, 3, SIZE, SIZE)
    with torch.no_grad():
        q1, q2 = (predictor(projector(model.encoder(x))) for x in (x1, x2))
        k1, k2 = (momentum_projector(model.momentum_encoder(x)) for x in (x1, x2))
        want = ctr(q1, k2) + ctr(q2, k1)
        got = model(x1, x2)["infonce"]
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)


def test_simsiam_heads_and_loss_match_official():
    model = _model("simsiam", "resnet18")
    prev_dim, dim, pred_dim = model.encoder.embed_dim, SMALL["simsiam"]["dim"], SMALL["simsiam"]["pred_dim"]
    nn = torch.nn
    # facebookresearch/simsiam builder.py: hidden layers of the encoder's width (prev_dim), the
    # output Linear's bias frozen and followed by BN(affine=False); bottleneck predictor.
    projector = nn.Sequential(nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(),
                              nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(),
                              nn.Linear(prev_dim, dim), nn.BatchNorm1d(dim, affine=False))
    predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(),
                              nn.Linear(pred_dim, dim))
    missing = projector.load_state_dict(model.projector.state_dict(), strict=False)
    assert missing.missing_keys == ["6.bias"] and not missing.unexpected_keys
    with torch.no_grad():
        projector[6].bias.uniform_(-1, 1)  # any frozen bias: BN in training removes it
    predictor.load_state_dict(model.predictor.state_dict())

    torch.manual_seed(1)
    x1, x2 = torch.randn(6, 3, SIZE, SIZE), torch.randn(6, 3, SIZE, SIZE)
    with torch.no_grad():
        z1, z2 = projector(model.encoder(x1)), projector(model.encoder(x2))
        p1, p2 = predictor(z1), predictor(z2)
        cos = torch.nn.functional.cosine_similarity
        want = -(cos(p1, z2).mean() + cos(p2, z1).mean()) * 0.5
        got = model(x1, x2)["simsiam"]
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    # FPSiam keeps its own official widths: FPN channels -> dim -> dim -> dim
    fp = _model("fpsiam", "resnet18")
    c, d = SMALL["fpsiam"]["fpn_channels"], SMALL["fpsiam"]["dim"]
    assert [tuple(m.weight.shape) for m in fp.projector if isinstance(m, nn.Linear)] == [(d, c), (d, d), (d, d)]


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
        # MAE and CLIP see one image; SLIP the CLIP view and two SSL views (Mu et al. 2022 §3)
        assert len(views) == {"mae": 1, "clip": 1, "slip": 3}.get(framework, 2), framework
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
    assert set(FRAMEWORKS) == {"mocov3", "barlowtwins", "mae", "simsiam", "fpsiam", "simclr", "clip", "slip"}
    with pytest.raises(Exception, match="does not train"):
        recipe("mae", "resnet18")


def test_encode_views_is_one_pass_only_where_that_is_the_same_function():
    """A ViT (no BatchNorm) encodes both views in one pass with the outputs of two; a ResNet in
    training mode normalises over its batch, so it keeps one pass per view (equal to calling it
    on each view: the papers' code)."""
    import torch
    from gissl.models import build_encoder
    from gissl.ssl.views import encode_views
    torch.manual_seed(0)
    x1, x2 = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    vit = build_encoder("vit_t", img_size=32).train()
    calls = []
    hook = vit.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    h1, h2 = encode_views(vit, x1, x2)
    hook.remove()
    assert calls == [6]
    torch.testing.assert_close(h1, vit(x1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h2, vit(x2), rtol=1e-4, atol=1e-5)
    resnet = build_encoder("resnet18").train()
    r1, r2 = encode_views(resnet, x1, x2)
    torch.testing.assert_close(r1, resnet(x1))
    torch.testing.assert_close(r2, resnet(x2))
