"""Finetune an encoder + linear head to classify HyperKvasir images (or any class folders).

As SSL4GIE's ``Classification/train_classification.py`` (docs/ssl4gie-study.md §4.2): class-weighted
cross-entropy, AdamW, model selection on validation macro F1; the class weights come from the
training split only and the split can be stratified.

    python train_classification.py --architecture resnet18 --dataset Hyperkvasir_anatomical \
        --image-size 64 --epochs 8 --batch-size 32 --learning-rate 1e-3
"""
from gissl import cli, dist
from gissl import classification as cls


def get_args(argv=None):
    p = cli.task_parser("classification", "Fine-tune pretrained model for classification", stage="train",
                        datasets=cls.CLASSIFICATION_DATASETS, default_epochs=50, cosine_warmup=1.0)
    args = cli.parse(cls.add_arguments(p, "train"), argv)
    cls.check_dataset(args.dataset, args.data_root)
    return args


def main(args):
    device = dist.init_distributed(args.device)
    ds, classes = cls.build_datasets(args.dataset, cli.data_root(args), image_size=args.image_size,
                                     split=args.split, seed=42, skip_bad=args.skip_bad_files)
    model = cls.build_model(cli.encoder(args, img_size=args.image_size), num_classes=len(classes)).to(device)
    weights = cls.class_weights(ds["train"].labels, len(classes))
    if dist.is_main_process():
        print(f"{args.dataset}: {len(ds['train'])} train / {len(ds['val'])} val / {len(ds['test'])} test "
              f"images, {len(classes)} classes; class weights (train split) "
              + ", ".join(f"{c}={w:.3g}" for c, w in zip(classes, weights.tolist())), flush=True)
    validate = cls.make_validate(cli.eval_loader(args, ds["val"], device), device, not args.no_amp)
    result = cli.train(args, model, ds["train"], cls.make_compute_losses(weights), device=device,
                       validate=validate, metric_mode="max", metric_name="macro_f1", frozen=[model.encoder])
    if dist.is_main_process():
        print(f"best validation macro F1 {result['best_metric']:.4f} at epoch {result['best_epoch']}; "
              f"model saved to {result['best_path']}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
