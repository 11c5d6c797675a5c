"""ONNX export of the finetuned task models, and its check against PyTorch with onnxruntime.

The exporter is torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``): with
torch 2.14 the default torch.export-based exporter needs the ``onnxscript`` package, which gissl
does not depend on, while the TorchScript one needs nothing beyond torch and gives files whose
onnxruntime outputs equal PyTorch's fp32 ones within 1e-4 for every task here, the whole Faster
R-CNN included (measured: at most 2e-5 on logits, 2e-4 px on boxes; tests/test_export.py). What
each task's file takes and returns (``images`` is float32):

- classification: ``images`` (N, 3, S, S) ImageNet-normalised -> ``logits`` (N, K)
- segmentation: ``images`` (N, 3, S, S) normalised -> ``logits`` (N, 1, S, S) (sigmoid > 0.5 = polyp)
- depth: ``images`` (N, 3, S, S) normalised -> ``depth`` (N, 1, S, S) relative depth, model
  unit (1 = 100 mm before alignment)
- retrieval: ``images`` (N, 3, S, S) normalised -> ``descriptors`` (N, D) L2-normalised
  (:class:`gissl.retrieval.DescriptorModel`)
- detection: ``images`` (1, 3, H, W) in [0, 1], not normalised (the model's own transform
  normalises and resizes, as in eval) -> ``boxes`` (D, 4) xyxy in input pixels, ``labels`` (D,)
  int64, ``scores`` (D,), the whole torchvision Faster R-CNN with its NMS. One image per run:
  tracing unrolls torchvision's per-image loops, so the batch is fixed at 1. ResNet detectors
  take any H, W (the graph resizes the short side to the training ``--image-size``); ViT ones the
  padded square canvas of ``--image-size``, their position embedding stored at that size
  (:func:`fixed_position_embedding`).

N is dynamic (any batch size) for every task but detection; S is fixed at the export size.
"""
import copy
import os
import tempfile
import warnings

import numpy as np
import torch

from gissl.errors import CheckpointError, UserError

TASKS = ("classification", "segmentation", "depth", "detection", "retrieval")
OUTPUT_NAMES = {"classification": ("logits",), "segmentation": ("logits",), "depth": ("depth",),
                "retrieval": ("descriptors",), "detection": ("boxes", "labels", "scores")}
# where a finetuned checkpoint's class count is read (the number of rows of the last layer)
NUM_CLASSES_KEYS = {"classification": "head.weight", "detection": "roi_heads.box_predictor.cls_score.weight"}
ATOL, RTOL = 1e-4, 1e-4  # fp32 onnxruntime vs PyTorch; measured differences are ~1e-6 (tests/test_export.py)


class ParityError(Exception):
    """The ONNX file's outputs differ from the PyTorch model's beyond the tolerance."""


class Detections(torch.nn.Module):
    """A torchvision detector in eval mode as a tensor-in, tensors-out module for export:
    ``images`` (1, 3, H, W) in [0, 1] -> ``boxes`` (D, 4), ``labels`` (D,), ``scores`` (D,)."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images):
        out = self.detector(list(images.unbind(0)))[0]
        return out["boxes"], out["labels"], out["scores"]


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs the 'onnx' and 'onnxruntime' packages; run "
                        "'pip install onnx onnxruntime'") from None
    return onnx, onnxruntime


def export_onnx(model, path, *, example, input_names, output_names, dynamic_batch=True, opset=17,
                dynamic_axes=None):
    """Write ``model`` (eval mode, fp32) as an ONNX file at ``path``, traced on ``example`` (a
    tensor or a tuple of them), and return ``path``.

    ``dynamic_batch``: axis 0 of every input and output may take any size. ``dynamic_axes``: more
    ``{name: {axis: label}}`` (e.g. a detector's image height/width and detection count). The file
    is written beside ``path`` under a temporary name, checked with ``onnx.checker`` and renamed
    over ``path`` (as :func:`gissl.checkpoint.save_atomic`): a failed export leaves no file.
    """
    onnx, _ = _onnx_modules()
    example = example if isinstance(example, tuple) else (example,)
    axes = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else {}
    for name, extra in (dynamic_axes or {}).items():
        axes[name] = {**axes.get(name, {}), **extra}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=folder)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the legacy-exporter notice, and tracer notes on shape arithmetic in torchvision's
            # detection code: the parity check (check_onnx) is what says the graph is right
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(model.eval(), example, tmp, input_names=list(input_names),
                              output_names=list(output_names), opset_version=opset, dynamo=False,
                              dynamic_axes=axes or None, do_constant_folding=True)
        onnx.checker.check_model(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); an exported model is for sharing, so it gets
        # the permissions of any file this process creates
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def run_onnx(path, inputs):
    """The outputs of ONNX file ``path`` for ``inputs`` (tensors, in the file's input order) on
    onnxruntime's CPU provider, as a list of numpy arrays."""
    return _run(path, inputs)[1]


def _run(path, inputs):
    """(output names, outputs) of ONNX file ``path`` for ``inputs`` on onnxruntime's CPU provider."""
    _, ort = _onnx_modules()
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ParityError(f"'{path}' takes {len(names)} inputs ({', '.join(names)}), {len(inputs)} were given")
    outputs = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})
    return [o.name for o in session.get_outputs()], outputs


