"""Evaluate a finetuned polyp-segmentation model on the test split (SSL4GIE's ``eval_segmentation.py``).

Dice, IoU, precision and recall per image at the original resolution, averaged; appended to
``eval_results.txt`` in the reference's format. An empty prediction on a polyp scores 0
(the reference scored its precision 1); images with neither a polyp nor a prediction are
counted apart. ``--print-list`` prints the per-image Dice as a Python list;
``--save-predictions DIR`` writes one 0/255 PNG mask per image (original size, by stem).

    python eval_segmentation.py --architecture resnet18 --image-size 128 --print-list
"""
from gissl import cli, dist
from gissl import segmentation as seg
from gissl.metrics import summarize_segmentation


def get_args():
    p = cli.task_parser("segmentation", "Evaluate fine-tuned segmentation model", stage="eval",
                        datasets=seg.DATASETS)
    return cli.check_args(seg.add_arguments(p).parse_args())


def main(args):
    device = dist.resolve_device(args.device)
    test = seg.datasets(args, original=True)["test"]
    model = seg.load_model(args, device)
    out = seg.evaluate(model, seg.loader(test, args, device), device, amp=not args.no_amp,
                       keep_masks=bool(args.save_predictions))
    if args.print_list:
        seg.print_list(args, out["dice"].tolist())
    cli.append_eval_results("Segmentation results", cli.run_name(args), summarize_segmentation(out))
    if args.save_predictions:
        print(f"predicted masks: {seg.save_masks(args.save_predictions, out['paths'], out['masks'])}")


if __name__ == "__main__":
    cli.run(main, get_args)
