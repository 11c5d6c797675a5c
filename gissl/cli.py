"""The command line shared by every script: the only module that reads an argparse Namespace.

SSL4GIE's flags keep their names and meanings (docs/ssl4gie-study.md §1) so its users can switch
without relearning; gissl adds the same extra flags to every script. Each task module adds
its own flags with ``add_arguments(parser, stage)`` and otherwise takes keyword arguments;
the functions here turn flags into those keyword arguments (:func:`encoder`,
:func:`model_kwargs`, :func:`train`, :func:`finetuned`, ...) so that a script reads as
parse → build → train or evaluate → report.
"""
import argparse
import copy
import inspect
import os
import sys
from pathlib import Path

from gissl.errors import UserError
from gissl.models import ARCHITECTURES, PRETRAININGS, SS_FRAMEWORKS, check_combination

ARCH_CHOICES = list(ARCHITECTURES)
PRETRAINING_CHOICES = list(PRETRAININGS)
FRAMEWORK_CHOICES = list(SS_FRAMEWORKS)
# The flags that say which model a finetuned checkpoint holds: eval and predict take them from
# the checkpoint, and one given on the command line must agree with it. (Data flags such as
# --image-size and --dataset default to the checkpoint's but may differ: evaluating a model at
# another size or on another dataset is a legitimate experiment.)
IDENTITY_FLAGS = ("arch", "pretraining", "ss_framework", "frozen")
DATA_FLAGS = ("image_size", "dataset")


