"""How good is a pretrained encoder without finetuning it? Probes on a frozen encoder.

Protocols (docs/transfer-study.md §b.1, with the fixes of docs/transfer-study.md §b.4/§b.5):
  linear      multinomial logistic regression on the features, L2 strength chosen on val over
              45 log-spaced values, refit on train + val, scored on test
  knn         cosine kNN with temperature-weighted votes (k = 20, T = 0.07, as DINO)
  fewshot     prototypical-network episodes: N-way K-shot, 15 queries, 600 episodes, mean ± 95 % CI
  invariance  cosine similarity of (centred) features under rotation, flips, colour, blur, crop
  saliency    occlusion maps (10×10 patch) and attentive diffusion (% of the map above its mean)
  reconstruction  deep-image-prior feature inversion (Ulyanov et al. 2018, as Zhao et al. 2021):
              input | reconstruction panels for --idx, PSNR and SSIM (LPIPS with --lpips-weights)
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
from gissl.classification import dataset_paths, prediction_picture, to_display, write_predictions_csv
from gissl.data import medical
from gissl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gissl.optim import freeze
from gissl.errors import UserError
from gissl.metrics import classification_metrics, format_per_class, topk_accuracy
from gissl.report import append_eval_results
from gissl import inversion, probes

PROTOCOLS = ("linear", "knn", "fewshot", "invariance", "saliency", "reconstruction", "zeroshot",
             "image-text-retrieval")


def get_args(argv=None):
    # the probed encoder is built from --checkpoint; there is no finetuned model (no --weights)
    p = cli.task_parser("transfer", "Evaluate a frozen pretrained encoder with representation probes", stage="eval",
                        datasets=cls.CLASSIFICATION_DATASETS + ("captions",),
                        default_batch_size=64, encoder_checkpoint=True,
                        weights=False)
    cls.add_arguments(p, "eval")
    p.add_argument("--protocol", default="linear", choices=PROTOCOLS,
                   help="linear probe, kNN, few-shot episodes, invariance to transforms, occlusion saliency, "
                        "or deep-image-prior reconstruction from the features")
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
    g.add_argument("--idx", default="0",
                   help="comma-separated 0-based positions in the test split (saliency, reconstruction)")
    g.add_argument("--patch", type=int, default=10, help="occluding window side in pixels (reference 10)")
    g.add_argument("--stride", type=int, default=5,
                   help="window stride; the reference's 1 costs (size-9)² forward passes per image")
    add_reconstruction_arguments(p)
    add_image_text_arguments(p)
    return check_transfer(cli.parse(p, argv))


def _ints(text):
    return tuple(int(v) for v in str(text).split(",") if v.strip())


def add_reconstruction_arguments(p):
    g = p.add_argument_group("reconstruction (deep image prior; defaults: the transfer study's reconstruction.py)")
    g.add_argument("--feature-layer", dest="feature_layer", default="stage4", choices=inversion.FEATURE_LAYERS,
                   help="features to invert: stage1..stage4 = forward_features maps (ResNet stages; stage4 is "
                        "the study's layer4), pooled = the encoder's output vector")
    g.add_argument("--dip-iterations", dest="dip_iterations", type=int, default=inversion.DIP_ITERATIONS,
                   help="Adam steps on the generator (study: 1000; its cluster runs used 3000)")
    g.add_argument("--dip-lr", dest="dip_lr", type=float, default=inversion.DIP_LR,
                   help="Adam learning rate of the generator (study: 1e-3)")
    g.add_argument("--dip-channels", dest="dip_channels", default=",".join(map(str, inversion.DIP_CHANNELS)),
                   help="generator channels per level, comma-separated (one value per level; study: "
                        "16,32,64,128,128,128); fewer or narrower levels are faster on CPU")
    g.add_argument("--dip-skip-channels", dest="dip_skip_channels",
                   default=",".join(map(str, inversion.DIP_SKIP_CHANNELS)),
                   help="channels of each level's 1x1 skip connection, comma-separated (0 = none; study: 4 each)")
    g.add_argument("--dip-kernels", dest="dip_kernels", default=",".join(map(str, inversion.DIP_KERNELS)),
                   help="odd convolution kernel side per level in pixels, comma-separated (study: 7,7,5,5,3,3)")
    g.add_argument("--dip-input-depth", dest="dip_input_depth", type=int, default=inversion.DIP_INPUT_DEPTH,
                   help="channels of the input noise (study: 32)")
    g.add_argument("--lpips-weights", dest="lpips_weights", default=None, metavar="FILE",
                   help="the LPIPS package's AlexNet linear layers (weights/v0.1/alex.pth); with "
                        "--lpips-backbone, LPIPS is reported too (skipped otherwise: nothing is downloaded)")
    g.add_argument("--lpips-backbone", dest="lpips_backbone", default=None, metavar="FILE",
                   help="torchvision AlexNet ImageNet weights (alexnet-owt-7be5be79.pth) for LPIPS")


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
    cli.check_classification_dataset(args)
    if args.pretraining in ("Hyperkvasir", "ImageNet_self") and not (args.ss_framework and args.checkpoint):
        raise UserError(f"--pretraining {args.pretraining} needs --ss-framework and --checkpoint PATH")
    args.frozen = True  # the name says so: '...init-frozen_True-dataset_...'
    if args.protocol == "reconstruction":
        check_reconstruction(args)
    return args


def medical_identity(args):
    """What, besides the images, decides a medical dataset's labels (part of the feature cache key)."""
    if args.dataset not in medical.MEDICAL_DATASETS:
        return {}  # other datasets keep their cache keys
    return {"labels": [probes.checkpoint_identity(args.labels), args.path_column, args.label_column, args.label_kind,
                       args.classes, args.group_column, args.chexpert_uncertain]}


