"""Encoders and their pretrained weights.

``build_encoder("vit_b", pretraining="Hyperkvasir", ss_framework="mae", checkpoint=path)`` is the
one way scripts get an encoder. Every encoder has ``embed_dim``, ``forward(x) -> (N, embed_dim)``,
``forward_features(x) -> [4 × (N, C_i, h_i, w_i)]``, ``feature_dims``, ``feature_strides`` and
``architecture``. Nothing downloads: ImageNet weights are local files (see ``imagenet_class_file``).
"""
import glob
import inspect
import os

import torch

from gissl.errors import UserError
from gissl.models.densenet import DenseNetEncoder, densenet121
from gissl.models.pretrained import describe_state_dict, load_pretrained
from gissl.models.resnet import ResNetEncoder, resnet18, resnet50, resnext101_32x4d
from gissl.models.text import TextTransformer
from gissl.models.vit import (VisionTransformer, vit_b, vit_b14_dinov2, vit_b14_reg4_dinov2, vit_b16_clip, vit_b32_clip,
                              vit_h, vit_l, vit_l14_clip, vit_l14_dinov2, vit_l14_reg4_dinov2, vit_s, vit_s14_dinov2,
                              vit_s14_reg4_dinov2, vit_t)

__all__ = ["ARCHITECTURES", "PRETRAININGS", "SS_FRAMEWORKS", "build_encoder", "load_pretrained",
           "describe_state_dict", "vit_num_heads", "imagenet_class_file", "is_vit", "family", "check_combination", "ResNetEncoder", "DenseNetEncoder",
           "VisionTransformer", "TextTransformer"]

ARCHITECTURES = {"resnet18": resnet18, "resnet50": resnet50,
                 # SSCD's sscd_disc_large trunk (grouped 3x3 convs), timm's resnext101_32x4d names
                 "resnext101_32x4d": resnext101_32x4d,
                 "densenet121": densenet121, "vit_t": vit_t,
                 "vit_s": vit_s, "vit_b": vit_b, "vit_l": vit_l, "vit_h": vit_h,
                 # DINOv2 (patch 14, LayerScale; reg4: 4 register tokens), timm's vit_*_patch14[_reg4]_dinov2
                 "vit_s14_dinov2": vit_s14_dinov2, "vit_s14_reg4_dinov2": vit_s14_reg4_dinov2,
                 "vit_b14_dinov2": vit_b14_dinov2, "vit_b14_reg4_dinov2": vit_b14_reg4_dinov2,
                 "vit_l14_dinov2": vit_l14_dinov2, "vit_l14_reg4_dinov2": vit_l14_reg4_dinov2,
                 # OpenAI CLIP's image towers (ln_pre, QuickGELU), timm's vit_*_clip_quickgelu_224
                 "vit_b16_clip": vit_b16_clip, "vit_b32_clip": vit_b32_clip, "vit_l14_clip": vit_l14_clip}
PRETRAININGS = ("Hyperkvasir", "ImageNet_self", "ImageNet_class", "random")
# Which encoder families each SSL framework trains (MAE masks patches: ViT only; the
# Barlow Twins / SimSiam / FPSiam recipes and the reference use ResNets; MoCo v3 both). No
# framework has a DenseNet recipe here, so every --ss-framework refuses densenet121.
SS_FRAMEWORKS = {"mocov3": ("resnet", "vit"), "barlowtwins": ("resnet",), "mae": ("vit",),
                 "simsiam": ("resnet",), "fpsiam": ("resnet",),
                 "simclr": ("resnet", "vit"), "clip": ("resnet", "vit"), "slip": ("resnet", "vit")}

