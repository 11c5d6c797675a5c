"""Evaluation metrics, each defined without the reference's smoothing artefacts.

The reference adds ε to numerator and denominator (ε/ε = 1), which scores a class that is
never predicted, or an empty prediction, as perfect (ssl4gie.md §8 item 10). Here an undefined
ratio is reported as such (NaN or a separate count), never as 1.
"""
import numpy as np
import torch

# ---- segmentation / depth (helper: seg-depth) ----

# ---- classification (helper: classification) ----

# ---- detection: COCO mAP (helper: detection) ----

# ---- retrieval (helper: retrieval) ----
