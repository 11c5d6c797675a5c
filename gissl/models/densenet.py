"""DenseNet-121 encoder: torchvision's class and parameter names, without ``classifier``.

Dropping ``classifier`` (as ``ResNetEncoder`` drops ``fc``) keeps the state dict exactly the
trunk keys ``features.conv0``, ``features.norm0``, ``features.denseblock1..4``,
``features.transition1..3`` and ``features.norm5`` of torchvision's ``densenet121``.
"""
import torch
import torch.nn.functional as F
from torchvision.models.densenet import DenseNet

# torchvision densenet121 (Huang et al., CVPR 2017, Table 1): growth rate 32, 6/12/24/16 layers
# per dense block, 64 stem channels.
GROWTH_RATE = 32
BLOCK_CONFIG = (6, 12, 24, 16)
NUM_INIT_FEATURES = 64


class DenseNetEncoder(DenseNet):
    """torchvision DenseNet trunk. ``forward``: (N, 3, H, W) -> (N, C) global-average-pooled
    ReLU(norm5), the input of torchvision's classifier (C = 1024 for DenseNet-121).

    ``forward_features``: 4 maps (N, C_i, H/s_i, W/s_i), the tensors torchvision's forward
    computes after denseblock1, denseblock2, denseblock3 (the concatenated layer outputs, before
    the transition's norm) and after denseblock4 → norm5 → ReLU; strides 4/8/16/32 and channels
    ``feature_dims`` (256/512/1024/1024 for DenseNet-121). The strides are DPT's targets, so
    ``gissl.models.dpt.DPT`` passes the maps straight to its 3×3 projections (no reassemble
    resampling, as for a ResNet), and the last map is what Grad-CAM and GeM pooling read.
    """

    def __init__(self, growth_rate, block_config, num_init_features, architecture):
        super().__init__(growth_rate=growth_rate, block_config=block_config, num_init_features=num_init_features)
        del self.classifier
        self.architecture = architecture
        dims, channels = [], num_init_features
        for i, layers in enumerate(block_config):
            channels += layers * growth_rate
            dims.append(channels)
            if i < len(block_config) - 1:
                channels //= 2  # each transition halves the channels (and the resolution)
        self.feature_dims = dims
        self.feature_strides = [4, 8, 16, 32]
        self.embed_dim = dims[-1]

    def forward_features(self, x):
        """(N, 3, H, W) -> list of 4 maps (N, C_i, H/s_i, W/s_i)."""
        feats = []
        for name, module in self.features.named_children():
            x = module(x)
            if name.startswith("denseblock") and name != f"denseblock{len(self.feature_dims)}":
                feats.append(x)
        feats.append(F.relu(x))  # x = norm5(denseblock4(...)); torchvision applies ReLU before pooling
        return feats

    def forward(self, x):
        """(N, 3, H, W) -> (N, embed_dim)."""
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x)[-1], 1), 1)


def densenet121(img_size=224):
    """DenseNet-121, 1024-d output, torchvision ``densenet121`` names.

    ``img_size`` is accepted for a signature shared with the ViT builders; any size works.
    """
    return DenseNetEncoder(GROWTH_RATE, BLOCK_CONFIG, NUM_INIT_FEATURES, "densenet121")
