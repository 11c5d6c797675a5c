"""Evaluate a polyp-retrieval descriptor.

``--dataset PolypTwin`` (default): EndoFinder's copy-detection protocol (endofinder.md §3) on
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
import argparse
import csv
import os

import numpy as np

from gissl import cli, dist
from gissl import retrieval as R
from gissl.errors import UserError
from gissl.metrics import map_at_k, precision_at_k
from gissl.retrieval_data import synthetic_twin_root, twin_set

EVAL_DATASETS = ("PolypTwin", "Hyperkvasir_pathological", "Hyperkvasir_anatomical")


def get_args():
    p = cli.task_parser("retrieval", "Evaluate a polyp-retrieval descriptor", stage="eval",
                        datasets=EVAL_DATASETS, default_batch_size=32, default_arch="vit_b")
    R.add_model_arguments(p)
    R.add_inference_arguments(p)
    args = cli.check_args(p.parse_args())
    if args.k < 1:
        raise UserError("--k must be at least 1")
    return args


def model_name(args):
    if args.untrained:
        return f"{args.arch}-{args.pretraining}{'_' + args.ss_framework if args.ss_framework else ''}_untrained"
    if args.weights:
        return os.path.splitext(os.path.basename(args.weights))[0]
    return cli.run_name(argparse.Namespace(**{**vars(args), "dataset": args.train_dataset}))


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
        workers=args.workers, use_head=args.use_head, postprocess=R.make_postprocess(args, model, device),
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
    post = R.make_postprocess(args, model, device)
    if post is not None:
        if post.needs_fit:
            post.fit(g)
        g, qd = post(g), post(qd)
    g_labels = np.array([s["label"] for s in gallery])
    q_labels = np.array([s["label"] for s in queries])
    k = min(args.k, len(gallery))
    index = R.DescriptorIndex(g.shape[1], args.index, nprobe=args.nprobe,
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
    model = R.load_model(args, device)
    if args.dataset == "PolypTwin":
        metrics = eval_copy_detection(args, model, device)
        title = "Copy-detection retrieval results"
    else:
        metrics = eval_class_retrieval(args, model, device)
        title = f"Class-based retrieval results ({args.dataset})"
    cli.append_eval_results(title, model_name(args), metrics)


if __name__ == "__main__":
    cli.run(main, get_args)
