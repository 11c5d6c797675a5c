"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021): a base encoder with projector and predictor, a momentum encoder with projector,
and a symmetrised contrastive loss whose negatives are the other keys of the global batch
(no queue)."""
import copy

import torch
import torch.nn as nn

from gissl.losses import infonce
from gissl.ssl.mae import set_sincos_pos_embed
from gissl.ssl.mlp import mlp
from gissl.ssl.views import encode_views


class MoCoV3(nn.Module):
    """forward(x1, x2 (N, 3, H, W)) -> {"infonce": loss}.

    Heads (paper §4, Appendix; facebookresearch/moco-v3 ``moco/builder.py``): projector MLP with
    4096-d hidden layers and a 256-d output (2 layers for ResNets, 3 for ViTs), predictor 2-layer
    MLP 256 -> 4096 -> 256; bias-free Linear layers, BN + ReLU in every hidden layer, and a
    final BN without affine on every projector and on the ViT predictor (the official
    ``MoCo_ViT`` builds its predictor with ``last_bn`` on, ``MoCo_ResNet`` with it off).
    Temperature 1.0 for ResNets and 0.2 for ViTs. ViTs get the fixed 2-D
    sin-cos position embedding and, with ``stop_grad_patch_embed``, a random patch projection
    that is never trained (§5, the paper's fix for training instability).
    The momentum copies are updated by :meth:`update_momentum` after every optimiser step.
    """

    def __init__(self, encoder, *, dim=256, mlp_dim=4096, temperature=None,
                 stop_grad_patch_embed=False):
        super().__init__()
        vit = hasattr(encoder, "patch_embed")
        self.encoder = encoder
        self.temperature = temperature if temperature is not None else (0.2 if vit else 1.0)
        if vit:
            set_sincos_pos_embed(encoder, rows_first=True)
            if stop_grad_patch_embed:
                encoder.patch_embed.requires_grad_(False)
        hidden = [mlp_dim] * (2 if vit else 1)
        self.projector = mlp([encoder.embed_dim, *hidden, dim])
        self.predictor = mlp([dim, mlp_dim, dim], last_bn=vit)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in (*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()):
            p.requires_grad_(False)

    def forward(self, x1, x2):
        h1, h2 = encode_views(self.encoder, x1, x2)  # the heads' BatchNorm still sees each view alone
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        with torch.no_grad():
            m1, m2 = encode_views(self.momentum_encoder, x1, x2)
            k1, k2 = self.momentum_projector(m1), self.momentum_projector(m2)
        t = self.temperature
        # Alg. 1: ctr(q1, k2) + ctr(q2, k1), each scaled by 2 * tau.
        return {"infonce": 2 * t * (infonce(q1, k2, t) + infonce(q2, k1, t))}

    @torch.no_grad()
    def update_momentum(self, m):
        """Exponential moving average: ``theta_k <- m * theta_k + (1 - m) * theta_q``."""
        for online, target in ((self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)):
            for p, pm in zip(online.parameters(), target.parameters()):
                pm.mul_(m).add_(p.detach(), alpha=1 - m)
