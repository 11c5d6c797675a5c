"""Optimisers, parameter groups, freezing and the plateau learning-rate schedule.

Per-step schedules (warm-up + cosine) live in :mod:`gissl.ssl.schedule`.
"""
import torch
import torch.nn as nn

from gissl.errors import UserError


def _no_decay(name, param):
    # Norm scales, biases and learned tokens/position embeddings are not weights to shrink
    # (timm/MAE practice); the reference decays everything (docs/ssl4gie-study.md §4.1).
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token")) or ".pos_embed" in name


def param_groups(model_or_params, weight_decay):
    """Split trainable parameters into a decayed and a non-decayed group."""
    if isinstance(model_or_params, nn.Module):
        named = list(model_or_params.named_parameters())
    else:
        named = [(f"p{i}", p) for i, p in enumerate(model_or_params)]
    decay = [p for n, p in named if p.requires_grad and not _no_decay(n, p)]
    no_decay = [p for n, p in named if p.requires_grad and _no_decay(n, p)]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters (everything is frozen)")
    return groups


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by Barlow Twins and MoCo v3 for ResNets: SGD with
    momentum whose update is scaled per tensor by ``eta * ||w|| / ||g + wd*w||``.
    1-D parameters (biases, norms) get neither weight decay nor the trust ratio. The step adds
    the weight decay into ``p.grad`` in place (the gradient is consumed by the step)."""

    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd, momentum, eta = group["lr"], group["weight_decay"], group["momentum"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu, g = state["mu"], p.grad
                if p.ndim > 1:
                    # mu <- momentum * mu + trust * (g + wd * w), trust = eta ||w|| / ||g + wd w||.
                    # In place where the grad may be reused (the engine drops it after the step):
                    # each step used to allocate two parameter-sized temporaries, and fresh large
                    # CPU allocations (page faults) made LARS 2x slower than the update itself.
                    g = g.add_(p, alpha=wd) if wd else g
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    if p.device.type == "cpu":  # a host value costs nothing here: fuse the scaling
                        w, gn = float(w_norm), float(g_norm)
                        mu.mul_(momentum).add_(g, alpha=eta * w / gn if w > 0 and gn > 0 else 1.0)
                    else:  # no host sync on accelerators
                        trust = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm,
                                            torch.ones_like(w_norm))
                        mu.mul_(momentum).add_(g * trust)
                else:
                    mu.mul_(momentum).add_(g)
                p.add_(mu, alpha=-lr)
        return loss


def build_optimizer(model_or_params, lr, weight_decay=0.01, kind="adamw", **kwargs):
    """AdamW (the reference's optimiser, 1e-4), LARS or SGD over the trainable parameters.

    Parameters with ``requires_grad=False`` (a frozen encoder) are left out, and norms,
    biases and tokens get no weight decay. AdamW and SGD use the fused kernels where available.
    """
    groups = param_groups(model_or_params, weight_decay)
    if kind == "adamw":
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, lr=lr, foreach=True, **kwargs)
    if kind == "lars":
        return LARS(groups, lr=lr, **kwargs)
    if kind == "sgd":
        return _sgd(groups, lr=lr, momentum=kwargs.pop("momentum", 0.9), **kwargs)
    if kind == "sgd-nesterov":  # the SSL-transfer study's finetune optimiser (docs/transfer-study.md §b.6)
        return _sgd(groups, lr=lr, momentum=0.9, nesterov=True, **kwargs)
    raise UserError(f"unknown optimizer '{kind}'; choose from adamw, lars, sgd, sgd-nesterov")


def _sgd(groups, **kwargs):
    """torch's SGD with its fused kernel where available: on CPU torch's default is the per-tensor
    loop, 4x slower on a ResNet-50 + Barlow Twins-sized parameter set (0.84 vs 0.20 s a step)."""
    try:
        return torch.optim.SGD(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.SGD(groups, foreach=True, **kwargs)


def search_grid(learning_rates, weight_decays, wd_per_lr=True):
    """The points ``[{"lr": .., "wd": ..}]`` of a learning-rate x weight-decay grid, learning
    rates outermost, in the order given. With ``wd_per_lr`` each weight decay is divided by the
    point's learning rate, as the SSL-transfer study's ``--search`` grid (docs/transfer-study.md
    §b.6): lr ∈ {1e-1, 1e-4} and wd ∈ {0, 1e-6, 1e-3} / lr, so that the decay per step,
    lr · wd, is what the grid spaces."""
    if not learning_rates or not weight_decays:
        raise UserError("the search grid is empty: give --search-lrs and --search-wds at least one value each")
    return [{"lr": float(lr), "wd": float(wd) / float(lr) if wd_per_lr else float(wd)}
            for lr in learning_rates for wd in weight_decays]


def freeze(module):
    """Stop ``module`` from training: no gradients (so the optimiser leaves it out).
    ``fit(frozen=[module])`` calls this itself, takes the module's parameters out of an
    optimiser built before, and keeps it in eval mode so BatchNorm statistics never change
    (SSL4GIE's ``--frozen`` did neither)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def drop_frozen_parameters(optimizer, frozen):
    """Freeze every module in ``frozen`` and remove its parameters (and their state) from
    ``optimizer``, whenever it was built: a frozen module then gets neither updates nor
    weight decay. Groups left empty are removed; none left at all is a UserError."""
    held = set()
    for module in frozen:
        held.update(id(p) for p in freeze(module).parameters())
    if not held:
        return optimizer
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in held:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) not in held]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    if not optimizer.param_groups:
        raise UserError("the model has no trainable parameters (everything is frozen)")
    return optimizer


def set_train_mode(model, frozen=()):
    model.train()
    for m in frozen:
        m.eval()


def plateau_scheduler(optimizer, metric_mode, lr_min):
    # ReduceLROnPlateau as the reference: factor 0.5, patience 10, min 1e-6 (docs/ssl4gie-study.md §4.1)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=metric_mode, factor=0.5, patience=10,
        min_lr=lr_min if lr_min and lr_min > 0 else 0.0)
