"""Draw polyp detections (SSL4GIE's ``predict_detection.py``).

One picture per test image, ``Predictions/detection-<dataset>/test{i}_<model>.png``: the
original image with the ground-truth boxes in yellow and the predicted boxes with score >=
``--threshold`` (default 0.5, the reference's) in green, labelled with their scores.
``--idx 11,468`` picks 0-based positions in the test split (default: all); the paths of the
test images and of the pictures are printed.

    python predict_detection.py --architecture resnet18 --image-size 256 --idx 0,3
"""
from gissl import cli, dist
from gissl import detection as det


def main(args):
    device = dist.resolve_device(args.device)
    test = det.build_datasets(args)["test"]
    model = det.load_model(args, device)
    for image, picture in det.render_predictions(args, model, test, device):
        print(f"{image} -> {picture}", flush=True)


if __name__ == "__main__":
    cli.run(main, lambda: det.parse_args("predict"))
