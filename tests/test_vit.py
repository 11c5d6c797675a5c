"""ViT encoders: equal to timm given the same weights, any input size, windowed attention."""
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from gissl.errors import UserError  # noqa: E402
from gissl.models import build_encoder  # noqa: E402
from gissl.models.vit import resample_pos_embed, window_attention  # noqa: E402

TIMM_NAMES = {"vit_t": "vit_tiny_patch16_224", "vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224"}


def _pair(arch):
    """Our encoder and timm's reference with the same (random) weights, both in eval mode."""
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    ours = build_encoder(arch).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same parameter names and shapes
    return ours, ref


@pytest.fixture(scope="module")
def vit_t_pair():
    return _pair("vit_t")


@torch.no_grad()
def test_vit_b_equals_timm_at_224():
    ours, ref = _pair("vit_b")
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert ours.embed_dim == 768 and ours.feature_dims == [768] * 4 and ours.architecture == "vit_b"


@torch.no_grad()
def test_vit_t_equals_timm_at_any_size(vit_t_pair):
    # timm's dynamic_img_size resamples pos_embed bicubically like ours: native, up- and
    # down-sampled (antialiased), non-square grids
    ours, ref = vit_t_pair
    for size in [(224, 224), (256, 256), (48, 80), (96, 160)]:
        x = torch.randn(1, 3, *size)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_vit_s_equals_timm():
    ours, ref = _pair("vit_s")
    x = torch.randn(1, 3, 112, 112)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_forward_features_are_blocks_2_5_8_11_before_norm(vit_t_pair):
    ours, ref = vit_t_pair
    x = torch.randn(1, 3, 96, 160)
    feats = ours.forward_features(x)
    # timm returns the intermediate block outputs (prefix tokens dropped, unnormed) as NCHW maps
    expected = ref.forward_intermediates(x, indices=[2, 5, 8, 11], norm=False, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(1, 192, 6, 10)] * 4
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_forward_features_shapes(vit_t_pair):
    enc = vit_t_pair[0]
    assert enc.out_indices == (2, 5, 8, 11) and enc.feature_strides == [16] * 4
    for size in [(224, 224), (256, 256), (224, 320)]:
        x = torch.randn(1, 3, *size)
        feats = enc.forward_features(x)
        assert [tuple(f.shape) for f in feats] == [(1, 192, size[0] // 16, size[1] // 16)] * 4
        assert enc.patch_embed(x).shape == (1, size[0] // 16 * size[1] // 16, 192)


def test_pos_embed_interpolation_keeps_native_size_and_cls():
    enc = build_encoder("vit_t")
    assert enc.pos_embed_for(14, 14) is enc.pos_embed  # native grid: untouched
    pe = enc.pos_embed_for(16, 20)
    assert pe.shape == (1, 1 + 16 * 20, 192)
    torch.testing.assert_close(pe[:, 0], enc.pos_embed[:, 0])  # CLS position kept
    # a constant grid stays constant under interpolation (no border artefacts from padding)
    const = torch.ones(1, 1 + 14 * 14, 4)
    torch.testing.assert_close(resample_pos_embed(const, (14, 14), (9, 23)), torch.ones(1, 1 + 9 * 23, 4))


@torch.no_grad()
def test_model_built_at_other_size_gives_same_output():
    # A model whose stored grid is 4x6 (img_size=(64, 96)) run at that size equals the 224 model
    # when its pos_embed is the 224 one interpolated once (what load_pretrained does).
    small = build_encoder("vit_t").eval()
    big = build_encoder("vit_t", img_size=(64, 96)).eval()
    state = dict(small.state_dict(), pos_embed=small.pos_embed_for(4, 6))
    big.load_state_dict(state)
    x = torch.randn(1, 3, 64, 96)
    torch.testing.assert_close(big(x), small(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_window_covering_whole_grid_equals_global_attention():
    enc = build_encoder("vit_t").eval()
    x = torch.randn(2, 3, 96, 160)
    ref, ref_feats = enc(x), enc.forward_features(x)
    enc.set_window_attention(10, list(range(12)))  # the 6x10 grid fits in one 10x10 window (padded)
    torch.testing.assert_close(enc(x), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(enc.forward_features(x), ref_feats):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    enc.set_window_attention(3, list(range(12)))
    assert not torch.allclose(enc(x), ref, atol=1e-3)  # small windows really restrict attention


def test_window_attention_equals_explicit_mask():
    # Reference: global attention with a mask allowing (same window) or (CLS query / CLS key).
    torch.manual_seed(0)
    h, w, ws = 5, 7, 3  # neither side divisible by the window: padding is masked
    q, k, v = torch.randn(3, 2, 4, 1 + h * w, 8).unbind(0)
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    win = torch.cat([torch.tensor([-1]), (rows // ws) * 100 + cols // ws])
    allowed = (win[:, None] == win[None, :]) | (win[:, None] == -1) | (win[None, :] == -1)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(window_attention(q, k, v, (h, w), ws), expected, atol=1e-5, rtol=1e-5)


def test_set_window_attention_default_blocks_and_errors():
    enc = build_encoder("vit_t", window_size=4)
    assert enc.window_blocks == [0, 1, 3, 4, 6, 7, 9, 10]  # global attention stays in 2, 5, 8, 11
    enc.set_window_attention(None)
    assert enc.window_blocks == []
    with pytest.raises(UserError, match="blocks \\[12\\] do not exist"):
        enc.set_window_attention(4, [12])
    with pytest.raises(UserError, match="needs a ViT"):
        build_encoder("resnet18", window_size=4)


def test_input_not_multiple_of_patch_size_is_a_user_error():
    with pytest.raises(UserError, match="not a multiple of the ViT patch size 16"):
        build_encoder("vit_t")(torch.randn(1, 3, 100, 112))


def test_backward_reaches_every_parameter():
    enc = build_encoder("vit_t", window_size=4)
    enc(torch.randn(1, 3, 48, 64)).sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
