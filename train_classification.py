"""Finetune an encoder + linear head to classify HyperKvasir images, class folders or the SSL-transfer
study's medical datasets (`--dataset csv`, `CheXpert`, `EyePACS`, ...; split by patient).

As SSL4GIE's ``Classification/train_classification.py`` (docs/ssl4gie-study.md §4.2): class-weighted
cross-entropy, AdamW, model selection on validation macro F1; the class weights come from the
training split only and the split can be stratified.

    python train_classification.py --architecture resnet18 --dataset Hyperkvasir_anatomical \
        --image-size 64 --epochs 8 --batch-size 32 --learning-rate 1e-3

``--recipe transfer-finetune`` is the SSL-transfer study's finetune protocol instead
(docs/transfer-study.md §b.6): SGD Nesterov, 5000 steps on a cosine, early stopping on val every
200 steps; with ``--search`` a learning-rate x weight-decay grid chosen on val, refit, and
scored once on the test split.
"""
from gissl import cli, dist
from gissl import classification as cls
from gissl.runfiles import GridSearch, append_line


def get_args(argv=None):
    p = cli.task_parser("classification", "Fine-tune pretrained model for classification", stage="train",
                        datasets=cls.CLASSIFICATION_DATASETS, default_epochs=50, cosine_warmup=1.0)
    args = cli.parse(cls.add_arguments(p, "train"), argv)
    vars(args).update(cls.recipe_values(args.recipe, args.given))  # a given flag beats the recipe
    cli.check_args(args)
    cls.check_protocol(steps=args.steps, search=args.search, eval_every_steps=args.eval_every_steps,
                       early_stopping_patience=args.early_stopping_patience)
    cli.check_classification_dataset(args)
    return args


def main(args):
    device = dist.init_distributed(args.device)
    _, ds, classes = cli.classification_datasets(args, augment=args.augment)
    weights = cls.class_weights(ds["train"].labels, len(classes))
    if args.class_weights == "none":
        weights = weights.new_ones(len(classes))
    if dist.is_main_process():
        print(f"{args.dataset}: {len(ds['train'])} train / {len(ds['val'])} val / {len(ds['test'])} test "
              f"images, {len(classes)} classes; class weights "
              f"({'train split' if args.class_weights == 'train' else 'none: plain cross-entropy'}) "
              + ", ".join(f"{c}={w:.3g}" for c, w in zip(classes, weights.tolist())), flush=True)
    validate = cls.make_validate(cli.eval_loader(args, ds["val"], device), device, not args.no_amp, args.val_metric)

    def finetune(lr=None, wd=None, folder=None, name=None):
        """One training run; ``lr``/``wd`` (a search point, or the refit) replace the flags'."""
        cli.seed_everything(args.seed)  # every search point and the refit start from the same weights
        model = cls.build_model(cli.encoder(args, img_size=args.image_size), num_classes=len(classes)).to(device)
        changes = {"learning_rate": lr, "weight_decay": wd} if lr is not None else {}
        result = cli.train(args, model, ds["train"], cls.make_compute_losses(weights), device=device,
                           validate=validate, metric_mode="max", metric_name=args.val_metric, frozen=[model.encoder],
                           learning_rate=lr, weight_decay=wd, run=cli.run_files(args, folder, name, **changes))
        return model, result

    search = None
    if args.search:
        search = GridSearch(cli.output_dir(args), cli.run_name(args), cli.search_grid(args), cli.settings(args),
                            resume_anyway=args.resume_anyway)
        search.run(lambda point, folder, name: finetune(point["lr"], point["wd"], folder, name)[1])
        best = search.best()
        if dist.is_main_process():
            print(f"search ({args.val_metric} on the validation split):\n{search.table(args.val_metric)}\n"
                  f"refitting lr {best['lr']:g}, weight decay {best['wd']:g}", flush=True)
        model, result = finetune(best["lr"], best["wd"])
    else:
        model, result = finetune()
    when = f"step {result['best_step']}" if args.steps else f"epoch {result['best_epoch']}"
    if dist.is_main_process():
        print(f"best validation {args.val_metric} {result['best_metric']:.4f} at {when}; "
              f"model saved to {result['best_path']}", flush=True)
    if search is not None and dist.is_main_process():  # the test split, untouched until now, scored once
        m = cls.score(model.eval(), cli.eval_loader(args, ds["test"], device), device, not args.no_amp)
        line = (f"test {args.val_metric} {m[args.val_metric]:.4f} (accuracy {m['accuracy']:.4f}, macro F1 "
                f"{m['macro_f1']:.4f}) of the refit, lr {best['lr']:g}, weight decay {best['wd']:g}")
        print(line, flush=True)
        append_line(cli.run_files(args).log, f"search ({args.val_metric} on val):\n{search.table(args.val_metric)}\n"
                    + line)


if __name__ == "__main__":
    cli.run(main, get_args)
