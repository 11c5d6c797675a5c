"""Training-pipeline throughput per CPU core: gissl's data pipeline vs a re-implementation of
SSL4GIE's (docs/ssl4gie-study.md §2.4, segmentation: the task with every augmentation).

Both pipelines read the same 1280x1072 JPEG frames and JPEG masks (synthetic, Kvasir-SEG
format) in one process with one thread, and produce a normalised (3, S, S) image and a
(1, S, S) mask:

- reference: full-size decode -> PIL resize to S (bicubic) -> PIL ColorJitter -> 25x25
  GaussianBlur -> ToTensor/Normalize -> flips -> TF.affine (nearest, fill -1);
- gissl: ``SegmentationDataset`` (JPEG draft decode at >= S, one resize, the same augmentation
  ranges with torchvision v2 on the small image, separable blur).

Usage: ``python benchmark_data.py [--num 24] [--image-size 224] [--json benchmark_data.json]``
"""

import argparse
import json
import os
import random
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms as T1
import torchvision.transforms.functional as TF1
from PIL import Image

from gissl.data import SegmentationDataset
from gissl.data.synthetic import render_polyp_image
from gissl.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def make_frames(folder, num, seed=0):
    """Kvasir-SEG-style 1280x1072 frames + RGB JPEG masks; returns [{"image", "mask"}]."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    samples = []
    for i in range(num):
        img, mask, _ = render_polyp_image(rng, 1072, 1280)
        ip, mp = os.path.join(folder, "images", f"{i}.jpg"), os.path.join(folder, "masks", f"{i}.jpg")
        Image.fromarray(img).save(ip, quality=90)
        Image.fromarray(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, -1)).save(mp, quality=90)
        samples.append({"image": ip, "mask": mp, "size": (1280, 1072)})
    return samples


class ReferencePipeline:
    """SSL4GIE Binary_segmentation train sample, re-implemented from docs/ssl4gie-study.md §2.4."""

    def __init__(self, size):
        self.size = size
        self.photometric = T1.Compose([
            T1.ColorJitter(brightness=0.4, contrast=0.5, saturation=0.25, hue=0.01),
            T1.GaussianBlur((25, 25), sigma=(0.001, 2.0)),
            T1.ToTensor(), T1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.to_mask = T1.Compose([T1.ToTensor(), T1.Grayscale()])

    def __call__(self, sample):
        s = self.size
        img = Image.open(sample["image"]).resize((s, s))  # full decode; PIL default = bicubic
        mask = Image.open(sample["mask"]).resize((s, s))
        x, m = self.photometric(img), self.to_mask(mask)
        if random.random() < 0.5:
            x, m = TF1.hflip(x), TF1.hflip(m)
        if random.random() < 0.5:
            x, m = TF1.vflip(x), TF1.vflip(m)
        angle, t = random.uniform(-180, 180), s / 8
        translate = [int(random.uniform(-t, t)), int(random.uniform(-t, t))]
        scale, shear = random.uniform(0.5, 1.5), random.uniform(-22.5, 22.5)
        x = TF1.affine(x, angle, translate, scale, shear, T1.InterpolationMode.NEAREST, fill=-1.0)
        m = TF1.affine(m, angle, translate, scale, shear, T1.InterpolationMode.NEAREST, fill=0.0)
        return {"image": x, "mask": m}


def decode_only(samples, size, draft):
    from gissl.data.images import open_rgb
    for s in samples:
        im = open_rgb(s["image"], (size, size) if draft else None)
        im.resize((size, size), Image.BICUBIC)


def rates(pipelines, samples, repeats):
    """Images per CPU-second of each pipeline. The pipelines take turns, one pass over the frames each per
    round, so that a change in machine load affects them all alike."""
    for fn in pipelines.values():
        fn(samples[:2])  # warm-up (lazy imports, allocator)
    spent = dict.fromkeys(pipelines, 0.0)
    for _ in range(repeats):
        for name, fn in pipelines.items():
            # CPU time of this process (one thread): images per core-second, and robust to other
            # programs competing for the cores, which only stretches wall-clock time
            t = time.process_time()
            fn(samples)
            spent[name] += time.process_time() - t
    return {name: len(samples) * repeats / t for name, t in spent.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=24, help="number of 1280x1072 frames")
    p.add_argument("--repeats", type=int, default=3, help="passes over the frames per pipeline")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--json", default="benchmark_data.json", help="where to write the results")
    a = p.parse_args()
    torch.set_num_threads(1)  # per-core numbers: one process, one thread
    random.seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_frames(tmp, a.num)
        ref = ReferencePipeline(a.image_size)
        ours = SegmentationDataset(samples, a.image_size, train=True)
        ours_out, ref_out = ours[0], ref(samples[0])
        if ours_out["image"].shape != ref_out["image"].shape or ours_out["mask"].shape != ref_out["mask"].shape:
            raise RuntimeError("the two pipelines produce different shapes")
        rows = rates({
            "reference pipeline (SSL4GIE seg. train)": lambda ss: [ref(s) for s in ss],
            "gissl pipeline (SegmentationDataset train)": lambda ss: [ours[i] for i in range(len(ss))],
            "decode + resize only, full-size decode": lambda ss: decode_only(ss, a.image_size, False),
            "decode + resize only, JPEG draft": lambda ss: decode_only(ss, a.image_size, True),
        }, samples, a.repeats)
    base = rows["reference pipeline (SSL4GIE seg. train)"]
    print(f"train-pipeline throughput, 1280x1072 JPEG -> {a.image_size}px, 1 process x 1 thread")
    print(f"{'pipeline':<46} {'img/s/core':>10} {'vs ref':>7}")
    for k, v in rows.items():
        print(f"{k:<46} {v:>10.1f} {v / base:>6.1f}x")
    result = {"image_size": a.image_size, "frames": a.num, "repeats": a.repeats, "source": "1280x1072 JPEG q90",
              "images_per_second_per_core": rows,
              "speedup": rows["gissl pipeline (SegmentationDataset train)"] / base}
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
