"""Self-supervised pretraining methods: MoCo v3, Barlow Twins, MAE, SimSiam, FPSiam, SimCLR,
and the image–text methods CLIP and SLIP.

Each method is an ``nn.Module`` that holds the trunk as ``encoder`` (MoCo v3 also a
``momentum_encoder``) and whose ``forward(*views)`` returns a dict of loss terms for the
engine. Exporting the encoder is "keep the ``encoder.`` keys and strip the prefix"
(:func:`export_encoder`), which gives torchvision / timm parameter names.

``RECIPES`` holds each paper's optimisation settings; ``pretrain.py`` uses them as defaults.
``TEXT_FRAMEWORKS`` are the methods that train on image–caption pairs (they also hold a text
tower, ``text``, and a learnt ``logit_scale``).
"""
from gissl.errors import UserError
from gissl.ssl.augment import VIEWS, Views, byol_views, mae_views, simsiam_views  # noqa: F401
from gissl.ssl.barlowtwins import BarlowTwins
from gissl.ssl.clip import CLIP, SLIP, SimCLR
from gissl.ssl.mae import MAE
from gissl.ssl.mocov3 import MoCoV3
from gissl.ssl.schedule import cosine_momentum, warmup_cosine  # noqa: F401
from gissl.ssl.simsiam import FPSiam, SimSiam

FRAMEWORKS = {"mocov3": MoCoV3, "barlowtwins": BarlowTwins, "mae": MAE,
              "simsiam": SimSiam, "fpsiam": FPSiam, "simclr": SimCLR, "clip": CLIP, "slip": SLIP}
TEXT_FRAMEWORKS = ("clip", "slip")

# Optimisation recipe per (framework, encoder family), from the papers; ``blr`` is the
# learning rate per 256 images (lr = blr * effective batch / 256), ``warmup`` in epochs of
# the paper's schedule of ``paper_epochs``; ``lr``, where given, is an absolute learning rate the
# paper's code does not scale with the batch, and ``min_lr`` the end of its cosine.
_SLIP_COMMON = dict(optimizer="adamw", betas=(0.9, 0.98), warmup=1, paper_epochs=25, min_lr=1e-5)
RECIPES = {
    # MoCo v3 Appendix / official recipe: ResNet-50 LARS lr 0.3 x B/256, wd 1.5e-6, 10 warm-up
    # epochs of 100; ViT AdamW lr 1.5e-4 x B/256, wd 0.1, 40 warm-up epochs of 300.
    ("mocov3", "resnet"): dict(optimizer="lars", blr=0.3, weight_decay=1.5e-6, warmup=10, paper_epochs=100),
    ("mocov3", "vit"): dict(optimizer="adamw", blr=1.5e-4, weight_decay=0.1, warmup=40, paper_epochs=300),
    # Barlow Twins §2: LARS, lr 0.2 (weights) / 0.0048 (biases, BN) x B/256, wd 1.5e-6,
    # 10 warm-up epochs of 1000.
    ("barlowtwins", "resnet"): dict(optimizer="lars", blr=0.2, weight_decay=1.5e-6, warmup=10,
                                    paper_epochs=1000, no_decay_lr_scale=0.0048 / 0.2),
    # MAE §A.1: AdamW (0.9, 0.95), lr 1.5e-4 x B/256, wd 0.05, 40 warm-up epochs of 800.
    ("mae", "vit"): dict(optimizer="adamw", blr=1.5e-4, weight_decay=0.05, warmup=40, paper_epochs=800,
                         betas=(0.9, 0.95)),
    # SimSiam §3: SGD momentum 0.9, lr 0.05 x B/256, wd 1e-4, cosine without warm-up, the
    # predictor at a fixed lr (§4.3 footnote); FPSiam the same (docs/fpsiam.md §a.1).
    ("simsiam", "resnet"): dict(optimizer="sgd", blr=0.05, weight_decay=1e-4, warmup=0, paper_epochs=100,
                                fixed_predictor_lr=True),
    ("fpsiam", "resnet"): dict(optimizer="sgd", blr=0.05, weight_decay=1e-4, warmup=0, paper_epochs=200,
                               fixed_predictor_lr=True),
    # SLIP README / main.py (batch 4096, lr not scaled): AdamW (0.9, 0.98), 1 warm-up epoch of 25,
    # cosine to 1e-5; SLIP lr 3e-3 wd 0.1, CLIP lr 5e-4 wd 0.5, SimCLR lr 3.2e-3 wd 0.1. The same
    # recipe for ResNet image towers (MedSLIP's ResNet variant).
    **{(fw, fam): dict(_SLIP_COMMON, lr=lr, weight_decay=wd)
       for fw, lr, wd in (("slip", 3e-3, 0.1), ("clip", 5e-4, 0.5), ("simclr", 3.2e-3, 0.1))
       for fam in ("vit", "resnet")},
}


def family(encoder_or_arch):
    """``"vit"`` or ``"resnet"`` for an encoder or an architecture name."""
    from gissl.models import family as arch_family
    return arch_family(encoder_or_arch if isinstance(encoder_or_arch, str) else encoder_or_arch.architecture)


def recipe(framework, architecture):
    """The paper's optimisation settings for ``framework`` on ``architecture`` (a copy)."""
    key = (framework, family(architecture))
    if key not in RECIPES:
        fits = sorted(f for f, fam in RECIPES if fam == family(architecture))
        raise UserError(f"--ss-framework {framework} does not train {family(architecture)} encoders "
                        f"({architecture}); for it choose from {', '.join(fits)}")
    return dict(RECIPES[key])


def build_ssl_model(framework, encoder, **kwargs):
    """Wrap ``encoder`` in the pretraining method ``framework`` (keyword arguments go to its class)."""
    if framework not in FRAMEWORKS:
        raise UserError(f"unknown --ss-framework '{framework}'; choose from {', '.join(FRAMEWORKS)}")
    recipe(framework, encoder.architecture)  # raises for a framework/family that does not fit
    return FRAMEWORKS[framework](encoder, **kwargs)


def export_encoder(state_dict):
    """The encoder part of an SSL model's state dict, with library (torchvision / timm) names."""
    out = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if not out:
        raise UserError("the state dict holds no 'encoder.*' keys; it is not a gissl SSL model")
    return out
