"""Evaluate a finetuned classifier on the test split (SSL4GIE's ``eval_classification.py``).

Appends the reference's lines (``mF1``, ``mPrecision``, ``mRecall``, ``Accuracy``) to
``eval_results.txt`` plus balanced accuracy, macro AUROC, top-3 accuracy and the classes absent
from the test split; prints the per-class table; saves the confusion matrix as a PNG.
Macro scores average over the classes present in the test split (no ε/ε = 1, docs/ssl4gie-study.md §8 item 10).

    python eval_classification.py --architecture resnet18 --dataset Hyperkvasir_anatomical --image-size 64
"""
from gissl import cli, dist
from gissl import classification as cls
from gissl.metrics import classification_metrics, format_per_class
from gissl.report import append_eval_results, print_list


def get_args(argv=None):
    p = cli.task_parser("classification", "Evaluate fine-tuned classification model", stage="eval",
                        datasets=cls.CLASSIFICATION_DATASETS)
    args = cli.parse(cls.add_arguments(p, "eval"), argv)
    cli.check_classification_dataset(args)
    return args


def load(args, device):
    """The datasets, class names and the finetuned classifier (shared with predict_classification.py)."""
    state, path = cli.finetuned(args, ("split",))
    _, ds, classes = cli.classification_datasets(args)
    model = cli.finetuned_model(args, cls.build_model, state, path, device, dict(img_size=args.image_size),
                                num_classes=len(classes))
    return ds, classes, model


def main(args):
    device = dist.resolve_device(args.device)
    ds, classes, model = load(args, device)
    test = ds["test"]
    # batched (--batch-size) and under bf16/fp16 autocast unless --no-amp; the scores do not depend
    # on the batch size (tests/test_performance.py)
    out = cls.predict(model, cli.eval_loader(args, test, device), device, amp=not args.no_amp)
    m = classification_metrics(out["targets"], out["preds"], out["probs"], num_classes=len(classes),
                               class_names=classes)
    name = cli.run_name(args)
    for line in format_per_class(m):
        print(line)
    if args.print_list:  # per-image probability of the true class, SSL4GIE's list format
        print_list(name, out["probs"][range(len(out["targets"])), out["targets"]].tolist())
    results = {"mF1": m["macro_f1"], "mPrecision": m["macro_precision"], "mRecall": m["macro_recall"],
               "Accuracy": m["accuracy"], "Balanced accuracy": m["balanced_accuracy"],
               "mAUROC": m["macro_auroc"]}
    results.update({f"Top-{k[3:-9]} accuracy": v for k, v in m.items() if k.startswith("top")})
    results["Test images"] = len(test)
    results["Classes absent from test split"] = ", ".join(m["absent_classes"]) or "none"
    append_eval_results("Classification results", name, results)
    png = cls.confusion_png(m["confusion"], classes, cli.predictions_dir(args) / f"confusion-{name}.png")
    print(f"confusion matrix: {png}")
    if args.save_predictions:
        cls.write_predictions_csv(args.save_predictions, cls.dataset_paths(test), out["targets"], out["probs"])
        print(f"predictions: {args.save_predictions}")


if __name__ == "__main__":
    cli.run(main, get_args)
