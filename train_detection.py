"""Finetune an encoder as a Faster R-CNN polyp detector (SSL4GIE's ``train_detection.py``).

torchvision's Faster R-CNN with its four losses summed (docs/ssl4gie-study.md §4.2), AdamW, model
selection on the validation split's COCO AP@[.5:.95] (never the test split). ``--batch-size``
is the global batch of one optimizer step, as in every train script: each process loads
batch/world/accum_iter images per forward and ``--accum_iter`` forwards are accumulated (the
last partial group of an epoch is stepped, not dropped). Without ``--data-root`` it trains on the built-in synthetic
Kvasir-SEG, e.g. (a few minutes on a 2-core CPU):

    python train_detection.py --architecture resnet18 --image-size 256 --epochs 8 \\
        --batch-size 4 --learning-rate 1e-4
"""
from gissl import cli, dist
from gissl import detection as det


def get_args(argv=None):
    p = cli.task_parser("detection", "Fine-tune pretrained model for object detection", stage="train",
                        datasets=det.DATASETS, default_epochs=200, default_image_size=None)
    args = cli.parse(det.add_arguments(p, "train"), argv)
    args.image_size = args.image_size or det.default_image_size(args.arch)
    cli.call(det.check_settings, args)
    return args


def main(args):
    device = dist.init_distributed(args.device)
    ds = det.build_datasets(args.dataset, cli.data_root(args), architecture=args.arch, image_size=args.image_size,
                            annotations=args.annotations, skip_bad=args.skip_bad_files)
    model = det.build_model(cli.encoder(args), **cli.model_kwargs(
        det.build_model, args, num_classes=len(det.categories(ds)) + 1)).to(device)
    if dist.is_main_process():
        print(f"{args.dataset}: {len(ds['train'])} train / {len(ds['val'])} val / {len(ds['test'])} test "
              f"images; {args.arch} Faster R-CNN, BatchNorm {det.batchnorm_mode(args.batchnorm, args.pretraining)}, "
              f"{'canvas' if det.fixed_size(args.arch, args.image_size) else 'short side'} {args.image_size} px",
              flush=True)
    val_loader = det.eval_loader(ds["val"], architecture=args.arch, image_size=args.image_size,
                                 batch_size=args.batch_size, workers=args.workers) if dist.is_main_process() else None
    result = cli.train(args, model, ds["train"], det.compute_losses, device=device,
                       validate=lambda m: det.validation_ap(m, val_loader, device), metric_mode="max",
                       metric_name="ap", frozen=[model.backbone.body], collate_fn=det.collate)
    if dist.is_main_process():
        print(f"best validation AP@[.5:.95] {result['best_metric']:.4f} at epoch {result['best_epoch']}; "
              f"model saved to {result['best_path']}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
