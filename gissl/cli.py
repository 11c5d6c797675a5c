"""The command line shared by every task script.

SSL4GIE's flags keep their names and meanings (ssl4gie.md §1) so its users can switch
without relearning; gissl adds the same extra flags to every script (DESIGN.md).
"""
import argparse
import datetime
import os
import sys
from pathlib import Path

from gissl.errors import UserError

ARCH_CHOICES = ["resnet18", "resnet50", "vit_t", "vit_s", "vit_b"]
PRETRAINING_CHOICES = ["Hyperkvasir", "ImageNet_self", "ImageNet_class", "random"]
FRAMEWORK_CHOICES = ["mocov3", "barlowtwins", "mae", "simsiam", "fpsiam"]
# which SSL frameworks fit which encoder family (ssl4gie.md §3.7: BT is ResNet-only,
# MAE ViT-only; SimSiam/FPSiam are defined on ResNets)
FRAMEWORK_FAMILIES = {"mocov3": ("resnet", "vit"), "barlowtwins": ("resnet",), "mae": ("vit",),
                      "simsiam": ("resnet",), "fpsiam": ("resnet",)}


def task_parser(task, description, *, stage="train", datasets=(), default_epochs=50,
                default_batch_size=16, default_image_size=224, default_lr=1e-4,
                default_dataset=None, default_arch="resnet50"):
    """An ``ArgumentParser`` with every shared flag; add task-specific flags to it.

    ``stage`` is ``train``, ``eval`` or ``predict``; ``task`` names the output folders
    (``Trained models/<task>``, ``Predictions/<task>-<dataset>``).
    """
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(task=task, stage=stage)
    g = p.add_argument_group("model")
    g.add_argument("--architecture", dest="arch", default=default_arch,
                   choices=ARCH_CHOICES,
                   help="encoder; resnet18/vit_t/vit_s are small variants for CPU experiments")
    g.add_argument("--pretraining", default="random", choices=PRETRAINING_CHOICES,
                   help="where the encoder's initial weights come from: Hyperkvasir/ImageNet_self "
                        "= a self-supervised checkpoint (needs --ss-framework and --checkpoint), "
                        "ImageNet_class = supervised ImageNet weights from a local file, random = none")
    g.add_argument("--ss-framework", dest="ss_framework", default=None, choices=FRAMEWORK_CHOICES,
                   help="self-supervised method that produced --checkpoint")
    g.add_argument("--checkpoint", default=None,
                   help="pretrained encoder weights (any layout: gissl, official MoCo v3 / MAE / "
                        "Barlow Twins releases, torchvision/timm state dicts)" + (
                       "" if stage == "train" else "; training only: eval/predict read the finetuned "
                       "model that the other flags name under --output-dir, so it is refused here"))
    # Eval/predict scripts that build an encoder from --checkpoint themselves (a probe of the
    # pretrained encoder, retrieval --untrained) set this to True.
    p.set_defaults(encoder_checkpoint=stage == "train")
    g.add_argument("--frozen", action="store_true",
                   help="freeze the encoder (no gradients, BatchNorm statistics fixed); only the "
                        "head/decoder trains")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=default_dataset or (datasets[0] if datasets else None),
                   choices=list(datasets) or None, help="dataset name (on-disk format)")
    d.add_argument("--data-root", dest="data_root", default=None,
                   help="dataset folder as downloaded; omit it to use the built-in synthetic data")
    d.add_argument("--image-size", dest="image_size", type=int, default=default_image_size,
                   help="side of the square network input in pixels")
    d.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading worker processes per GPU/process")
    d.add_argument("--skip-bad-files", dest="skip_bad_files", action="store_true",
                   help="skip unreadable or unpaired files with a warning instead of stopping")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-identical reruns on CPU; on GPU some "
                        "kernels are slower or raise an error naming the operation)")
    r.add_argument("--no-amp", dest="no_amp", action="store_true",
                   help="run in fp32 (default: bf16 autocast where supported, CPU included; fp16 on "
                        "older GPUs)")
    r.add_argument("--batch-size", dest="batch_size", type=int, default=default_batch_size,
                   help="global batch size, split over all processes")
    r.add_argument("--output-dir", dest="output_dir", default=None,
                   help=f"folder for checkpoints and logs (default 'Trained models/{task}')")
    if stage == "train":
        t = p.add_argument_group("training")
        t.add_argument("--epochs", type=int, default=default_epochs)
        t.add_argument("--learning-rate", dest="learning_rate", type=float, default=default_lr,
                       help="AdamW learning rate (the reference's 1e-4)")
        t.add_argument("--learning-rate-scheduler", dest="learning_rate_scheduler",
                       action="store_true",
                       help="halve the learning rate when the validation metric has not improved "
                            "for 10 epochs (as SSL4GIE)")
        t.add_argument("--learning-rate-scheduler-minimum", dest="learning_rate_scheduler_minimum",
                       type=float, default=1e-6)
        t.add_argument("--accum_iter", "--accum-iter", dest="accum_iter", type=int, default=1,
                       help="accumulate gradients over this many batches per optimizer step")
        t.add_argument("--clip-grad", dest="clip_grad", type=float, default=None,
                       help="clip the global gradient norm to this value")
        t.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.01,
                       help="AdamW weight decay (not applied to norms, biases and tokens)")
        t.add_argument("--compile", action="store_true",
                       help="torch.compile the model for training (the first steps compile for a "
                            "minute or more; pays off on long runs; on CPU it needs a C++ compiler)")
        t.add_argument("--resume-anyway", dest="resume_anyway", action="store_true",
                       help="resume the run in --output-dir even though its dataset, --data-root, "
                            "architecture or a model flag differ from this command's (by default "
                            "that stops: it would continue another experiment)")
        t.add_argument("--skip-nonfinite", dest="skip_nonfinite", type=int, default=0, metavar="N",
                       help="skip up to N optimiser steps whose loss is NaN/inf (no update) before "
                            "stopping, e.g. rare fp16 overflows; 0 stops at the first (exit code 1)")
    if stage == "eval":
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the model for evaluation (compiling takes a minute or more: "
                            "for large test sets; on CPU it needs a C++ compiler)")
        p.add_argument("--print-list", dest="print_list", action="store_true",
                       help="print the per-image scores as a Python list (as SSL4GIE)")
        p.add_argument("--save-predictions", dest="save_predictions", default=None, metavar="PATH",
                       help="write the predictions to PATH")
    if stage == "predict":
        p.add_argument("--idx", default=None,
                       help="comma-separated 0-based positions in the test split, e.g. 11,468 "
                            "(default: every test image)")
    return p


