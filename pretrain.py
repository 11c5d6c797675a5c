"""Self-supervised pretraining of an encoder on unlabelled endoscopy images.

Methods (``--ss-framework``): MoCo v3 (ResNet or ViT), Barlow Twins (ResNet), MAE (ViT),
SimSiam and FPSiam (ResNet), SimCLR (either), each with its paper's augmentations, optimiser,
warm-up + cosine learning rate and ``--blr`` (learning rate per 256 images) scaled by the
effective batch; and the image–text methods CLIP and SLIP (CLIP + ``--ssl-scale`` x SimCLR) on
image–caption pairs (``--dataset captions``: captions.csv, ROCO, MedSLIP's selected_pairs.txt
or COCO captions; the built-in captioned synthetic set without ``--data-root``), trained on the
caption set's train split so that its test split stays held out for retrieval.
Runs on the shared engine: CPU, one GPU or torchrun (DDP), bf16/fp16 autocast, gradient
accumulation, and re-running the same command resumes.

Writes ``<output-dir>/<arch>-<framework>-<dataset>/``: ``checkpoint.pth`` (full training
state, also the resume point as ``checkpoint.last.pth``), ``encoder.pth`` (the encoder only,
torchvision / timm names), ``checkpoint.txt`` / ``.jsonl`` logs. Either file loads in every
task script with ``--pretraining Hyperkvasir --ss-framework X --checkpoint FILE``. For CLIP and
SLIP ``checkpoint.pth`` also holds the text tower, both projections, ``logit_scale`` and the
tokenizer (under ``extra``), which ``eval_transfer.py --protocol zeroshot`` reads.

    python pretrain.py --ss-framework mocov3 --architecture resnet18 --image-size 64 --epochs 5 \
        --batch-size 32
    python pretrain.py --ss-framework clip --architecture vit_t --image-size 64 --epochs 10 \
        --batch-size 64 --text-width 128 --text-layers 2 --text-heads 2 --embed-dim 128
    torchrun --nproc_per_node 6 pretrain.py --ss-framework mae --architecture vit_b \
        --data-root hyper-kvasir/unlabeled-images --batch-size 768 --epochs 800
"""
import argparse
import functools
import os

from gissl import cli, dist
from gissl.checkpoint import save_atomic
from gissl.data import UnlabelledDataset, build_unlabelled_dataset
from gissl.data.captions import CAPTION_FORMATS, CaptionDataset, build_caption_datasets
from gissl.engine import fit
from gissl.optim import build_optimizer
from gissl.errors import UserError
from gissl.models import build_encoder, vit_num_heads
from gissl.ssl import (FRAMEWORKS, TEXT_FRAMEWORKS, VIEWS, build_ssl_model, cosine_momentum, export_encoder,
                       recipe, warmup_cosine)
from gissl.ssl.clip import TEXT_TOWER_FLAGS, text_tower

DATASETS = ("Hyperkvasir_unlabelled", "folder", "captions")


