"""Finetune an encoder + linear head to classify HyperKvasir images (or any class folders).

As SSL4GIE's ``Classification/train_classification.py`` (ssl4gie.md §4.2): class-weighted
cross-entropy, AdamW, model selection on validation macro F1; the class weights come from the
training split only and the split can be stratified.

    python train_classification.py --architecture resnet18 --dataset Hyperkvasir_anatomical \
        --image-size 64 --epochs 8 --batch-size 32 --learning-rate 1e-3
"""
from gissl import cli, dist
from gissl.classification import (Classifier, build_datasets, check_args, class_weights,
                                  make_compute_losses, make_validate, task_parser)
from gissl.engine import build_optimizer, fit, freeze, make_loader
from gissl.errors import UserError
from gissl.ssl.schedule import warmup_cosine


def get_args():
    p = task_parser("train", "Fine-tune pretrained model for classification", default_epochs=50)
    p.add_argument("--cosine", action="store_true",
                   help="1-epoch linear warm-up, then cosine decay to --learning-rate-scheduler-minimum "
                        "over --epochs (steadier than a constant rate for short runs from scratch)")
    args = check_args(p.parse_args())
    if args.cosine and args.learning_rate_scheduler:
        raise UserError("choose one of --cosine and --learning-rate-scheduler")
    return args


def main(args):
    device = dist.init_distributed(args.device)
    root = cli.data_root(args)
    ds, classes = build_datasets(args.dataset, root, image_size=args.image_size, split=args.split,
                                 seed=42, skip_bad=args.skip_bad_files)
    model = Classifier(cli.encoder_from_args(args, img_size=args.image_size), len(classes)).to(device)
    frozen = [freeze(model.encoder)] if args.frozen else []
    weights = class_weights(ds["train"].labels, len(classes))
    if dist.is_main_process():
        print(f"{args.dataset}: {len(ds['train'])} train / {len(ds['val'])} val / {len(ds['test'])} test "
              f"images, {len(classes)} classes; class weights (train split) "
              + ", ".join(f"{c}={w:.3g}" for c, w in zip(classes, weights.tolist())), flush=True)
    train_loader = make_loader(ds["train"], batch_size=args.batch_size, train=True, workers=args.workers,
                               seed=args.seed, device=device)
    val_loader = make_loader(ds["val"], batch_size=args.batch_size, train=False, workers=args.workers,
                             device=device)
    optimizer = build_optimizer(model, args.learning_rate, weight_decay=args.weight_decay)
    result = fit(model, train_loader=train_loader, compute_losses=make_compute_losses(weights),
                 optimizer=optimizer, device=device, run_dir=cli.output_dir(args), run_name=cli.run_name(args),
                 args=args, epochs=args.epochs, validate=make_validate(val_loader, device, not args.no_amp), metric_mode="max",
                 lr_scheduler=args.learning_rate_scheduler, lr_min=args.learning_rate_scheduler_minimum,
                 accum_iter=args.accum_iter, clip_grad=args.clip_grad, amp=not args.no_amp, frozen=frozen,
                 lr_schedule=warmup_cosine(args.learning_rate, args.epochs, min(1.0, args.epochs / 10),
                                           args.learning_rate_scheduler_minimum) if args.cosine else None)
    if dist.is_main_process():
        print(f"best validation macro F1 {result['best_metric']:.4f} at epoch {result['best_epoch']}; "
              f"model saved to {result['best_path']}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
