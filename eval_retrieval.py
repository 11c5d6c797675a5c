"""Evaluate a polyp-retrieval descriptor.

``--dataset PolypTwin`` (default): EndoFinder's copy-detection protocol (docs/endofinder-retrieval.md §3) on
``<root>/val_query/``, ``<root>/val_ref/`` and ``<root>/val_groundtruth_matches.csv``: the k
best references of every query are pooled and scored with micro-AP, accuracy@1 and recall at
90 % precision (ISC2021 definitions, worst-case ties). Without ``--data-root`` the built-in
synthetic query / reference set is used (augmented copies of synthetic polyps).

``--dataset Hyperkvasir_pathological`` / ``Hyperkvasir_anatomical``: class-based retrieval;
the training split is the gallery, the test split the queries: mAP@k, precision@k and the
accuracy of the k-nearest-neighbour vote (plain and similarity-weighted).

``--save-predictions PATH`` writes ``query,rank,reference,score`` rows. Examples:

    python eval_retrieval.py --architecture resnet18 --image-size 64           # trained model
    python eval_retrieval.py --architecture resnet18 --image-size 64 --untrained  # random init
"""
import csv
import os

import numpy as np

import torch

from gissl import cli, dist
from gissl import retrieval as R
from gissl.search import DescriptorIndex
from gissl.engine import compile_model, prepare_for_eval
from gissl.errors import UserError
from gissl.metrics import map_at_k, precision_at_k
from gissl.report import append_eval_results
from gissl.retrieval_data import synthetic_twin_root, twin_set

EVAL_DATASETS = ("PolypTwin", "Hyperkvasir_pathological", "Hyperkvasir_anatomical")


def get_args(argv=None):
    p = cli.task_parser("retrieval", "Evaluate a polyp-retrieval descriptor", stage="eval",
                        datasets=EVAL_DATASETS, default_batch_size=32, default_arch="vit_b", encoder_checkpoint=True)
    return check(cli.parse(R.add_arguments(p, "eval"), argv))


def check(args):
    """The retrieval eval / predict checks (shared with predict_retrieval.py)."""
    if args.k < 1:
        raise UserError("--k must be at least 1")
    if args.descriptor_model and (args.untrained or args.weights or args.checkpoint):
        raise UserError("--descriptor-model is a whole descriptor model; drop --untrained, --weights and "
                        "--checkpoint, which choose another one")
    if args.descriptor_model and getattr(args, "export_torchscript", None):
        raise UserError("--descriptor-model is already a TorchScript model; there is nothing to export")
    if args.descriptor_model and not os.path.isfile(args.descriptor_model):
        raise UserError(f"--descriptor-model '{args.descriptor_model}' does not exist")
    if args.checkpoint and not args.untrained:
        raise UserError("--checkpoint is the pretrained encoder and has no effect without --untrained: a trained "
                        "retrieval model is read instead; drop --checkpoint and use --weights FILE or the "
                        "training flags, or add --untrained to use --checkpoint's encoder as it is")
    return args


def load(args, device):
    """The descriptor model in eval mode on ``device``: ``--descriptor-model``'s TorchScript file as it
    is, the trained one (``--weights`` or the one the flags name under ``--train-dataset``), or with
    ``--untrained`` the encoder as built by
    ``--pretraining`` (the same random init as train_retrieval.py). Eval ``--compile`` compiles
    its ``embed`` (descriptors come from it, not from ``forward``)."""
    torch.manual_seed(args.seed)
    if args.descriptor_model:
        return R.ScriptedDescriptor(args.descriptor_model).to(device).eval()
    if args.untrained:
        model = R.build_model(cli.encoder(args, img_size=args.image_size), **cli.model_kwargs(R.build_model, args))
        if args.checkpoint and R.load_projection_head(model, args.checkpoint):
            print(f"--checkpoint '{args.checkpoint}' holds its own projection (SSCD layout): loaded as the "
                  "head; --use-head gives that file's descriptor", flush=True)
        model = prepare_for_eval(model, device)
    else:
        # --dataset is what to evaluate on; --train-dataset names the checkpoint
        state, path = cli.finetuned(args, cli.model_flags(R.build_model), dataset=args.train_dataset,
                                    data_flags=("image_size",))
        model = cli.finetuned_model(args, R.build_model, state, path, device, dict(img_size=args.image_size),
                                    compile=False, pretrained=False)
    if getattr(args, "compile", False):
        model.embed = compile_model(model.embed, device)
    return model