def get_args(argv=None):
    p = cli.task_parser("pretraining", "Self-supervised pretraining of an encoder on unlabelled images",
                        stage="train", datasets=DATASETS, default_epochs=100, default_batch_size=256,
                        default_lr=None, default_output_dir="pretrained")
    p.set_defaults(weight_decay=None)  # the framework's recipe value unless given
    g = p.add_argument_group("pretraining (defaults: each paper's recipe, see README)")
    g.add_argument("--blr", type=float, default=None,
                   help="base learning rate per 256 images; lr = blr * batch / 256 (MoCo v3: "
                        "0.3 ResNet / 1.5e-4 ViT; Barlow Twins 0.2; MAE 1.5e-4; SimSiam/FPSiam 0.05). "
                        "SimCLR/CLIP/SLIP: none, their papers' lr 3.2e-3 / 5e-4 / 3e-3 is absolute, as SLIP's code. "
                        "--learning-rate, when given, sets the absolute lr instead")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=None,
                   help="linear warm-up length; default: the paper's warm-up fraction of its schedule "
                        "applied to --epochs")
    g.add_argument("--min-lr", dest="min_lr", type=float, default=None,
                   help="lr at the end of the cosine (default 0; SimCLR/CLIP/SLIP 1e-5, as SLIP)")
    g.add_argument("--optimizer", default=None, choices=["lars", "adamw", "sgd"],
                   help="default: LARS for MoCo v3 ResNet and Barlow Twins, AdamW for ViTs, SGD for SimSiam")
    g.add_argument("--color-strength", dest="color_strength", type=float, default=1.0,
                   help="scale of the colour augmentations (jitter, grayscale, solarize): 1 = the paper's, "
                        "0 = none (keeps colour, which is diagnostic in endoscopy, out of the invariances)")
    g.add_argument("--decode-size", dest="decode_size", type=int, default=None,
                   help="decode JPEGs at reduced scale with this short side (default 2 x --image-size)")
    g.add_argument("--dim", type=int, default=None,
                   help="projector output width (MoCo v3 256, SimSiam/FPSiam 2048, SimCLR/SLIP head 256)")
    g.add_argument("--mlp-dim", dest="mlp_dim", type=int, default=None,
                   help="hidden width of the heads (MoCo v3 4096, Barlow Twins 8192, SimSiam predictor 512, "
                        "SimCLR/SLIP head 4096)")
    g.add_argument("--temperature", type=float, default=None,
                   help="softmax temperature: MoCo v3 (default 1.0 ResNet / 0.2 ViT), SimCLR and SLIP's SimCLR "
                        "term (default 0.1)")
    g.add_argument("--moco-momentum", dest="moco_momentum", type=float, default=0.99,
                   help="MoCo v3 momentum at step 0; it rises to 1 on a cosine")
    g.add_argument("--stop-grad-patch-embed", dest="stop_grad_patch_embed",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="MoCo v3 ViT: keep the random patch projection fixed (the paper's stability fix)")
    g.add_argument("--lambd", type=float, default=0.0051, help="Barlow Twins off-diagonal weight")
    g.add_argument("--mask-ratio", dest="mask_ratio", type=float, default=0.75, help="MAE")
    g.add_argument("--norm-pix-loss", dest="norm_pix_loss", action="store_true",
                   help="MAE: predict per-patch normalised pixels (better features in the paper)")
    g.add_argument("--decoder-dim", dest="decoder_dim", type=int, default=512, help="MAE")
    g.add_argument("--decoder-depth", dest="decoder_depth", type=int, default=8, help="MAE")
    g.add_argument("--decoder-heads", dest="decoder_heads", type=int, default=16, help="MAE")
    g.add_argument("--fpsiam-lambda", dest="fpsiam_lambda", type=float, default=0.5,
                   help="FPSiam weight of the local (P2) loss; the global (P5) loss gets 1 - lambda")
    add_text_arguments(p)
    return check(cli.parse(p, argv))


def add_text_arguments(p):
    """Flags of the image–text methods (CLIP, SLIP)."""
    g = p.add_argument_group("image–text (clip, slip)")
    g.add_argument("--ssl-scale", dest="ssl_scale", type=float, default=1.0,
                   help="SLIP: weight of the SimCLR loss added to the CLIP loss (SLIP's 1.0)")
    g.add_argument("--caption-format", dest="caption_format", default="auto", choices=CAPTION_FORMATS,
                   help="--dataset captions layout: captions.csv, ROCO captions.txt, MedSLIP selected_pairs.txt, "
                        "COCO captions JSON; auto = the one found in --data-root")
    g.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) for the official token ids; "
                        "default: a BPE learnt from the training captions, saved in the checkpoint")
    g.add_argument("--tokenizer-vocab-size", dest="vocab_size", type=int, default=8192,
                   help="tokens of the learnt BPE (without --tokenizer); fewer when the captions have fewer merges")
    g.add_argument("--context-length", dest="context_length", type=int, default=77,
                   help="tokens per caption, start and end-of-text included (CLIP's 77)")
    g.add_argument("--text-width", dest="text_width", type=int, default=512, help="text transformer width (CLIP 512)")
    g.add_argument("--text-layers", dest="text_layers", type=int, default=12, help="text transformer blocks (CLIP 12)")
    g.add_argument("--text-heads", dest="text_heads", type=int, default=8,
                   help="text transformer attention heads (CLIP 8; must divide --text-width)")
    g.add_argument("--embed-dim", dest="embed_dim", type=int, default=512,
                   help="joint image–text embedding width of both projections (CLIP 512)")


def check(args):
    if args.ss_framework is None:
        raise UserError(f"choose the pretraining method with --ss-framework ({', '.join(FRAMEWORKS)})")
    if args.ss_framework in TEXT_FRAMEWORKS:
        if "dataset" not in args.given:
            args.dataset = "captions"  # the built-in captioned synthetic set without --data-root
        elif args.dataset != "captions":
            raise UserError(f"--ss-framework {args.ss_framework} trains on image–caption pairs: use --dataset "
                            f"captions (not {args.dataset}) with --data-root holding captions.csv, ROCO, "
                            "MedSLIP or COCO captions, or no --data-root for the built-in set")
        if args.text_width % args.text_heads:
            raise UserError(f"--text-heads {args.text_heads} must divide --text-width {args.text_width}")
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        raise UserError(f"--tokenizer '{args.tokenizer}' does not exist")
    if args.dataset == "folder" and not args.data_root:
        raise UserError("--dataset folder needs --data-root DIR (any folder of images)")
    return args


