"""How good is a pretrained encoder without finetuning it? Probes on a frozen encoder.

Protocols (docs/transfer-study.md §b.1, with the fixes of docs/transfer-study.md §b.4/§b.5):
  linear      multinomial logistic regression on the features, L2 strength chosen on val over
              45 log-spaced values, refit on train + val, scored on test
  knn         cosine kNN with temperature-weighted votes (k = 20, T = 0.07, as DINO)
  fewshot     prototypical-network episodes: N-way K-shot, 15 queries, 600 episodes, mean ± 95 % CI
  invariance  cosine similarity of (centred) features under rotation, flips, colour, blur, crop
  saliency    occlusion maps (10×10 patch) and attentive diffusion (% of the map above its mean)
  zeroshot    CLIP / SLIP zero-shot classification: class names in prompt templates, text
              embeddings averaged over templates (Radford et al. 2021 §3.1.4); --checkpoint is
              pretrain.py's checkpoint.pth (both towers and the tokenizer)
  image-text-retrieval  Recall@1/5/10 image→text and text→image on the caption set's held-out
              test split (--dataset captions; the split pretrain.py did not train on)

The encoder is frozen and stays in eval mode (BatchNorm statistics never change); features are
extracted once per encoder / dataset / split and cached under ``<output-dir>/features``.

    python eval_transfer.py --protocol linear --architecture resnet18 --dataset Hyperkvasir_anatomical \
        --image-size 64
    python eval_transfer.py --protocol zeroshot --architecture vit_t --pretraining Hyperkvasir \
        --ss-framework clip --checkpoint pretrained/vit_t-clip-captions/checkpoint.pth --image-size 64
"""
import functools
import os

import torch

from gissl import cli, dist
from gissl import classification as cls
from gissl.classification import build_datasets, dataset_paths, prediction_picture, to_display, write_predictions_csv
from gissl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gissl.optim import freeze
from gissl.errors import UserError
from gissl.metrics import classification_metrics, format_per_class, topk_accuracy
from gissl.report import append_eval_results
from gissl import probes

PROTOCOLS = ("linear", "knn", "fewshot", "invariance", "saliency", "zeroshot", "image-text-retrieval")


def get_args(argv=None):
    # the probed encoder is built from --checkpoint; there is no finetuned model (no --weights)
    p = cli.task_parser("transfer", "Evaluate a frozen pretrained encoder with representation probes", stage="eval",
                        datasets=cls.CLASSIFICATION_DATASETS + ("captions",), default_batch_size=64, encoder_checkpoint=True,
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
    add_image_text_arguments(p)
    return check_transfer(cli.parse(p, argv))


def add_image_text_arguments(p):
    g = p.add_argument_group("zeroshot, image-text-retrieval")
    g.add_argument("--classnames", default=None,
                   help="comma-separated class names put into the prompts, in class-id order (default: the "
                        "dataset's class folder names, '-' read as a space)")
    g.add_argument("--templates", default=None, metavar="FILE",
                   help="prompt templates, one per line with {} for the class name (default: endoscopy "
                        f"templates, e.g. '{probes.ENDOSCOPY_TEMPLATES[0]}')")
    g.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz), needed for official SLIP files; "
                        "default: the tokenizer stored in a pretrain.py checkpoint")
    g.add_argument("--caption-format", dest="caption_format", default="auto",
                   choices=["auto", "csv", "roco", "medslip", "coco"],
                   help="image-text-retrieval: layout of the --dataset captions folder (auto = the one found)")


def check_image_text(args):
    """--dataset captions is the retrieval protocol's data, and only its."""
    if args.protocol == "image-text-retrieval" and "dataset" not in args.given:
        args.dataset = "captions"
    if (args.protocol == "image-text-retrieval") != (args.dataset == "captions"):
        raise UserError("--protocol image-text-retrieval runs on --dataset captions (image–caption pairs), and "
                        "--dataset captions only with it; the other protocols need a classification --dataset")
    if args.protocol in ("zeroshot", "image-text-retrieval") and not args.checkpoint:
        raise UserError(f"--protocol {args.protocol} needs --checkpoint: the checkpoint.pth of a pretrain.py "
                        "--ss-framework clip or slip run (both towers and the tokenizer), or an official SLIP file "
                        "with --tokenizer")
    if getattr(args, "tokenizer", None) and not os.path.isfile(args.tokenizer):
        raise UserError(f"--tokenizer '{args.tokenizer}' does not exist")


