"""Draw polyp-segmentation predictions (SSL4GIE's ``predict_segmentation.py``).

One picture per test image in ``Predictions/segmentation-<dataset>/test{i}_<model>.png``:
the input, the ground-truth outline, and the predicted mask over the input with its Dice.
``--idx 11,468`` picks 0-based positions in the test split (default: all); the paths of the
test images and of the pictures are printed.

    python predict_segmentation.py --architecture resnet18 --image-size 128 --idx 0,3
"""
from gissl import cli, dist
from gissl import segmentation as seg


def get_args():
    p = cli.task_parser("segmentation", "Make predictions with fine-tuned segmentation model",
                        stage="predict", datasets=seg.DATASETS)
    return cli.check_args(seg.add_arguments(p).parse_args())


def main(args):
    device = dist.resolve_device(args.device)
    test = seg.datasets(args, original=True)["test"]
    model = seg.load_model(args, device)
    for image, picture in seg.render_predictions(args, model, test, device, amp=not args.no_amp):
        print(f"{image} -> {picture}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