# ImageNet-supervised weight files looked for in the torch hub cache, first found wins.
# ResNet, DenseNet: torchvision's files (V1 first: the reference used V1, docs/ssl4gie-study.md §3.1).
# ViT: timm state dicts saved as .pth / .safetensors; augreg in21k→in1k is the reference's
# choice (docs/ssl4gie-study.md §3.3), augreg2 is timm's current default for vit_base_patch16_224.
# timm has no ImageNet-1k-supervised ViT-H/14: its supervised file is the original ImageNet-21k one.
# DINOv2 has no supervised weights: its self-supervised LVD-142M files load through the same
# flag (timm's converted file, or Meta's own release, named as torch.hub caches it).
IMAGENET_CLASS_FILES = {
    "resnet18": ["resnet18-f37072fd.pth", "resnet18-5c106cde.pth"],
    "resnet50": ["resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth", "resnet50-19c8e357.pth"],
    "vit_t": ["vit_tiny_patch16_224.augreg_in21k_ft_in1k"],
    "vit_s": ["vit_small_patch16_224.augreg_in21k_ft_in1k"],
    "vit_b": ["vit_base_patch16_224.augreg_in21k_ft_in1k", "vit_base_patch16_224.augreg2_in21k_ft_in1k"],
    "vit_l": ["vit_large_patch16_224.augreg_in21k_ft_in1k"],
    "vit_h": ["vit_huge_patch14_224.orig_in21k"],
    "densenet121": ["densenet121-a639ec97.pth"],
    # torchvision has no ResNeXt-101 32x4d: timm's files, Gluon's ImageNet-1k weights first, then
    # Facebook's semi- / semi-weakly supervised ones (YFCC100M / IG-1B, then ImageNet-1k)
    "resnext101_32x4d": ["resnext101_32x4d.gluon_in1k", "resnext101_32x4d.fb_ssl_yfcc100m_ft_in1k",
                         "resnext101_32x4d.fb_swsl_ig1b_ft_in1k"],
    "vit_s14_dinov2": ["vit_small_patch14_dinov2.lvd142m", "dinov2_vits14_pretrain"],
    "vit_s14_reg4_dinov2": ["vit_small_patch14_reg4_dinov2.lvd142m", "dinov2_vits14_reg4_pretrain"],
    "vit_b14_dinov2": ["vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14_pretrain"],
    "vit_b14_reg4_dinov2": ["vit_base_patch14_reg4_dinov2.lvd142m", "dinov2_vitb14_reg4_pretrain"],
    "vit_l14_dinov2": ["vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14_pretrain"],
    "vit_l14_reg4_dinov2": ["vit_large_patch14_reg4_dinov2.lvd142m", "dinov2_vitl14_reg4_pretrain"],
    # CLIP has no supervised weights either: timm's conversion of OpenAI's image towers
    "vit_b16_clip": ["vit_base_patch16_clip_quickgelu_224.openai"],
    "vit_b32_clip": ["vit_base_patch32_clip_quickgelu_224.openai"],
    "vit_l14_clip": ["vit_large_patch14_clip_quickgelu_224.openai"],
}
_IMAGENET_HOWTO = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
}


# Architectures whose attention-head count depends on the SSL framework that trains them. The
# head count is not in the weights (it only splits the qkv projection), so a file loads into
# either model and only the features differ: it must follow from the flags. MoCo v3's ViT-S
# (facebookresearch/moco-v3 vits.py, vit_small) has 12 heads where timm / DeiT-S / DINO have 6.
# SLIP's ViT-S (facebookresearch/SLIP models.py, vit_small_mocov3_patch16_224) is MoCo v3's too,
# for its CLIP, SLIP and SimCLR models alike.
_FRAMEWORK_HEADS = {("vit_s", "mocov3"): 12, ("vit_s", "clip"): 12, ("vit_s", "slip"): 12, ("vit_s", "simclr"): 12}


def vit_num_heads(architecture, ss_framework=None):
    """Attention heads of ``architecture`` as trained by ``ss_framework`` (None: the default).

    ``--architecture vit_s --ss-framework mocov3`` is MoCo v3's ViT-S (12 heads) in pretrain,
    finetune, eval and predict alike; every other combination keeps the architecture's own count.
    """
    return _FRAMEWORK_HEADS.get((architecture, ss_framework))


def is_vit(architecture):
    """True for the ViT architectures (vit_t, vit_s, vit_b, vit_l, vit_h)."""
    return architecture.startswith("vit")


def family(architecture):
    """``"vit"``, ``"densenet"`` or ``"resnet"``: the encoder family of an architecture name (the
    one family test). DenseNet is its own family: no SSL framework here trains it (the framework
    check refuses it), and the ResNet-only code (torchvision's FPN over layer1..4) does not fit it;
    it shares the ResNet behaviour only where a test is ``not is_vit`` (4 stride-4..32 maps, BatchNorm)."""
    if is_vit(architecture):
        return "vit"
    return "densenet" if architecture.startswith("densenet") else "resnet"


