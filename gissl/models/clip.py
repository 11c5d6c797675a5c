"""Image–text models: CLIP / SLIP's two towers (Radford et al. 2021; Mu et al. 2022), and
loaders for the official SLIP releases and OpenAI CLIP / open_clip state dicts.

:class:`CLIPModel` holds ``visual`` (a gissl encoder, timm / torchvision names), the
``image_projection`` matrix (encoder width, embed_dim) as SLIP has it, ``text`` (CLIP's
:class:`~gissl.models.text.TextTransformer`) and ``logit_scale`` (log of the inverse
temperature, initialised to log(1/0.07)). Its state dict is SLIP's minus ``module.``, with
the text tower's keys under ``text.``.

Files understood (read as data only, ``torch.load(weights_only=True)``):

- the official SLIP release / training checkpoint (facebookresearch/SLIP ``main.py``):
  ``{"state_dict": {"module.visual.*" (timm ViT), "module.image_projection",
  "module.text_projection", "module.transformer.resblocks.*", "module.token_embedding.weight",
  "module.positional_embedding", "module.ln_final.*", "module.logit_scale",
  "module.image_mlp.*" (SLIP's SimCLR head)}, "args": argparse.Namespace, "epoch",
  "best_acc1", "optimizer", "scaler"}``. SLIP's ViT-S is MoCo v3's (12 heads), ViT-B/L timm's;
  its text tower uses QuickGELU, 8 heads of 64;
- a flat :class:`CLIPModel` state dict, or one under ``"model"`` / ``"state_dict"``;
- OpenAI CLIP / open_clip state dicts (``visual.conv1.weight``, ``visual.class_embedding``,
  ``visual.transformer.resblocks.*``, ``visual.proj``, ``token_embedding.weight``, ...):
  the **text tower** loads exactly (:func:`load_text_tower`); the image tower does not, because
  OpenAI's VisionTransformer differs from gissl's timm-named ViT in four places gissl's ViT
  does not have: a LayerNorm before the blocks (``ln_pre``), a patch convolution without bias,
  QuickGELU in the MLPs and LayerNorm eps 1e-5 (1e-6 in gissl), besides patch sizes 32 and 14
  for ViT-B/32 and ViT-L/14 (gissl's ViT-B and ViT-L use 16). Such a file is refused as an
  image encoder with that reason.

The text tower's attention-head count is not in the weights; CLIP and SLIP use heads of 64
channels (width 512: 8 heads), which is what is assumed.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gissl.checkpoint import load_file
from gissl.errors import CheckpointError
from gissl.models.pretrained import SLIP_VISUALS, describe_state_dict, match_encoder, openai_clip_refusal
from gissl.models.text import TextTransformer

# The ViT a visual width means when a file does not name its model (SLIP's heads, SLIP_VISUALS).
_VIT_BY_WIDTH = {192: ("vit_t", 3), 384: ("vit_s", 12), 768: ("vit_b", 12), 1024: ("vit_l", 16)}
_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
# Entries OpenAI's JIT-exported state dicts carry beside the weights (open_clip drops them too).
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
TEXT_HEAD_WIDTH = 64


class CLIPModel(nn.Module):
    """Two towers and a learnable temperature.

    ``forward(images (N, 3, H, W), tokens (M, L) long) -> (image_emb (N, E), text_emb (M, E),
    logit_scale.exp())`` with both embeddings L2-normalised, so ``scale * image_emb @ text_emb.T``
    are CLIP's logits.
    """

    def __init__(self, visual, *, embed_dim=512, vocab_size=49408, context_length=77, text_width=512,
                 text_layers=12, text_heads=8, quick_gelu=False):
        super().__init__()
        self.visual = visual
        self.image_projection = nn.Parameter(torch.empty(visual.embed_dim, embed_dim))
        nn.init.normal_(self.image_projection, std=visual.embed_dim ** -0.5)  # SLIP's init
        self.text = TextTransformer(vocab_size=vocab_size, context_length=context_length, width=text_width,
                                    layers=text_layers, heads=text_heads, embed_dim=embed_dim, quick_gelu=quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.embed_dim = embed_dim
        self.text_config = {"embed_dim": embed_dim, "vocab_size": vocab_size, "context_length": context_length,
                            "text_width": text_width, "text_layers": text_layers, "text_heads": text_heads,
                            "quick_gelu": quick_gelu}

    def encode_image(self, images, normalize=False):
        """images (N, 3, H, W) -> (N, embed_dim)."""
        x = self.visual(images) @ self.image_projection
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        """tokens (M, L) long, each row ending at its end-of-text token -> (M, embed_dim)."""
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, tokens):
        return (self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True),
                self.logit_scale.exp())


def text_config(state):
    """TextTransformer keyword arguments read from a flat text-tower state dict (CLIP names)."""
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}
    width = state["token_embedding.weight"].shape[1]
    return {"vocab_size": state["token_embedding.weight"].shape[0],
            "context_length": state["positional_embedding"].shape[0], "width": width,
            "layers": len(layers), "heads": max(width // TEXT_HEAD_WIDTH, 1),
            "embed_dim": state["text_projection"].shape[1]}


def _unwrap(path_or_state):
    """(top-level dict or None, flat state dict without ``module.``, a name for messages)."""
    if isinstance(path_or_state, dict):
        obj, name = path_or_state, "<state dict>"
    else:
        obj, name = load_file(path_or_state), str(path_or_state)
    state = obj
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"checkpoint '{name}' holds no state dict of tensors; expected a SLIP file "
                              "('state_dict'), a gissl CLIP checkpoint ('model') or an OpenAI CLIP state dict")
    top = obj if obj is not state else None
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    inner = next((k[:-len("image_projection")] for k in state if k.endswith(".image_projection")), None)
    if "image_projection" not in state and inner:  # a CLIPModel inside a training wrapper
        state = {(k[len(inner):] if k.startswith(inner) else k): v for k, v in state.items()}
    if "image_projection" in state and not any(k.startswith("visual.") for k in state):
        # pretrain.py's CLIP / SLIP modules hold the image tower as "encoder" (every SSL wrapper's name)
        state = {("visual." + k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in state.items()}
    return top, state, name


def clip_layout(state):
    """``"slip"`` (SLIP's names, text tower at the top level), ``"gissl"`` (:class:`CLIPModel`'s),
    ``"openai"`` (OpenAI CLIP / open_clip) or None, from a flat state dict without ``module.``."""
    if "visual.class_embedding" in state or "visual.attnpool.positional_embedding" in state:
        return "openai"
    if "image_projection" in state and "token_embedding.weight" in state:
        return "slip"
    if "image_projection" in state and "text.token_embedding.weight" in state:
        return "gissl"
    return None


def _visual_architecture(obj, visual, name):
    """(gissl architecture, attention heads) of a visual tower: SLIP's ``args.model`` when the file
    has one (``SLIP_VITB16`` -> vit_b, 12 heads), else the ViT of that width."""
    settings = obj.get("args") if isinstance(obj, dict) else None
    settings = vars(settings) if isinstance(settings, argparse.Namespace) else settings
    model = settings.get("model") if isinstance(settings, dict) else None
    if isinstance(model, str) and model.split("_")[-1] in SLIP_VISUALS:
        return SLIP_VISUALS[model.split("_")[-1]]
    if isinstance(settings, dict) and isinstance(settings.get("arch"), str):  # gissl's stored flags
        from gissl.models import vit_num_heads  # the package imports this module
        arch = settings["arch"]
        return arch, settings.get("num_heads") or vit_num_heads(arch, settings.get("ss_framework"))
    if "cls_token" in visual:
        width = visual["cls_token"].shape[-1]
        if width in _VIT_BY_WIDTH:
            return _VIT_BY_WIDTH[width]
    if "conv1.weight" in visual:
        text = describe_state_dict(visual)[1]
        arch = "resnet50" if "ResNet-50" in text else "resnet18" if "ResNet-18" in text else None
        if arch:
            return arch, None
    raise CheckpointError(f"checkpoint '{name}': cannot tell which gissl architecture its visual tower is "
                          f"(first keys: {', '.join(list(visual)[:5])}); extract it and pass --architecture")


def _two_towers(path_or_state):
    """:func:`_unwrap` for a SLIP / gissl image–text file: ``(obj, state, name, layout)``; refuses
    OpenAI CLIP files and files without both towers."""
    obj, state, name = _unwrap(path_or_state)
    layout = clip_layout(state)
    if layout == "openai":
        raise openai_clip_refusal(name)
    if layout is None:
        raise CheckpointError(f"checkpoint '{name}' is not an image–text model (no image_projection and text "
                              "tower); pass a SLIP checkpoint or a gissl clip/slip pretrain.py checkpoint, or give "
                              "an image-only file with --checkpoint as an image encoder")
    return obj, state, name, layout


def image_encoder_state(path_or_state):
    """``(architecture, encoder_state_dict)`` of the image tower of a SLIP file or a gissl CLIP
    checkpoint (a path, or the loaded object), timm / torchvision names, ready for
    ``build_encoder(architecture, ...)`` and ``load_state_dict``. SLIP's ViT-S has 12 heads
    (``architecture`` is ``"vit_s"``; build it with ``num_heads=12``, which
    ``vit_num_heads("vit_s", "slip")`` gives). Raises :class:`CheckpointError` for OpenAI CLIP
    files (see the module docstring) and files of no image–text layout."""
    obj, state, name, _ = _two_towers(path_or_state)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return _visual_architecture(obj or {}, visual, name)[0], visual


def load_text_tower(path_or_state, *, quick_gelu=True):
    """``(TextTransformer, logit_scale)`` from a SLIP file, a gissl CLIP checkpoint or an OpenAI
    CLIP / open_clip state dict; the text config is read from the tensor shapes (heads of 64).
    ``quick_gelu``: True for OpenAI's and SLIP's weights."""
    _, state, name = _unwrap(path_or_state)
    layout = clip_layout(state)
    if layout is None and "token_embedding.weight" not in state:
        raise CheckpointError(f"checkpoint '{name}' holds no CLIP text tower (no token_embedding.weight)")
    prefix = "text." if layout == "gissl" else ""
    text = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):].startswith(_TEXT_KEYS)}
    tower = TextTransformer(**text_config(text), quick_gelu=quick_gelu)
    _load_strict(tower, text, name, "text tower")
    scale = state.get("logit_scale", torch.tensor(math.log(1 / 0.07)))
    return tower, scale.float().reshape(())


def load_clip(path_or_state, *, quick_gelu=None, img_size=None):
    """Build a :class:`CLIPModel` from a SLIP file or a gissl CLIP checkpoint, loading both towers,
    both projections and ``logit_scale`` strictly. Returns ``(model, info)`` with ``info``:
    ``{"layout", "architecture", "num_heads", "dropped", "image_mlp", "epoch", "tokenizer"}``
    (``image_mlp``: SLIP's SimCLR head state, not part of the model; ``tokenizer``: the file's
    ``"tokenizer"`` (or ``extra["tokenizer"]``) entry for
    :meth:`~gissl.tokenizer.ClipTokenizer.from_state`, or None). ``quick_gelu`` (None: True for
    SLIP files, the stored value or False for gissl's) sets the text MLP activation. gissl files
    are pretrain.py's (image tower under ``encoder.``, text sizes in ``args``) or a saved
    :class:`CLIPModel` (``visual.``, ``text_config``)."""
    from gissl.models import build_encoder  # the package imports this module
    obj, state, name, layout = _two_towers(path_or_state)
    if layout == "slip":  # SLIP's text tower sits at the top level: move it under "text."
        state = {("text." + k if k.startswith(_TEXT_KEYS) else k): v for k, v in state.items()}
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    obj = obj or {}
    # gissl files: the text sizes in "text_config" (CLIPModel.text_config) or pretrain.py's "args"
    stored = (obj.get("text_config") or obj.get("args")) if layout == "gissl" else None
    stored = stored if isinstance(stored, dict) else None
    img_size = img_size or (stored or {}).get("image_size")
    arch, heads = _visual_architecture(obj, visual, name)
    config = text_config({k[len("text."):]: v for k, v in state.items() if k.startswith("text.")})
    if stored:
        config["heads"] = stored.get("text_heads", config["heads"])
        quick_gelu = stored.get("quick_gelu", False) if quick_gelu is None else quick_gelu
    encoder = build_encoder(arch, num_heads=heads, **({"img_size": img_size} if img_size else {}))
    model = CLIPModel(encoder, embed_dim=config["embed_dim"], vocab_size=config["vocab_size"],
                      context_length=config["context_length"], text_width=config["width"],
                      text_layers=config["layers"], text_heads=config["heads"],
                      quick_gelu=True if quick_gelu is None else quick_gelu)
    plan = match_encoder(encoder, visual, name)
    if plan["missing"] or plan["unexpected"] or plan["misshaped"]:
        raise CheckpointError(f"checkpoint '{name}': its visual tower does not fit {arch}: missing "
                              f"{plan['missing'][:5]}, unexpected {plan['unexpected'][:5]}, mis-shaped {plan['misshaped'][:5]}")
    own = {k: v for k, v in state.items() if not k.startswith(("visual.", "image_mlp."))}
    own.update({"visual." + k: v for k, v in plan["weights"].items()})
    image_mlp = {k[len("image_mlp."):]: v for k, v in state.items() if k.startswith("image_mlp.")}
    if own["logit_scale"].dim():
        own["logit_scale"] = own["logit_scale"].reshape(())
    _load_strict(model, own, name, "CLIP model")
    epoch = obj.get("epoch")
    tokenizer = obj.get("tokenizer") or (obj.get("extra") or {}).get("tokenizer")
    return model, {"layout": layout, "architecture": arch, "num_heads": heads, "dropped": plan["dropped"],
                   "image_mlp": image_mlp, "epoch": epoch if isinstance(epoch, int) else None,
                   "tokenizer": tokenizer if isinstance(tokenizer, dict) else None}


def _load_strict(module, weights, name, what):
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected and k not in _OPENAI_SCALARS]
    misshaped = [f"{k} (file {tuple(weights[k].shape)}, model {tuple(v.shape)})"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or misshaped:
        raise CheckpointError(f"checkpoint '{name}' does not fit the {what}: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}, mis-shaped {misshaped[:6]}")
    bad = [k for k in expected if weights[k].is_floating_point() and not torch.isfinite(weights[k]).all()]
    if bad:
        raise CheckpointError(f"checkpoint '{name}' holds NaN/Inf values in {bad[:6]}; use an earlier checkpoint")
    module.load_state_dict({k: weights[k] for k in expected}, strict=True)
