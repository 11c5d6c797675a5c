"""Load pretrained encoder weights from any known checkpoint layout, strictly.

Layouts understood (all read through ``gissl.checkpoint.load_file``, i.e. as data only):

- flat state dicts: torchvision / timm files, Barlow Twins ``resnet50.pth``, an extracted MoCo v3
  base encoder, gissl's ``encoder.pth``; ``.pth``, ``.pth.tar``, ``.pt`` or ``.safetensors``;
- containers: ``{"state_dict": ...}`` (official MoCo v3, keys ``module.base_encoder.*`` and
  ``module.momentum_encoder.*``) and ``{"model": ...}`` (MAE; gissl's pretrain ``checkpoint.pth``
  with ``encoder.*`` / ``momentum_encoder.*``; gissl's finetuned checkpoints with ``encoder.*``).

The encoder is found as the key prefix under which most of the encoder's own parameter names
occur; on a tie the query / base / student / online encoder wins over its key / momentum /
teacher / target copy (MoCo v2 ``encoder_q`` over ``encoder_k``), and a tie that rule cannot
settle is refused, never left to set order. Also understood: MoCo v1/v2 files
(``module.encoder_q.*``) and MAE / EndoFinder files that pickle ``'args'`` as an
``argparse.Namespace``. DINO (v1) training checkpoints (facebookresearch/dino ``main_dino.py``:
``{"student": DDP state, "teacher": state, "optimizer", "epoch", "args", "dino_loss", "fp16_scaler"}``)
load their **teacher** backbone (``backbone.*``, or ``module.backbone.*`` where DINO wraps the teacher
in DDP for SyncBatchNorm, i.e. ResNets), as DINO's own evaluation does (``--checkpoint_key teacher``);
``checkpoint_key="student"`` takes the student. DINOv2's ``{"teacher": ...}`` evaluation checkpoints
load the same way (FSDP-chunked ``blocks.{c}.{i}.`` names are unchunked). Meta's DINOv2 releases
(``dinov2_vits14_pretrain.pth``, ``..._reg4_pretrain.pth``) load as timm converts them:
``register_tokens`` becomes ``reg_token``, and for the register models the CLS position is folded
into ``cls_token`` (timm's ``no_embed_class`` layout). Heads, projectors and decoders of the source
(``fc.*``, ``head.*``, ``mask_token``, ``decoder_*``) are dropped on purpose; every other
difference (missing, unexpected or mis-shaped key) is an error naming the keys and saying which
architecture the file holds. A ``pos_embed`` of another grid size is interpolated.
"""
import math
import re

import torch

from gissl.checkpoint import load_file
from gissl.errors import CheckpointError
from gissl.models.vit import resample_pos_embed

# Keys under which trainers store the weights: MoCo v3 "state_dict", MAE and gissl "model",
# SSL4GIE's finetuned checkpoints "model_state_dict".
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")
# Parts of SSL / supervised models that are not the encoder: ResNet fc (MoCo v3 projector,
# ImageNet classifier), ViT head (MoCo v3 projector, timm classifier), fc_norm (timm pooled
# head norm), MAE's mask token and decoder.
# Heads that a file may hold beside its encoder, dropped on purpose: classifiers (fc, head,
# classifier), MAE's decoder, and SwAV / DeepCluster-v2 / SeLa-v2's projection_head and
# prototypes (a Linear, or MultiPrototypes' prototypes0, prototypes1, ...), and EndoFinder's
# fixed mask-patch summer target_embed (a frozen all-ones conv over the polyp mask).
# SSL4GIE's finetuned models add lin_head (classifier), decoder / decoder_levels / output_conv (DPT and
# its residual depth decoder) beside an encoder at the top level.
_DROPPED_PREFIXES = ("fc.", "head.", "fc_norm.", "decoder_", "classifier.", "projection_head.", "prototypes",
                     "target_embed.", "lin_head.", "decoder.", "output_conv.")
