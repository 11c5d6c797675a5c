"""Evaluate a finetuned polyp-segmentation model on the test split (SSL4GIE's ``eval_segmentation.py``).

Dice, IoU, precision and recall per image at the original resolution, averaged; appended to
``eval_results.txt`` in the reference's format. An empty prediction on a polyp scores 0
(the reference scored its precision 1); images with neither a polyp nor a prediction are
counted apart. ``--print-list`` prints the per-image Dice as a Python list;
``--save-predictions DIR`` writes one 0/255 PNG mask per image (original size, by stem).
The model is the checkpoint the flags name, as SSL4GIE, or ``--weights FILE`` alone:

    python eval_segmentation.py --architecture resnet18 --image-size 128 --print-list
    python eval_segmentation.py --weights "Trained models/segmentation/<run name>.pth"
"""
from gissl import cli, dist
from gissl import segmentation as seg
from gissl.data import build_segmentation_datasets
from gissl.metrics import summarize_segmentation
from gissl.report import append_eval_results, print_list


def get_args(argv=None):
    p = cli.task_parser("segmentation", "Evaluate fine-tuned segmentation model", stage="eval",
                        datasets=seg.DATASETS)
    return cli.parse(seg.add_arguments(p, "eval"), argv)


def main(args):
    device = dist.resolve_device(args.device)
    state, path = cli.finetuned(args, cli.model_flags(seg.build_model))
    test = build_segmentation_datasets(args.dataset, cli.data_root(args), image_size=args.image_size,
                                       original=True, skip_bad=args.skip_bad_files)["test"]
    model = cli.finetuned_model(args, seg.build_model, state, path, device, dict(img_size=args.image_size))
    out = seg.evaluate(model, cli.eval_loader(args, test, device), device, amp=not args.no_amp,
                       keep_masks=bool(args.save_predictions))
    if args.print_list:
        print_list(cli.list_name(args), out["dice"].tolist())
    append_eval_results("Segmentation results", cli.run_name(args), summarize_segmentation(out))
    if args.save_predictions:
        print(f"predicted masks: {seg.save_masks(args.save_predictions, out['paths'], out['masks'])}")


if __name__ == "__main__":
    cli.run(main, get_args)
