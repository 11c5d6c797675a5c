"""Draw polyp-segmentation predictions (SSL4GIE's ``predict_segmentation.py``).

One picture per test image in ``Predictions/segmentation-<dataset>/test{i}_<model>.png``:
the input, the ground-truth outline, and the predicted mask over the input with its Dice.
``--idx 11,468`` picks 0-based positions in the test split (default: all); the paths of the
test images and of the pictures are printed.

    python predict_segmentation.py --architecture resnet18 --image-size 128 --idx 0,3
"""
from gissl import cli, dist
from gissl import segmentation as seg
from gissl.data import build_segmentation_datasets
from gissl.pictures import picture_label


def get_args(argv=None):
    p = cli.task_parser("segmentation", "Make predictions with fine-tuned segmentation model",
                        stage="predict", datasets=seg.DATASETS)
    return cli.parse(seg.add_arguments(p, "predict"), argv)


def main(args):
    device = dist.resolve_device(args.device)
    state, path = cli.finetuned(args, cli.model_flags(seg.build_model))
    test = build_segmentation_datasets(args.dataset, cli.data_root(args), image_size=args.image_size,
                                       original=True, skip_bad=args.skip_bad_files)["test"]
    model = cli.finetuned_model(args, seg.build_model, state, path, device, dict(img_size=args.image_size))
    for image, picture in seg.render_predictions(model, test, device, folder=cli.predictions_dir(args),
                                                 label=picture_label(cli.run_name(args)),
                                                 positions=cli.positions(args), amp=not args.no_amp):
        print(f"{image} -> {picture}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