def check_args(args):
    """Reject invalid flag combinations before any work (UserError → exit code 2)."""
    arch, pre, ss = args.arch, args.pretraining, args.ss_framework
    family = "vit" if arch.startswith("vit") else "resnet"
    if pre in ("Hyperkvasir", "ImageNet_self") and getattr(args, "stage", "train") == "train":
        if ss is None:
            raise UserError(f"--pretraining {pre} needs --ss-framework (one of "
                            f"{', '.join(FRAMEWORK_CHOICES)})")
        if args.checkpoint is None:
            raise UserError(f"--pretraining {pre} needs --checkpoint PATH (the pretrained weights)")
    if ss is not None and family not in FRAMEWORK_FAMILIES[ss]:
        allowed = ", ".join(a for a in ARCH_CHOICES if
                            ("vit" if a.startswith("vit") else "resnet") in FRAMEWORK_FAMILIES[ss])
        raise UserError(f"--ss-framework {ss} does not apply to --architecture {arch}; "
                        f"use one of {allowed}")
    if getattr(args, "checkpoint", None) and not getattr(args, "encoder_checkpoint", True) and not \
            getattr(args, "untrained", False):
        other = ("--weights FILE for a finetuned checkpoint, or --untrained to use --checkpoint's encoder "
                 "as it is" if hasattr(args, "weights") else
                 "--output-dir and the training flags (--architecture, --pretraining, --ss-framework, "
                 "--frozen, --dataset) to pick the finetuned model")
        raise UserError(f"--checkpoint is the pretrained encoder for training and has no effect in "
                        f"{args.stage}: this script reads the finetuned model instead; drop "
                        f"--checkpoint and use {other}")
    if getattr(args, "checkpoint", None) and not os.path.isfile(args.checkpoint):
        raise UserError(f"--checkpoint '{args.checkpoint}' does not exist")
    if args.image_size % 32:
        raise UserError(f"--image-size {args.image_size} must be a multiple of 32")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if getattr(args, "accum_iter", 1) < 1:
        raise UserError("--accum_iter must be at least 1")
    if getattr(args, "epochs", 1) < 1:
        raise UserError("--epochs must be at least 1")
    if getattr(args, "idx", None) is not None:
        try:
            args.idx_list = [int(v) for v in str(args.idx).split(",") if v.strip() != ""]
        except ValueError:
            raise UserError(f"--idx '{args.idx}' must be comma-separated integers, e.g. 11,468") from None
        if not args.idx_list:
            raise UserError("--idx is empty")
    return args


def run_name(args):
    """The SSL4GIE checkpoint name (ssl4gie.md §4.4), e.g.
    ``vit_b-Hyperkvasir_mae_init-frozen_False-dataset_Kvasir``."""
    ss = f"_{args.ss_framework}" if args.ss_framework else ""
    return (f"{args.arch}-{args.pretraining}{ss}_init-frozen_{bool(args.frozen)}"
            f"-dataset_{args.dataset}")


def output_dir(args):
    return Path(args.output_dir) if args.output_dir else Path("Trained models") / args.task


