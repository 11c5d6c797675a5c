"""CLIP's text tower against open_clip's (the same weights give the same outputs), parameter
names as OpenAI CLIP's, pooling at the end-of-text token."""
import pytest
import torch

from gissl.models.text import TextTransformer

open_clip = pytest.importorskip("open_clip")

TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _open_clip_model(quick_gelu):
    # A tiny open_clip CLIP built from a config in the test (nothing downloads).
    vision = {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32}
    text = {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 2}
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=48, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # move LayerNorms and biases off their 1/0 init so they are checked too
        for name, p in model.named_parameters():
            if name.startswith("transformer.") or name.startswith("ln_final"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _tokens(eot=999):
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(5, 77, dtype=torch.long)
    for row, n in enumerate((0, 3, 10, 40, 75)):
        tokens[row, 0] = 998
        tokens[row, 1:n + 1] = torch.randint(1, 990, (n,), generator=g)
        tokens[row, n + 1] = eot
    return tokens


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_equals_open_clip_text_tower(quick_gelu):
    reference = _open_clip_model(quick_gelu)
    state = {k: v for k, v in reference.state_dict().items() if k.startswith(TEXT_KEYS)}
    ours = TextTransformer(vocab_size=1000, context_length=77, width=64, layers=2, heads=4,
                           embed_dim=48, quick_gelu=quick_gelu).eval()
    assert set(ours.state_dict()) == set(state)
    ours.load_state_dict(state, strict=True)
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference.encode_text(tokens), rtol=1e-5, atol=1e-5)
        # Padding after the end-of-text token does not change a row (causal attention).
        torch.testing.assert_close(ours(tokens[:, :45])[:4], ours(tokens)[:4], rtol=1e-5, atol=1e-5)


def test_default_shape_names_and_gradients():
    model = TextTransformer(vocab_size=600, width=32, layers=1, heads=2, embed_dim=16)
    tokens = _tokens(eot=599) % 600
    out = model(tokens)
    assert out.shape == (5, 16)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    names = set(TextTransformer(layers=1).state_dict())
    assert {"transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.bias",
            "transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.ln_2.bias",
            "text_projection", "positional_embedding", "token_embedding.weight"} <= names
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 78, dtype=torch.long))
