"""Reading and writing checkpoint files safely.

A checkpoint is data, never code: every read goes through ``torch.load(weights_only=True)``
(or safetensors), and every write goes to a temporary file in the same folder that is
then renamed over the target, so a crash never leaves a half-written checkpoint behind.

``python -m gissl.checkpoint FILE [--architecture A] [--ss-framework F] [--json]`` says what a
file is (:func:`describe_checkpoint`): its layout, the flags it stores, where the encoder sits,
the architecture it holds, the keys the loader drops and whether it loads into ``A``.
"""
import argparse
import os
import pathlib
import pickle
import random
import tempfile
import zipfile

import numpy as np
import torch

from gissl.errors import CheckpointError

# what to do about a file that is cut short or is something else under a checkpoint's name
_AGAIN = "copy or download it again, or pass the path of the right file"
# SSCD's backbone names (sscd/models/model.py Backbone) for the gissl architecture a file holds.
# Its TV_RESNEXT101 is torchvision's resnext101_32x8d, not gissl's 32x4d: SSCD releases its
# ResNeXt (sscd_disc_large) as CV_RESNEXT101 only, so a torchvision-layout 32x4d is a conversion.
_SSCD_BACKBONES = {("CV", "resnet18"): "CV_RESNET18", ("CV", "resnet50"): "CV_RESNET50",
                   ("CV", "resnext101_32x4d"): "CV_RESNEXT101",
                   ("TV", "resnet18"): "TV_RESNET18", ("TV", "resnet50"): "TV_RESNET50"}
# Plain-data classes that official training scripts pickle beside the weights, allowed on top
# of torch's weights-only set: MAE's, DINO's and EndoFinder's checkpoints store their
# command line as 'args': argparse.Namespace(...) (a bag of attributes; unpickling one only
# sets them). Their values are str/int/float/bool/list/tuple/None; forks of these scripts often
# add pathlib paths (e.g. output_dir), which only hold strings. No class here runs code or I/O.
# DINO's optimizer state also holds NumPy scalars: main_dino.py sets each param group's "lr" and
# "weight_decay" from NumPy schedules (np.float64), pickled as numpy's ``scalar(dtype, bytes)``
# (``numpy.core.multiarray.scalar`` when written with NumPy 1.x) and ``numpy.dtype``: a number
# rebuilt from its bytes, no code; the dtype is rebuilt as its class (NumPy >= 1.25: numpy.dtypes.Float64DType, ...).
# SSL4GIE's finetuned checkpoints store np.random.get_state() ('np_state'): a uint32 array,
# pickled as ``_reconstruct(ndarray, shape, dtype)`` plus its raw bytes, again no code.
_NUMPY_MODULE = np._core if hasattr(np, "_core") else np.core
_NUMPY_SCALAR = _NUMPY_MODULE.multiarray.scalar
_NUMPY_RECONSTRUCT = _NUMPY_MODULE.multiarray._reconstruct
_NUMPY_DTYPES = tuple(dict.fromkeys(type(np.dtype(c)) for c in ("f8", "f4", "f2", "i8", "i4", "u4", "b1")))


class LightningCallbackClass:
    """Stands for a PyTorch Lightning callback class named in a checkpoint. Lightning 1.0-1.4 keyed
    the saved callback states by the callback's class (``{ModelCheckpoint: {"best_model_path": ...}}``,
    e.g. CovidPrognosis's MoCo checkpoints); unpickling that reference gives this inert class, used
    only as a dict key: Lightning is neither needed nor imported, and nothing is instantiated."""


_LIGHTNING_CALLBACKS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                        "pytorch_lightning.callbacks.early_stopping.EarlyStopping")
SAFE_GLOBALS = (argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                pathlib.PureWindowsPath, np.dtype, np.ndarray, *_NUMPY_DTYPES,
                *[(f, f"numpy.{m}.multiarray.{f.__name__}") for f in (_NUMPY_SCALAR, _NUMPY_RECONSTRUCT)
                  for m in ("core", "_core")],
                *[(LightningCallbackClass, name) for name in _LIGHTNING_CALLBACKS])