def check_transfer(args):
    check_image_text(args)
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


def image_text(args, device, root, model=None):
    """``--protocol zeroshot`` / ``image-text-retrieval`` with the CLIP model of ``--checkpoint``
    (``model``, ``(model, tokenizer)``, overrides it: tests). Returns the result dict."""
    from gissl.data import ClassificationDataset, build_caption_datasets
    from gissl.data.synthetic import class_phrase
    from gissl.ssl.clip import load_image_text_model
    model, tokenizer = model or load_image_text_model(args.checkpoint, args.tokenizer)
    model = freeze(model).to(device).eval()
    tokenize = functools.partial(tokenizer, context_length=model.text.context_length)
    extract = functools.partial(probes.extract_features, probes.ImageEmbedder(model), device=device,
                                batch_size=args.batch_size, workers=args.workers)
    if args.protocol == "image-text-retrieval":
        test = build_caption_datasets(root, format=args.caption_format, skip_bad=args.skip_bad_files)["test"]
        # the eval transform of every classification split (exact resize, normalise); labels unused
        images = extract(ClassificationDataset([dict(s, label=0) for s in test], args.image_size))["features"]
        captions = [(i, c) for i, s in enumerate(test) for c in s["captions"]]
        with torch.inference_mode():
            texts = torch.cat([model.encode_text(tokenize([c for _, c in captions[j:j + args.batch_size]])
                                                 .to(device)).float().cpu()
                               for j in range(0, len(captions), args.batch_size)])
        res = probes.image_text_recall(images, texts, [i for i, _ in captions])
        res.update({"Images": len(test), "Captions": len(captions)})
        print("  ".join(f"{k} {v:.2f}" for k, v in res.items()))
        return res, None
    ds, classes = build_datasets(args.dataset, root, image_size=args.image_size, split=args.split,
                                 skip_bad=args.skip_bad_files, augment_train=False)
    names = [c.strip() for c in args.classnames.split(",")] if args.classnames else [class_phrase(c) for c in classes]
    if len(names) != len(classes):
        raise UserError(f"--classnames gives {len(names)} names; {args.dataset} has {len(classes)} classes "
                        f"({', '.join(classes)})")
    templates = probes.read_templates(args.templates) if args.templates else probes.ENDOSCOPY_TEMPLATES
    weights = probes.zeroshot_weights(model.encode_text, tokenize, names, templates, device)
    f = extract(ds["test"])
    probs = probes.zeroshot_logits(f["features"].to(device), weights, model.logit_scale.exp()).softmax(1).cpu()
    res = {"Top-1 accuracy": topk_accuracy(f["labels"], probs, 1), "Top-5 accuracy": topk_accuracy(f["labels"], probs, 5)}
    res.update(scores(f["labels"], probs, classes))
    res["Templates"] = len(templates)
    return res, (ds, f, probs)


def main(args, encoder=None):
    """Run ``args.protocol``; ``encoder`` overrides the one built from the flags (tests; for
    zeroshot and image-text-retrieval a ``(CLIP model, tokenizer)`` pair)."""
    device = dist.resolve_device(args.device)
    root = cli.data_root(args)
    if args.protocol in ("zeroshot", "image-text-retrieval"):
        res, predictions = image_text(args, device, root, encoder)
        append_eval_results(f"Transfer ({args.protocol}) results", cli.run_name(args), res)
        if args.save_predictions and predictions is not None:
            ds, f, probs = predictions
            write_predictions_csv(args.save_predictions, dataset_paths(ds["test"]), f["labels"], probs)
            print(f"predictions: {args.save_predictions}")
        return res
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
