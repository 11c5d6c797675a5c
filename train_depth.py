"""Finetune an encoder + DPT decoder for colonoscopy depth on C3VD (SSL4GIE's ``train_depth.py``).

Scale-and-shift-invariant loss with multi-scale gradient matching (α = 0.1, ssl4gie.md §4.3),
AdamW, model selection on the validation videos' aligned RMSE in mm (lower is better). Without
``--data-root`` it trains on the built-in synthetic C3VD, e.g.:

    python train_depth.py --architecture resnet18 --image-size 128 --epochs 10 \
        --batch-size 8 --learning-rate 1e-3
"""
from functools import partial

from gissl import cli, dist
from gissl import depth
from gissl.segmentation import train_dense


def get_args():
    p = cli.task_parser("depth", "Fine-tune pretrained model for depth estimation", stage="train",
                        datasets=depth.DATASETS, default_epochs=50)
    return cli.check_args(depth.add_arguments(p).parse_args())


def main(args):
    device = dist.init_distributed(args.device)
    ds = depth.datasets(args, original=True)
    model = depth.build_depth_model(args).to(device)
    if dist.is_main_process():
        print(f"C3VD: {len(ds['train'])} train / {len(ds['val'])} val / {len(ds['test'])} test frames "
              f"at {args.image_size} px", flush=True)
    validate = depth.make_validate(depth.loader(ds["val"], args, device), device, not args.no_amp)
    losses = partial(depth.compute_losses, alpha=args.gradient_weight, anchor_weight=args.anchor_weight)
    result = train_dense(args, model, ds, device, losses, validate, metric_mode="min")
    if dist.is_main_process():
        print(f"best validation RMSE {result['best_metric']:.3f} mm (scale-shift aligned) at epoch "
              f"{result['best_epoch']}; model saved to {result['best_path']}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
