"""Loss functions as plain functions of tensors.

None of them needs a process group: the ones that gather across ranks use
``gissl.dist`` helpers, which are no-ops in a single process.
"""
import torch
import torch.nn.functional as F

from gissl import dist

# ---- segmentation / depth (helper: seg-depth) ----

# ---- self-supervised pretraining (helper: pretrain) ----

# ---- retrieval (helper: retrieval) ----
