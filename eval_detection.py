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
from gissl.metrics import coco_map
from gissl.segmentation import print_list


def main(args):
    device = dist.resolve_device(args.device)
    test = det.build_datasets(args)["test"]
    model = det.load_model(args, device)
    predictions, targets, indices = det.predict(model, det.eval_loader(test, args), device)
    if args.print_list:
        print_list(args, [coco_map([p], [t])["map"] for p, t in zip(predictions, targets)])
    cli.append_eval_results("Object detection results", cli.run_name(args),
                            det.results_lines(coco_map(predictions, targets)))
    if args.save_predictions:
        paths = det.save_predictions(args.save_predictions, test, indices, predictions, targets, args.categories)
        print(f"COCO results: {paths[0]}\nCOCO ground truth: {paths[1]}", flush=True)


if __name__ == "__main__":
    cli.run(main, lambda: det.parse_args("eval"))