def task_parser(task, description, *, stage="train", datasets=(), default_epochs=50,
                default_batch_size=16, default_image_size=224, default_lr=1e-4,
                default_dataset=None, default_arch="resnet50", cosine_warmup=None,
                default_output_dir=None, encoder_checkpoint=False, weights=True):
    """An ``ArgumentParser`` with every shared flag; add task-specific flags to it.

    ``stage`` is ``train``, ``eval`` or ``predict``; ``task`` names the output folders
    (``Trained models/<task>``, ``Predictions/<task>-<dataset>``). ``cosine_warmup``: offer
    ``--cosine`` with ``--warmup-epochs`` defaulting to this value (train stage).
    ``encoder_checkpoint``: an eval/predict script that builds a pretrained encoder itself (a
    probe of it, retrieval ``--untrained``) and so takes ``--checkpoint`` too. ``weights``: an
    eval/predict script of a finetuned model, which takes ``--weights FILE``.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pretrained = stage == "train" or encoder_checkpoint
    p.set_defaults(task=task, stage=stage, pretrained_encoder=pretrained)
    _model_flags(p, stage, default_arch, pretrained)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=default_dataset or (datasets[0] if datasets else None),
                   choices=list(datasets) or None, help="dataset name (on-disk format)")
    d.add_argument("--data-root", dest="data_root", default=None,
                   help="dataset folder as downloaded; omit it to use the built-in synthetic data")
    d.add_argument("--image-size", dest="image_size", type=int, default=default_image_size,
                   help="side of the square network input, in pixels (a multiple of 32)" +
                        ("" if stage == "train" else "; default: the size the checkpoint was trained at"))
    d.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading worker processes per GPU/process (0 = load in the main process)")
    d.add_argument("--skip-bad-files", dest="skip_bad_files", action="store_true",
                   help="skip unreadable or unpaired files with a warning instead of stopping")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run: auto = the GPU of this process when there is one, else the CPU")
    r.add_argument("--seed", type=int, default=42,
                   help="seeds model initialisation, data order and augmentation (same seed, same run)")
    r.add_argument("--no-amp", dest="no_amp", action="store_true",
                   help="run in fp32 (default: bf16 autocast where supported, CPU included; fp16 on "
                        "older GPUs)")
    r.add_argument("--batch-size", dest="batch_size", type=int, default=default_batch_size,
                   help="images per optimizer step, over all processes (with --accum_iter N each forward "
                        "pass sees batch/N)" if stage == "train" else "images per forward pass")
    r.add_argument("--output-dir", dest="output_dir", default=default_output_dir or f"Trained models/{task}",
                   help="folder for checkpoints and logs")
    if stage == "train":
        _training_flags(p, default_epochs, default_lr, cosine_warmup)
    else:
        _inference_flags(p, stage, weights)
    return p


def _model_flags(p, stage, default_arch, pretrained):
    g = p.add_argument_group("model")
    g.add_argument("--architecture", dest="arch", default=default_arch, choices=ARCH_CHOICES,
                   help="encoder; resnet18/vit_t/vit_s are small variants for CPU experiments")
    g.add_argument("--pretraining", default="random", choices=PRETRAINING_CHOICES,
                   help="where the encoder's initial weights come from: Hyperkvasir/ImageNet_self "
                        "= a self-supervised checkpoint (needs --ss-framework and --checkpoint), "
                        "ImageNet_class = supervised ImageNet weights from a local file, random = none" +
                        ("" if pretrained else "; here it names the finetuned model's checkpoint"))
    g.add_argument("--ss-framework", dest="ss_framework", default=None, choices=FRAMEWORK_CHOICES,
                   help="self-supervised method of the pretrained encoder (with --pretraining "
                        "Hyperkvasir / ImageNet_self)")
    g.add_argument("--frozen", action="store_true",
                   help="freeze the encoder (no gradients, BatchNorm statistics fixed); only the "
                        "head/decoder trains" if stage == "train" else
                   "the model was trained with a frozen encoder (names its checkpoint)")
    if pretrained:
        g.add_argument("--checkpoint", default=None,
                       help="pretrained encoder weights (any layout: gissl, official MoCo v3 / MAE / "
                            "Barlow Twins releases, torchvision/timm state dicts)")
    else:  # not offered, but a user of the training command may still pass it: say why it is refused
        g.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)


def _training_flags(p, default_epochs, default_lr, cosine_warmup):
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=default_epochs, help="passes over the training split")
    t.add_argument("--learning-rate", dest="learning_rate", type=float, default=default_lr,
                   help="peak AdamW learning rate (the reference's 1e-4)")
    t.add_argument("--learning-rate-scheduler", dest="learning_rate_scheduler", action="store_true",
                   help="halve the learning rate when the validation metric has not improved "
                        "for 10 epochs (as SSL4GIE)")
    t.add_argument("--learning-rate-scheduler-minimum", dest="learning_rate_scheduler_minimum",
                   type=float, default=1e-6,
                   help="the learning rate never goes below this (plateau scheduler and --cosine)")
    if cosine_warmup is not None:
        t.add_argument("--cosine", action="store_true",
                       help="per-step schedule: linear warm-up over --warmup-epochs, then a half-cosine "
                            "from --learning-rate to --learning-rate-scheduler-minimum (instead of "
                            "SSL4GIE's plateau scheduler); steadier short runs")
        t.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=cosine_warmup,
                       help="epochs of linear warm-up before the cosine (with --cosine; capped at a "
                            "tenth of --epochs)")
    t.add_argument("--accum_iter", "--accum-iter", dest="accum_iter", type=int, default=1,
                   help="split each optimizer step's --batch-size images into this many forward "
                        "passes (gradient accumulation: same result, less memory)")
    t.add_argument("--clip-grad", dest="clip_grad", type=float, default=None,
                   help="clip the global gradient norm to this value (default: no clipping)")
    t.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.01,
                   help="AdamW weight decay (not applied to norms, biases and tokens)")
    t.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-identical reruns on CPU; on GPU some "
                        "kernels are slower or raise an error naming the operation)")
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


def _inference_flags(p, stage, weights):
    if weights:
        p.add_argument("--weights", default=None, metavar="FILE",
                       help="a finetuned checkpoint written by the train script; alone it is enough: "
                            "the model flags are read from it (default: the checkpoint that --output-dir "
                            "and the model flags name, as SSL4GIE)")
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


def parse(parser, argv=None):
    """Parse and check the flags (:func:`check_args`); remembers which were given on the command
    line (``args.given``), so that a checkpoint's settings fill only the others."""
    args = parser.parse_args(argv)
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    quiet._defaults = {}
    args.given = frozenset(vars(quiet.parse_known_args(argv)[0]))
    return check_args(args)


