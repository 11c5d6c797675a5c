"""Per-step schedules of the pretraining recipes (learning rate, momentum coefficient)."""
import math


def warmup_cosine(peak_lr, epochs, warmup_epochs=0.0, min_lr=0.0):
    """``lr(progress)`` for the engine's ``lr_schedule`` (progress = fractional epoch from 0).

    Linear warm-up from 0 to ``peak_lr`` over ``warmup_epochs`` (Goyal et al. 2017, used by
    MoCo v3, Barlow Twins and MAE), then a half-cosine down to ``min_lr`` at ``epochs``
    (Loshchilov & Hutter 2017, no restarts).
    """
    def lr(progress):
        if progress < warmup_epochs:
            return peak_lr * progress / warmup_epochs
        span = max(epochs - warmup_epochs, 1e-12)
        t = min(max((progress - warmup_epochs) / span, 0.0), 1.0)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    return lr


def cosine_momentum(base, step, total_steps):
    """Momentum coefficient rising from ``base`` (step 0) to 1 (last step) on a half-cosine
    (BYOL §3.2; MoCo v3 §4 with base 0.99): ``1 - (1 - base) * (cos(pi * k / K) + 1) / 2``."""
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0
