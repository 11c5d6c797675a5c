"""Pictures of a finetuned classifier's predictions on test images.

For each chosen test image (``--idx``: 0-based positions in the test split; default all):
the image, the top-3 classes with probabilities, the true class, and a heat map of what the
decision rests on (Grad-CAM for ResNets, occlusion of 16-px patches for ViTs), saved under
``Predictions/classification-<dataset>/``; the paths are printed.

    python predict_classification.py --architecture resnet18 --dataset Hyperkvasir_anatomical \
        --image-size 64 --idx 0,5
"""

from eval_classification import load
from gissl import cli, dist
from gissl import classification as cls
from gissl.pictures import picture_label


def get_args(argv=None):
    p = cli.task_parser("classification", "Make predictions with fine-tuned classification model",
                        stage="predict", datasets=cls.CLASSIFICATION_DATASETS)
    args = cli.parse(cls.add_arguments(p, "predict"), argv)
    cli.check_classification_dataset(args)
    return args


def main(args):
    device = dist.resolve_device(args.device)
    ds, classes, model = load(args, device)
    for image, picture in cls.render_predictions(model, ds["test"], classes, device, folder=cli.predictions_dir(args),
                                                 label=picture_label(cli.run_name(args)),
                                                 positions=cli.positions(args)):
        print(f"{image} -> {picture}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