def check_args(args):
    """Reject invalid flag combinations before any work (UserError → exit code 2)."""
    checkpoint = args.checkpoint
    if checkpoint and not args.pretrained_encoder:
        weights = "--weights FILE for a finetuned checkpoint, or " if hasattr(args, "weights") else ""
        raise UserError(f"--checkpoint is the pretrained encoder for training and has no effect in {args.stage}: "
                        f"this script reads the finetuned model instead; drop --checkpoint and use {weights}"
                        "--output-dir and the training flags (as SSL4GIE)")
    if args.ss_framework is not None:  # the framework must fit the family, whatever it names
        check_combination(args.arch, "Hyperkvasir", args.ss_framework, "unused")
    ssl_weights = args.stage == "train" and args.pretraining in ("Hyperkvasir", "ImageNet_self")
    if ssl_weights:  # a missing flag is named before a missing file
        check_combination(args.arch, args.pretraining, args.ss_framework, checkpoint)
    if checkpoint and not os.path.isfile(checkpoint):
        raise UserError(f"--checkpoint '{checkpoint}' does not exist")
    if getattr(args, "weights", None) and not os.path.isfile(args.weights):
        raise UserError(f"--weights '{args.weights}' does not exist")
    if args.image_size is not None and args.image_size % 32:
        raise UserError(f"--image-size {args.image_size} must be a multiple of 32")
    for flag, value in (("--batch-size", args.batch_size), ("--accum_iter", getattr(args, "accum_iter", 1)),
                        ("--epochs", getattr(args, "epochs", 1))):
        if value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    if getattr(args, "cosine", False) and args.learning_rate_scheduler:
        raise UserError("--cosine and --learning-rate-scheduler are two learning-rate schedules; pick one")
    if getattr(args, "steps", None) and (getattr(args, "cosine", False) or args.learning_rate_scheduler):
        raise UserError("--steps anneals the learning rate on a cosine over the steps; drop --cosine and "
                        "--learning-rate-scheduler")
    positions(args)
    return args


def positions(args):
    """``--idx`` as a list of ints, or ``None`` (every test image)."""
    if getattr(args, "idx", None) is None:
        return None
    try:
        out = [int(v) for v in str(args.idx).split(",") if v.strip() != ""]
    except ValueError:
        raise UserError(f"--idx '{args.idx}' must be comma-separated integers, e.g. 11,468") from None
    if not out:
        raise UserError("--idx is empty")
    return out


# --------------------------------------------------------------------------- names and folders

def run_name(args, dataset=None):
    """The SSL4GIE checkpoint name of this run (:func:`gissl.runfiles.run_name`)."""
    from gissl.runfiles import run_name as name
    return name(args.arch, args.pretraining, args.ss_framework, args.frozen, dataset or args.dataset)


def list_name(args):
    """SSL4GIE's ``--print-list`` variable name (:func:`gissl.report.list_id`)."""
    from gissl.report import list_id
    return list_id(args.arch, args.pretraining, args.ss_framework, args.dataset)


def output_dir(args):
    return Path(args.output_dir)


def predictions_dir(args, dataset=None):
    return Path("Predictions") / f"{args.task}-{dataset or args.dataset}"


def check_classification_dataset(args):
    """:func:`gissl.classification.check_dataset` of the parsed flags; ``--classes`` becomes a tuple."""
    from gissl.classification import check_dataset
    check_dataset(args.dataset, args.data_root, labels=getattr(args, "labels", None),
                  split=getattr(args, "split", "random"))
    if isinstance(getattr(args, "classes", None), str):
        args.classes = tuple(c.strip() for c in args.classes.split(",") if c.strip()) or None


def classification_datasets(args, augment_train=True, augment="ssl4gie"):
    """``(root, {split: dataset}, class names)`` for the classification dataset flags (a medical
    dataset split by patient; without ``--data-root`` a ``--dataset csv`` reads its paths relative
    to the label file's folder)."""
    from gissl.classification import datasets
    from gissl.data.medical import MEDICAL_DATASETS
    options = None
    if args.dataset in MEDICAL_DATASETS:
        root = data_root(args) if args.data_root else os.path.dirname(os.path.abspath(args.labels))
        options = dict(labels=args.labels, path_column=args.path_column, label_column=args.label_column,
                       label_kind=args.label_kind, classes=args.classes, group_column=args.group_column,
                       chexpert_uncertain=args.chexpert_uncertain)
    else:
        root = data_root(args)
    ds, classes = datasets(args.dataset, root, image_size=args.image_size, split=args.split,
                           skip_bad=args.skip_bad_files, augment_train=augment_train, augment=augment,
                           medical_options=options)
    return root, ds, classes


