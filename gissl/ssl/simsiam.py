"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021) and
FPSiam (Gan et al., "Self-supervised representation learning using feature pyramid siamese
networks for colorectal polyp detection"; docs/fpsiam.md)."""
import torch.nn as nn
import torch.nn.functional as F

from gissl.losses import simsiam
from gissl.ssl.mlp import mlp


def simsiam_heads(in_dim, dim=2048, pred_dim=512, hidden=None):
    """SimSiam's heads (paper §3 "Baseline settings"; facebookresearch/simsiam
    ``simsiam/builder.py``). Projector, 3 layers in -> hidden -> hidden -> dim, ``hidden``
    defaulting to the encoder's width as in the official code (2048 on ResNet-50, 512 on
    ResNet-18): BN on every layer, the last without affine, no ReLU on the output. Predictor
    dim -> pred_dim -> dim, BN and ReLU on the hidden layer only (a bottleneck), its output
    Linear with a bias. The official projector's output Linear has a bias frozen at its
    initial value; the BN right after it subtracts the batch mean, so leaving the bias out is
    the same function in training."""
    hidden = in_dim if hidden is None else hidden
    projector = mlp([in_dim, hidden, hidden, dim], last_bn=True)
    predictor = mlp([dim, pred_dim, dim], last_bn=False, last_bias=True)
    return projector, predictor


class SimSiam(nn.Module):
    """forward(x1, x2 (N, 3, H, W)) -> {"simsiam": loss}, the symmetric negative cosine with
    stop-gradient. ``predictor`` parameters are the group the recipe keeps at a fixed lr (§4.3)."""

    def __init__(self, encoder, *, dim=2048, pred_dim=512):
        super().__init__()
        self.encoder = encoder
        self.projector, self.predictor = simsiam_heads(encoder.embed_dim, dim, pred_dim)

    def forward(self, x1, x2):
        z1 = self.projector(self.encoder(x1))
        z2 = self.projector(self.encoder(x2))
        return {"simsiam": simsiam(self.predictor(z1), z1, self.predictor(z2), z2)}


class FPN(nn.Module):
    """FPSiam's feature pyramid over C2-C5 (docs/fpsiam.md §a.1): 1x1 lateral convs to
    ``channels``, a nearest-upsampling top-down pathway, and 3x3 output convs on P2 (finest,
    with all top-down context) and P5 (coarsest lateral) only.

    forward([C2, C3, C4, C5]) -> (P2 (N, channels, H/4, W/4), P5 (N, channels, H/32, W/32)).
    """

    def __init__(self, in_dims, channels=256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_dims)
        self.out_p2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.out_p5 = nn.Conv2d(channels, channels, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats):
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        top = laterals[-1]
        merged = top
        for lat in reversed(laterals[:-1]):
            merged = lat + F.interpolate(merged, size=lat.shape[-2:], mode="nearest")
        return self.out_p2(merged), self.out_p5(top)


class FPSiam(nn.Module):
    """forward(x1, x2) -> {"local": lam * L(P2), "global": (1 - lam) * L(P5)}, each L the SimSiam
    loss on the global-average-pooled level, with one projector and one predictor shared by
    both levels; lam = 0.5 (docs/fpsiam.md §a.1)."""

    def __init__(self, encoder, *, fpn_channels=256, dim=2048, pred_dim=512, lam=0.5):
        super().__init__()
        self.encoder = encoder
        self.lam = lam
        self.fpn = FPN(encoder.feature_dims, fpn_channels)
        # FPSiam's projector (its config: hid_channels = out_channels = 2048) widens the 256
        # FPN channels to ``dim`` in its first layer, unlike SimSiam's.
        self.projector, self.predictor = simsiam_heads(fpn_channels, dim, pred_dim, hidden=dim)

    def _levels(self, x):
        p2, p5 = self.fpn(self.encoder.forward_features(x))
        return [self.projector(p.mean(dim=(2, 3))) for p in (p2, p5)]

    def forward(self, x1, x2):
        (z1_local, z1_global), (z2_local, z2_global) = self._levels(x1), self._levels(x2)

        def loss(z1, z2):
            return simsiam(self.predictor(z1), z1, self.predictor(z2), z2)

        return {"local": self.lam * loss(z1_local, z2_local),
                "global": (1 - self.lam) * loss(z1_global, z2_global)}
