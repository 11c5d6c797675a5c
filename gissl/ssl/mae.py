"""Masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

The ViT encoder sees only the visible 25 % of the patches (no mask tokens in the encoder,
§3); a light transformer decoder gets the encoded visible tokens plus a shared learned mask
token at every removed position and predicts the pixels of every patch; the loss is the mean
squared error on the removed patches only. Position embeddings of encoder and decoder are
fixed 2-D sine-cosine (paper §A.1).
"""
import torch
import torch.nn as nn

from gissl.errors import UserError
from gissl.losses import masked_patch_mse
from gissl.models.vit import Block


def sincos_pos_embed(h, w, dim, cls_token=True, rows_first=False):
    """Fixed 2-D sine-cosine position embedding (Vaswani et al. 2017, per axis).

    Returns (1, [1 +] h*w, dim), tokens row by row. Each axis gets half of the channels as
    [sin(pos * omega_k), cos(pos * omega_k)] with ``omega_k = 10000^(-k / (dim/4))``; the CLS
    position (when asked for) is zeros. Which axis comes first follows the official code:

    - MAE (facebookresearch/mae, ``util/pos_embed.py``: ``np.meshgrid(grid_w, grid_h)``, "here
      w goes first"): the first half encodes the column, the second the row (the default);
    - MoCo v3 (facebookresearch/moco-v3, ``vits.py``: ``torch.meshgrid(grid_w, grid_h)`` with
      "ij" indexing, then ``[sin(w), cos(w), sin(h), cos(h)]``): on its square grids the first
      half ends up encoding the row of the token, the second its column (``rows_first=True``).
    """
    if dim % 4:
        raise UserError(f"sine-cosine position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")

    def axis(pos):
        angles = pos.reshape(-1, 1) * omega  # (h*w, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    halves = (rows, cols) if rows_first else (cols, rows)
    emb = torch.cat([axis(p) for p in halves], dim=1).float()
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb.unsqueeze(0)


def set_sincos_pos_embed(vit, rows_first=False):
    """Make a ViT's ``pos_embed`` the fixed 2-D sine-cosine embedding (not trained), as MAE
    and MoCo v3 (§4, "we use the 2-D sin-cos position embedding"); ``rows_first`` as in
    :func:`sincos_pos_embed`."""
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed(*vit.pos_grid, vit.embed_dim, rows_first=rows_first))
    vit.pos_embed.requires_grad_(False)


def patchify(imgs, patch_size):
    """(N, 3, H, W) -> (N, L, patch*patch*3), patches row by row, pixels (row, col, channel)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise UserError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x, patch_size, h, w):
    """Inverse of :func:`patchify`: (N, h*w, patch*patch*3) -> (N, 3, h*patch, w*patch)."""
    n, p = x.shape[0], patch_size
    x = x.reshape(n, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, 3, h * p, w * p)


def random_masking(n, length, mask_ratio, device=None, generator=None):
    """Per-sample uniform random choice of the patches to keep (MAE §3, "random sampling").

    Returns ``ids_keep`` (N, K) with K = int(L * (1 - mask_ratio)), ``mask`` (N, L) float with
    1 = removed, 0 = kept, in the original patch order, and ``ids_restore`` (N, L) that puts a
    [kept, removed] sequence back into the original order.
    """
    keep = int(length * (1 - mask_ratio))
    if not 0 < keep < length:
        raise UserError(f"mask ratio {mask_ratio} leaves {keep} of {length} patches visible; "
                        "it must keep at least one patch and mask at least one")
    noise = torch.rand(n, length, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


def add_pixel_decoder(module, encoder, decoder_dim, decoder_depth, decoder_heads):
    """Give ``module`` MAE's pixel decoder (He et al. 2022, §3): ``decoder_embed``,
    ``mask_token``, ``decoder_blocks``, ``decoder_norm`` and ``decoder_pred`` (one patch of
    RGB pixels per token), plus ``patch_size`` and ``decoder_dim``. Shared by MAE
    pretraining and EndoFinder's masked reconstruction; the names are the MAE release's,
    which the pretrained-weight loader drops when it extracts the encoder."""
    module.patch_size = encoder.patch_size
    module.decoder_dim = decoder_dim
    module.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
    module.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
    module.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
    module.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
    module.decoder_pred = nn.Linear(decoder_dim, encoder.patch_size ** 2 * 3)
    nn.init.normal_(module.mask_token, std=0.02)


class MAE(nn.Module):
    """MAE around a gissl ViT encoder (uses its ``patch_embed``, ``pos_embed_for``,
    ``cls_token``, ``blocks`` and ``norm``).

    forward(imgs (N, 3, H, W)) -> {"mse": loss}. Defaults are the paper's: 75 % masking,
    8-block 512-d decoder with 16 heads (§A.1). ``norm_pix_loss`` predicts per-patch
    normalised pixels (Table 1d, better features).
    """

    def __init__(self, encoder, *, mask_ratio=0.75, decoder_dim=512, decoder_depth=8,
                 decoder_heads=16, norm_pix_loss=False):
        super().__init__()
        if not hasattr(encoder, "patch_embed"):
            raise UserError(f"MAE needs a ViT encoder; {encoder.architecture} has no patch embedding "
                            "(use --architecture vit_t / vit_s / vit_b)")
        if getattr(encoder, "num_prefix_tokens", 1) != 1:
            raise UserError(f"MAE builds its own token sequence and does not know {encoder.architecture}'s "
                            "register tokens; pretrain a ViT without registers")
        self.encoder = encoder
        set_sincos_pos_embed(encoder)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        add_pixel_decoder(self, encoder, decoder_dim, decoder_depth, decoder_heads)
        for name, m in self.named_modules():
            if name.startswith("decoder") and isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_encoder(self, imgs, generator=None):
        """(N, 3, H, W) -> latent (N, 1 + K, D) of the visible patches, mask (N, L), ids_restore (N, L)."""
        enc = self.encoder
        h, w = imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size
        pos = enc.pos_embed_for(h, w)
        x = enc.patch_embed(imgs) + pos[:, 1:]
        ids_keep, mask, ids_restore = random_masking(x.shape[0], x.shape[1], self.mask_ratio,
                                                     x.device, generator)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in enc.blocks:
            x = blk(x, (h, w))  # global attention: the grid is only used by windowed blocks
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore, grid):
        """latent (N, 1 + K, D) -> per-patch pixel predictions (N, L, patch*patch*3)."""
        x = self.decoder_embed(latent)
        n, length = x.shape[0], ids_restore.shape[1]
        masked = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        pos = sincos_pos_embed(*grid, self.decoder_dim).to(x.device, x.dtype)
        x = torch.cat([x[:, :1], patches], dim=1) + pos
        for blk in self.decoder_blocks:
            x = blk(x, grid)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, imgs):
        """imgs: (N, 3, H, W) normalised images -> {"mse": loss on the masked patches}."""
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        latent, mask, ids_restore = self.forward_encoder(imgs)
        pred = self.forward_decoder(latent, ids_restore, grid)
        target = patchify(imgs, self.patch_size)
        return {"mse": masked_patch_mse(pred, target, mask, norm_pix=self.norm_pix_loss)}