def data_root(args, dataset=None):
    """``--data-root``, or the built-in synthetic copy of ``--dataset`` (made once, cached)."""
    if args.data_root:
        if not os.path.isdir(args.data_root):
            raise UserError(f"--data-root '{args.data_root}' is not a folder")
        return args.data_root
    from gissl import dist
    from gissl.data.synthetic import synthetic_root
    dataset = dataset or args.dataset
    root = synthetic_root(dataset)
    if dist.is_main_process():
        print(f"No --data-root given: using the built-in synthetic {dataset} dataset at {root}", flush=True)
    return root


def settings(args):
    """The flags as a plain dict (what a checkpoint stores and a resumed run is compared with)."""
    return {k: (os.fspath(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "given"}


# --------------------------------------------------------------------------- models

def encoder(args, pretrained=None, **kwargs):
    """``gissl.models.build_encoder`` with the model flags (``--checkpoint``'s weights where the
    script takes that flag, unless ``pretrained=False``).

    Eval and predict build a randomly initialised encoder: the finetuned checkpoint
    overwrites every weight, so nothing pretrained needs to be present (the reference
    downloaded ImageNet weights only to overwrite them, docs/ssl4gie-study.md §8 item 4)."""
    from gissl.models import build_encoder, vit_num_heads
    if not (args.pretrained_encoder if pretrained is None else pretrained):
        # the head count follows --ss-framework (MoCo v3's ViT-S), as when training
        return build_encoder(args.arch, num_heads=vit_num_heads(args.arch, args.ss_framework), **kwargs)
    return build_encoder(args.arch, pretraining=args.pretraining, ss_framework=args.ss_framework,
                         checkpoint=args.checkpoint, **kwargs)


def model_kwargs(build, args, **known):
    """The keyword-only arguments of ``build`` (a task's ``build_model`` or any keyword
    function) from the flags of the same names; ``known`` gives the ones that are no flag
    (e.g. ``num_classes``). A required keyword with no flag of its name is a programming error,
    never silently skipped; one with a default keeps it where this script has no such flag."""
    params = {n: p for n, p in inspect.signature(build).parameters.items() if p.kind == p.KEYWORD_ONLY}
    missing = [n for n, p in params.items() if n not in known and not hasattr(args, n) and p.default is p.empty]
    if missing:
        raise TypeError(f"{build.__qualname__} takes {missing}, which no flag of this script sets")
    return {n: known[n] if n in known else getattr(args, n) for n in params if n in known or hasattr(args, n)}


def call(fn, args, **known):
    """``fn(**model_kwargs(fn, args, **known))``: a keyword function called with the flags."""
    return fn(**model_kwargs(fn, args, **known))


def model_flags(build, **known):
    """Flag names of ``build``'s keyword-only arguments, minus ``known``."""
    return tuple(n for n, p in inspect.signature(build).parameters.items()
                 if p.kind == p.KEYWORD_ONLY and n not in known)


def _flag(name):
    return "--" + {"arch": "architecture"}.get(name, name).replace("_", "-")


def finetuned(args, flags=(), dataset=None, legacy=None, data_flags=DATA_FLAGS):
    """Read the finetuned checkpoint (``--weights`` or the one the flags name) and take the
    model's settings from it: each of ``IDENTITY_FLAGS + flags`` not given on the command line
    is set from the file, and a given one that contradicts the file is a UserError naming
    both values; ``data_flags`` not given are set from the file too. ``dataset``: the
    training dataset that names the file (default ``--dataset``). ``legacy``: values for
    settings a file from before that setting existed lacks. Returns ``(state, path)``."""
    from gissl.checkpoint import load_file
    from gissl.errors import CheckpointError
    from gissl.models import ssl4gie_checkpoints
    path = Path(args.weights) if args.weights else output_dir(args) / (run_name(args, dataset) + ".pth")
    if not path.is_file():
        raise CheckpointError(
            f"no finetuned model at '{path}'; train it first with the same flags (train_{args.task}.py "
            "...), point --output-dir at the folder that holds it, or pass the file with --weights FILE")
    state = load_file(path)
    if ssl4gie_checkpoints.is_ssl4gie(state):  # SSL4GIE's own train_<task>.py file: rename to gissl's
        state = ssl4gie_checkpoints.convert(state, args.task, path)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"'{path}' is not a gissl finetuned checkpoint (no 'model' key); pass the "
                              f".pth file that train_{args.task}.py wrote")
    stored = state.get("args") if isinstance(state.get("args"), dict) else None
    if stored is None:
        return state, path
    stored = {**(legacy or {}), **stored}
    for name in IDENTITY_FLAGS + tuple(flags) + tuple(data_flags):
        if name not in stored or not hasattr(args, name):
            continue
        if name in args.given and name not in data_flags and str(getattr(args, name)) != str(stored[name]):
            raise UserError(f"{_flag(name)} {getattr(args, name)} contradicts the checkpoint '{path}', which "
                            f"was trained with {_flag(name)} {stored[name]}; drop the flag or give that value")
        if name not in args.given:
            setattr(args, name, stored[name])
    return state, path


def load_weights(model, state, path):
    """Load a finetuned checkpoint's weights into ``model`` strictly (CheckpointError naming the
    keys otherwise)."""
    from gissl.models.pretrained import load_model_state
    load_model_state(model, state["model"], path, hint="Use the same --architecture and model flags "
                     "as in training, or the checkpoint of this model")
    return model


def finetuned_model(args, build, state, path, device, encoder_kwargs=None, compile=None, pretrained=False,
                    **known):
    """The finetuned model of :func:`finetuned`'s ``state``: ``build(encoder(args), **model
    kwargs)``, its weights loaded strictly, on ``device`` in eval mode, compiled with
    ``compile`` (default: eval ``--compile``)."""
    from gissl.engine import prepare_for_eval
    model = build(encoder(args, pretrained, **(encoder_kwargs or {})), **model_kwargs(build, args, **known))
    load_weights(model, state, path)
    return prepare_for_eval(model, device, getattr(args, "compile", False) if compile is None else compile)


# --------------------------------------------------------------------------- training

def forward_batch(args):
    """Images per forward pass over all processes: ``--batch-size`` / ``--accum_iter``."""
    from gissl import dist
    per_pass, rest = divmod(args.batch_size, args.accum_iter)
    if rest:
        raise UserError(f"--batch-size {args.batch_size} is not a multiple of --accum_iter {args.accum_iter}: "
                        "each optimizer step takes --batch-size images in --accum_iter equal forward passes")
    if per_pass < dist.get_world_size():
        raise UserError(f"--batch-size {args.batch_size} / --accum_iter {args.accum_iter} leaves {per_pass} "
                        f"images per forward pass for {dist.get_world_size()} process(es); raise --batch-size "
                        "or lower --accum_iter")
    return per_pass


def train_loader(args, dataset, device, collate_fn=None):
    """The training loader: :func:`forward_batch` images per pass, seeded by ``--seed``."""
    from gissl.loaders import make_loader
    return make_loader(dataset, batch_size=forward_batch(args), train=True, workers=args.workers,
                       seed=args.seed, device=device, collate_fn=collate_fn)


def eval_loader(args, dataset, device, batch_size=None, collate_fn=None):
    """An ordered loader over all of ``dataset`` (``--batch-size`` images per pass)."""
    from gissl.loaders import make_loader
    return make_loader(dataset, batch_size=batch_size or args.batch_size, train=False, workers=args.workers,
                       device=device, collate_fn=collate_fn)


def cosine_schedule(args, lr):
    """``--cosine``'s per-step schedule for peak ``lr``, or ``None`` without ``--cosine``."""
    if not getattr(args, "cosine", False):
        return None
    from gissl.ssl.schedule import warmup_cosine
    return warmup_cosine(lr, args.epochs, min(args.warmup_epochs, args.epochs / 10),
                         args.learning_rate_scheduler_minimum)


def fit_options(args, **overrides):
    """:class:`gissl.engine.FitOptions` from the shared training flags (``overrides`` win)."""
    from gissl.engine import FitOptions
    values = dict(amp=not args.no_amp, accum_iter=args.accum_iter, clip_grad=args.clip_grad,
                  plateau=args.learning_rate_scheduler, lr_min=args.learning_rate_scheduler_minimum,
                  skip_nonfinite=args.skip_nonfinite, seed=args.seed, compile=args.compile)
    values.update(overrides)
    return FitOptions(**values)


def run_files(args, run_dir=None, name=None, **changes):
    """The :class:`gissl.runfiles.RunFiles` of this run, with the flags (``changes`` replacing some
    of them, e.g. a search point's ``learning_rate``) as its stored settings."""
    from gissl.runfiles import RunFiles
    return RunFiles(run_dir or output_dir(args), name or run_name(args), config={**settings(args), **changes},
                    resume_anyway=args.resume_anyway)


def step_options(args, lr):
    """The :class:`gissl.engine.FitOptions` of step-based training (``--steps``, where a script
    offers it): ``--steps`` optimiser steps on a cosine from ``lr`` to
    ``--learning-rate-scheduler-minimum`` without warm-up (the SSL-transfer study's
    CosineAnnealingLR over the steps), ``--eval-every-steps`` checks and early stopping after
    ``--early-stopping-patience`` checks; ``{}`` without ``--steps``."""
    steps = getattr(args, "steps", None)
    if not steps:
        return {}
    from gissl.ssl.schedule import warmup_cosine
    return dict(max_steps=steps, eval_every_steps=args.eval_every_steps, patience=args.early_stopping_patience or 0,
                lr_schedule=warmup_cosine(lr, steps, 0.0, args.learning_rate_scheduler_minimum))


def search_grid(args):
    """``--search-lrs`` x ``--search-wds`` as :func:`gissl.optim.search_grid` points."""
    from gissl.optim import search_grid as grid
    return grid(args.search_lrs, args.search_wds, wd_per_lr=args.search_wd_scale == "per-lr")


def train(args, model, train_set, compute_losses, *, device, validate=None, metric_mode="max",
          metric_name=None, frozen=(), optimizer=None, collate_fn=None, learning_rate=None, weight_decay=None,
          run=None, **options):
    """:func:`gissl.engine.fit` with the shared training flags: ``--optimizer`` (AdamW where the
    script has no such flag) at ``--learning-rate`` (or ``optimizer``), ``--steps`` (step-based,
    :func:`step_options`), ``--cosine`` or the plateau scheduler, ``frozen`` modules frozen with
    ``--frozen``; ``learning_rate``, ``weight_decay`` and ``run`` (a RunFiles) replace the
    flags' (one point of a search); ``options`` override :func:`fit_options`. Returns fit's result."""
    from gissl.engine import fit
    from gissl.optim import build_optimizer
    lr = args.learning_rate if learning_rate is None else learning_rate
    if optimizer is None:
        optimizer = build_optimizer(model, lr, weight_decay=args.weight_decay if weight_decay is None else weight_decay,
                                    kind=getattr(args, "optimizer", "adamw"))
    for key, value in step_options(args, lr).items():
        options.setdefault(key, value)
    options.setdefault("lr_schedule", cosine_schedule(args, lr))
    return fit(model, train_loader=train_loader(args, train_set, device, collate_fn), compute_losses=compute_losses,
               optimizer=optimizer, device=device, run=run or run_files(args), epochs=args.epochs, validate=validate,
               metric_mode=metric_mode, metric_name=metric_name,
               options=fit_options(args, frozen=tuple(frozen) if args.frozen else (), **options))


# --------------------------------------------------------------------------- running a script

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


def _format_warning(message, category, filename, lineno, line=None):
    # one "warning: ..." line for a person, not Python's "file:line: UserWarning" with its source
    return f"warning: {message}\n"


def run(main, get_args):
    """Run ``main(get_args())``; bad input (UserError) prints one line and exits with 2."""
    import warnings

    from gissl import dist
    from gissl.engine import NonFiniteLossError, TrainingInterrupted
    warnings.formatwarning = _format_warning
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
