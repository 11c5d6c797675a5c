"""Evaluate a finetuned polyp detector on the test split (SSL4GIE's ``eval_detection.py``).

COCO box AP@[.5:.95], AP@.5, AP@.75 and AR@100 (pycocotools' definitions, computed by
:func:`gissl.metrics.coco_map`) in original image pixels, appended to ``eval_results.txt`` in
the reference's format. ``--print-list`` prints the per-image AP@[.5:.95] (NaN for an image
without polyps); ``--save-predictions FILE.json`` writes the COCO results there and the ground
truth as ``FILE.ground_truth.json``, both readable by pycocotools.

    python eval_detection.py --architecture resnet18 --image-size 256 --save-predictions dets.json
"""
from gissl import cli, dist
from gissl import detection as det
from gissl.engine import compile_model
from gissl.metrics import coco_map
from gissl.report import append_eval_results, print_list


def get_args(argv=None, stage="eval"):
    descriptions = {"eval": "Evaluate fine-tuned object detection model",
                    "predict": "Make predictions with fine-tuned object detection model"}
    p = cli.task_parser("detection", descriptions[stage], stage=stage, datasets=det.DATASETS,
                        default_image_size=None)
    args = cli.parse(det.add_arguments(p, stage), argv)
    # checked again once the checkpoint's settings are known (load)
    cli.call(det.check_settings, args, image_size=args.image_size or det.default_image_size(args.arch))
    return args


def load(args, device):
    """The test split and the finetuned detector (eval mode; eval ``--compile`` compiles its
    backbone: the heads' data-dependent parts, proposal selection and NMS, would only break
    the graph). Shared with predict_detection.py."""
    state, path = cli.finetuned(args, cli.model_flags(det.build_model, num_classes=None),
                                legacy=det.LEGACY_SETTINGS)
    args.image_size = args.image_size or det.default_image_size(args.arch)
    cli.call(det.check_settings, args)
    ds = det.build_datasets(args.dataset, cli.data_root(args), architecture=args.arch, image_size=args.image_size,
                            annotations=args.annotations, skip_bad=args.skip_bad_files)
    model = cli.finetuned_model(args, det.build_model, state, path, device, compile=False,
                                num_classes=len(det.categories(ds)) + 1)
    if getattr(args, "compile", False):
        model.backbone = compile_model(model.backbone, device)
    return ds, model


def main(args):
    device = dist.resolve_device(args.device)
    ds, model = load(args, device)
    test = ds["test"]
    loader = det.eval_loader(test, architecture=args.arch, image_size=args.image_size, batch_size=args.batch_size,
                             workers=args.workers)
    predictions, targets, indices = det.predict(model, loader, device)
    if args.print_list:
        print_list(cli.list_name(args), [coco_map([p], [t])["map"] for p, t in zip(predictions, targets)])
    append_eval_results("Object detection results", cli.run_name(args),
                        det.results_lines(coco_map(predictions, targets)))
    if args.save_predictions:
        paths = det.save_predictions(args.save_predictions, test, indices, predictions, targets, det.categories(ds))
        print(f"COCO results: {paths[0]}\nCOCO ground truth: {paths[1]}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
