"""Vision Transformer encoders (ViT-T/S/B/L patch 16, ViT-H patch 14, DINOv2 ViT-S/B/L patch 14
with and without registers) with timm's parameter names.

Parameter names equal timm's ``vit_base_patch16_224`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``),
so timm, MoCo v3 and MAE weights load without renaming (docs/ssl4gie-study.md §3.3: patch 16, MLP ratio 4,
qkv bias, LayerNorm eps 1e-6; ViT-L/16 and ViT-H/14 are timm's ``vit_large_patch16_224`` /
``vit_huge_patch14_224``, the same block with other widths, depths and patch size).
DINOv2 (Oquab et al., 2023; registers: Darcet et al., ICLR 2024) adds LayerScale
(``blocks.{i}.ls1.gamma`` / ``ls2.gamma``) and, for the ``reg4`` models, 4 register tokens
(``reg_token``) after the CLS token; those models use timm's ``no_embed_class`` layout (the CLS
position folded into ``cls_token``, ``pos_embed`` for the patches only), as timm's
``vit_*_patch14_reg4_dinov2``.
Attention runs through ``F.scaled_dot_product_attention`` (except CPU training, see :func:`attention`).
Any input whose height and width are multiples of the patch size p works: the patch part of the
position embedding is interpolated to the token grid, the CLS position is kept.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from gissl.errors import UserError

# Blocks tapped for dense tasks (DPT, docs/ssl4gie-study.md §3.3): the 3rd/6th/9th/12th of 12 blocks.
OUT_INDICES = (2, 5, 8, 11)
# The same quarters of deeper models: DPT-Large taps ViT-L/16's blocks 5/11/17/23 (Ranftl et al.,
# ICCV 2021); ViT-H/14's 32 blocks are split the same way.
OUT_INDICES_24 = (5, 11, 17, 23)
OUT_INDICES_32 = (7, 15, 23, 31)
# DINOv2's own dense heads tap ViT-L/14 at blocks 4/11/17/23 (facebookresearch/dinov2 hub/depthers.py,
# Depth Anything's intermediate_layer_idx "vitl"); ViT-S/B/14 at 2/5/8/11 as OUT_INDICES.
OUT_INDICES_DINOV2_L = (4, 11, 17, 23)
# DINOv2 grid: 518 px = 37 × 14 (timm's vit_*_patch14_dinov2 img_size, Meta's hub models).
DINOV2_IMG_SIZE = 518
# LayerScale init of timm's DINOv2 builders (pretrained weights overwrite it).
DINOV2_INIT_VALUES = 1e-5
# Longest sequence for which CPU training uses the explicit attention of :func:`attention`
# (its (N, heads, L, L) score matrix grows as L²; 1024 tokens = a 512x512 image at patch 16).
EXPLICIT_ATTENTION_MAX_TOKENS = 1024


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def attention(q, k, v, causal=False):
    """Softmax attention of q, k, v (N, heads, L, d) -> (N, heads, L, d); ``causal``: position i
    attends to positions <= i only (CLIP's text tower).

    ``F.scaled_dot_product_attention`` (fused) everywhere except when training on a CPU, where
    the explicit q·kᵀ -> softmax -> ·v (timm's non-fused path, the same numbers up to rounding)
    is used: PyTorch's CPU flash-attention backward is slow. On the AVX512-BF16 EPYC development
    machine, forward + backward of one ViT-B attention (4 images, 12 heads, 197 tokens, bf16,
    1 thread) took 33 ms fused vs 13 ms explicit (18 ms with an fp32 softmax, no more
    accurate: the bf16 scores dominate the error), and on a 2-core Intel Xeon with AMX (8
    images, 2 threads) 50 vs 22 ms; forward alone took 8 ms either way on the EPYC, so
    inference keeps the fused kernel, as do GPUs and sequences over
    ``EXPLICIT_ATTENTION_MAX_TOKENS``.
    """
    if (q.device.type == "cpu" and torch.is_grad_enabled()
            and max(q.shape[-2], k.shape[-2]) <= EXPLICIT_ATTENTION_MAX_TOKENS):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if causal:
            later = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(later, float("-inf"))
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def resample_pos_embed(pos_embed, old_grid, new_grid, num_prefix=1):
    """Interpolate the patch part of a position embedding to another token grid.

    pos_embed: (1, P + gh*gw, D) with P prefix (CLS) positions first, kept unchanged.
    Returns (1, P + h*w, D). Bicubic with antialias in fp32, like timm's
    ``resample_abs_pos_embed``, so our outputs equal timm's at any input size.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def window_attention(q, k, v, grid, window_size, num_prefix=1):
    """Attention inside non-overlapping windows of window_size × window_size tokens.

    q, k, v: (N, heads, P + h*w, d), P prefix (CLS) tokens first, then the h×w grid row by row.
    Returns (N, heads, P + h*w, d). Patch tokens attend to the tokens of their window and to the
    prefix tokens; prefix tokens attend to everything. So a window covering the whole grid is
    exactly global attention. A grid not divisible by the window is padded; padded tokens are
    masked out as keys, so results do not depend on the padding (ViTDet pads without a mask).
    """
    h, w = grid
    n, heads, _, d = q.shape
    ws, p = window_size, num_prefix
    pad_h, pad_w = (-h) % ws, (-w) % ws
    hp, wp = h + pad_h, w + pad_w
    nwin = (hp // ws) * (wp // ws)

    def to_windows(t):  # (N, heads, P + h*w, d) -> (N * nwin, heads, ws*ws, d)
        t = t[:, :, p:].reshape(n, heads, h, w, d)
        t = F.pad(t, (0, 0, 0, pad_w, 0, pad_h))
        t = t.reshape(n, heads, hp // ws, ws, wp // ws, ws, d).permute(0, 2, 4, 1, 3, 5, 6)
        return t.reshape(n * nwin, heads, ws * ws, d)

    def with_prefix(t_win, t):  # every window also sees the prefix keys / values
        pre = t[:, :, :p].unsqueeze(1).expand(n, nwin, heads, p, d).reshape(n * nwin, heads, p, d)
        return torch.cat([pre, t_win], dim=2)

    qw = to_windows(q)
    kw, vw = with_prefix(to_windows(k), k), with_prefix(to_windows(v), v)
    mask = None
    if pad_h or pad_w:
        valid = torch.zeros(hp, wp, dtype=torch.bool, device=q.device)
        valid[:h, :w] = True
        valid = valid.reshape(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(nwin, ws * ws)
        valid = torch.cat([valid.new_ones(nwin, p), valid], dim=1)  # (nwin, P + ws*ws)
        mask = valid[None, :, None, None, :].expand(n, -1, 1, 1, -1).reshape(n * nwin, 1, 1, p + ws * ws)
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask)
    out = out.reshape(n, hp // ws, wp // ws, heads, ws, ws, d).permute(0, 3, 1, 4, 2, 5, 6)
    out = out.reshape(n, heads, hp, wp, d)[:, :, :h, :w].reshape(n, heads, h * w, d)
    out_prefix = F.scaled_dot_product_attention(q[:, :, :p], k, v) if p else out[:, :, :0]
    return torch.cat([out_prefix, out], dim=2)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches to tokens: (N, 3, H, W) -> (N, H/p * W/p, D)."""

    def __init__(self, patch_size=16, embed_dim=768, in_chans=3, bias=True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise UserError(
                f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of the ViT patch size {p}; "
                f"resize or crop to a multiple of {p} (e.g. --image-size 224)")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, global or windowed (``window_size`` tokens per side)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.window_size = None  # None = global attention

    def forward(self, x, grid=None):
        """x: (N, P + h*w, D), grid = (h, w) (needed by windowed attention only). Returns (N, P + h*w, D)."""
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, d)
        if self.window_size is None:
            x = attention(q, k, v)
        else:
            if grid is None:
                raise UserError("windowed attention needs the token grid (h, w): call block(x, (h, w))")
            x = window_attention(q, k, v, grid, self.window_size, num_prefix=length - grid[0] * grid[1])
        return self.proj(x.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, quick_gelu=False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU() if quick_gelu else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (Touvron et al., CaiT; timm / DINOv2 ``LayerScale``)."""

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` without drop path); LayerScale when
    ``init_values`` is given (DINOv2), else none (``ls1`` / ``ls2`` are identities without parameters)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=None, quick_gelu=False, norm_eps=1e-6):
        super().__init__()
        # attribute order = timm's state-dict order (norm1, attn, ls1, norm2, mlp, ls2)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), quick_gelu)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x, grid=None):
        """x: (N, L, D) -> (N, L, D); grid (h, w) of the patch tokens, for windowed attention."""
        x = x + self.ls1(self.attn(self.norm1(x), grid))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT encoder. ``forward``: (N, 3, H, W) -> (N, D) CLS token after the final LayerNorm.

    ``forward_features``: the outputs of blocks ``out_indices`` (before the final norm, CLS and
    register tokens dropped) as 4 maps (N, D, H/p, W/p), p = ``patch_size`` (also ``feature_strides``).
    ``img_size`` sets the grid of the stored ``pos_embed`` (int or (H, W), a multiple of p);
    other input sizes interpolate it on the fly.
    ``init_values``: LayerScale in every block (DINOv2). ``reg_tokens``: register tokens after the
    CLS token (``num_prefix_tokens`` = 1 + reg_tokens); they have no position, and the CLS token
    has none either (``num_prefix_pos`` = 0, timm's ``no_embed_class``): ``pos_embed`` then holds
    the patch grid only.
    ``pre_norm``, ``quick_gelu``, ``norm_eps``: OpenAI CLIP's image tower (timm's
    ``vit_*_clip_quickgelu_224``): a LayerNorm ``norm_pre`` after the position embedding, a
    patch convolution without bias, QuickGELU MLPs and LayerNorm eps 1e-5.
    """

    def __init__(self, *, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16,
                 img_size=224, out_indices=OUT_INDICES, architecture="vit", init_values=None, reg_tokens=0,
                 pre_norm=False, quick_gelu=False, norm_eps=1e-6):
        super().__init__()
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_h % patch_size or img_w % patch_size:
            raise UserError(f"image size {img_h}x{img_w} is not a multiple of the patch size {patch_size}")
        if max(out_indices) >= depth:
            raise UserError(f"out_indices {tuple(out_indices)} exceed the {depth} blocks of {architecture}")
        self.architecture = architecture
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.pos_grid = (img_h // patch_size, img_w // patch_size)
        self.out_indices = tuple(out_indices)
        self.feature_dims = [embed_dim] * len(self.out_indices)
        self.feature_strides = [patch_size] * len(self.out_indices)
        self.num_prefix_tokens = 1 + reg_tokens
        self.num_prefix_pos = 0 if reg_tokens else 1  # timm's reg4 DINOv2: no_embed_class

        self.patch_embed = PatchEmbed(patch_size, embed_dim, bias=not pre_norm)
        # parameter order = timm's (cls_token, reg_token, pos_embed, patch_embed, norm_pre, blocks, norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_prefix_pos + self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, init_values, quick_gelu, norm_eps)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self._init_weights()

    def _init_weights(self):
        # timm's default ViT init: trunc-normal 0.02 for pos_embed and Linear weights, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def pos_embed_for(self, h, w):
        """Position embedding (1, P + h*w, D) for an h×w token grid, P = ``num_prefix_pos``
        (1: the CLS position first; 0 for the register models, whose prefix tokens have none)."""
        return resample_pos_embed(self.pos_embed, self.pos_grid, (h, w), num_prefix=self.num_prefix_pos)

    def set_window_attention(self, window_size, blocks=None):
        """Use attention in window_size×window_size token windows in ``blocks``, global elsewhere.

        ``blocks=None`` picks every block not in ``out_indices`` (ViTDet / docs/ssl4gie-study.md §3.4 pattern:
        global attention stays in the tapped blocks). ``window_size=None`` makes all blocks global.
        Parameter names do not change, so weights load either way.
        """
        if window_size is not None and (not isinstance(window_size, int) or window_size < 1):
            raise UserError(f"window size must be a positive integer number of tokens, got {window_size!r}")
        if blocks is None:
            blocks = [i for i in range(len(self.blocks)) if i not in self.out_indices]
        blocks = set(blocks)
        bad = sorted(b for b in blocks if not 0 <= b < len(self.blocks))
        if bad:
            raise UserError(f"window-attention blocks {bad} do not exist; {self.architecture} has "
                            f"blocks 0..{len(self.blocks) - 1}")
        for i, blk in enumerate(self.blocks):
            blk.attn.window_size = window_size if i in blocks else None

    @property
    def window_blocks(self):
        """Indices of the blocks that use windowed attention."""
        return [i for i, blk in enumerate(self.blocks) if blk.attn.window_size is not None]

    def tokens(self, x):
        """CLS [+ register] + patch tokens with position embedding:
        (N, 3, H, W) -> ((N, num_prefix_tokens + h*w, D), (h, w))."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        pos = self.pos_embed_for(h, w)
        if self.num_prefix_pos == 0:  # timm's no_embed_class: positions for the patches only
            return self.norm_pre(torch.cat(prefix + [x + pos], dim=1)), (h, w)
        return self.norm_pre(torch.cat(prefix + [x], dim=1) + pos), (h, w)

    def forward_tokens(self, x):
        """All tokens after the final LayerNorm: (N, 3, H, W) -> (N, num_prefix_tokens + H/p * W/p, D)."""
        x, grid = self.tokens(x)
        for blk in self.blocks:
            x = blk(x, grid)
        return self.norm(x)

    def forward(self, x):
        """(N, 3, H, W) -> (N, D): the CLS token after the final LayerNorm."""
        return self.forward_tokens(x)[:, 0]

    def forward_features(self, x):
        """(N, 3, H, W) -> list of len(out_indices) maps (N, D, H/p, W/p), before the final norm."""
        x, (h, w) = self.tokens(x)
        feats = []
        for i, blk in enumerate(self.blocks[: max(self.out_indices) + 1]):
            x = blk(x, (h, w))
            if i in self.out_indices:
                patches = x[:, self.num_prefix_tokens:]  # CLS and registers dropped
                feats.append(patches.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w))
        return feats


def _clip_vit(architecture, embed_dim, depth, patch_size, img_size, num_heads, out_indices):
    return VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size,
                             img_size=img_size, out_indices=out_indices, architecture=architecture,
                             pre_norm=True, quick_gelu=True, norm_eps=1e-5)


def vit_b16_clip(img_size=224, num_heads=12):
    """OpenAI CLIP's ViT-B/16 image tower (timm ``vit_base_patch16_clip_quickgelu_224``)."""
    return _clip_vit("vit_b16_clip", 768, 12, 16, img_size, num_heads, OUT_INDICES)


def vit_b32_clip(img_size=224, num_heads=12):
    """OpenAI CLIP's ViT-B/32 image tower (timm ``vit_base_patch32_clip_quickgelu_224``)."""
    return _clip_vit("vit_b32_clip", 768, 12, 32, img_size, num_heads, OUT_INDICES)


def vit_l14_clip(img_size=224, num_heads=16):
    """OpenAI CLIP's ViT-L/14 image tower (timm ``vit_large_patch14_clip_quickgelu_224``)."""
    return _clip_vit("vit_l14_clip", 1024, 24, 14, img_size, num_heads, OUT_INDICES_24)


def vit_t(img_size=224, num_heads=3):
    """ViT-Ti/16: 192-d, 12 blocks, 3 heads (timm ``vit_tiny_patch16_224``)."""
    return VisionTransformer(embed_dim=192, depth=12, num_heads=num_heads, img_size=img_size, architecture="vit_t")


def vit_s(img_size=224, num_heads=6):
    """ViT-S/16: 384-d, 12 blocks, 6 heads (timm ``vit_small_patch16_224``, DeiT-S, DINO).

    MoCo v3's ``vit_small`` (facebookresearch/moco-v3 ``vits.py``) has the same weights but 12
    heads; the head count is not in the weights, so it is chosen by the caller (``num_heads``,
    see ``gissl.models.vit_num_heads``).
    """
    return VisionTransformer(embed_dim=384, depth=12, num_heads=num_heads, img_size=img_size,
                             architecture="vit_s")


def vit_b(img_size=224, num_heads=12):
    """ViT-B/16: 768-d, 12 blocks, 12 heads (timm ``vit_base_patch16_224``, docs/ssl4gie-study.md §3.3)."""
    return VisionTransformer(embed_dim=768, depth=12, num_heads=num_heads, img_size=img_size,
                             architecture="vit_b")


def vit_l(img_size=224, num_heads=16):
    """ViT-L/16: 1024-d, 24 blocks, 16 heads, MLP 4096 (timm ``vit_large_patch16_224``).

    ``forward_features`` taps blocks 5/11/17/23, DPT-Large's (``OUT_INDICES_24``).
    """
    return VisionTransformer(embed_dim=1024, depth=24, num_heads=num_heads, img_size=img_size,
                             out_indices=OUT_INDICES_24, architecture="vit_l")


def vit_h(img_size=224, num_heads=16):
    """ViT-H/14: 1280-d, 32 blocks, 16 heads, MLP 5120, patch 14 (timm ``vit_huge_patch14_224``).

    Inputs must be multiples of 14 (224 = 16 × 14 patches); ``feature_strides`` are 14 and
    ``forward_features`` taps blocks 7/15/23/31 (``OUT_INDICES_32``).
    """
    return VisionTransformer(embed_dim=1280, depth=32, num_heads=num_heads, patch_size=14, img_size=img_size,
                             out_indices=OUT_INDICES_32, architecture="vit_h")


def _dinov2(embed_dim, depth, num_heads, img_size, reg_tokens, out_indices, architecture):
    return VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=14,
                             img_size=img_size, out_indices=out_indices, architecture=architecture,
                             init_values=DINOV2_INIT_VALUES, reg_tokens=reg_tokens)


def vit_s14_dinov2(img_size=DINOV2_IMG_SIZE, num_heads=6):
    """DINOv2 ViT-S/14: 384-d, 12 blocks, 6 heads, LayerScale (timm ``vit_small_patch14_dinov2``,
    Meta's ``dinov2_vits14``). Default grid 37×37 (518 px); inputs must be multiples of 14."""
    return _dinov2(384, 12, num_heads, img_size, 0, OUT_INDICES, "vit_s14_dinov2")


def vit_s14_reg4_dinov2(img_size=DINOV2_IMG_SIZE, num_heads=6):
    """DINOv2 ViT-S/14 with 4 registers (timm ``vit_small_patch14_reg4_dinov2``, Meta's ``dinov2_vits14_reg``)."""
    return _dinov2(384, 12, num_heads, img_size, 4, OUT_INDICES, "vit_s14_reg4_dinov2")


def vit_b14_dinov2(img_size=DINOV2_IMG_SIZE, num_heads=12):
    """DINOv2 ViT-B/14: 768-d, 12 blocks, 12 heads (timm ``vit_base_patch14_dinov2``, Meta's ``dinov2_vitb14``)."""
    return _dinov2(768, 12, num_heads, img_size, 0, OUT_INDICES, "vit_b14_dinov2")


def vit_b14_reg4_dinov2(img_size=DINOV2_IMG_SIZE, num_heads=12):
    """DINOv2 ViT-B/14 with 4 registers (timm ``vit_base_patch14_reg4_dinov2``, Meta's ``dinov2_vitb14_reg``)."""
    return _dinov2(768, 12, num_heads, img_size, 4, OUT_INDICES, "vit_b14_reg4_dinov2")


def vit_l14_dinov2(img_size=DINOV2_IMG_SIZE, num_heads=16):
    """DINOv2 ViT-L/14: 1024-d, 24 blocks, 16 heads (timm ``vit_large_patch14_dinov2``, Meta's
    ``dinov2_vitl14``); ``forward_features`` taps blocks 4/11/17/23 (``OUT_INDICES_DINOV2_L``)."""
    return _dinov2(1024, 24, num_heads, img_size, 0, OUT_INDICES_DINOV2_L, "vit_l14_dinov2")


def vit_l14_reg4_dinov2(img_size=DINOV2_IMG_SIZE, num_heads=16):
    """DINOv2 ViT-L/14 with 4 registers (timm ``vit_large_patch14_reg4_dinov2``, Meta's ``dinov2_vitl14_reg``)."""
    return _dinov2(1024, 24, num_heads, img_size, 4, OUT_INDICES_DINOV2_L, "vit_l14_reg4_dinov2")
