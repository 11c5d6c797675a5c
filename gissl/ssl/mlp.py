"""The projector / predictor MLPs of the SSL methods: Linear -> BN -> ReLU hidden layers."""
import torch.nn as nn


def mlp(dims, *, last_bn=True, last_bn_affine=False, last_bias=False):
    """MLP over ``dims`` = [in, hidden..., out]; (N, in) -> (N, out).

    Hidden layers are Linear (no bias: BN follows) -> BatchNorm1d -> ReLU. The output layer is
    Linear, followed by BatchNorm1d (without affine unless ``last_bn_affine``) when ``last_bn``
    (MoCo v3 / SimSiam projectors), and with a bias only when ``last_bias``.
    """
    layers = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=last and last_bias))
        if not last:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=last_bn_affine))
    return nn.Sequential(*layers)
