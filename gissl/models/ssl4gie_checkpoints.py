"""SSL4GIE's finetuned checkpoints (Sanderson & Matuszewski 2024) read as gissl finetuned models.

SSL4GIE's ``train_<task>.py`` saves ``{"epoch", "model_state_dict", "optimizer_state_dict",
"scaler_state_dict", "loss", "val_perf", "test_perf", "py_state", "np_state", "torch_state"}``
(docs/ssl4gie-study.md §4.4), ``model_state_dict`` holding its own module names:

- classification: the encoder's keys at the top level (torchvision ResNet / timm ViT names; MAE
  models keep ``decoder_pos_embed``) and ``lin_head.*``;
- segmentation: ResNet = smp ``DeepLabV3Plus`` (``encoder.*``, ``decoder.*``,
  ``segmentation_head.*``, already gissl's ``--decoder deeplabv3plus`` names); ViT = the encoder
  at the top level and its DPT decoder under ``decoder.`` (``act_postprocess*``, ``layer*_rn``,
  ``refinenet*``, ``output_conv``);
- depth: ResNet = the trunk at the top level with the residual decoder (``decoder_levels.*``,
  ``output_conv.*``, gissl's ``--decoder residual`` names); ViT = as segmentation, sigmoid head;
- detection: ResNet = torchvision 0.10's ``fasterrcnn_resnet50_fpn`` (FrozenBatchNorm2d, the
  FPN and RPN convs under their pre-0.13 names); ViT = the CLS-less ViT at ``backbone.``, its
  ViTDet-like pyramid (LayerNorms over (C, H, W), 1024 px only) at ``backbone.fpn.``, rebuilt by
  :mod:`gissl.models.ssl4gie_vitdet` (``--pyramid ssl4gie``).

:func:`convert` renames such a file to gissl's finetuned layout ``{"model", "args", "epoch"}``,
``args`` holding the model flags the file implies (architecture, decoder, head, input size), so
eval / predict / export scripts rebuild SSL4GIE's model from ``--weights FILE`` alone.
"""
import math
import re

from gissl.errors import CheckpointError

# the entries SSL4GIE's train scripts save beside the weights
ENTRIES = ("epoch", "model_state_dict", "optimizer_state_dict", "scaler_state_dict", "loss", "val_perf",
           "test_perf", "py_state", "np_state", "torch_state")
INPUT_SIZE = 224              # SSL4GIE's input side for classification, segmentation and depth
DETECTION_MIN_SIZE = 800      # torchvision's resize of the ResNet detectors (docs/ssl4gie-study.md §2.3)
VIT_DETECTION_SIZE = 1024     # the ViT detectors' canvas, fixed by their LayerNorms (docs/ssl4gie-study.md §3.4)
_VITS = {192: "vit_t", 384: "vit_s", 768: "vit_b", 1024: "vit_l"}
_RESNETS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet50"}
# SSL4GIE's DPT_decoder names -> gissl.models.dpt.DPT names (refinenet4.resConfUnit1 is unused)
_DPT = [(r"act_postprocess12\.([01])\.", r"reassemble.levels.0.\1."),
        (r"act_postprocess22\.([01])\.", r"reassemble.levels.1.\1."),
        (r"act_postprocess32\.0\.", "reassemble.levels.2.0."),
        (r"act_postprocess42\.0\.", "reassemble.levels.3.0."),
        (r"act_postprocess42\.1\.", "reassemble.levels.3.1.0."),
        (r"layer([1-4])_rn\.", lambda m: f"project.{int(m.group(1)) - 1}."),
        (r"refinenet([1-4])\.resConfUnit1\.", lambda m: f"fusion.{int(m.group(1)) - 1}.skip_unit."),
        (r"refinenet([1-4])\.resConfUnit2\.", lambda m: f"fusion.{int(m.group(1)) - 1}.unit."),
        (r"refinenet([1-4])\.out_conv\.", lambda m: f"fusion.{int(m.group(1)) - 1}.out_conv.")]
_DPT_HEADS = {"segmentation": {"0": "conv", "1": "bn", "4": "classifier"},
              "depth": {"0": "conv1", "2": "conv2", "4": "conv3"}}