# torchvision's released DenseNet files keep the names of its first DenseNet code
# ("denselayer1.norm.1.weight" for today's "denselayer1.norm1.weight"); torchvision renames them
# on load with this pattern, and so does gissl.
_LEGACY_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_DROPPED_KEYS = ("mask_token",)
# Classy Vision's ResNeXt names (SSCD's *.classy.pt): the stem ``initial_block._module.{0,1}`` and the
# blocks, named ``blocks.{s}.block{s}-{i}.`` since Classy Vision 0.4 (the pip release SSCD's
# Model("CV_*") is built and loaded with) or, in files of older Classy Vision (which its ResNeXt
# still converts on load), ClassyBlock-wrapped as ``blocks.{s}.{i}._module.``
_CLASSY_NAME = re.compile(r"^(.*?)(?:initial_block\._module\.([01])\.|blocks\.(\d+)\.(?:(\d+)\._module\.|block\d+-(\d+)\.)"
                          r"(convolutional_block\.\d+\.|bn\.|downsample\.\d+\.))(.*)$")
# DINO / DINOv2 training files: the copy to load unless asked otherwise (DINO's eval_linear.py /
# eval_knn.py default ``--checkpoint_key teacher``; DINOv2 evaluates its teacher too).
DINO_CHECKPOINT_KEY = "teacher"
# DINOv2 trains with FSDP block chunks: ``blocks.{chunk}.{i}.`` (i counts over all blocks, as the
# chunks are padded with Identity modules, dinov2/models/vision_transformer.py BlockChunk).
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+\.)")
# Names that identify where an encoder starts inside a larger state dict.
_ANCHORS = ("pos_embed", "cls_token", "patch_embed.proj.weight", "layer1.0.conv1.weight")
# The copy to use (MoCo v1/v2 encoder_q, MoCo v3 base_encoder, BYOL online, student) and the
# slowly-updated copy beside it (encoder_k, momentum_encoder, target, teacher, EMA); the names
# are matched as whole words of the prefix, split at '.' and '_'.
_PRIMARY_COPY = {"q", "query", "base", "online", "student"}
_SECONDARY_COPY = {"k", "key", "momentum", "target", "teacher", "ema"}
# SLIP (facebookresearch/SLIP models.py): the model name in its 'args' Namespace (SLIP_VITB16,
# CLIP_VITS16, SIMCLR_VITL16, ...) names the ViT; SLIP's ViT-S is MoCo v3's vit_small, 12 heads.
SLIP_VISUALS = {"VITS16": ("vit_s", 12), "VITB16": ("vit_b", 12), "VITL16": ("vit_l", 16)}
# OpenAI CLIP's VisionTransformer names -> timm's (the vit_*_clip_quickgelu_224 architectures).
_OPENAI_VISUAL = [(re.compile(p), r) for p, r in (
    (r"^conv1\.", "patch_embed.proj."), (r"^positional_embedding$", "pos_embed"), (r"^class_embedding$", "cls_token"),
    (r"^ln_pre\.", "norm_pre."), (r"^ln_post\.", "norm."), (r"^transformer\.resblocks\.(\d+)\.ln_(\d)\.", r"blocks.\1.norm\2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."))]
_VIT_NAMES = {192: "ViT-T", 384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}
_RESNET_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
                  ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}


def load_pretrained(encoder, path, ss_framework=None, *, checkpoint_key=None):
    """Load the encoder weights found in checkpoint ``path`` into ``encoder`` (strict).

    ``ss_framework`` (e.g. "mocov3", "mae") only sharpens error messages: the layout is
    recognised from the file itself. ``checkpoint_key``: which copy of a DINO / DINOv2 training
    file to load (default ``DINO_CHECKPOINT_KEY``, the teacher; ``"student"`` for the student).
    Returns ``{"prefix", "loaded", "dropped"}`` for logging.
    Raises :class:`CheckpointError` for unreadable/unsafe files, non-finite values, and any
    key that does not fit (naming the keys and the architecture the file holds).
    """
    obj = load_file(path)
    _check_described_architecture(obj, encoder, path)
    state = _find_state_dict(obj, path, checkpoint_key)
    if any(k.endswith("visual.attnpool.positional_embedding") for k in state):
        raise openai_clip_refusal(path)
    plan = match_encoder(encoder, state, path)
    prefix, weights = plan["prefix"], plan["weights"]
    if plan["missing"] or plan["unexpected"] or plan["misshaped"]:
        raise CheckpointError(_mismatch_message(encoder, path, prefix, weights, plan["missing"], plan["unexpected"],
                                                plan["misshaped"], ss_framework))
    _check_finite(weights, path, "encoder ")
    encoder.load_state_dict(weights, strict=True)
    return {"prefix": prefix, "loaded": len(weights), "dropped": plan["dropped"]}