def check_reconstruction(args):
    try:
        args.dip_channels, args.dip_skip_channels, args.dip_kernels = (
            _ints(args.dip_channels), _ints(args.dip_skip_channels), _ints(args.dip_kernels))
    except ValueError:
        raise UserError("--dip-channels, --dip-skip-channels and --dip-kernels take comma-separated integers, "
                        "e.g. 16,32,64") from None
    if args.dip_iterations < 1 or args.dip_lr <= 0:
        raise UserError(f"--dip-iterations {args.dip_iterations} must be >= 1 and --dip-lr {args.dip_lr} > 0")
    if bool(args.lpips_weights) != bool(args.lpips_backbone):
        raise UserError("LPIPS needs both --lpips-weights FILE and --lpips-backbone FILE (or neither: it is skipped)")
    for flag, path in (("--lpips-weights", args.lpips_weights), ("--lpips-backbone", args.lpips_backbone)):
        if path and not os.path.isfile(path):
            raise UserError(f"{flag} '{path}' does not exist")
    if args.image_size < 11:
        raise UserError(f"--image-size {args.image_size}: SSIM needs images of at least 11 pixels")


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
            root=os.path.abspath(root), split_kind=args.split, split=split, image_size=args.image_size, n=len(ds),
            **medical_identity(args))
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
    _, ds, classes = cli.classification_datasets(args, augment_train=False)
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
    if args.protocol in ("zeroshot", "image-text-retrieval"):
        res, predictions = image_text(args, device, cli.data_root(args), encoder)
        append_eval_results(f"Transfer ({args.protocol}) results", cli.run_name(args), res)
        if args.save_predictions and predictions is not None:
            ds, f, probs = predictions
            write_predictions_csv(args.save_predictions, dataset_paths(ds["test"]), f["labels"], probs)
            print(f"predictions: {args.save_predictions}")
        return res
    root, ds, classes = cli.classification_datasets(args, augment_train=False)
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
    elif proto == "reconstruction":
        res = reconstruction(args, encoder, ds["test"], device, name)
    append_eval_results(title, name, res)
    if args.save_predictions and proto in ("linear", "knn"):
        write_predictions_csv(args.save_predictions, dataset_paths(ds["test"]), f["test"]["labels"], probs)
        print(f"predictions: {args.save_predictions}")
    return res


def reconstruction(args, encoder, test, device, name):
    """Invert the features of each ``--idx`` test image; save input | reconstruction panels and
    return the mean PSNR / SSIM (and LPIPS with its weight files) over those images."""
    idx = cli.positions(args) or [0]
    bad = [i for i in idx if not 0 <= i < len(test)]
    if bad:
        raise UserError(f"--idx {bad} out of range: the test split has {len(test)} images")
    lpips = inversion.load_lpips(args.lpips_backbone, args.lpips_weights) if args.lpips_weights else None
    if lpips is None:
        print("LPIPS skipped: it needs --lpips-weights and --lpips-backbone (local files; nothing is downloaded)")
    folder, scores = cli.predictions_dir(args), {"PSNR (dB)": [], "SSIM": [], "LPIPS": [], "Feature MSE ratio": []}
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i in idx:
        image = (test[i]["image"] * std + mean).clamp(0, 1).to(device)  # [0, 1]: what the generator makes
        out = inversion.invert(encoder, image, layer=args.feature_layer, iterations=args.dip_iterations,
                               lr=args.dip_lr, channels=args.dip_channels, skips=args.dip_skip_channels,
                               kernels=args.dip_kernels, input_depth=args.dip_input_depth, seed=args.seed,
                               mean=IMAGENET_MEAN, std=IMAGENET_STD, log_every=max(1, args.dip_iterations // 5))
        rec = out["reconstruction"]
        scores["PSNR (dB)"].append(inversion.psnr(rec, image))
        scores["SSIM"].append(inversion.ssim(rec, image))
        scores["Feature MSE ratio"].append(out["losses"][0] / max(out["losses"][-1], 1e-30))
        text = f"PSNR {scores['PSNR (dB)'][-1]:.2f} dB, SSIM {scores['SSIM'][-1]:.3f}"
        if lpips is not None:
            scores["LPIPS"].append(float(lpips.to(device)(rec[None], image[None])[0]))
            text += f", LPIPS {scores['LPIPS'][-1]:.3f}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"reconstruction{i}_{name}.png"
        inversion.reconstruction_panel(image, rec, text).save(path)
        print(f"{test.samples[i]['image']}: {text}, feature MSE {out['losses'][0]:.4g} -> {out['losses'][-1]:.4g} "
              f"in {out['seconds']:.1f} s\n  -> {path}")
    res = {k: sum(v) / len(v) for k, v in scores.items() if v}
    res["LPIPS"] = res.get("LPIPS", "skipped (no --lpips-weights)")
    res.update({"Images": len(idx), "Feature layer": args.feature_layer, "DIP iterations": args.dip_iterations})
    return res


if __name__ == "__main__":
    cli.run(main, get_args)
