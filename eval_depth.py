"""Evaluate a finetuned depth model on the C3VD test videos (SSL4GIE's ``eval_depth.py``).

Per frame at original resolution, in millimetres: RMSE, median relative error ("Relative
Error"), mean absolute error, plus mean abs-rel and δ<1.25, after ``--alignment`` (least-squares
scale and shift as the reference, median scaling, or none); the best constant prediction's
RMSE is printed as a baseline. Lines go to ``eval_results.txt`` in the reference's format.
``--print-list`` prints per-frame RMSE; ``--save-predictions DIR`` writes
``<sequence>/<video>/<N>_depth.npy`` (float32 mm, original size) per frame. The model is the
checkpoint the flags name, or ``--weights FILE`` alone:

    python eval_depth.py --architecture resnet18 --image-size 128 --alignment median
"""
import sys

from gissl import cli, dist
from gissl import depth
from gissl.data import build_depth_datasets
from gissl.report import append_eval_results, print_list


def get_args(argv=None):
    p = cli.task_parser("depth", "Evaluate fine-tuned depth estimation model", stage="eval",
                        datasets=depth.DATASETS)
    return cli.parse(depth.add_arguments(p, "eval"), argv)


def main(args):
    device = dist.resolve_device(args.device)
    state, path = cli.finetuned(args, cli.model_flags(depth.build_model), legacy=depth.LEGACY_SETTINGS)
    root = cli.data_root(args)
    test = build_depth_datasets(root, image_size=args.image_size, original=True, skip_bad=args.skip_bad_files)["test"]
    model = cli.finetuned_model(args, depth.build_model, state, path, device, dict(img_size=args.image_size))
    out = depth.evaluate(model, cli.eval_loader(args, test, device), device, args.alignment,
                         amp=not args.no_amp, keep_depth=bool(args.save_predictions))
    warning = depth.constant_warning(out, "test frames")
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if args.print_list:
        print_list(cli.list_name(args), out["rmse"].tolist())
    append_eval_results("Depth estimation results", cli.run_name(args), depth.summarize(out, args.alignment))
    if args.save_predictions:
        folder = depth.save_depths(args.save_predictions, root, out["paths"], out["depth"])
        print(f"predicted depth (mm, .npy): {folder}")


if __name__ == "__main__":
    cli.run(main, get_args)