def model_name(args):
    if args.descriptor_model:
        return os.path.basename(args.descriptor_model)
    if args.untrained:
        return f"{args.arch}-{args.pretraining}{'_' + args.ss_framework if args.ss_framework else ''}_untrained"
    if args.weights:
        return os.path.splitext(os.path.basename(args.weights))[0]
    return cli.run_name(args, args.train_dataset)


def postprocess(args, model, device):
    """``--postprocess`` / ``--hash`` (shared with predict_retrieval.py)."""
    return cli.call(R.make_postprocess, args, model=model, device=device, amp=not args.no_amp)


def save_predictions(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "rank", "reference", "score"])
        w.writerows(rows)
    print(f"predictions written to {path}", flush=True)


def eval_copy_detection(args, model, device):
    root = args.data_root or synthetic_twin_root()
    if not args.data_root:
        print(f"No --data-root given: using the built-in synthetic query/reference set at {root}", flush=True)
    twin = twin_set(root, args.skip_bad_files)
    metrics, (q, r, s, rank) = R.copy_detection_eval(
        model, twin, image_size=args.image_size, batch_size=args.batch_size, device=device, k=args.k,
        workers=args.workers, use_head=args.use_head, postprocess=postprocess(args, model, device),
        index_kind=args.index, nprobe=args.nprobe, amp=not args.no_amp)
    if args.print_list:
        top1 = {qq: rr for qq, rr, kk in zip(q, r, rank) if kk == 0}
        print([top1.get(qq) for qq in twin["query_ids"]])
    if args.save_predictions:
        save_predictions(args.save_predictions, [(a, k, b, f"{c:.6f}") for a, b, c, k in zip(q, r, s, rank)])
    return {"uAP": metrics["uAP"], "Accuracy@1": metrics["accuracy@1"], "Recall@P90": metrics["recall@P90"],
            "Recall@10": metrics["recall@10"]}


def eval_class_retrieval(args, model, device):
    from gissl.data import build_classification_datasets
    root = cli.data_root(args)
    ds = build_classification_datasets(args.dataset, root, image_size=args.image_size)
    gallery, queries = ds["train"].samples, ds["test"].samples
    kw = dict(image_size=args.image_size, batch_size=args.batch_size, device=device, workers=args.workers,
              use_head=args.use_head, amp=not args.no_amp)
    g = R.extract_descriptors(model, [s["image"] for s in gallery], **kw)
    qd = R.extract_descriptors(model, [s["image"] for s in queries], **kw)
    post = postprocess(args, model, device)
    if post is not None:
        if post.needs_fit:
            post.fit(g)
        g, qd = post(g), post(qd)
    g_labels = np.array([s["label"] for s in gallery])
    q_labels = np.array([s["label"] for s in queries])
    k = min(args.k, len(gallery))
    index = DescriptorIndex(g.shape[1], args.index, nprobe=args.nprobe,
                              device="cpu" if device.type == "cpu" else "auto")
    index.add(g, names=[os.path.relpath(s["image"], root) for s in gallery], labels=g_labels)
    scores, ids = index.search(qd, k)
    retrieved = np.where(ids >= 0, g_labels[np.clip(ids, 0, None)], -1)
    pred, _ = R.neighbour_vote(retrieved, num_classes=len(ds["train"].classes))
    wpred, _ = R.neighbour_vote(retrieved, scores, num_classes=len(ds["train"].classes), weighted=True)
    num_relevant = np.array([(g_labels == c).sum() for c in q_labels])
    if args.print_list:
        print(pred.tolist())
    if args.save_predictions:
        rows = [(os.path.relpath(queries[i]["image"], root), rank, index.names[j], f"{scores[i, rank]:.6f}")
                for i in range(len(queries)) for rank, j in enumerate(ids[i]) if j >= 0]
        save_predictions(args.save_predictions, rows)
    return {f"mAP@{k}": map_at_k(retrieved, q_labels, k, num_relevant),
            f"Precision@{k}": precision_at_k(retrieved, q_labels, k),
            "Precision@1": precision_at_k(retrieved, q_labels, 1),
            f"kNN-vote accuracy (k={k})": float((pred == q_labels).mean()),
            f"Weighted kNN-vote accuracy (k={k})": float((wpred == q_labels).mean())}


def main(args):
    device = dist.resolve_device(args.device)
    model = load(args, device)
    if args.dataset == "PolypTwin":
        metrics = eval_copy_detection(args, model, device)
        title = "Copy-detection retrieval results"
    else:
        metrics = eval_class_retrieval(args, model, device)
        title = f"Class-based retrieval results ({args.dataset})"
    append_eval_results(title, model_name(args), metrics)


if __name__ == "__main__":
    cli.run(main, get_args)
