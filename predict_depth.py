"""Draw colonoscopy depth predictions (SSL4GIE's ``predict_depth.py``).

One picture per test frame in ``Predictions/depth-C3VD/test{i}_<model>.png``: the input, the
ground truth and the prediction in one colour map with a millimetre scale bar (near = bright,
invalid = black), and the absolute-error map, which saturates instead of wrapping around.
``--idx`` picks 0-based positions in the test frames (default: all); the paths are printed.

    python predict_depth.py --architecture resnet18 --image-size 128 --idx 0,12
"""
from gissl import cli, dist
from gissl import depth


def get_args():
    p = cli.task_parser("depth", "Make predictions with fine-tuned depth estimation model",
                        stage="predict", datasets=depth.DATASETS)
    return cli.check_args(depth.add_arguments(p).parse_args())


def main(args):
    device = dist.resolve_device(args.device)
    test = depth.datasets(args, original=True)["test"]
    model = depth.load_model(args, device)
    for image, picture in depth.render_predictions(args, model, test, device, args.alignment,
                                                   amp=not args.no_amp):
        print(f"{image} -> {picture}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
