"""Finetune an encoder + DPT decoder for polyp segmentation (SSL4GIE's ``train_segmentation.py``).

Soft Dice loss (optionally + BCE), AdamW, model selection on the validation split's Dice at
original resolution (docs/ssl4gie-study.md §4.2, without looking at test). Without ``--data-root``
it trains on the built-in synthetic Kvasir-SEG, e.g. (a few minutes on a 2-core CPU):

    python train_segmentation.py --architecture resnet18 --image-size 128 --epochs 12 \
        --batch-size 8 --learning-rate 1e-3
"""
from functools import partial

from gissl import cli, dist
from gissl import segmentation as seg
from gissl.data import build_segmentation_datasets


def get_args(argv=None):
    p = cli.task_parser("segmentation", "Fine-tune pretrained model for segmentation", stage="train",
                        datasets=seg.DATASETS, default_epochs=200, cosine_warmup=0.0)
    return cli.parse(seg.add_arguments(p, "train"), argv)


def main(args):
    device = dist.init_distributed(args.device)
    ds = build_segmentation_datasets(args.dataset, cli.data_root(args), image_size=args.image_size,
                                     original=True, skip_bad=args.skip_bad_files)
    model = seg.build_model(cli.encoder(args, img_size=args.image_size),
                            **cli.model_kwargs(seg.build_model, args)).to(device)
    if dist.is_main_process():
        print(f"{args.dataset}: {len(ds['train'])} train / {len(ds['val'])} val / {len(ds['test'])} test "
              f"images at {args.image_size} px", flush=True)
    val_loader = cli.eval_loader(args, ds["val"], device)
    result = cli.train(args, model, ds["train"], partial(seg.compute_losses, bce_weight=args.bce_weight),
                       device=device, validate=seg.make_validate(val_loader, device, not args.no_amp),
                       metric_mode="max", metric_name="dice", frozen=[model.encoder])
    if dist.is_main_process():
        print(f"best validation Dice {result['best_metric']:.4f} at epoch {result['best_epoch']}; "
              f"model saved to {result['best_path']}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