def head_kwargs(args, vocab_size=None):
    """Keyword arguments of the method's class from the flags that were given (``vocab_size``:
    the tokenizer's, for the text tower of CLIP and SLIP)."""
    fw = args.ss_framework
    if fw in ("simclr", "slip"):
        kw = {k: v for k, v in (("dim", args.dim), ("mlp_dim", args.mlp_dim), ("temperature", args.temperature))
              if v}
        if fw == "simclr":
            return kw
        kw["ssl_scale"] = args.ssl_scale
    if fw in TEXT_FRAMEWORKS:
        text = text_tower(vocab_size=vocab_size, **{k: getattr(args, k) for k in TEXT_TOWER_FLAGS})
        return dict(kw if fw == "slip" else {}, text=text, embed_dim=args.embed_dim)
    if fw == "mocov3":
        kw = dict(temperature=args.temperature, stop_grad_patch_embed=args.stop_grad_patch_embed)
        kw.update({k: v for k, v in (("dim", args.dim), ("mlp_dim", args.mlp_dim)) if v})
    elif fw == "barlowtwins":
        kw = dict(lambd=args.lambd)
        if args.mlp_dim:
            kw["proj_dims"] = (args.mlp_dim,) * 3
    elif fw == "mae":
        kw = dict(mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss, decoder_dim=args.decoder_dim,
                  decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads)
    else:
        kw = {k: v for k, v in (("dim", args.dim), ("pred_dim", args.mlp_dim)) if v}
        if fw == "fpsiam":
            kw["lam"] = args.fpsiam_lambda
    return kw


def build_model(args, device, vocab_size=None):
    """The SSL model around a random encoder, or one initialised from ``--pretraining`` weights
    (e.g. ImageNet_class, FPSiam's recipe; or continued pretraining from an SSL checkpoint)."""
    # --ss-framework names the method to train; it describes --checkpoint only for SSL weights
    ss = args.ss_framework if args.pretraining in ("Hyperkvasir", "ImageNet_self") else None
    encoder = build_encoder(args.arch, args.pretraining, ss, args.checkpoint, img_size=args.image_size,
                            num_heads=vit_num_heads(args.arch, args.ss_framework))  # MoCo v3's ViT-S: 12
    model = build_ssl_model(args.ss_framework, encoder, **head_kwargs(args, vocab_size))
    if dist.get_world_size() > 1:
        # the heads' BatchNorm sees the global batch, as every method's paper (SyncBN), on CPU
        # (gloo) ranks too: a run then trains the same weights whatever the number of processes
        model = dist.convert_sync_batchnorm(model, device)
    return model.to(device)


def build_optimizer_for(model, args, r, lr):
    """The recipe's optimiser; SimSiam/FPSiam predictors in their own group (fixed lr)."""
    kind = args.optimizer or r["optimizer"]
    wd = args.weight_decay if args.weight_decay is not None else r["weight_decay"]
    kw = {"betas": r["betas"]} if kind == "adamw" and "betas" in r else {}
    if r.get("fixed_predictor_lr") and hasattr(model, "predictor"):
        pred_ids = {id(p) for p in model.predictor.parameters()}
        rest = [p for p in model.parameters() if id(p) not in pred_ids]
        optimizer = build_optimizer(rest, lr, weight_decay=wd, kind=kind, **kw)
        optimizer.add_param_group({"params": list(model.predictor.parameters()), "weight_decay": wd,
                                   "fixed_lr": True})
    else:
        optimizer = build_optimizer(model, lr, weight_decay=wd, kind=kind, **kw)
    if "no_decay_lr_scale" in r:  # Barlow Twins: biases and BN at 0.0048 / 0.2 of the weights' lr
        for group in optimizer.param_groups:
            if group["weight_decay"] == 0:
                group["lr_scale"] = r["no_decay_lr_scale"]
    return optimizer


def make_lr_schedule(optimizer, lr, args, r):
    warmup = args.warmup_epochs if args.warmup_epochs is not None else \
        r["warmup"] * args.epochs / r["paper_epochs"]
    min_lr = args.min_lr if args.min_lr is not None else r.get("min_lr", 0.0)
    schedule = warmup_cosine(lr, args.epochs, warmup, min_lr)

    def lr_at(progress):
        value = schedule(progress)
        for group in optimizer.param_groups:
            if group.get("fixed_lr"):
                # the engine sets lr = value * lr_scale: this keeps the predictor at the peak lr
                group["lr_scale"] = lr / max(value, 1e-12)
        return value
    return lr_at, warmup


