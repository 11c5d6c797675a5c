"""Train a polyp-retrieval descriptor (EndoFinder, MICCAI 2024, on SSCD's loss).

Loss (docs/endofinder-retrieval.md §1.4-1.5): SSCD InfoNCE over the two augmented views of every image
(temperature 0.05, negatives gathered from every rank) + ``--entropy-weight`` x KoLeo
(EndoFinder 5, SSCD 30) + ``--mse-weight`` x the ViT's masked-patch reconstruction, where the
masking keeps every patch that touches the polyp mask visible (random masking for images
without a mask). Per-epoch model selection on the copy-detection micro-AP of a query /
reference set (``--val-root``, Polyp-Twin layout; default: the built-in synthetic one).

Without ``--data-root`` it trains on the built-in synthetic Kvasir-SEG, e.g. (CPU, minutes):

    python train_retrieval.py --architecture resnet18 --image-size 64 --epochs 6 \
        --batch-size 32 --learning-rate 1e-3 --workers 1
"""
import torch

from gissl import cli, dist
from gissl import retrieval as R
from gissl.losses import koleo, sscd_infonce
from gissl.optim import build_optimizer
from gissl.retrieval_data import TRAIN_DATASETS, TwoViewDataset, synthetic_twin_root, training_samples, twin_set
from gissl.ssl.schedule import warmup_cosine


def get_args(argv=None):
    p = cli.task_parser("retrieval", "Train a polyp-retrieval descriptor (EndoFinder / SSCD)", stage="train",
                        datasets=TRAIN_DATASETS, default_epochs=100, default_batch_size=32,
                        default_lr=None, default_arch="vit_b")
    R.add_arguments(p, "train")
    g = p.add_argument_group("retrieval loss")
    g.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature (SSCD / EndoFinder 0.05)")
    g.add_argument("--entropy-weight", dest="entropy_weight", type=float, default=5.0,
                   help="KoLeo weight: 5 as EndoFinder; SSCD used 30 but calls it unstable in new setups")
    g.add_argument("--mse-weight", dest="mse_weight", type=float, default=0.5,
                   help="weight of the ViT masked-patch reconstruction (EndoFinder 0.5)")
    g.add_argument("--mixup-prob", dest="mixup_prob", type=float, default=0.05,
                   help="per-view Mixup/CutMix probability (SSCD / EndoFinder 0.05; 0 = off)")
    g.add_argument("--no-masks", dest="no_masks", action="store_true",
                   help="ignore polyp masks: plain random masking (ViT)")
    g.add_argument("--min-scale", dest="min_scale", type=float, default=0.08,
                   help="smallest RandomResizedCrop area fraction of a view (SSCD 0.08)")
    g.add_argument("--aug-strength", dest="aug_strength", type=float, default=1.0,
                   help="scales the photometric ranges of the views (1 = SSCD ADVANCED); lower it when "
                        "colour is what tells your cases apart (the same polyp seen twice keeps its colour)")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=5.0,
                   help="linear warm-up, then cosine decay per step (EndoFinder: 5 of 100)")
    g.add_argument("--val-root", dest="val_root", default=None,
                   help="Polyp-Twin layout (val_query/, val_ref/, val_groundtruth_matches.csv) for the "
                        "per-epoch micro-AP; default: the built-in synthetic query/reference set")
    p.set_defaults(weight_decay=0.05)
    return cli.parse(p, argv)


def compute_losses(model, batch, *, temperature, entropy_weight, mse_weight, mixup_prob):
    """batch["image"]: (B, 2, 3, S, S), batch["mask"]: (B, 2, 1, S, S) -> dict of weighted terms."""
    b = batch["image"].shape[0]
    images = batch["image"].transpose(0, 1).reshape(2 * b, *batch["image"].shape[2:])
    masks = batch["mask"].transpose(0, 1).reshape(2 * b, *batch["mask"].shape[2:])
    ids = torch.arange(b, device=images.device).repeat(2)  # view order: all first views, then seconds
    labels = ids
    if mixup_prob > 0:
        images, labels = R.mixup_cutmix(images, ids, b, prob=mixup_prob)
        if not (labels.max(dim=1).values < 1).any():
            labels = ids  # nothing mixed: exact instance ids (SSCD's non-mixup normalisation)
    out = model(images, masks)
    losses = {"infonce": sscd_infonce(out["z"], labels, temperature),
              "koleo": entropy_weight * koleo(out["z"], labels)}
    if "mse" in out and mse_weight > 0:
        losses["mse"] = mse_weight * out["mse"]
    return losses


def main(args):
    device = dist.init_distributed(args.device)
    root = cli.data_root(args)
    samples = training_samples(args.dataset, root, args.skip_bad_files, use_masks=not args.no_masks)
    train_set = TwoViewDataset(samples, args.image_size, args.min_scale, args.aug_strength)
    twin = twin_set(args.val_root or synthetic_twin_root(), args.skip_bad_files)
    torch.manual_seed(args.seed)  # eval_retrieval.py --untrained rebuilds this exact init
    model = R.build_model(cli.encoder(args, img_size=args.image_size),
                          **cli.model_kwargs(R.build_model, args)).to(device)
    # EndoFinder: absolute lr = 1e-3 x batch per optimizer step / 256, AdamW betas (0.9, 0.95), wd 0.05
    lr = args.learning_rate or 1e-3 * args.batch_size / 256
    optimizer = build_optimizer(model, lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    if dist.is_main_process():
        print(f"{args.dataset}: {len(train_set)} training images "
              f"({sum(bool(s.get('mask')) for s in samples)} with polyp masks), {args.image_size} px; "
              f"validation: {len(twin['queries'])} queries / {len(twin['references'])} references; lr {lr:g}",
              flush=True)

    def validate(bare):
        metrics, _ = R.copy_detection_eval(bare, twin, image_size=args.image_size, batch_size=args.batch_size,
                                           device=device, use_head=args.use_head, amp=not args.no_amp)
        print(f"  val uAP {metrics['uAP']:.4f}  acc@1 {metrics['accuracy@1']:.4f}  "
              f"recall@P90 {metrics['recall@P90']:.4f}", flush=True)
        return metrics["uAP"]

    def losses(m, batch):
        return compute_losses(m, batch, temperature=args.temperature, entropy_weight=args.entropy_weight,
                              mse_weight=args.mse_weight, mixup_prob=args.mixup_prob)

    result = cli.train(args, model, train_set, losses, device=device, validate=validate, metric_mode="max",
                       metric_name="uAP", frozen=[model.encoder], optimizer=optimizer,
                       lr_schedule=warmup_cosine(lr, args.epochs, min(args.warmup_epochs, args.epochs / 2)))
    if dist.is_main_process():
        print(f"best validation uAP {result['best_metric']:.4f} at epoch {result['best_epoch']}; "
              f"model saved to {result['best_path']}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
