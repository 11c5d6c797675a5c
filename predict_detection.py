"""Draw polyp detections (SSL4GIE's ``predict_detection.py``).

One picture per test image, ``Predictions/detection-<dataset>/test{i}_<model>.png``: the
original image with the ground-truth boxes in yellow and the predicted boxes with score >=
``--threshold`` (default 0.5, the reference's) in green, labelled with their scores.
``--idx 11,468`` picks 0-based positions in the test split (default: all); the paths of the
test images and of the pictures are printed.

    python predict_detection.py --architecture resnet18 --image-size 256 --idx 0,3
"""
from eval_detection import get_args as eval_get_args
from eval_detection import load
from gissl import cli, dist
from gissl import detection as det
from gissl.pictures import picture_label


def get_args(argv=None):
    return eval_get_args(argv, stage="predict")


def main(args):
    device = dist.resolve_device(args.device)
    ds, model = load(args, device)
    loader_kwargs = dict(architecture=args.arch, image_size=args.image_size, batch_size=args.batch_size,
                         workers=args.workers)
    for image, picture in det.render_predictions(model, ds["test"], device, folder=cli.predictions_dir(args),
                                                 label=picture_label(cli.run_name(args)),
                                                 loader_kwargs=loader_kwargs, positions=cli.positions(args),
                                                 threshold=args.threshold):
        print(f"{image} -> {picture}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