def match_encoder(encoder, state, path):
    """What :func:`load_pretrained` would load from the flat state dict ``state`` into ``encoder``,
    without loading it: ``{"prefix", "weights", "dropped", "missing", "unexpected", "misshaped"}``.

    ``weights`` are the file's tensors renamed to the encoder's names (heads dropped, BatchNorm
    counters added, ``pos_embed`` interpolated); ``encoder`` may live on the meta device.
    """
    expected = encoder.state_dict()
    state = openai_visual_to_timm(state)
    prefix = _encoder_prefix(state, expected.keys(), path)
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith("blocks.") for k in expected):
        weights = {(k if k in expected else _CHUNKED_BLOCK.sub(r"blocks.\1", k)): v for k, v in weights.items()}
    if "register_tokens" in weights:
        weights = _dinov2_to_timm(weights, fold_cls_position=getattr(encoder, "num_prefix_pos", 1) == 0)
    if any(".denselayer" in k for k in expected):
        weights = {(k if k in expected else _LEGACY_DENSENET.sub(r"\1\2", k)): v for k, v in weights.items()}
    dropped = sorted(k for k in weights if k not in expected and _is_dropped(k))
    for k in dropped:
        del weights[k]
    # Files written before BatchNorm had this buffer (e.g. torchvision's resnet50-19c8e357.pth)
    # lack it; it only counts batches and is not used with the default momentum. Only layers
    # the file has get it, so the file is still described by its own keys (a ResNet-18 file
    # given to a ResNet-50 must not gain the ResNet-50's extra blocks).
    for k, v in expected.items():
        stats = k[:-len("num_batches_tracked")] + "running_mean"
        if k.endswith("num_batches_tracked") and k not in weights and stats in weights:
            weights[k] = v.clone()
    if "pos_embed" in weights and "pos_embed" in expected:
        weights["pos_embed"] = _fit_pos_embed(weights["pos_embed"], encoder, path)
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [f"{k} (file {tuple(weights[k].shape)}, model {tuple(v.shape)})"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    return {"prefix": prefix, "weights": weights, "dropped": dropped, "missing": missing,
            "unexpected": unexpected, "misshaped": misshaped}


def inspect_encoder(obj, path, architecture=None, ss_framework=None):
    """Where the encoder of a loaded checkpoint ``obj`` sits and whether it would load, as plain data.

    The prefix and the dropped keys come from :func:`match_encoder`, the loader's own rule, applied
    to an encoder built on the meta device (no weights are allocated or loaded): ``architecture``
    (with ``ss_framework``'s head count) when given, else each gissl architecture in turn, the one
    that fits strictly (or the closest) being reported. Returns ``{"container", "tensors",
    "values", "prefix", "holds", "family", "stated", "architecture", "encoder_tensors",
    "encoder_parameters", "dropped", "outside", "fit", "refused"}``; raises
    :class:`CheckpointError` when ``obj`` holds no state dict of tensors.
    """
    from gissl.models import ARCHITECTURES, vit_num_heads  # the package imports this module
    refused, container = None, None
    if isinstance(obj, dict) and _is_state(obj.get(DINO_CHECKPOINT_KEY)):
        # DINO / DINOv2 training file: the loader takes the teacher
        state, container = obj[DINO_CHECKPOINT_KEY], DINO_CHECKPOINT_KEY
    else:
        state = _find_state_dict(obj, path)
        container = next((k for k in _CONTAINER_KEYS if isinstance(obj, dict) and obj.get(k) is state), None)
    stated = _stated_architecture(obj)
    framework = ss_framework if architecture else (ss_framework or stated["ss_framework"])
    checks = []
    for arch in [architecture] if architecture else sorted(ARCHITECTURES):
        heads = vit_num_heads(arch, framework)
        with torch.device("meta"):
            encoder = ARCHITECTURES[arch](**({"num_heads": heads} if heads else {}))
        try:
            if refused is None:
                _check_described_architecture(obj, encoder, path)
            plan = match_encoder(encoder, state, path)
        except CheckpointError as e:
            plan = {"error": str(e), "prefix": None, "weights": {}, "dropped": [], "missing": [], "unexpected": [],
                    "misshaped": []}
        problems = len(plan["missing"]) + len(plan["unexpected"]) + len(plan["misshaped"])
        plan["fits"] = "error" not in plan and not problems
        plan["loads"] = plan["fits"] and refused is None
        plan["architecture"], plan["ss_framework"] = arch, framework if heads else None
        checks.append((plan, -problems))
    # the strict fit, else a refusal (its message says why), else the encoder with the fewest
    # differences (a tie: the first by name)
    plan = max(checks, key=lambda c: (c[0]["fits"], "error" in c[0], c[1]))[0]
    prefix = plan["prefix"]
    if prefix is None:  # every candidate was refused (e.g. two encoders tie): say where the anchors are
        prefix = _encoder_prefix(state, (), path)
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    kept = {k: v for k, v in inner.items() if k not in plan["dropped"]}
    family, holds = describe_state_dict(kept or inner)
    real = [v for k, v in plan["weights"].items() if k in kept]  # not the meta BatchNorm counters added
    fit = {k: plan[k] for k in ("architecture", "ss_framework", "loads", "missing", "unexpected", "misshaped")}
    fit["error"] = plan.get("error")
    fit["given"] = architecture is not None
    return {"container": container, "tensors": len(state), "values": sum(v.numel() for v in state.values()),
            "prefix": prefix, "holds": holds, "family": family, "stated": stated,
            "architecture": plan["architecture"] if plan["fits"] else None,
            "encoder_tensors": len(real), "encoder_parameters": sum(v.numel() for v in real),
            "dropped": _groups(plan["dropped"], 1),
            "outside": _groups([k for k in state if not k.startswith(prefix)], prefix.count(".")),
            "fit": fit, "refused": refused}


def classy_to_torchvision(state):
    """Classy Vision ResNet / ResNeXt names (SSCD's ``*.classy.pt``: ``Model("CV_RESNET50", ...)``,
    ``Model("CV_RESNEXT101", ...)``, Classy Vision's ``ResNeXt``) -> torchvision's:
    ``initial_block._module.{0,1}`` -> ``conv1`` / ``bn1``; ``blocks.{s}.block{s}-{b}.convolutional_block.{i}``
    (or ``blocks.{s}.{b}._module.convolutional_block.{i}``, Classy Vision before 0.4) ->
    ``layer{s+1}.{b}.conv1 / bn1 / conv2 / bn2 / conv3`` and its final ``bn`` -> ``bn3`` (``bn2``
    for basic blocks); ``downsample`` keeps its name. The layers compute the same functions
    (stride on the 3×3 conv, as torchvision's ResNet v1.5; a ResNeXt's grouped 3×3 conv keeps its
    weight shape, whose groups the model's own conv fixes). Other keys are kept."""
    bottleneck = any(".convolutional_block.6." in k for k in state)
    inner = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3"}
    last_bn = "bn3" if bottleneck else "bn2"
    out = {}
    for key, value in state.items():
        m = _CLASSY_NAME.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, stem, stage, wrapped, named, part, rest = m.groups()
        block = wrapped if wrapped is not None else named
        if stem is not None:
            new = {"0": "conv1", "1": "bn1"}[stem] + "."
        else:
            layer = f"layer{int(stage) + 1}.{block}."
            if part.startswith("convolutional_block."):
                part = inner.get(part.split(".")[1], part) + "."
            elif part == "bn.":
                part = last_bn + "."
            new = layer + part
        out[prefix + new + rest] = value
    return out


def _dinov2_to_timm(weights, fold_cls_position):
    """Meta's DINOv2 register layout -> timm's (timm ``_convert_dinov2``): ``register_tokens`` ->
    ``reg_token``, the CLS position added to ``cls_token`` and dropped from ``pos_embed``
    (``no_embed_class``: the same sums in the forward pass, cls + pos). Without
    ``fold_cls_position`` (an encoder without registers) only the rename happens, so the
    mismatch is reported as the unexpected ``reg_token``."""
    weights = dict(weights)
    weights["reg_token"] = weights.pop("register_tokens")
    if fold_cls_position and "pos_embed" in weights and "cls_token" in weights:
        pos = weights.pop("pos_embed")
        weights["cls_token"] = weights["cls_token"] + pos[:, :1]
        weights["pos_embed"] = pos[:, 1:]
    return weights


def _is_state(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _stated_architecture(obj):
    """What a file says it holds besides its keys: MoCo's ``'arch'``, gissl's ``'args'`` (a dict of
    flags), MAE's / DINO's ``'args'`` Namespace (``model`` / ``arch``, ``patch_size``).
    Returns ``{"arch", "ss_framework", "text"}`` (None where the file says nothing)."""
    out = {"arch": None, "ss_framework": None, "text": None}
    if not isinstance(obj, dict):
        return out
    settings = obj.get("args")
    settings = vars(settings) if hasattr(settings, "__dict__") and not isinstance(settings, dict) else settings
    state = obj.get("state_dict")
    if isinstance(obj.get("arch"), str):
        out["arch"] = obj["arch"]
        moco3 = isinstance(state, dict) and any(k.startswith("module.base_encoder.") for k in state)
        out["ss_framework"] = "mocov3" if moco3 else None
        heads = {"vit_small": 12, "vit_base": 12}.get(obj["arch"]) if moco3 else None
        note = f" (MoCo v3 vits.py: {heads} attention heads)" if heads else ""
        out["text"] = f"'arch': '{obj['arch']}'{note}"
    elif isinstance(settings, dict) and isinstance(obj.get("model"), dict) and "task" in settings:
        out["arch"], out["ss_framework"] = settings.get("arch"), settings.get("ss_framework")
        out["text"] = f"'args': --architecture {out['arch']} --ss-framework {out['ss_framework']}"
    elif isinstance(settings, dict) and any(isinstance(settings.get(k), str) for k in ("model", "arch")):
        name = settings.get("model") if isinstance(settings.get("model"), str) else settings["arch"]
        out["arch"] = name
        patch = f", patch_size {settings['patch_size']}" if "patch_size" in settings else ""
        out["text"] = f"'args': {'model' if name == settings.get('model') else 'arch'} '{name}'{patch}"
    return out


def _groups(keys, parts):
    """Keys summarised by their first ``parts`` dotted names: ``["module.predictor.* (6)", "module.queue"]``."""
    counts = {}
    for key in keys:
        names = key.split(".")
        group = ".".join(names[:parts]) + (".*" if len(names) > parts else "")
        counts[group] = counts.get(group, 0) + 1
    return [f"{g} ({n})" if g.endswith(".*") else g for g, n in counts.items()]


def load_model_state(model, weights, path, hint=""):
    """``model.load_state_dict(weights)`` (strict) for a whole finetuned model read from ``path``.

    Raises :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys (and the
    encoder the file holds), or the tensors holding NaN/Inf; ``hint`` ends the message (what to
    check, e.g. the flags used in training).
    """
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"'{path}' holds no state dict of tensors under 'model'; it is not a gissl "
                              "finetuned checkpoint. Pass the .pth file that train_<task>.py wrote")
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [f"{k} (file {tuple(weights[k].shape)}, model {tuple(v.shape)})"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or misshaped:
        inner = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
        family, text = describe_state_dict(inner) if inner else (None, "")
        held = f" its encoder is {text}." if family else ""
        parts = [f"checkpoint '{path}' does not fit this {type(model).__name__}:{held}"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                parts.append(f"{what} keys ({len(keys)}): {_names(keys)}.")
        raise CheckpointError(" ".join(parts + [hint]).strip())
    _check_finite(weights, path)
    model.load_state_dict(weights, strict=True)


def _check_finite(weights, path, what=""):
    """Refuse NaN/Inf weights once at load time (naming the tensors), not as a NaN loss later."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint '{path}' holds NaN/Inf values in {len(bad)} {what}tensor(s) ({_names(bad)}); "
            "the run that wrote it diverged. Use an earlier checkpoint of that run")


def describe_state_dict(state):
    """Name the architecture a flat state dict holds, e.g. "a ViT-B/16 (768-d, 12 blocks)".

    Returns (family, text) with family "vit", "resnet" or None.
    """
    keys = list(state)
    if any(k in state for k in ("pos_embed", "cls_token", "patch_embed.proj.weight")):
        dim = next((state[k].shape[-1] for k in ("cls_token", "pos_embed") if k in state), None)
        if dim is None:
            dim = state["patch_embed.proj.weight"].shape[0]
        depth = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
        patch = state["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in state else "?"
        name = _VIT_NAMES.get(dim, "ViT")
        return "vit", f"a {name}/{patch} ({dim}-d, {depth} blocks; cls_token/pos_embed/blocks keys)"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        bottleneck = any(".conv3." in k for k in keys)
        depth = _RESNET_DEPTHS.get((blocks, bottleneck))
        name = f"ResNet-{depth}" if depth else f"ResNet with {list(blocks)} blocks per stage"
        # a ResNeXt's grouped 3x3 conv (Xie et al. 2017): weight (width, width / groups, 3, 3); at the
        # first stage width = groups x base width, e.g. (128, 4, 3, 3) for 32x4d
        conv2 = state.get("layer1.0.conv2.weight")
        if bottleneck and conv2 is not None and conv2.dim() == 4 and conv2.shape[1] and \
                conv2.shape[0] % conv2.shape[1] == 0 and conv2.shape[0] // conv2.shape[1] > 1:
            groups = conv2.shape[0] // conv2.shape[1]
            name = f"ResNeXt-{depth} {groups}x{conv2.shape[1]}d" if depth else \
                f"ResNeXt ({groups}x{conv2.shape[1]}d) with {list(blocks)} blocks per stage"
        return "resnet", f"a {name} (conv1/layer1..4 keys)"
    return None, f"an unrecognised layout (first keys: {_names(keys, 5)})"


def _check_described_architecture(obj, encoder, path):
    """Refuse a file whose own description (MoCo v3's ``'arch'``, gissl's ``'args'``) says it was
    trained as another model than ``encoder``: the attention-head count is not in the weights, so
    loading would succeed and give other features."""
    if not isinstance(obj, dict) or not hasattr(encoder, "num_heads"):
        return
    from gissl.models import vit_num_heads  # the package's table, imported late (it imports us)
    built, heads = getattr(encoder, "architecture", "?"), encoder.num_heads
    state = obj.get("state_dict")
    if isinstance(obj.get("arch"), str) and isinstance(state, dict) and \
            any(k.startswith("module.base_encoder.") for k in state):
        # MoCo v3 (facebookresearch/moco-v3 vits.py): vit_small and vit_base both have 12 heads
        arch = obj["arch"]
        want = {"vit_small": ("vit_s", 12), "vit_base": ("vit_b", 12)}.get(arch)
        if want is not None and (built, heads) != want:
            raise CheckpointError(
                f"checkpoint '{path}' is MoCo v3's {arch} ('arch' in the file), a {want[0]} with {want[1]} "
                f"attention heads, but the encoder being built is {built} with {heads} heads; load it with "
                f"--architecture {want[0]} --ss-framework mocov3 (which builds MoCo v3's {want[1]}-head model)")
        return
    slip = getattr(obj.get("args"), "model", None)  # SLIP's Namespace (gissl stores a dict)
    if isinstance(slip, str) and slip.split("_")[-1] in SLIP_VISUALS and isinstance(state, dict) and \
            any(k.startswith("module.visual.") for k in state):
        arch, want = SLIP_VISUALS[slip.split("_")[-1]]
        if built == arch and heads != want:
            raise CheckpointError(
                f"checkpoint '{path}' is SLIP's {slip} ('args.model' in the file), whose {arch} has {want} attention "
                f"heads, but the encoder being built has {heads} heads; load it with --architecture {arch} "
                f"--ss-framework slip (which builds SLIP's {want}-head model)")
        return
    settings = obj.get("args")  # the flags gissl's training stored
    if isinstance(settings, dict) and isinstance(settings.get("arch"), str) and isinstance(obj.get("model"), dict):
        arch, framework = settings["arch"], settings.get("ss_framework")
        if arch == built and vit_num_heads(arch, framework) not in (None, heads):
            raise CheckpointError(
                f"checkpoint '{path}' was written by gissl for --architecture {arch} --ss-framework {framework} "
                f"({vit_num_heads(arch, framework)} attention heads), but the encoder being built has {heads} heads; "
                f"load it with --architecture {arch} --ss-framework {framework}")


def openai_visual_to_timm(state):
    """An OpenAI CLIP / open_clip state dict with its image tower in timm's ViT names (under the
    same prefix, e.g. ``visual.``): ``conv1`` -> ``patch_embed.proj``, ``class_embedding`` (D) ->
    ``cls_token`` (1, 1, D), ``positional_embedding`` (L, D) -> ``pos_embed`` (1, L, D), ``ln_pre`` ->
    ``norm_pre``, ``transformer.resblocks.{i}`` -> ``blocks.{i}`` (``ln_1/2`` -> ``norm1/2``,
    ``in_proj_*`` -> ``qkv``, ``out_proj`` -> ``proj``, ``c_fc/c_proj`` -> ``fc1/fc2``), ``ln_post`` ->
    ``norm``; ``proj`` (D, E) becomes the head ``head.weight`` (E, D), which the encoder loader drops.
    Other states are returned unchanged."""
    prefix = next((k[:-len("class_embedding")] for k in state if k.endswith("visual.class_embedding")), None)
    if prefix is None:
        return state
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        name = key[len(prefix):]
        if name == "proj":
            name, value = "head.weight", value.t()
        for pattern, repl in _OPENAI_VISUAL:
            name, n = pattern.subn(repl, name)
            if n:
                break
        if name in ("cls_token", "pos_embed"):
            value = value.reshape(1, -1, value.shape[-1])
        out[prefix + name] = value
    return out


def openai_clip_refusal(path):
    """The error for an OpenAI CLIP ResNet file given as an image encoder."""
    return CheckpointError(
        f"checkpoint '{path}' is an OpenAI CLIP / open_clip ResNet (visual.attnpool.*): its text tower loads "
        "(gissl.models.clip.load_text_tower), but its image tower (ModifiedResNet: a 3-convolution stem, "
        "average-pool downsampling and attention pooling) fits no gissl encoder. OpenAI's ViTs load as "
        "--architecture vit_b16_clip / vit_b32_clip / vit_l14_clip")


def _find_state_dict(obj, path, checkpoint_key=None):
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` containers down to a flat dict of tensors;
    a DINO / DINOv2 training file (``"teacher"``, with or without ``"student"``) gives its
    ``checkpoint_key`` copy (default the teacher)."""
    if checkpoint_key is not None or (isinstance(obj, dict) and _is_state(obj.get(DINO_CHECKPOINT_KEY))):
        key = checkpoint_key or DINO_CHECKPOINT_KEY
        if not (isinstance(obj, dict) and _is_state(obj.get(key))):
            top = _names(list(obj), 8) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(
                f"checkpoint '{path}' has no state dict of tensors under '{key}' (found: {top}); "
                "checkpoint_key picks the student or teacher of a DINO training checkpoint: use 'teacher' "
                "or 'student', or leave it unset for other files")
        return obj[key]
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return classy_to_torchvision(obj) if any(map(_CLASSY_NAME.match, obj)) else obj
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    top = _names(list(obj), 8) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"checkpoint '{path}' holds no state dict of tensors (found: {top}); expected a state dict, "
        "or a dict with it under 'state_dict' (MoCo v3) or 'model' (MAE, gissl)")


def _encoder_prefix(state, expected, path):
    """The key prefix ('' for flat files) under which the encoder's parameters sit in ``state``."""
    expected = set(expected)
    scores, anchored = {}, set()
    for key in state:
        cuts = [0] + [i + 1 for i, c in enumerate(key) if c == "."]
        for cut in cuts:
            prefix, rest = key[:cut], key[cut:]
            if rest in expected:
                scores[prefix] = scores.get(prefix, 0) + 1
            if rest in _ANCHORS:
                anchored.add(prefix)
    if not scores and not anchored:
        return ""
    # Most matching names wins; on a tie the base encoder beats its momentum copy. Sorting the
    # names first makes the choice independent of set order (i.e. of the Python hash seed).
    ranked = sorted(sorted(set(scores) | anchored), key=lambda p: (_prefix_rank(p, scores), len(p)))
    best = _prefix_rank(ranked[0], scores)
    tied = [p for p in ranked if _prefix_rank(p, scores) == best]
    if len(tied) > 1 and scores.get(ranked[0]):
        raise CheckpointError(
            f"checkpoint '{path}' holds {len(tied)} encoders with the same {scores[ranked[0]]} parameter "
            f"names, under {', '.join(repr(p) for p in tied)}, and nothing tells which one to use; "
            "extract the one you mean as a plain state dict (torch.save(state_dict, 'encoder.pth')) "
            "and pass that file with --checkpoint")
    return ranked[0]


def _prefix_rank(prefix, scores):
    """Sort key of a candidate prefix: more matching names first, then a query / base / student /
    online copy, then anything that is not a key / momentum / teacher / target / EMA copy."""
    words = set(re.split(r"[._]", prefix.lower()))
    return -scores.get(prefix, 0), not (words & _PRIMARY_COPY), bool(words & _SECONDARY_COPY)


def _is_dropped(key):
    return key.startswith(_DROPPED_PREFIXES) or key in _DROPPED_KEYS


def _fit_pos_embed(pos_embed, encoder, path):
    """Interpolate a (1, P + g*g, D) position embedding to the encoder's grid (P = the encoder's
    ``num_prefix_pos``: 1 CLS position, or 0 for the register models)."""
    target = encoder.pos_embed
    if pos_embed.shape == target.shape or pos_embed.dim() != 3 or pos_embed.shape[-1] != target.shape[-1]:
        return pos_embed  # equal, or a width mismatch reported with the other keys
    prefix = getattr(encoder, "num_prefix_pos", 1)
    side = math.isqrt(max(pos_embed.shape[1] - prefix, 0))
    if side * side != pos_embed.shape[1] - prefix:
        what = "1 CLS position plus a square grid" if prefix else "a square grid (no CLS position)"
        raise CheckpointError(
            f"checkpoint '{path}': pos_embed has {pos_embed.shape[1]} positions, not {what} as "
            f"{getattr(encoder, 'architecture', 'this model')} has, so it cannot be interpolated to this "
            "model's grid; use a file of the same architecture")
    return resample_pos_embed(pos_embed, (side, side), encoder.pos_grid, num_prefix=prefix)


def _mismatch_message(encoder, path, prefix, weights, missing, unexpected, misshaped, ss_framework):
    arch = getattr(encoder, "architecture", type(encoder).__name__)
    model_family = "vit" if hasattr(encoder, "pos_embed") else "resnet"
    model_text = "a ViT" if model_family == "vit" else "a ResNet"
    file_family, file_text = describe_state_dict(weights)
    where = f" under '{prefix}'" if prefix else ""
    if file_family is not None and file_family != model_family:
        head = f"this file holds {file_text}{where}, not {model_text}; --architecture {arch} needs " \
               f"a {'ViT' if model_family == 'vit' else 'ResNet'} checkpoint"
    else:
        head = f"this file holds {file_text}{where}, which does not match {arch}"
    framework = f" (given as a {ss_framework} checkpoint)" if ss_framework else ""
    parts = [f"checkpoint '{path}'{framework} does not fit encoder {arch}: {head}."]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_names(missing)}.")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}.")
    if misshaped:
        parts.append(f"mis-shaped keys ({len(misshaped)}): {_names(misshaped)}.")
    parts.append("Pass a checkpoint of the same architecture as --architecture (or change --architecture).")
    return " ".join(parts)


def _names(keys, most=8):
    keys = list(keys)
    return ", ".join(keys[:most]) + (f", ... ({len(keys) - most} more)" if len(keys) > most else "")