def make_tokenizer(args, samples):
    """``--tokenizer``'s official vocabulary, or a BPE learnt from the training ``samples``'
    captions (deterministic, so every rank and a resumed run learn the same one)."""
    from gissl.tokenizer import ClipTokenizer
    if args.tokenizer:
        return ClipTokenizer.from_file(args.tokenizer)
    return ClipTokenizer.learn([c for s in samples for c in s["captions"]], vocab_size=args.vocab_size)


def build_dataset(args, root, views):
    """The training images (with their captions and tokenizer for CLIP / SLIP)."""
    decode = args.decode_size or 2 * args.image_size
    if args.dataset != "captions":
        return build_unlabelled_dataset(root, transform=views, decode_size=decode, skip_bad=args.skip_bad_files), None
    # train split only: val / test stay held out (eval_transfer.py --protocol image-text-retrieval)
    train = build_caption_datasets(root, format=args.caption_format, skip_bad=args.skip_bad_files)["train"]
    if args.ss_framework not in TEXT_FRAMEWORKS:  # SimCLR & co. on the caption set's images alone
        return UnlabelledDataset(train, views, decode), None
    tokenizer = make_tokenizer(args, train)
    tokenize = functools.partial(tokenizer, context_length=args.context_length)
    return CaptionDataset(train, views, tokenize, decode), tokenizer


def main(args):
    device = dist.init_distributed(args.device)
    r = recipe(args.ss_framework, args.arch)
    root = cli.data_root(args)
    views = VIEWS[args.ss_framework](args.image_size, color=args.color_strength)
    dataset, tokenizer = build_dataset(args, root, views)
    per_rank = min(cli.forward_batch(args), len(dataset)) // dist.get_world_size()
    if args.ss_framework != "mae" and per_rank < 2:
        raise UserError(f"{args.ss_framework} needs at least 2 images per process per step (its BatchNorm "
                        f"heads and batch statistics); raise --batch-size (now {args.batch_size})")
    loader = cli.train_loader(args, dataset, device)
    model = build_model(args, device, tokenizer.vocab_size if tokenizer is not None else None)
    eff_batch = args.batch_size  # images per optimizer step
    if args.learning_rate is not None:
        lr = args.learning_rate
    elif args.blr is None and "lr" in r:
        lr = r["lr"]  # SLIP's recipes: an absolute lr
    else:
        lr = (args.blr if args.blr is not None else r["blr"]) * eff_batch / 256
    optimizer = build_optimizer_for(model, args, r, lr)
    lr_schedule, warmup = make_lr_schedule(optimizer, lr, args, r)

    after_step, extra_state = None, None
    if args.ss_framework == "mocov3":
        total_steps = args.epochs * -(-len(loader) // args.accum_iter)

        def after_step(bare, step):
            bare.update_momentum(cosine_momentum(args.moco_momentum, step, total_steps))
    elif args.ss_framework in TEXT_FRAMEWORKS:
        def after_step(bare, step):
            bare.clamp_logit_scale()
        # the tokenizer goes into every checkpoint, so evaluation tokenizes exactly as training did
        extra_state = (lambda: {"tokenizer": tokenizer.state_dict()}, lambda stored: None)

    run_dir = os.path.join(args.output_dir, f"{args.arch}-{args.ss_framework}-{args.dataset}")
    if dist.is_main_process():
        n_train = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        print(f"{args.ss_framework} on {args.arch}: {len(dataset)} images, {len(loader)} steps/epoch, "
              f"effective batch {eff_batch}, lr {lr:.3g} ({args.optimizer or r['optimizer']}, "
              f"{warmup:.3g} warm-up epochs, cosine), {n_train / 1e6:.2f}M trained parameters; "
              f"writing {run_dir}", flush=True)
    result = fit(model, train_loader=loader, compute_losses=lambda m, views: m(*views), optimizer=optimizer,
                 device=device, run=cli.run_files(args, run_dir, "checkpoint"), epochs=args.epochs,
                 options=cli.fit_options(args, lr_schedule=lr_schedule, after_step=after_step,
                                         extra_state=extra_state))
    if dist.is_main_process():
        encoder_path = os.path.join(run_dir, "encoder.pth")
        save_atomic(export_encoder(model.state_dict()), encoder_path)
        print(f"done ({result['epochs_run']} epochs this run). Encoder: {encoder_path}; full state: "
              f"{result['best_path']}. Use it with --pretraining Hyperkvasir --ss-framework "
              f"{args.ss_framework} --checkpoint {encoder_path}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args)