def load_file(path):
    """Load a checkpoint file as plain data (dict of tensors / numbers / strings).

    Accepts ``.pth``/``.pth.tar``/``.pt`` files written by ``torch.save`` and
    ``.safetensors`` files. Raises :class:`CheckpointError` with the reason for a missing,
    truncated, non-checkpoint or unsafe (code-carrying pickle) file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass the path of a local file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes); the download or copy was "
                              f"incomplete: {_AGAIN}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file as load_safetensors
        except ImportError:
            raise CheckpointError(
                f"'{path}' is a .safetensors file but the 'safetensors' package is not installed; "
                "run 'pip install safetensors' or convert the file to .pth") from None
        try:
            return load_safetensors(path)
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file '{path}': {e}; it is truncated or not "
                                  f"a safetensors file: {_AGAIN}") from None
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive ("PK"); very old files are raw pickles (protocol byte 0x80)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(f"cannot read checkpoint '{path}': the file is truncated or is not "
                              "a PyTorch checkpoint (it is neither a torch.save archive nor a pickle); "
                              f"{_AGAIN}")
    if head.startswith(b"PK") and _is_torchscript(path):
        raise CheckpointError(
            f"'{path}' is a TorchScript program (a compiled model saved with torch.jit.save, e.g. SSCD's "
            "*.torchscript.pt), not a checkpoint of weights; gissl loads weights only and never runs a "
            "file's code. A descriptor model of this kind is used as it is by eval_retrieval.py / "
            "predict_retrieval.py --descriptor-model FILE. Otherwise use the plain weights file of the same model instead (SSCD publishes "
            "sscd_disc_mixup.torchvision.pt beside sscd_disc_mixup.torchscript.pt, and sscd_disc_large.classy.pt "
            "for --architecture resnext101_32x4d), or, if you trust the file, "
            f"extract its weights: python -c \"import torch; torch.save(torch.jit.load('{path}').state_dict(), "
            "'weights.pth')\" and pass weights.pth with --checkpoint")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = [line.strip() for line in str(e).splitlines() if "unsupported" in line.lower()]
        raise CheckpointError(
            f"refused to load '{path}': it contains Python objects other than tensors and plain "
            f"data, which could run code when unpickled ({why[0] if why else 'not weights-only'}). "
            "Re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or as "
            ".safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"cannot read checkpoint '{path}': the file is truncated or is not a PyTorch "
            f"checkpoint ({type(e).__name__}: {_first_sentence(e)}); {_AGAIN}") from None


def _is_torchscript(path):
    """True for a ``torch.jit.save`` archive: its zip holds the program's ``code/`` and a
    ``constants.pkl``, which ``torch.save`` archives never do."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # reported by torch.load below as truncated / not a checkpoint
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _first_sentence(e):
    # torch's reader errors go on for a paragraph; its first sentence says what failed
    return (str(e).splitlines() or [""])[0].split(". ")[0]


