"""How good is a pretrained encoder without finetuning it? Probes on a frozen encoder.

Protocols (docs/transfer-study.md §b.1, with the fixes of docs/transfer-study.md §b.4/§b.5):
  linear      multinomial logistic regression on the features, L2 strength chosen on val over
              45 log-spaced values, refit on train + val, scored on test
  knn         cosine kNN with temperature-weighted votes (k = 20, T = 0.07, as DINO)
  fewshot     prototypical-network episodes: N-way K-shot, 15 queries, 600 episodes, mean ± 95 % CI
  invariance  cosine similarity of (centred) features under rotation, flips, colour, blur, crop
  saliency    occlusion maps (10×10 patch) and attentive diffusion (% of the map above its mean)

The encoder is frozen and stays in eval mode (BatchNorm statistics never change); features are
extracted once per encoder / dataset / split and cached under ``<output-dir>/features``.

    python eval_transfer.py --protocol linear --architecture resnet18 --dataset Hyperkvasir_anatomical \
        --image-size 64
"""
import os

import torch

from gissl import cli, dist
from gissl import classification as cls
from gissl.classification import build_datasets, dataset_paths, prediction_picture, to_display, write_predictions_csv
from gissl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gissl.optim import freeze
from gissl.errors import UserError
from gissl.metrics import classification_metrics, format_per_class
from gissl.report import append_eval_results
from gissl import probes

PROTOCOLS = ("linear", "knn", "fewshot", "invariance", "saliency")


def get_args(argv=None):
    # the probed encoder is built from --checkpoint; there is no finetuned model (no --weights)
    p = cli.task_parser("transfer", "Evaluate a frozen pretrained encoder with representation probes", stage="eval",
                        datasets=cls.CLASSIFICATION_DATASETS, default_batch_size=64, encoder_checkpoint=True,
                        weights=False)
    cls.add_arguments(p, "eval")
    p.add_argument("--protocol", default="linear", choices=PROTOCOLS,
                   help="linear probe, kNN, few-shot episodes, invariance to transforms, or occlusion saliency")
    p.add_argument("--no-cache", dest="no_cache", action="store_true", help="re-extract features")
    g = p.add_argument_group("linear")
    g.add_argument("--wd-values", dest="wd_values", type=int, default=45,
                   help="L2 strengths tried, log-spaced over 1e-6..1e5 (the reference's 45)")
    g = p.add_argument_group("knn")
    g.add_argument("--knn-k", dest="knn_k", type=int, default=20, help="neighbours that vote (DINO: 20)")
    g.add_argument("--temperature", type=float, default=0.07,
                   help="vote weight exp(cosine / T) (DINO: 0.07)")
    g = p.add_argument_group("fewshot")
    g.add_argument("--n-way", dest="n_way", type=int, default=5, help="classes per episode")
    g.add_argument("--k-shot", dest="k_shot", type=int, default=5,
                   help="support images per class (the transfer study's paper runs used 20)")
    g.add_argument("--n-query", dest="n_query", type=int, default=15, help="query images per class and episode")
    g.add_argument("--episodes", type=int, default=600, help="episodes averaged (mean and 95 %% interval)")
    g.add_argument("--distance", default="euclidean", choices=["euclidean", "cosine"],
                   help="prototype distance: squared Euclidean on raw features (ProtoNet) or cosine")
    g.add_argument("--fewshot-pool", dest="fewshot_pool", default="split", choices=["split", "pooled"],
                   help="split = support from train, queries from test; pooled = both from all images "
                        "(the transfer study's protocol; use it when test has too few images per class)")
    g = p.add_argument_group("invariance")
    g.add_argument("--families", default=",".join(probes.INVARIANCE_FAMILIES),
                   help="comma-separated transform families")
    g.add_argument("--num-images", dest="num_images", type=int, default=100,
                   help="test images used (the reference's default)")
    g.add_argument("--k-transforms", dest="k_transforms", type=int, default=8,
                   help="transforms drawn per family and image")
    g = p.add_argument_group("saliency")
    g.add_argument("--idx", default="0", help="comma-separated 0-based positions in the test split")
    g.add_argument("--patch", type=int, default=10, help="occluding window side in pixels (reference 10)")
    g.add_argument("--stride", type=int, default=5,
                   help="window stride; the reference's 1 costs (size-9)² forward passes per image")
    return check_transfer(cli.parse(p, argv))


def check_transfer(args):
    cls.check_dataset(args.dataset, args.data_root)
    if args.pretraining in ("Hyperkvasir", "ImageNet_self") and not (args.ss_framework and args.checkpoint):
        raise UserError(f"--pretraining {args.pretraining} needs --ss-framework and --checkpoint PATH")
    args.frozen = True  # the name says so: '...init-frozen_True-dataset_...'
    return args


def build_frozen_encoder(args, device):
    """The pretrained encoder, frozen and in eval mode."""
    return freeze(cli.encoder(args, img_size=args.image_size)).to(device).eval()


def features(args, encoder, datasets, root, device):
    """``{split: {"features", "labels"}}`` for train/val/test, cached per encoder and dataset."""
    folder = cli.output_dir(args) / "features"
    out = {}
    for split, ds in datasets.items():
        cache = None if args.no_cache else probes.feature_cache_path(
            folder, arch=args.arch, pretraining=args.pretraining, ss=args.ss_framework,
            checkpoint=probes.checkpoint_identity(args.checkpoint), dataset=args.dataset,
            init_seed=args.seed if args.pretraining == "random" else None,  # --seed draws the init
            root=os.path.abspath(root), split_kind=args.split, split=split, image_size=args.image_size, n=len(ds))
        out[split] = probes.extract_features(encoder, ds, device=device, batch_size=args.batch_size,
                                             workers=args.workers, cache=cache)
    return out


