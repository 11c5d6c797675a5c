"""Pictures of a finetuned classifier's predictions on test images.

For each chosen test image (``--idx``: 0-based positions in the test split; default all):
the image, the top-3 classes with probabilities, the true class, and a heat map of what the
decision rests on (Grad-CAM for ResNets, occlusion of 16-px patches for ViTs), saved under
``Predictions/classification-<dataset>/``; the paths are printed.

    python predict_classification.py --architecture resnet18 --dataset Hyperkvasir_anatomical \
        --image-size 64 --idx 0,5
"""
from pathlib import Path

import torch

from gissl import cli, dist
from gissl.classification import (check_args, explanation, load_finetuned, prediction_picture, task_parser,
                                  to_display)
from gissl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gissl.errors import UserError


def get_args():
    return check_args(task_parser("predict", "Make predictions with fine-tuned classification model").parse_args())


def main(args):
    device = dist.resolve_device(args.device)
    ds, classes, model = load_finetuned(args, device)
    test = ds["test"]
    idx = getattr(args, "idx_list", None) or list(range(len(test)))
    bad = [i for i in idx if not 0 <= i < len(test)]
    if bad:
        raise UserError(f"--idx {bad} out of range: the test split has {len(test)} images (0..{len(test) - 1})")
    label = cli.run_name(args).rsplit("-dataset_", 1)[0]
    folder = cli.predictions_dir(args)
    for i in idx:
        sample = test[i]
        image = sample["image"].to(device)
        with torch.inference_mode():
            probs = torch.softmax(model(image[None]).float(), 1)[0].cpu()
        top = probs.topk(min(3, len(classes)))
        heat = explanation(model, image, int(top.indices[0])).cpu()
        path = test.samples[i]["image"]
        print(path)
        out = prediction_picture(to_display(image, IMAGENET_MEAN, IMAGENET_STD), heat,
                                 [(classes[c], float(p)) for p, c in zip(top.values, top.indices)],
                                 classes[int(sample["label"])], folder / f"test{i}_{label}.png", title=Path(path).name)
        print(f"  -> {out}")


if __name__ == "__main__":
    cli.run(main, get_args)
