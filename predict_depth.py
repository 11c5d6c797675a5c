"""Draw colonoscopy depth predictions (SSL4GIE's ``predict_depth.py``).

One picture per test frame in ``Predictions/depth-C3VD/test{i}_<model>.png``: the input, the
ground truth and the prediction in one colour map with a millimetre scale bar (near = bright,
invalid = black), and the absolute-error map, which saturates instead of wrapping around.
``--idx`` picks 0-based positions in the test frames (default: all); the paths are printed.

    python predict_depth.py --architecture resnet18 --image-size 128 --idx 0,12
"""
from gissl import cli, dist
from gissl import depth
from gissl.data import build_depth_datasets
from gissl.pictures import picture_label


def get_args(argv=None):
    p = cli.task_parser("depth", "Make predictions with fine-tuned depth estimation model",
                        stage="predict", datasets=depth.DATASETS)
    return cli.parse(depth.add_arguments(p, "predict"), argv)


def main(args):
    device = dist.resolve_device(args.device)
    state, path = cli.finetuned(args, cli.model_flags(depth.build_model), legacy=depth.LEGACY_SETTINGS)
    test = build_depth_datasets(cli.data_root(args), image_size=args.image_size, original=True,
                                skip_bad=args.skip_bad_files)["test"]
    model = cli.finetuned_model(args, depth.build_model, state, path, device, dict(img_size=args.image_size))
    for image, picture in depth.render_predictions(model, test, device, folder=cli.predictions_dir(args),
                                                   label=picture_label(cli.run_name(args)),
                                                   positions=cli.positions(args), alignment=args.alignment,
                                                   amp=not args.no_amp):
        print(f"{image} -> {picture}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