def predictions_dir(args):
    return Path("Predictions") / f"{args.task}-{args.dataset}"


def data_root(args):
    """``--data-root``, or the built-in synthetic copy of ``--dataset`` (made once, cached)."""
    if args.data_root:
        if not os.path.isdir(args.data_root):
            raise UserError(f"--data-root '{args.data_root}' is not a folder")
        return args.data_root
    from gissl.data.synthetic import synthetic_root
    root = synthetic_root(args.dataset)
    from gissl import dist
    if dist.is_main_process():
        print(f"No --data-root given: using the built-in synthetic {args.dataset} dataset at {root}",
              flush=True)
    return root


def encoder_from_args(args, **kwargs):
    """``gissl.models.build_encoder`` with the script's model flags.

    Eval and predict build a randomly initialised encoder: the finetuned checkpoint
    overwrites every weight, so nothing pretrained needs to be present (the reference
    downloaded ImageNet weights only to overwrite them, ssl4gie.md §8 item 4)."""
    from gissl.models import build_encoder, vit_num_heads
    if getattr(args, "stage", "train") != "train":
        # the head count follows --ss-framework (MoCo v3's ViT-S), as when training
        return build_encoder(args.arch, num_heads=vit_num_heads(args.arch, args.ss_framework), **kwargs)
    return build_encoder(args.arch, pretraining=args.pretraining, ss_framework=args.ss_framework,
                         checkpoint=args.checkpoint, **kwargs)


def trained_path(args):
    """Where the finetuned ``best`` checkpoint of this run lives (eval/predict read it)."""
    return output_dir(args) / (run_name(args) + ".pth")


def load_trained(model, args, path=None):
    """Load the finetuned weights of this run (or of the gissl checkpoint ``path``) into
    ``model``, strictly; a missing or non-fitting file is a CheckpointError."""
    from gissl.checkpoint import load_file
    from gissl.errors import CheckpointError
    path = Path(path) if path is not None else trained_path(args)
    if not path.is_file():
        raise CheckpointError(
            f"no finetuned model at '{path}'; train it first with the same flags "
            f"(train_{args.task}.py ...), or point --output-dir at the folder that holds it")
    from gissl.models.pretrained import load_model_state
    state = load_file(path)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"'{path}' is not a gissl finetuned checkpoint (no 'model' key); pass the "
                              f".pth file that train_{args.task}.py wrote")
    load_model_state(model, state["model"], path, hint="Use the same --architecture and model flags "
                     "as in training, or the checkpoint of this model")
    return state


def append_eval_results(title, name, metrics, path="eval_results.txt"):
    """Append SSL4GIE-style lines: ``{title} for {name} @ {timestamp}`` then ``Key: value``."""
    lines = [f"{title} for {name} @ {datetime.datetime.now()}"]
    lines += [f"{k}: {v}" for k, v in metrics.items()]
    text = "\n".join(lines)
    print(text, flush=True)
    with open(path, "a") as f:
        f.write(text + "\n")


def set_deterministic():
    """Deterministic kernels everywhere (cuBLAS needs its workspace setting for that)."""
    import torch
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op with no deterministic kernel (CUDA only, e.g. the backward of bilinear
    # interpolate in the DPT decoders) warns instead of stopping a run that is deterministic
    # everywhere else; on CPU every op gissl uses has one, and two runs are bit-identical.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def seed_everything(seed):
    """Seed torch, numpy and ``random`` from ``--seed`` before any model is built, so a random
    initialisation (heads, decoders, a ``--pretraining random`` encoder) is the same on every
    run and every rank: random-init baselines are reproducible, not one draw per run."""
    import random

    import numpy as np
    import torch
    seed = int(seed or 0)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def user_message(e):
    """The message of UserError ``e``. One raised in a DataLoader worker (e.g. an image that fails
    to decode) reaches the main process re-raised by torch with the worker's whole traceback in
    its message; only the original message, the traceback's last entry, is kept."""
    text = str(e)
    if "Original Traceback" in text:
        marker = f"{type(e).__module__}.{type(e).__qualname__}: "
        text = text.rsplit(marker, 1)[-1].strip()
    return text


def run(main, get_args):
    """Run ``main(get_args())``; bad input (UserError) prints one line and exits with 2."""
    from gissl import dist
    from gissl.engine import NonFiniteLossError, TrainingInterrupted
    try:
        args = get_args()
        if getattr(args, "deterministic", False):
            set_deterministic()
        seed_everything(getattr(args, "seed", 0))
        main(args)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        dist.cleanup()
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        dist.cleanup()
        sys.exit(1)
    except TrainingInterrupted as e:
        print(f"{e}", file=sys.stderr, flush=True)
        dist.cleanup()
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept, re-run the same command "
              "to resume", file=sys.stderr, flush=True)
        sys.exit(130)
    dist.cleanup(wait_for_peers=True)
