"""Finetune an encoder + DPT decoder for colonoscopy depth on C3VD (SSL4GIE's ``train_depth.py``).

Scale-and-shift-invariant loss with multi-scale gradient matching (α = 0.1, docs/ssl4gie-study.md
§4.3) plus a weak unaligned anchor (``--anchor-weight``), AdamW, model selection on the
validation videos' aligned RMSE in mm (lower is better). Without ``--data-root`` it trains on
the built-in synthetic C3VD, e.g.:

    python train_depth.py --architecture resnet18 --image-size 128 --epochs 10 \
        --batch-size 8 --learning-rate 1e-3
"""
from functools import partial

from gissl import cli, dist
from gissl import depth
from gissl.data import build_depth_datasets


def get_args(argv=None):
    p = cli.task_parser("depth", "Fine-tune pretrained model for depth estimation", stage="train",
                        datasets=depth.DATASETS, default_epochs=50, cosine_warmup=0.0)
    return cli.parse(depth.add_arguments(p, "train"), argv)


def main(args):
    device = dist.init_distributed(args.device)
    ds = build_depth_datasets(cli.data_root(args), image_size=args.image_size, original=True,
                              skip_bad=args.skip_bad_files)
    model = depth.build_model(cli.encoder(args, img_size=args.image_size),
                              **cli.model_kwargs(depth.build_model, args)).to(device)
    if dist.is_main_process():
        print(f"C3VD: {len(ds['train'])} train / {len(ds['val'])} val / {len(ds['test'])} test frames "
              f"at {args.image_size} px", flush=True)
    validate = depth.make_validate(cli.eval_loader(args, ds["val"], device), device, not args.no_amp)
    losses = partial(depth.compute_losses, alpha=args.gradient_weight, anchor_weight=args.anchor_weight)
    result = cli.train(args, model, ds["train"], losses, device=device, validate=validate, metric_mode="min",
                       metric_name="rmse_mm", frozen=[model.encoder])
    if dist.is_main_process():
        print(f"best validation RMSE {result['best_metric']:.3f} mm (scale-shift aligned) at epoch "
              f"{result['best_epoch']}; model saved to {result['best_path']}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
