"""Finetune an encoder as a Faster R-CNN polyp detector (SSL4GIE's ``train_detection.py``).

torchvision's Faster R-CNN with its four losses summed (ssl4gie.md §4.2), AdamW, model
selection on the validation split's COCO AP@[.5:.95] (never the test split). ``--batch-size``
is the global batch of one optimizer step: each process loads batch/world/accum_iter images
per forward and ``--accum_iter`` forwards are accumulated (the last partial group of an epoch
is stepped, not dropped). Without ``--data-root`` it trains on the built-in synthetic
Kvasir-SEG, e.g. (a few minutes on a 2-core CPU):

    python train_detection.py --architecture resnet18 --image-size 256 --epochs 8 \\
        --batch-size 4 --learning-rate 1e-4
"""
from gissl import cli, dist
from gissl import detection as det
from gissl.engine import build_optimizer, fit, freeze, make_loader
from gissl.errors import UserError


def main(args):
    device = dist.init_distributed(args.device)
    ds = det.build_datasets(args)
    model = det.build_model(args).to(device)
    per_step = args.batch_size // args.accum_iter
    if per_step < dist.get_world_size():  # the reference never checked this (§8 item 25)
        raise UserError(f"--batch-size {args.batch_size} / --accum_iter {args.accum_iter} leaves "
                        f"{per_step} images per forward for {dist.get_world_size()} process(es); "
                        "raise --batch-size or lower --accum_iter")
    if dist.is_main_process():
        print(f"{args.dataset}: {len(ds['train'])} train / {len(ds['val'])} val / {len(ds['test'])} test "
              f"images; {args.arch} Faster R-CNN, BatchNorm {det.batchnorm_mode(args)}, "
              f"{'canvas' if det.fixed_size(args) else 'short side'} {args.image_size} px", flush=True)
    train_loader = make_loader(ds["train"], batch_size=per_step, train=True, workers=args.workers,
                               seed=args.seed, device=device, collate_fn=det.collate)
    val_loader = det.eval_loader(ds["val"], args) if dist.is_main_process() else None
    result = fit(model, train_loader=train_loader, compute_losses=det.compute_losses,
                 optimizer=build_optimizer(model, args.learning_rate, weight_decay=args.weight_decay),
                 device=device, run_dir=cli.output_dir(args), run_name=cli.run_name(args), args=args,
                 epochs=args.epochs, validate=lambda m: det.validation_ap(m, val_loader, device),
                 metric_mode="max", lr_scheduler=args.learning_rate_scheduler,
                 lr_min=args.learning_rate_scheduler_minimum, accum_iter=args.accum_iter,
                 clip_grad=args.clip_grad, amp=not args.no_amp,
                 frozen=[freeze(model.backbone.body)] if args.frozen else [])
    if dist.is_main_process():
        print(f"best validation AP@[.5:.95] {result['best_metric']:.4f} at epoch {result['best_epoch']}; "
              f"model saved to {result['best_path']}", flush=True)


if __name__ == "__main__":
    cli.run(main, lambda: det.parse_args("train"))
