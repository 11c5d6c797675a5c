"""Encoding several augmented views of one batch."""
import torch
import torch.nn as nn


def encode_views(encoder, *views):
    """``[encoder(v) for v in views]``, computed in one forward pass of the concatenated views
    when that is the same function: an encoder without BatchNorm (a ViT) treats every image on its
    own, so one pass over 2N images equals two over N (to float rounding) and its larger matrix
    products run faster on CPUs and GPUs alike. An encoder with BatchNorm (a ResNet) normalises
    over its batch, so each view keeps its own pass, as the papers' code does."""
    if len(views) < 2 or any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules()) \
            or len({tuple(v.shape[1:]) for v in views}) > 1:
        return [encoder(v) for v in views]
    return list(encoder(torch.cat(views)).split([len(v) for v in views]))