def save_atomic(obj, path, before_replace=None, writer=None):
    """``torch.save`` (or ``writer(obj, file)``) to a temporary file beside ``path``, fsync, then
    rename over ``path``.

    Readers see either the previous file or the complete new one, never a partial file:
    a crash or a full disk leaves ``path`` as it was. A failed write removes its temporary
    file; one left by a killed process is named ``.tmp-<file name>-<random>`` (no ``.pth``
    ending, so it is never mistaken for a checkpoint) and :func:`gissl.engine.fit` removes
    those of its own run. ``before_replace(tmp_path)``, if given, runs just before the
    rename (tests inject crashes there).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            (writer or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state():
    """All random-number-generator states of this process, as plain data."""
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": np.random.get_state()[1].tolist() + [int(np.random.get_state()[2])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((int(py[-2]), tuple(int(v) for v in py[:-2]), py[-1]))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.asarray(state["numpy"][:-1], dtype=np.uint32),
                         int(state["numpy"][-1]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- what a file is

# the settings of a gissl run worth showing (the identity flags eval rebuilds the model from)
_SHOWN_FLAGS = ("task", "arch", "pretraining", "ss_framework", "frozen", "dataset", "image_size")
_SHOWN_SCALARS = ("epoch", "best_metric", "best_epoch", "global_step")


def describe_checkpoint(path, architecture=None, ss_framework=None):
    """Say what checkpoint ``path`` is, read as data only, without building a model.

    Returns plain data: ``{"path", "format", "bytes", "layout", "what", "stored", "encoder",
    "refused"}``; ``encoder`` is :func:`gissl.models.pretrained.inspect_encoder`'s report (the
    prefix the loader chooses, the architecture held, dropped keys, the strict fit into
    ``architecture``). Raises :class:`CheckpointError` for a missing file or one that is not a
    checkpoint.
    """
    from gissl.models.pretrained import inspect_encoder  # that module imports this one
    path = os.fspath(path)
    out = {"path": path, "format": None, "bytes": os.path.getsize(path) if os.path.isfile(path) else None,
           "layout": None, "what": None, "stored": {}, "encoder": None, "refused": None}
    try:
        obj = load_file(path)
    except CheckpointError as e:
        if not (os.path.isfile(path) and zipfile.is_zipfile(path) and _is_torchscript(path)):
            raise
        # a program, not data: name the modules its code/ folder holds; nothing is unpickled
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        modules = sorted({n.split("/code/__torch__/", 1)[1].rsplit(".", 1)[0].replace("/", ".")
                          for n in names if "/code/__torch__/" in n and n.endswith(".py")})
        out.update(format="TorchScript archive (torch.jit.save)", layout="torchscript", refused=str(e),
                   what="TorchScript program, not a checkpoint of weights"
                        + (f" (code: {', '.join(modules)})" if modules else ""))
        return out
    out["format"] = _file_format(path)
    out["encoder"] = enc = inspect_encoder(obj, path, architecture, ss_framework)
    out["layout"], out["what"] = _layout(obj, path, enc)
    out["stored"] = _stored(obj, out["layout"])
    out["refused"] = enc["refused"]
    return out


def _file_format(path):
    if path.endswith(".safetensors"):
        return "safetensors"
    with open(path, "rb") as f:
        return "torch.save archive" if f.read(2) == b"PK" else "torch.save pickle (legacy format)"


def _layout(obj, path, enc):
    """(short name, sentence) of the layout: which training code writes files like this one."""
    prefix, container = enc["prefix"], enc["container"]
    top = obj if isinstance(obj, dict) else {}
    state = top.get(container) if container else obj
    keys = list(state)
    settings = top.get("args")
    epoch = f", epoch {top['epoch']}" if isinstance(top.get("epoch"), int) else ""
    if container == "teacher":
        return "dino", f"DINO main_dino.py training checkpoint (student/teacher{epoch})"
    if container == "model_state_dict":
        from gissl.models.ssl4gie_checkpoints import is_vit_detector, task_of
        task = task_of(state) or "<task>"
        kind = ", a ViT detector: ViT + SSL4GIE's pyramid with LayerNorms over (C, H, W), 1024-px canvas " \
               "(read as --pyramid ssl4gie)" if task == "detection" and is_vit_detector(state) else ""
        return "ssl4gie-finetuned", f"SSL4GIE train_{task}.py finetuned checkpoint (model_state_dict{epoch}{kind}); " \
                                    f"eval_{task}.py / predict_{task}.py --weights FILE use the whole model"
    if container == "state_dict" and "pytorch-lightning_version" in top:
        return "lightning", f"PyTorch Lightning checkpoint (Lightning {top['pytorch-lightning_version']}{epoch}; " \
                            f"the LightningModule's state dict, the encoder under '{prefix}', e.g. CovidPrognosis's MoCo)"
    if container == "state_dict" and prefix.startswith("module.base_encoder."):
        return "mocov3", f"MoCo v3 main_moco.py checkpoint ('arch' {top.get('arch')!r}{epoch})"
    if container == "state_dict" and prefix == "module.visual." and "module.image_mlp.layer1.weight" in state:
        name = getattr(settings, "model", None)
        towers = "image and text towers, SimCLR head" if "module.image_projection" in state else "SimCLR image tower"
        return "slip", f"SLIP main.py checkpoint ({towers}; 'args' model {name!r}{epoch})"
    if container == "state_dict" and prefix == "module.visual." and "module.image_projection" in state:
        return "slip", f"SLIP main.py CLIP checkpoint ('args' model {getattr(settings, 'model', None)!r}{epoch})"
    if container is None and any(k in state for k in ("visual.class_embedding", "visual.attnpool.positional_embedding")):
        vit = "visual.class_embedding" in state
        return "openai-clip", "OpenAI CLIP / open_clip state dict: " + (
            "both towers load (gissl.models.clip.load_clip; the image tower into vit_*_clip)" if vit else
            "a ResNet, whose text tower loads (gissl.models.clip.load_text_tower) and image tower fits no gissl encoder")
    if container == "state_dict" and "encoder_q" in prefix:
        return "mocov2", f"MoCo v1/v2 main_moco.py checkpoint ('arch' {top.get('arch')!r}{epoch})"
    if container == "model":
        task = settings.get("task") if isinstance(settings, dict) else None
        ssl = any(k.startswith(("momentum_encoder.", "projector.", "predictor.")) for k in keys)
        if task == "pretraining" or (prefix == "encoder." and ssl and task is None):
            return "gissl-pretrain", f"gissl pretrain.py full training state (checkpoint.pth{epoch})"
        if prefix == "encoder.":
            what = f"train_{task}.py" if task else "a train_<task>.py script (no stored flags)"
            return "gissl-finetuned", f"gissl finetuned checkpoint written by {what}{epoch}"
        if prefix == "module.backbone." and any(k.startswith("module.projector.") for k in keys):
            return "barlowtwins", f"Barlow Twins main.py training checkpoint (DDP backbone + projector{epoch})"
        if prefix == "" and any(k.startswith("decoder_") or k == "mask_token" for k in keys):
            return "mae-pretrain", f"MAE main_pretrain.py checkpoint (encoder + decoder{epoch})"
        if prefix == "" and enc["family"] == "vit":
            return "mae-release", "{'model': ViT state dict} (MAE's released mae_pretrain_vit_*.pth layout)"
    if container is None and prefix == "backbone." and "embeddings.1.weight" in state:
        dims = state["embeddings.1.weight"].shape[0]
        backbone = _SSCD_BACKBONES.get(("CV", enc["architecture"]), "CV_*")
        return "sscd-classy", f"SSCD Classy Vision weights (sscd Model '{backbone}': backbone.* in Classy Vision " \
                              f"names, read as torchvision's; embeddings.1 the {dims}-d descriptor Linear after GeM)"
    if container is None and prefix == "backbone." and "backbone.fc.weight" in state:
        dims = state["backbone.fc.weight"].shape[0]
        backbone = _SSCD_BACKBONES.get(("TV", enc["architecture"]), "TV_*")
        return "sscd-torchvision", f"SSCD torchvision weights (sscd Model '{backbone}': backbone.* with a {dims}-d " \
                                   "descriptor fc)"
    if container is None and prefix == "":
        head = "fc" if enc["family"] == "resnet" else "head"
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.dim() == 2:
            name, lib = ("torchvision", "torchvision ResNet") if head == "fc" else ("timm", "timm VisionTransformer")
            return name, f"{lib} state dict with a {weight.shape[0]}-class {head} classifier"
        if any(k.startswith(f"{head}.0.") for k in keys):
            return "ssl-extracted", f"flat encoder with its SSL projector ({head}.*), e.g. an extracted MoCo v3 " \
                                    "base encoder"
        named = "gissl pretrain.py encoder.pth: " if os.path.basename(path) == "encoder.pth" else ""
        return "flat-encoder", f"{named}flat encoder state dict (gissl encoder.pth, Barlow Twins resnet50.pth, " \
                               "DINO's released backbones, an extracted MoCo v3 base encoder)"
    where = f"under '{container}'" if container else "flat"
    return "state-dict", f"state dict of tensors ({where}) from no training code gissl names"


def _stored(obj, layout):
    """What the file stores besides the weights: gissl's flags, a run's epoch / metric, other entries."""
    if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {}
    settings = obj.get("args")
    if isinstance(settings, argparse.Namespace):
        settings = vars(settings)
    out = {k: obj[k] for k in _SHOWN_SCALARS if isinstance(obj.get(k), (int, float, str))}
    if isinstance(settings, dict) and layout.startswith("gissl"):
        out.update({k: settings[k] for k in _SHOWN_FLAGS if k in settings})
    elif isinstance(settings, dict):
        out.update({k: settings[k] for k in ("model", "arch", "patch_size", "input_size") if k in settings})
    if isinstance(obj.get("arch"), str):
        out["arch"] = obj["arch"]
    out["entries"] = list(obj)
    return out


def format_description(d):
    """The human-readable block ``python -m gissl.checkpoint`` prints for :func:`describe_checkpoint`."""
    size = "" if d["bytes"] is None else f", {d['bytes'] / 2**20:.1f} MiB" if d["bytes"] >= 2**20 else \
        f", {d['bytes'] / 2**10:.1f} KiB"
    lines = [f"file        {d['path']} ({d['format']}{size})", f"layout      {d['what']}"]
    stored = {k: v for k, v in d["stored"].items() if k != "entries"}
    if stored:
        lines.append("stored      " + ", ".join(f"{k} {v}" for k, v in stored.items()))
    if d["stored"].get("entries"):
        lines.append("entries     " + ", ".join(d["stored"]["entries"]))
    enc = d["encoder"]
    if enc is not None:
        where = f"'{enc['container']}'" if enc["container"] else "the file"
        lines.append(f"tensors     {enc['tensors']} in {where}, {enc['values'] / 1e6:.2f}M values")
        under = f"under '{enc['prefix']}'" if enc["prefix"] else "at the top level (no prefix)"
        lines.append(f"encoder     {under}: {enc['holds']}; {enc['encoder_tensors']} tensors, "
                     f"{enc['encoder_parameters'] / 1e6:.2f}M values")
        if enc["stated"]["text"]:
            lines.append(f"file says   {enc['stated']['text']}")
        if enc["dropped"] or enc["outside"]:
            parts = ([f"under the prefix: {', '.join(enc['dropped'])}"] if enc["dropped"] else []) + \
                    ([f"beside the encoder: {', '.join(enc['outside'])}"] if enc["outside"] else [])
            lines.append("dropped     " + "; ".join(parts))
        lines.append("gissl       " + _fit_line(enc))
    if d["refused"]:
        lines.append(f"refused     {d['refused']}")
    return "\n".join(lines)


def _fit_line(enc):
    fit = enc["fit"]
    flags = f"--architecture {fit['architecture']}" + (f" --ss-framework {fit['ss_framework']}"
                                                        if fit["ss_framework"] else "")
    if fit["loads"] or (enc["architecture"] and not fit["given"]):
        how = "loads strictly" if fit["loads"] else "the keys fit, but the loader refuses the file (below)"
        return f"{flags}: {how}"
    if fit["error"]:
        return f"{flags}: does not load: {fit['error']}" if fit["given"] else f"the loader refuses it: {fit['error']}"
    parts = [f"{what} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
             for what, keys in (("missing", fit["missing"]), ("unexpected", fit["unexpected"]),
                                ("mis-shaped", fit["misshaped"])) if keys]
    head = f"{flags}: does not load strictly" if fit["given"] else \
        f"no gissl architecture fits; the closest, {flags}, differs"
    return f"{head}: {'; '.join(parts)}"


def main(argv=None):
    """``python -m gissl.checkpoint FILE [--architecture A] [--ss-framework F] [--json]``: exit 0
    when the file was understood, 2 with one ``error: ...`` line otherwise."""
    import json
    import sys

    from gissl.errors import UserError
    from gissl.models import ARCHITECTURES, SS_FRAMEWORKS, check_combination
    parser = argparse.ArgumentParser(
        prog="python -m gissl.checkpoint",
        description="Say what a checkpoint file is (its layout, where the encoder sits, the architecture it "
                    "holds, the keys the loader drops) without building a model; the file is read as data only.")
    parser.add_argument("path", help="a .pth / .pth.tar / .pt / .safetensors file")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES),
                        help="also check that the file loads strictly into this encoder (naming the keys if not)")
    parser.add_argument("--ss-framework", choices=sorted(SS_FRAMEWORKS),
                        help="the framework the encoder is built for (MoCo v3's vit_s has 12 attention heads)")
    parser.add_argument("--json", action="store_true", help="print the same as JSON")
    flags = vars(parser.parse_args(argv))
    try:
        if flags["architecture"] and flags["ss_framework"]:
            check_combination(flags["architecture"], "Hyperkvasir", flags["ss_framework"], flags["path"])
        d = describe_checkpoint(flags["path"], flags["architecture"], flags["ss_framework"])
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(d, indent=2, default=str) if flags["json"] else format_description(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