# torchvision >= 0.13 wraps these convs in Conv2dNormActivation (its modules rename them on load)
_TORCHVISION_010 = [(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2"),
                    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1")]


def is_ssl4gie(obj):
    """True for a dict laid out as SSL4GIE's train scripts save it (``model_state_dict``, no ``model``)."""
    return isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict) and "model" not in obj


def task_of(state):
    """The task of an SSL4GIE ``model_state_dict`` as its keys show it (None if none fits)."""
    if "lin_head.weight" in state:
        return "classification"
    if "segmentation_head.0.weight" in state or "decoder.output_conv.1.running_mean" in state:
        return "segmentation"
    if "decoder_levels.0.chan_reduce.0.weight" in state or "decoder.output_conv.4.weight" in state:
        return "depth"
    if any(k.startswith("roi_heads.") for k in state):
        return "detection"
    return None


def is_vit_detector(state):
    """True for the ``model_state_dict`` of one of SSL4GIE's ViT detectors (a ViT at ``backbone.``)."""
    return any(k.startswith("backbone.blocks.") for k in state) and any(k.startswith("roi_heads.") for k in state)


def convert(obj, task, path):
    """SSL4GIE's checkpoint ``obj`` of ``task`` -> ``{"model": gissl state dict, "args": model flags,
    "epoch", "source": "SSL4GIE"}``. Raises :class:`CheckpointError` for a file of another task."""
    state = obj["model_state_dict"]
    if task == "classification":
        model, flags = _classification(state, path)
    elif task in ("segmentation", "depth"):
        model, flags = _dense(state, task, path)
    elif task == "detection":
        model, flags = _detection(state, path)
    else:
        raise CheckpointError(f"'{path}' is an SSL4GIE finetuned checkpoint; SSL4GIE has no {task} models")
    # SSL4GIE's eval reads '...-frozen_False-...' files only
    flags = {"arch": flags.get("arch") or _architecture(model, path), "frozen": False, **flags}
    return {"model": model, "args": flags, "epoch": obj.get("epoch"), "source": "SSL4GIE"}


def _classification(state, path):
    if "lin_head.weight" not in state:
        raise _wrong_task(state, "classification", path)
    model = {("head." + k[len("lin_head."):] if k.startswith("lin_head.") else "encoder." + k): v
             for k, v in state.items() if k != "decoder_pos_embed"}
    return model, {"image_size": _input_size(model)}


def _dense(state, task, path):
    if task == "segmentation" and "segmentation_head.0.weight" in state:
        # smp DeepLabV3Plus: gissl's DeepLabV3Plus has the same names
        return dict(state), {"decoder": "deeplabv3plus", "image_size": INPUT_SIZE,
                             "decoder_channels": int(state["segmentation_head.0.weight"].shape[1])}
    if task == "depth" and "decoder_levels.0.chan_reduce.0.weight" in state:
        model = {(k if k.startswith(("decoder_levels.", "output_conv.")) else "encoder." + k): v
                 for k, v in state.items()}
        return model, {"decoder": "residual", "depth_output": "sigmoid", "image_size": INPUT_SIZE,
                       "decoder_channels": 256}
    if "decoder.layer1_rn.weight" not in state or "decoder.output_conv.4.weight" not in state:
        raise _wrong_task(state, task, path)
    if task == "segmentation" and "decoder.output_conv.1.running_mean" not in state:
        raise _wrong_task(state, task, path, "its DPT has the depth head")
    if task == "depth" and "decoder.output_conv.1.running_mean" in state:
        raise _wrong_task(state, task, path, "its DPT has the segmentation head")
    model = {}
    for k, v in state.items():
        if k == "decoder_pos_embed" or k.startswith("decoder.refinenet4.resConfUnit1."):
            continue  # MAE's unused decoder position embedding; DPT's unused first unit
        model[_dpt_name(k[len("decoder."):], task) if k.startswith("decoder.") else "encoder." + k] = v
    args = {"decoder": "dpt", "image_size": _input_size(model),
            "decoder_channels": int(state["decoder.layer1_rn.weight"].shape[0])}
    if task == "depth":
        args["depth_output"] = "sigmoid"
    return model, args


def _dpt_name(key, task):
    head = re.match(r"output_conv\.(\d+)\.(.*)$", key)
    if head and head.group(1) in _DPT_HEADS[task]:
        return f"head.{_DPT_HEADS[task][head.group(1)]}.{head.group(2)}"
    for pattern, replacement in _DPT:
        new, n = re.subn("^" + pattern, replacement, key)
        if n:
            return new
    return key  # unknown: reported by the strict load


def _detection(state, path):
    if is_vit_detector(state):
        return _vit_detection(state, path)
    if "backbone.body.conv1.weight" not in state:
        raise _wrong_task(state, "detection", path)
    model = {}
    for k, v in state.items():
        for pattern, replacement in _TORCHVISION_010:
            k = re.sub(pattern, replacement, k)
        model[k] = v
    inner = {k[len("backbone.body."):]: v for k, v in model.items() if k.startswith("backbone.body.")}
    # FrozenBatchNorm2d, as torchvision built every ResNet detector then (docs/ssl4gie-study.md §8 item 19)
    return model, {"arch": _architecture({"encoder." + k: v for k, v in inner.items()}, path),
                   "batchnorm": "frozen", "image_size": DETECTION_MIN_SIZE}


def _vit_detection(state, path):
    """SSL4GIE's ViT detector -> gissl.models.ssl4gie_vitdet's names: the ViT under
    ``backbone.body.``, its pyramid (``backbone.fpn.fpn1``..``fpn4``) and the torchvision heads as
    they are (RPN conv renamed from torchvision 0.10), MAE's unused ``decoder_pos_embed`` dropped."""
    ln = state.get("backbone.fpn.fpn2.1.weight")
    if ln is None or ln.dim() != 3 or "backbone.patch_embed.proj.weight" not in state:
        raise _wrong_task(state, "detection", path, "a ViT without SSL4GIE's ViTDet_FPN pyramid")
    if tuple(ln.shape[1:]) != (VIT_DETECTION_SIZE // 16,) * 2:
        raise CheckpointError(f"'{path}' holds a ViT detector whose pyramid LayerNorms are {tuple(ln.shape)}; "
                              f"SSL4GIE's are made for the {VIT_DETECTION_SIZE}-px canvas "
                              f"({(256, VIT_DETECTION_SIZE // 16, VIT_DETECTION_SIZE // 16)}): pass the file "
                              "SSL4GIE's train_detection.py wrote")
    model = {}
    for k, v in state.items():
        if k == "backbone.decoder_pos_embed":
            continue
        if k.startswith("backbone.") and not k.startswith("backbone.fpn."):
            k = "backbone.body." + k[len("backbone."):]
        for pattern, replacement in _TORCHVISION_010:
            k = re.sub(pattern, replacement, k)
        model[k] = v
    inner = {"encoder." + k[len("backbone.body."):]: v for k, v in model.items() if k.startswith("backbone.body.")}
    # the window size is SSL4GIE's (16 tokens); stored so that a contradicting --window-size is refused
    return model, {"arch": _architecture(inner, path), "pyramid": "ssl4gie", "window_size": 16,
                   "image_size": VIT_DETECTION_SIZE}


def _architecture(model, path):
    """The gissl architecture of the ``encoder.*`` keys: ViT by width (patch 16), ResNet by blocks."""
    if "encoder.patch_embed.proj.weight" in model:
        w = model["encoder.patch_embed.proj.weight"]
        arch = _VITS.get(int(w.shape[0])) if w.shape[-1] == 16 else None
    else:
        blocks = tuple(len({k.split(".")[2] for k in model if k.startswith(f"encoder.layer{i}.")}) for i in range(1, 5))
        arch = _RESNETS.get(blocks)
    if arch is None:
        raise CheckpointError(f"'{path}' is an SSL4GIE finetuned checkpoint of an encoder gissl does not build "
                              "(SSL4GIE used ResNet-50 and ViT-B/16)")
    return arch


def _input_size(model):
    """The input side a ViT's position embedding was made for (1 CLS + g² positions, patch 16)."""
    pos = model.get("encoder.pos_embed")
    if pos is None:
        return INPUT_SIZE
    return math.isqrt(pos.shape[1] - 1) * 16


def _wrong_task(state, task, path, why=""):
    keys = ", ".join(list(state)[-3:])
    return CheckpointError(f"'{path}' is an SSL4GIE finetuned checkpoint but not of a {task} model "
                           f"{'(' + why + ') ' if why else ''}(its last keys: {keys}); pass the file "
                           f"SSL4GIE's train_{task}.py wrote")
