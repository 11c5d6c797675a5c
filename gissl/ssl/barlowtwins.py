"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021): the cross-correlation of the two views' projections should
be the identity matrix."""
import torch.nn as nn

from gissl.losses import barlow_twins
from gissl.ssl.mlp import mlp


class BarlowTwins(nn.Module):
    """forward(x1, x2 (N, 3, H, W)) -> {"barlow": loss}.

    Projector (paper §2, "Implementation details"): three linear layers of 8192 units, the
    first two followed by BN and ReLU; ``proj_dims`` makes it smaller for CPU tests. The
    loss standardises each output over the global batch (``gissl.losses.barlow_twins``),
    lambda = 0.0051.
    """

    def __init__(self, encoder, *, proj_dims=(8192, 8192, 8192), lambd=0.0051):
        super().__init__()
        self.encoder = encoder
        self.lambd = lambd
        self.projector = mlp([encoder.embed_dim, *proj_dims], last_bn=False)

    def forward(self, x1, x2):
        z1 = self.projector(self.encoder(x1))
        z2 = self.projector(self.encoder(x2))
        return {"barlow": barlow_twins(z1, z2, self.lambd)}
