"""Export a finetuned model to ONNX, and with ``--check`` verify it with onnxruntime.

The model is rebuilt from its checkpoint exactly as the task's eval script does (the model flags
are read from the file), traced on the CPU in fp32 and written as one ONNX file; what the file
takes and returns for each task is in ``gissl/export.py``. Every task but detection exports with
a dynamic batch axis; ``--check`` runs the file on onnxruntime (CPU) for a random batch of another
size and prints the largest difference from PyTorch's output:

    python export.py --task segmentation --weights "Trained models/segmentation/<run name>.pth" \
        --output seg.onnx --check
    python export.py --task retrieval --weights retrieval.pth --output descriptor.onnx --use-head
"""
import argparse
import sys

import torch

from gissl import classification as cls
from gissl import cli, depth
from gissl import detection as det
from gissl import export as ex
from gissl import retrieval as R
from gissl import segmentation as seg
from gissl.errors import UserError
from gissl.models import is_vit

# task -> (its module, the datasets that name its checkpoints)
TASKS = {"classification": (cls, cls.CLASSIFICATION_DATASETS), "segmentation": (seg, seg.DATASETS),
         "depth": (depth, depth.DATASETS), "detection": (det, det.DATASETS), "retrieval": (R, ())}
# eval flags that mean nothing to an export: refused when given rather than silently ignored
UNUSED = {"compile": "--compile", "print_list": "--print-list", "save_predictions": "--save-predictions",
          "untrained": "--untrained"}


def _export_flags(p, task_required=True):
    g = p.add_argument_group("export")
    g.add_argument("--task", required=task_required, choices=list(TASKS),
                   help="which finetuned model the checkpoint holds (its model flags follow: "
                        "--task T --help lists them)")
    g.add_argument("--output", required=True, metavar="FILE.onnx",
                   help="ONNX file to write (atomically: a failed export leaves no file)")
    g.add_argument("--check", action="store_true",
                   help="run the file on onnxruntime (CPU) for a random input of another batch size "
                        "(detection: another image height, ResNet) and compare with PyTorch fp32; "
                        "exit code 1 beyond --atol/--rtol")
    g.add_argument("--opset", type=int, default=17, help="ONNX opset version (FasterRCNN needs 11 or later)")
    g.add_argument("--atol", type=float, default=ex.ATOL, help="--check: absolute tolerance")
    g.add_argument("--rtol", type=float, default=ex.RTOL,
                   help="--check: relative tolerance (× |PyTorch value|; detection boxes are in pixels)")
    return p


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", choices=list(TASKS))
    task = first.parse_known_args(argv)[0].task
    if task is None:  # only the export flags are known until the task is: argparse names what is
        # missing (exit code 2) or, for --help, lists them
        _export_flags(argparse.ArgumentParser(description="Export a finetuned model to ONNX")).parse_args(argv)
    module, datasets = TASKS[task]
    p = cli.task_parser(task, f"Export a finetuned {task} model to ONNX", stage="eval", datasets=datasets,
                        default_image_size=None if task == "detection" else 224,
                        default_arch="vit_b" if task == "retrieval" else "resnet50")
    args = cli.parse(_export_flags(module.add_arguments(p, "eval")), argv)
    given = [flag for name, flag in UNUSED.items() if name in args.given and getattr(args, name, None)]
    if given:
        raise UserError(f"{', '.join(given)} has no effect in export; drop it")
    if args.device == "cuda":
        raise UserError("export traces the model on the CPU in fp32 (the ONNX file then runs anywhere); "
                        "drop --device cuda")
    if args.opset < 11:
        raise UserError(f"--opset {args.opset}: use 11 or later (torchvision's detection ops need 11)")
    return args


def load(args):
    """The finetuned model of ``--weights`` (or the flags), built as the task's eval script builds it."""
    task, device = args.task, torch.device("cpu")
    module = TASKS[task][0]
    if task == "retrieval":  # --train-dataset names the checkpoint (eval_retrieval.py)
        state, path = cli.finetuned(args, cli.model_flags(R.build_model), dataset=args.train_dataset,
                                    data_flags=("image_size",))
    elif task == "classification":
        state, path = cli.finetuned(args, ("split",))
    elif task == "detection":
        state, path = cli.finetuned(args, cli.model_flags(det.build_model, num_classes=None),
                                    legacy=det.LEGACY_SETTINGS)
        if args.pyramid == "ssl4gie":
            # its CLS-less windowed attention traces to zero-size reshapes that onnxruntime rejects
            raise UserError(f"'{path}' is one of SSL4GIE's ViT detectors (--pyramid ssl4gie), which export.py "
                            "does not write to ONNX; evaluate or draw it with eval_detection.py / "
                            "predict_detection.py --weights FILE")
    else:
        state, path = cli.finetuned(args, cli.model_flags(module.build_model),
                                    legacy=depth.LEGACY_SETTINGS if task == "depth" else None)
    known, encoder_kwargs = {}, dict(img_size=args.image_size)
    if task in ex.NUM_CLASSES_KEYS:  # read from the weights, so that no dataset is needed
        known["num_classes"] = ex.num_classes(task, state["model"], path)
    if task == "detection":
        args.image_size = args.image_size or det.default_image_size(args.arch)
        encoder_kwargs = {}
        # the data flags do not matter to an export: only the model's settings are checked
        det.check_settings(arch=args.arch, image_size=args.image_size, dataset=None, annotations=None,
                           data_root=None, proposals=args.proposals, roi_samples=args.roi_samples)
    model = cli.finetuned_model(args, module.build_model, state, path, device, encoder_kwargs, compile=False,
                                pretrained=False, **known)
    return model, path


def main(args):
    model, path = load(args)
    task = args.task
    module, inputs, outputs = ex.exportable(task, model, image_size=args.image_size,
                                             use_head=getattr(args, "use_head", False))
    resizes = task == "detection" and not is_vit(args.arch)  # the graph resizes any image size
    ex.export_onnx(module, args.output, example=ex.example_inputs(task, args.image_size),
                   input_names=inputs, output_names=outputs, dynamic_batch=task != "detection",
                   opset=args.opset, dynamic_axes=ex.dynamic_axes(task, any_image_size=resizes))
    print(f"{task} model '{path}' exported to {args.output}: {ex.describe(task, args.image_size, resizes)}",
          flush=True)
    if args.check:
        sample = ex.example_inputs(task, args.image_size, batch=3, seed=1,
                                   height=args.image_size + 32 if resizes else None)
        try:
            diffs = ex.check_onnx(module, args.output, sample, atol=args.atol, rtol=args.rtol)
        except ex.ParityError as e:
            sys.exit(f"error: {e}")
        print(f"onnxruntime vs PyTorch on a random input {tuple(sample.shape)}: max |difference| "
              + ", ".join(f"{name} {d:.3g}" for name, d in diffs.items()), flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
