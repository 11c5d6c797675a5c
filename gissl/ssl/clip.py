"""Image–text and image-only contrastive pretraining: CLIP (Radford et al., "Learning
Transferable Visual Models From Natural Language Supervision", ICML 2021), SimCLR (Chen et al.,
"A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020) in SLIP's
form, and SLIP (Mu, Kirillov, Wagner, Xie, "SLIP: Self-supervision meets Language-Image
Pre-training", ECCV 2022) = CLIP + ``ssl_scale`` x SimCLR.

The image tower is ``encoder`` (timm / torchvision names, exported as every other method's);
the text tower is ``text`` (a module ``(N, L) int64 tokens -> (N, embed_dim)``, CLIP's text
transformer in ``pretrain.py``). ``encode_image`` / ``encode_text`` give the embeddings that
zero-shot classification and retrieval compare.
"""
import math

import torch
import torch.nn as nn

from gissl.losses import clip_contrastive, simclr
from gissl.ssl.mlp import mlp
from gissl.ssl.views import encode_views

# CLIP §2.5: the temperature starts at 0.07 and the logit scale is clipped at 100 (SLIP clamps
# its log to [0, ln 100] after every optimiser step).
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)


def simclr_head(in_dim, mlp_dim=4096, dim=256):
    """SLIP's SimCLR head: Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear (with bias),
    in_dim -> mlp_dim -> mlp_dim -> dim (its ``--ssl-mlp-dim 4096 --ssl-emb-dim 256``)."""
    return mlp([in_dim, mlp_dim, mlp_dim, dim], last_bn=False, last_bias=True)


class SimCLR(nn.Module):
    """forward(x1, x2 (N, 3, H, W)) -> {"simclr": loss}: NT-Xent over the global batch at
    ``temperature`` (0.1 in SLIP) on the head's outputs (``gissl.losses.simclr``)."""

    def __init__(self, encoder, *, mlp_dim=4096, dim=256, temperature=0.1):
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        self.image_mlp = simclr_head(encoder.embed_dim, mlp_dim, dim)

    def ssl_loss(self, x1, x2):
        h1, h2 = encode_views(self.encoder, x1, x2)  # the head's BatchNorm still sees each view alone
        z1, z2 = self.image_mlp(h1), self.image_mlp(h2)
        return simclr(z1, z2, self.temperature)

    def forward(self, x1, x2):
        return {"simclr": self.ssl_loss(x1, x2)}


class CLIP(nn.Module):
    """forward(images (N, 3, H, W), tokens (N, L)) -> {"clip": loss}.

    ``image_projection`` is a (width, embed_dim) matrix as in CLIP / SLIP (init std
    width^-0.5); ``logit_scale`` is the learnt log of the logit multiplier, starting at
    ln(1 / 0.07); call :meth:`clamp_logit_scale` after every optimiser step.
    """

    def __init__(self, encoder, *, text, embed_dim=512):
        super().__init__()
        self.encoder = encoder
        self.text = text
        self.image_projection = nn.Parameter(torch.empty(encoder.embed_dim, embed_dim))
        nn.init.normal_(self.image_projection, std=encoder.embed_dim ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def encode_image(self, images):
        """(N, 3, H, W) -> (N, embed_dim), not normalised."""
        return self.encoder(images) @ self.image_projection

    def encode_text(self, tokens):
        """(N, L) int64 -> (N, embed_dim), not normalised."""
        return self.text(tokens)

    def clip_loss(self, images, tokens):
        return clip_contrastive(self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp())

    def forward(self, images, tokens):
        return {"clip": self.clip_loss(images, tokens)}

    @torch.no_grad()
    def clamp_logit_scale(self):
        """Keep the multiplier exp(logit_scale) in [1, 100] (SLIP ``main.py``, after each step)."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


class SLIP(CLIP):
    """forward(images, x1, x2, tokens) -> {"clip": CLIP loss, "simclr": ssl_scale x SimCLR loss}.

    ``images`` is the CLIP view, ``x1`` / ``x2`` the two SSL views; the SimCLR head sits on the
    image tower's pooled feature, before the CLIP projection (SLIP §3).
    """

    def __init__(self, encoder, *, text, embed_dim=512, mlp_dim=4096, dim=256, temperature=0.1, ssl_scale=1.0):
        super().__init__(encoder, text=text, embed_dim=embed_dim)
        self.temperature, self.ssl_scale = temperature, ssl_scale
        self.image_mlp = simclr_head(encoder.embed_dim, mlp_dim, dim)

    def forward(self, images, x1, x2, tokens):
        return {"clip": self.clip_loss(images, tokens), "simclr": self.ssl_scale * SimCLR.ssl_loss(self, x1, x2)}


def text_tower(*, vocab_size, context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512):
    """CLIP's text transformer (``gissl.models.text``) with pretrain.py's ``--text-*`` sizes."""
    from gissl.models.text import TextTransformer
    return TextTransformer(vocab_size=vocab_size, context_length=context_length, width=text_width,
                           layers=text_layers, heads=text_heads, embed_dim=embed_dim)


TEXT_TOWER_FLAGS = ("context_length", "text_width", "text_layers", "text_heads", "embed_dim")


def load_image_text_model(path, tokenizer_file=None):
    """``(image–text model, tokenizer)`` for zero-shot and retrieval: ``pretrain.py``'s CLIP / SLIP
    ``checkpoint.pth`` or an official SLIP release, read by :func:`gissl.models.clip.load_clip`
    (both towers, projections and ``logit_scale`` strictly; SLIP's SimCLR head is left out).

    The tokenizer is ``tokenizer_file`` (CLIP's ``bpe_simple_vocab_16e6.txt.gz``) when given,
    else the one the checkpoint was trained with, so prompts tokenize exactly as in training.
    """
    from gissl.errors import UserError
    from gissl.models.clip import load_clip
    from gissl.tokenizer import ClipTokenizer
    model, info = load_clip(path)
    if tokenizer_file:
        return model, ClipTokenizer.from_file(tokenizer_file)
    if info["tokenizer"] is None:
        raise UserError(f"'{path}' holds no tokenizer (an official release): give CLIP's vocabulary with "
                        "--tokenizer bpe_simple_vocab_16e6.txt.gz")
    return model, ClipTokenizer.from_state(info["tokenizer"])
