"""ResNet-18 / ResNet-50 / ResNeXt-101 32x4d encoders: torchvision's classes and parameter names,
without ``fc``.

Dropping ``fc`` (rather than replacing it with Identity) keeps the state dict exactly the
trunk keys, which is what SSL checkpoints hold (docs/ssl4gie-study.md §3.2/§3.7: Barlow Twins
``resnet50.pth``, the MoCo v3 base encoder without its ``fc`` projector).
"""
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from gissl.errors import UserError


class ResNetEncoder(ResNet):
    """torchvision ResNet trunk. ``forward``: (N, 3, H, W) -> (N, C) global-average-pooled layer4.

    ``forward_features``: [layer1, layer2, layer3, layer4] maps (N, C_i, H/s_i, W/s_i) with
    strides 4/8/16/32 and channels ``feature_dims``.
    """

    def __init__(self, block, layers, architecture, groups=1, width_per_group=64):
        super().__init__(block, layers, groups=groups, width_per_group=width_per_group)
        del self.fc
        self.architecture = architecture
        self.feature_dims = [64 * block.expansion * 2 ** i for i in range(4)]
        self.feature_strides = [4, 8, 16, 32]
        self.embed_dim = self.feature_dims[-1]

    def set_output_stride(self, output_stride):
        """Replace the last stages' strides by dilation, as DeepLab (Chen et al. 2018) and
        segmentation_models_pytorch do: output stride 16 dilates every conv of ``layer4`` by 2,
        output stride 8 also ``layer3`` by 2 and ``layer4`` by 4. Unlike torchvision's
        ``replace_stride_with_dilation``, which keeps the first block of a stage at the previous
        dilation, every conv of a dilated stage gets the stage's rate (so an smp DeepLabV3+
        state dict gives the same features). No parameter changes shape. Returns ``self``."""
        if output_stride not in (8, 16, 32):
            raise UserError(f"output stride {output_stride} is not supported; use 8, 16 or 32")
        strides = [4, 8, 16, 32]
        for i, layer in ((2, self.layer3), (3, self.layer4)):
            rate = max(1, strides[i] // output_stride)
            if rate > 1:
                for conv in (m for m in layer.modules() if isinstance(m, torch.nn.Conv2d)):
                    conv.stride = (1, 1)
                    conv.dilation = (rate, rate)
                    conv.padding = tuple(k // 2 * rate for k in conv.kernel_size)
        self.feature_strides = [min(s, output_stride) for s in strides]
        return self

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


def resnext101_32x4d(img_size=224):
    """ResNeXt-101 32x4d (Xie et al. 2017: Bottleneck [3, 4, 23, 3], the 3x3 convs in 32 groups of
    4 channels at the first stage), 2048-d output, timm ``resnext101_32x4d`` names (torchvision's
    ``ResNet`` class with ``groups=32, width_per_group=4``; torchvision's ResNeXt-101s are 32x8d and
    64x4d).

    SSCD's ``sscd_disc_large`` trunk: its ``CV_RESNEXT101`` is Classy Vision's ``resnext101_32x4d``
    (``base_width_and_cardinality=(4, 32)``), the same layers under other names.
    """
    return ResNetEncoder(Bottleneck, [3, 4, 23, 3], "resnext101_32x4d", groups=32, width_per_group=4)
