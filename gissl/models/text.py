"""CLIP's text transformer (Radford et al. 2021, §2.4), with OpenAI CLIP's parameter names.

Token embedding + learned positional embedding, ``layers`` causal pre-LayerNorm residual
blocks (attention, then an MLP of 4 × width), ``ln_final``, the features at the end-of-text
token (the largest id of each row: CLIP pools at ``tokens.argmax(-1)``), then the
``text_projection`` matrix (width, embed_dim). Parameter names equal OpenAI CLIP's and
open_clip's (``token_embedding.weight``, ``positional_embedding``,
``transformer.resblocks.{i}.ln_1 / attn.in_proj_weight / attn.in_proj_bias / attn.out_proj /
ln_2 / mlp.c_fc / mlp.c_proj``, ``ln_final``, ``text_projection``), so their state dicts load
without renaming. OpenAI's weights were trained with QuickGELU (``quick_gelu=True``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names
    (``in_proj_weight`` (3D, D), ``in_proj_bias`` (3D), ``out_proj``), each position attending
    to itself and earlier positions only."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        """x: (N, L, D) -> (N, L, D)."""
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)) (pre-LayerNorm)."""

    def __init__(self, width, heads, quick_gelu=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``layers`` residual blocks under the name ``resblocks`` (CLIP's)."""

    def __init__(self, width, layers, heads, quick_gelu=False):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class TextTransformer(nn.Module):
    """CLIP's text tower: ``forward(tokens (N, L) long) -> (N, embed_dim)``, L ≤ context_length.

    The defaults are CLIP ViT-B's text tower (63M parameters). Initialisation follows CLIP's
    ``initialize_parameters`` (normal with std 0.02 / 0.01 for the embeddings, width^-0.5
    scaled by depth for the blocks, width^-0.5 for the projection).
    """

    def __init__(self, vocab_size=49408, context_length=77, width=512, layers=12, heads=8,
                 embed_dim=512, quick_gelu=False):
        super().__init__()
        self.vocab_size, self.context_length = vocab_size, context_length
        self.width, self.embed_dim = width, embed_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self._init_weights(layers)

    def _init_weights(self, layers):
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = self.width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=self.width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.width ** -0.5)

    def forward(self, tokens):
        """tokens: (N, L) token ids, each row ending at its end-of-text token (the row's
        largest id) -> (N, embed_dim), not normalised."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the text tower's context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x))
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return pooled @ self.text_projection