def build_encoder(architecture, pretraining="random", ss_framework=None, checkpoint=None, *,
                  img_size=None, window_size=None, window_blocks=(), num_heads=None):
    """Build an encoder and load its pretrained weights (all local files).

    architecture: one of ``ARCHITECTURES``. pretraining: ``Hyperkvasir`` / ``ImageNet_self``
    (SSL weights: need ``ss_framework`` and ``checkpoint``), ``ImageNet_class`` (supervised
    ImageNet weights from the torch hub cache, or ``checkpoint``), or ``random``.
    img_size: ViT position-embedding grid (other sizes are interpolated at run time); None: the
    architecture's own (224 px, DINOv2's 518 px = 37 × 14).
    window_size / window_blocks: ViT windowed attention (``window_blocks=()`` with a window
    size means every block but ``out_indices``, the ViTDet pattern). num_heads: ViT attention
    heads (default: ``vit_num_heads(architecture, ss_framework)``, else the architecture's own;
    pass it where the model is rebuilt without ``ss_framework``, e.g. eval). Invalid combinations
    raise :class:`UserError`; unreadable or non-fitting files :class:`CheckpointError`.
    """
    check_combination(architecture, pretraining, ss_framework, checkpoint)
    if window_size is not None and not is_vit(architecture):
        raise UserError(f"windowed attention needs a ViT; {architecture} is not one (a {family(architecture)})")
    num_heads = num_heads or vit_num_heads(architecture, ss_framework)
    if num_heads is not None and not is_vit(architecture):
        raise UserError(f"attention heads were given for {architecture}, which is not a ViT (a {family(architecture)})")
    kwargs = {"num_heads": num_heads} if num_heads is not None else {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    encoder = ARCHITECTURES[architecture](**kwargs)
    if window_size is not None:
        encoder.set_window_attention(window_size, list(window_blocks) or None)
    if pretraining in ("Hyperkvasir", "ImageNet_self"):
        load_pretrained(encoder, checkpoint, ss_framework)
    elif pretraining == "ImageNet_class":
        standard = inspect.signature(ARCHITECTURES[architecture]).parameters["num_heads"].default \
            if is_vit(architecture) else None
        if is_vit(architecture) and encoder.num_heads != standard:
            # timm's ImageNet ViT-S has 6 heads: its weights would load into a 12-head model unnoticed
            raise UserError(f"--pretraining ImageNet_class loads timm's {architecture} ({standard} attention heads), "
                            f"but this {architecture} is built with {encoder.num_heads} heads (MoCo v3's ViT-S); "
                            f"use --pretraining random, or --architecture vit_b / vit_t")
        load_pretrained(encoder, checkpoint or imagenet_class_file(architecture))
    return encoder


def check_combination(architecture, pretraining="random", ss_framework=None, checkpoint=None):
    """Raise :class:`UserError` for an invalid architecture / pretraining / framework / file
    combination (the one place these rules live; ``gissl.cli`` and ``build_encoder`` use it)."""
    if architecture not in ARCHITECTURES:
        raise UserError(f"unknown architecture '{architecture}'; choose from {', '.join(sorted(ARCHITECTURES))}")
    if pretraining not in PRETRAININGS:
        raise UserError(f"unknown pretraining '{pretraining}'; choose from {', '.join(PRETRAININGS)}")
    if ss_framework is not None:
        if ss_framework not in SS_FRAMEWORKS:
            raise UserError(f"unknown --ss-framework '{ss_framework}'; choose from {', '.join(SS_FRAMEWORKS)}")
        families = SS_FRAMEWORKS[ss_framework]
        if family(architecture) not in families:
            fits = [a for a in sorted(ARCHITECTURES) if family(a) in families]
            raise UserError(f"--ss-framework {ss_framework} does not apply to --architecture {architecture}: "
                            f"{ss_framework} trains {' or '.join(families)} encoders, not {architecture}; "
                            f"use --architecture {' / '.join(fits)}")
    if pretraining in ("Hyperkvasir", "ImageNet_self"):
        if ss_framework is None or checkpoint is None:
            missing = "--ss-framework" if ss_framework is None else "--checkpoint"
            raise UserError(
                f"--pretraining {pretraining} needs {missing}: it loads self-supervised weights, so give both "
                f"--ss-framework ({', '.join(SS_FRAMEWORKS)}) and --checkpoint PATH (e.g. the encoder.pth written "
                "by pretrain.py)")
    elif ss_framework is not None:
        raise UserError(f"--ss-framework is only used with --pretraining Hyperkvasir or ImageNet_self, "
                        f"not {pretraining}; drop it or change --pretraining")
    elif pretraining == "random" and checkpoint is not None:
        raise UserError("--checkpoint given with --pretraining random would be ignored; use --pretraining "
                        "Hyperkvasir / ImageNet_self (with --ss-framework) or ImageNet_class to load it")


def imagenet_class_file(architecture):
    """Path of the local ImageNet-supervised weights for ``architecture``.

    Looks in ``torch.hub.get_dir()/checkpoints`` (i.e. ``$TORCH_HOME/hub/checkpoints``) for the
    torchvision file names (those ending in ``.pth``), and for timm's names (ViTs, ResNeXt-101
    32x4d) ``<timm name>.pth`` / ``.safetensors`` there and timm's own Hugging Face cache. Raises
    :class:`UserError` naming the file and folder.
    """
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    names = IMAGENET_CLASS_FILES[architecture]
    candidates = []
    for name in names:
        if not name.endswith(".pth"):  # a timm model name, saved as a state dict or cached by timm
            candidates += [os.path.join(folder, name + ext) for ext in (".pth", ".safetensors")]
            candidates += sorted(glob.glob(os.path.join(_hf_cache(), f"models--timm--{name}", "snapshots",
                                                        "*", "model.safetensors")))
        else:
            candidates.append(os.path.join(folder, name))
    for path in candidates:
        if os.path.isfile(path):
            return path
    if not names[0].endswith(".pth"):
        name = names[0]
        howto = (f"on a machine with internet run: python -c \"import timm, torch; torch.save(timm.create_model("
                 f"'{name}', pretrained=True).state_dict(), '{name}.pth')\" and copy {name}.pth there")
        expected = f"{name}.pth (or .safetensors)"
    else:
        expected = names[0]
        howto = f"download {_IMAGENET_HOWTO[architecture]} and copy it there"
    raise UserError(f"--pretraining ImageNet_class for {architecture} needs the file {expected} in {folder} "
                    f"(set TORCH_HOME to move that folder); {howto}, or pass the file with --checkpoint PATH. "
                    "Nothing is downloaded at run time")


def _hf_cache():
    """Hugging Face hub cache folder (where timm stores weights it downloaded)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "hub")
