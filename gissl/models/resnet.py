"""ResNet-18 / ResNet-50 encoders: torchvision's classes and parameter names, without ``fc``.

Dropping ``fc`` (rather than replacing it with Identity) keeps the state dict exactly the
trunk keys, which is what SSL checkpoints hold (docs/ssl4gie-study.md §3.2/§3.7: Barlow Twins
``resnet50.pth``, the MoCo v3 base encoder without its ``fc`` projector).
"""
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


class ResNetEncoder(ResNet):
    """torchvision ResNet trunk. ``forward``: (N, 3, H, W) -> (N, C) global-average-pooled layer4.

    ``forward_features``: [layer1, layer2, layer3, layer4] maps (N, C_i, H/s_i, W/s_i) with
    strides 4/8/16/32 and channels ``feature_dims``.
    """

    def __init__(self, block, layers, architecture):
        super().__init__(block, layers)
        del self.fc
        self.architecture = architecture
        self.feature_dims = [64 * block.expansion * 2 ** i for i in range(4)]
        self.feature_strides = [4, 8, 16, 32]
        self.embed_dim = self.feature_dims[-1]

    def forward_features(self, x):
        """(N, 3, H, W) -> list of 4 maps (N, C_i, H/s_i, W/s_i)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def forward(self, x):
        """(N, 3, H, W) -> (N, embed_dim)."""
        return torch.flatten(self.avgpool(self.forward_features(x)[-1]), 1)


def resnet18(img_size=224):
    """ResNet-18 (BasicBlock [2, 2, 2, 2]), 512-d output, torchvision ``resnet18`` names.

    ``img_size`` is accepted for a signature shared with the ViT builders; any size works.
    """
    return ResNetEncoder(BasicBlock, [2, 2, 2, 2], "resnet18")


def resnet50(img_size=224):
    """ResNet-50 (Bottleneck [3, 4, 6, 3]), 2048-d output, torchvision ``resnet50`` names."""
    return ResNetEncoder(Bottleneck, [3, 4, 6, 3], "resnet50")