def check_onnx(model, path, inputs, atol=ATOL, rtol=RTOL):
    """Compare ONNX file ``path`` run by onnxruntime (CPU) with ``model`` in fp32 eval mode on
    ``inputs`` (a tensor or tuple of tensors). Returns ``{output name: max |difference|}``;
    raises :class:`ParityError` naming the output and its max difference when any element is
    beyond ``atol + rtol * |reference|`` or a shape / dtype differs."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    names, got = _run(path, inputs)
    device = next(model.parameters()).device
    with torch.no_grad():
        ref = model.eval().float()(*(t.to(device) for t in inputs))
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(ref) != len(got):
        raise ParityError(f"'{path}' has {len(got)} outputs, the PyTorch model {len(ref)}")
    diffs = {}
    for name, g, r in zip(names, got, ref):
        r = r.detach().cpu().numpy()
        if g.shape != r.shape:
            raise ParityError(f"ONNX output '{name}' has shape {g.shape}, PyTorch {r.shape} (for a detector: "
                              "a different number of detections)")
        if g.dtype.kind != r.dtype.kind:
            raise ParityError(f"ONNX output '{name}' is {g.dtype}, PyTorch {r.dtype}")
        diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
        diffs[name] = float(diff.max()) if diff.size else 0.0
        if not np.all(np.isfinite(g) == np.isfinite(r)) or np.any(diff > atol + rtol * np.abs(r)):
            raise ParityError(f"ONNX output '{name}' differs from PyTorch by up to {diffs[name]:.3g} "
                              f"(tolerance {atol:g} + {rtol:g} x |value|) in '{path}'")
    return diffs


def fixed_position_embedding(model, image_size):
    """``model`` (a copy, where anything changes) with the position embedding of each ViT in it
    stored for the ``image_size`` token grid, so that the traced graph holds it as a constant.

    A ViT detector's encoder keeps its 224-px embedding and resamples it to the canvas grid in
    every forward pass, by bicubic interpolation with antialias, which no ONNX opset of torch's
    exporter supports; the canvas is fixed, so the resampled embedding is too (same values)."""
    from gissl.models.vit import VisionTransformer
    vits = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    if not any(v.pos_grid != (image_size // v.patch_size,) * 2 for v in vits):
        return model
    model = copy.deepcopy(model)
    for vit in (m for m in model.modules() if isinstance(m, VisionTransformer)):
        grid = (image_size // vit.patch_size,) * 2
        with torch.no_grad():
            vit.pos_embed = torch.nn.Parameter(vit.pos_embed_for(*grid).detach().clone())
        vit.pos_grid = grid
    return model


def exportable(task, model, *, image_size=None, use_head=False):
    """The module to export for ``task`` and its input / output names: the model itself, the
    retrieval :class:`~gissl.retrieval.DescriptorModel` (``use_head``: after the projection), or
    :class:`Detections` around a Faster R-CNN; with ``image_size``, ViT position embeddings are
    fixed at that size (:func:`fixed_position_embedding`). Returns ``(module, input_names,
    output_names)``."""
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    if image_size is not None:
        model = fixed_position_embedding(model, image_size)
    if task == "retrieval":
        from gissl.retrieval import DescriptorModel
        model = DescriptorModel(model, use_head=use_head)
    elif task == "detection":
        model = Detections(model)
    return model.eval(), ("images",), OUTPUT_NAMES[task]


def example_inputs(task, image_size, *, batch=2, seed=0, height=None):
    """A random input for ``task``: (batch, 3, S, S) normal (normalised images), or for detection
    (1, 3, height or S, S) uniform in [0, 1] (a detector takes one unnormalised image)."""
    g = torch.Generator().manual_seed(seed)
    if task == "detection":
        return torch.rand(1, 3, height or image_size, image_size, generator=g)
    return torch.randn(batch, 3, image_size, image_size, generator=g)


def dynamic_axes(task, *, any_image_size=False):
    """The export's dynamic axes beyond the batch: a detector's detection count, and with
    ``any_image_size`` (ResNet detectors, which resize inside the graph) its image height / width."""
    if task != "detection":
        return {}
    axes = {n: {0: "detections"} for n in OUTPUT_NAMES["detection"]}
    if any_image_size:
        axes["images"] = {2: "height", 3: "width"}
    return axes


def num_classes(task, weights, path):
    """The class count of a finetuned ``task`` checkpoint's ``weights`` (its last layer's rows;
    for detection it counts the background), so that export needs no dataset."""
    key = NUM_CLASSES_KEYS[task]
    if key not in weights:
        raise CheckpointError(f"'{path}' has no '{key}', so it is no {task} checkpoint written by "
                              f"train_{task}.py; pass the .pth file that script wrote")
    return int(weights[key].shape[0])


def describe(task, image_size, any_image_size=False):
    """One line saying what the exported file of ``task`` takes and returns."""
    s = image_size
    if task == "detection":
        shape = "(1, 3, H, W)" if any_image_size else f"(1, 3, {s}, {s})"
        return (f"images {shape} float32 in [0, 1] -> boxes (D, 4) xyxy pixels, labels (D,) int64, "
                "scores (D,)")
    out = {"classification": "logits (N, K)", "segmentation": f"logits (N, 1, {s}, {s})",
           "depth": f"depth (N, 1, {s}, {s}) relative, 1 = 100 mm", "retrieval": "descriptors (N, D) L2-normalised"}
    return f"images (N, 3, {s}, {s}) float32 ImageNet-normalised -> {out[task]}"
