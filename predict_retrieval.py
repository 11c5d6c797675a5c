"""Explainable polyp diagnosis by retrieval: show each query with its nearest past cases.

For every ``--query`` image: a picture ``Predictions/retrieval-<gallery>/<query>.png`` with the
query and its k nearest gallery images, each captioned with its label and cosine similarity,
and the neighbour vote ("7 of 10 nearest cases were polyps", docs/endofinder-retrieval.md §4), plus a JSON file
with the same content. ``--gallery`` is a folder (``<class>/<images>`` sub-folders give labels;
a flat folder gives unlabelled cases) or an index saved with ``--save-index``. Without
``--gallery`` / ``--query`` the built-in synthetic Hyperkvasir_pathological set is used
(training split = gallery, two test images = queries).

``--export-torchscript PATH`` writes a standalone descriptor model (images normalised with the
ImageNet mean / std -> L2-normalised descriptors) that needs neither gissl nor this checkpoint.

    python predict_retrieval.py --architecture resnet18 --image-size 64 --k 5
    python predict_retrieval.py --query new.jpg --gallery cases/ --save-index cases.npz
    python predict_retrieval.py --query new.jpg --gallery cases.npz
"""
import json
import os

import torch
from PIL import Image, ImageDraw

from eval_retrieval import check, load, postprocess
from gissl import cli, dist
from gissl import retrieval as R
from gissl.search import DescriptorIndex
from gissl.data import class_folder, image_folder
from gissl.data.images import open_rgb
from gissl.errors import DataError, UserError


def get_args(argv=None):
    p = cli.task_parser("retrieval", "Retrieve the nearest past cases of polyp images", stage="predict",
                        default_batch_size=32, default_arch="vit_b", encoder_checkpoint=True)
    R.add_arguments(p, "predict")
    p.add_argument("--query", nargs="+", default=None, help="query image file(s)")
    p.add_argument("--gallery", default=None,
                   help="folder of past cases (<class>/<images> for labels) or a saved index (.npz)")
    p.add_argument("--save-index", dest="save_index", default=None,
                   help="save the gallery index (descriptors, names, labels, post-processing) to this .npz")
    p.add_argument("--weighted-vote", dest="weighted_vote", action="store_true",
                   help="weigh each neighbour's vote by its similarity")
    p.add_argument("--export-torchscript", dest="export_torchscript", default=None, metavar="PATH",
                   help="write the descriptor model as TorchScript to PATH and exit")
    return check(cli.parse(p, argv))


def gallery_samples(args):
    """(paths, labels, class names, root, name) of the gallery folder or the synthetic default."""
    if args.gallery is None:
        from gissl.data import build_classification_datasets
        from gissl.data.synthetic import synthetic_root
        root = synthetic_root("Hyperkvasir_pathological")
        print(f"No --gallery given: using the training split of the built-in synthetic "
              f"Hyperkvasir_pathological at {root}", flush=True)
        ds = build_classification_datasets("Hyperkvasir_pathological", root, image_size=args.image_size)
        if args.query is None:
            args.query = [s["image"] for s in ds["test"].samples[:2]]
        g = ds["train"].samples
        return [s["image"] for s in g], [s["label"] for s in g], ds["train"].classes, root, "synthetic"
    try:
        samples, classes = class_folder(args.gallery, args.skip_bad_files)
        labels = [s["label"] for s in samples]
    except DataError:
        samples, classes = image_folder(args.gallery, args.skip_bad_files), None
        labels = [-1] * len(samples)
    return [s["image"] for s in samples], labels, classes, args.gallery, os.path.basename(os.path.normpath(args.gallery))


def build_gallery(args, model, device):
    if args.gallery and args.gallery.endswith(".npz"):
        index = DescriptorIndex.load(args.gallery, device="cpu" if device.type == "cpu" else "auto")
        return index, os.path.splitext(os.path.basename(args.gallery))[0]
    paths, labels, classes, root, name = gallery_samples(args)
    desc = R.extract_descriptors(model, paths, image_size=args.image_size, batch_size=args.batch_size,
                                 device=device, workers=args.workers, use_head=args.use_head, amp=not args.no_amp)
    post = postprocess(args, model, device)
    if post is not None:
        if post.needs_fit:
            post.fit(desc)
        desc = post(desc)
    index = DescriptorIndex(desc.shape[1], args.index, nprobe=args.nprobe,
                              device="cpu" if device.type == "cpu" else "auto")
    index.transform, index.label_names = post, classes
    # names keep the full path so the picture can show the neighbour images
    index.add(desc, names=[os.path.abspath(p) for p in paths], labels=labels)
    if args.save_index:
        index.save(args.save_index)
        print(f"gallery index ({index.ntotal} cases) saved to {args.save_index}", flush=True)
    return index, name


def thumbnail(path, size, caption):
    tile = Image.new("RGB", (size, size + 30), "white")
    try:
        tile.paste(open_rgb(path).resize((size, size)), (0, 0))
    except (DataError, OSError):  # the gallery file moved after the index was saved
        ImageDraw.Draw(tile).text((4, size // 2), "(image not found)", fill="black")
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(caption.split("\n")[:2]):
        draw.text((3, size + 2 + 13 * i), line[:size // 6], fill="black")
    return tile


def render(result, out_png, size=160):
    tiles = [thumbnail(result["query"], size, "QUERY\n" + os.path.basename(result["query"]))]
    for n in result["neighbours"]:
        tiles.append(thumbnail(n["reference"], size, f"#{n['rank'] + 1} {n['label'] or '?'}\nsim {n['similarity']:.3f}"))
    canvas = Image.new("RGB", (len(tiles) * (size + 6), size + 60), "white")
    for i, t in enumerate(tiles):
        canvas.paste(t, (i * (size + 6), 0))
    ImageDraw.Draw(canvas).text((4, size + 38), result["vote"]["sentence"], fill="black")
    canvas.save(out_png)


def main(args):
    device = dist.resolve_device(args.device)
    model = load(args, device)
    if args.export_torchscript:
        example = torch.zeros(1, 3, args.image_size, args.image_size, device=device)
        with torch.no_grad():
            scripted = torch.jit.trace(R.DescriptorModel(model, args.use_head).eval(), example)
        scripted.save(args.export_torchscript)
        print(f"TorchScript descriptor model written to {args.export_torchscript} "
              f"(input (N, 3, {args.image_size}, {args.image_size}) ImageNet-normalised)", flush=True)
        return
    index, name = build_gallery(args, model, device)
    if not args.query:
        raise UserError("no --query images given")
    missing = [q for q in args.query if not os.path.isfile(q)]
    if missing:
        raise UserError(f"query image(s) not found: {', '.join(missing)}")
    q = R.extract_descriptors(model, args.query, image_size=args.image_size, batch_size=args.batch_size,
                              device=device, workers=0, use_head=args.use_head, amp=not args.no_amp)
    if index.transform is not None:
        q = index.transform(q)
    k = min(args.k, index.ntotal)
    scores, ids = index.search(q, k)
    results = R.vote_results(index, scores, ids, weighted=args.weighted_vote)
    out_dir = cli.predictions_dir(args, name)
    os.makedirs(out_dir, exist_ok=True)
    for path, answer in zip(args.query, results):
        result = {"query": os.path.abspath(path), **answer}
        stem = os.path.splitext(os.path.basename(path))[0]
        with open(out_dir / f"{stem}.json", "w") as f:
            json.dump(result, f, indent=2)
        render(result, out_dir / f"{stem}.png")
        print(f"{path}: {result['vote']['sentence']} -> {out_dir / (stem + '.png')}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