def scores(target, probs, classes):
    m = classification_metrics(target, probs.argmax(1), probs, num_classes=len(classes), class_names=classes)
    for line in format_per_class(m):
        print(line)
    res = {"mF1": m["macro_f1"], "mPrecision": m["macro_precision"], "mRecall": m["macro_recall"],
           "Accuracy": m["accuracy"], "Balanced accuracy": m["balanced_accuracy"], "mAUROC": m["macro_auroc"],
           "Classes absent from test split": ", ".join(m["absent_classes"]) or "none"}
    return res


def main(args, encoder=None):
    """Run ``args.protocol``; ``encoder`` overrides the one built from the flags (tests)."""
    device = dist.resolve_device(args.device)
    root = cli.data_root(args)
    ds, classes = build_datasets(args.dataset, root, image_size=args.image_size, split=args.split,
                                 skip_bad=args.skip_bad_files, augment_train=False)
    if encoder is None:
        encoder = build_frozen_encoder(args, device)
    else:
        freeze(encoder).to(device).eval()
    name = cli.run_name(args)
    title = f"Transfer ({args.protocol}) results"
    proto = args.protocol
    if proto in ("linear", "knn", "fewshot"):
        f = features(args, encoder, ds, root, device)
    if proto == "linear":
        model, history = probes.linear_probe(f["train"]["features"], f["train"]["labels"], f["val"]["features"],
                                             f["val"]["labels"], len(classes), grid=probes.c_grid(args.wd_values))
        best = max(h[1] for h in history)
        print(f"C = {model.C:.4g} chosen on val macro F1 ({best:.4f}); refit on train + val")
        probs = model.predict_proba(f["test"]["features"])
        res = scores(f["test"]["labels"], probs, classes)
        res["C"] = model.C
    elif proto == "knn":
        probs = probes.knn_predict(f["train"]["features"], f["train"]["labels"], f["test"]["features"],
                                   len(classes), k=args.knn_k, temperature=args.temperature)
        res = scores(f["test"]["labels"], probs, classes)
        res.update({"k": args.knn_k, "T": args.temperature})
    elif proto == "fewshot":
        if args.fewshot_pool == "pooled":
            allf = torch.cat([f[s]["features"] for s in ("train", "val", "test")])
            ally = torch.cat([f[s]["labels"] for s in ("train", "val", "test")])
            r = probes.fewshot_episodes(allf, ally, n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query,
                                        episodes=args.episodes, seed=args.seed, distance=args.distance)
        else:
            r = probes.fewshot_episodes(f["train"]["features"], f["train"]["labels"], f["test"]["features"],
                                        f["test"]["labels"], n_way=args.n_way, k_shot=args.k_shot,
                                        n_query=args.n_query, episodes=args.episodes, seed=args.seed,
                                        distance=args.distance)
        res = {"Accuracy (%)": r["mean"], "95% CI (%)": r["ci95"],
               "Episodes": f"{args.n_way}-way {args.k_shot}-shot {args.n_query} queries x {args.episodes} "
                           f"({args.fewshot_pool}, {args.distance})"}
        print(f"Test Acc = {r['mean']:.2f}% +- {r['ci95']:.2f}%")
    elif proto == "invariance":
        test = ds["test"]
        g = torch.Generator().manual_seed(args.seed)
        pick = torch.randperm(len(test), generator=g)[:args.num_images].tolist()
        images = torch.stack([test[i]["image"] for i in pick]).to(device)
        fams = [s.strip() for s in args.families.split(",") if s.strip()]
        center = features(args, encoder, {"train": ds["train"]}, root, device)["train"]["features"].mean(0).to(device)
        res = {f"{k} similarity": v for k, v in probes.invariance(
            encoder, images, families=fams, k=args.k_transforms, center=center, batch_size=args.batch_size,
            seed=args.seed, mean=IMAGENET_MEAN, std=IMAGENET_STD).items()}
        res["Images"] = len(pick)
    elif proto == "saliency":
        test = ds["test"]
        idx = cli.positions(args) or [0]
        bad = [i for i in idx if not 0 <= i < len(test)]
        if bad:
            raise UserError(f"--idx {bad} out of range: the test split has {len(test)} images")
        folder = cli.predictions_dir(args)
        diffusion = []
        for i in idx:
            image = test[i]["image"].to(device)
            sal = probes.occlusion_map(encoder, image, patch=args.patch, stride=args.stride,
                                       batch_size=args.batch_size).cpu()
            diffusion.append(probes.attentive_diffusion(sal))
            path = prediction_picture(to_display(image, IMAGENET_MEAN, IMAGENET_STD), sal, [],
                                      classes[int(test[i]["label"])], folder / f"saliency{i}_{name}.png",
                                      title=f"attentive diffusion {diffusion[-1]:.2f}%")
            print(f"{test.samples[i]['image']}\n  -> {path}")
        res = {"Attentive diffusion (%)": sum(diffusion) / len(diffusion), "Images": len(idx),
               "Occlusion": f"{args.patch}x{args.patch} patch, stride {args.stride}"}
    append_eval_results(title, name, res)
    if args.save_predictions and proto in ("linear", "knn"):
        write_predictions_csv(args.save_predictions, dataset_paths(ds["test"]), f["test"]["labels"], probs)
        print(f"predictions: {args.save_predictions}")
    return res


if __name__ == "__main__":
    cli.run(main, get_args)
