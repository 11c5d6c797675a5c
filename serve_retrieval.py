"""EndoFinder online: serve polyp retrieval to clinicians' browsers (library: ``gissl/serve.py``).

Loads a descriptor model (any that ``predict_retrieval.py`` accepts: ``--weights``, the training
flags, ``--untrained``, ``--descriptor-model``) and a gallery once, then serves the page at ``/``,
``GET /health``, ``GET /api/info``, ``POST /api/query``, ``POST /api/cases`` and ``GET /thumb/<id>``.

The gallery: ``--gallery cases.npz`` (a saved index, updated in place when cases are added), or a
folder (``<class>/<images>``; indexed once into ``--data-dir``/index.npz, which later starts reuse),
or nothing (the built-in synthetic Hyperkvasir_pathological training split). Added cases go to
``--data-dir``/cases/<label>/, every query to ``--data-dir``/audit.jsonl.

    python serve_retrieval.py --weights "Trained models/retrieval/model.pth" --gallery cases/
    python serve_retrieval.py --architecture resnet18 --image-size 64 --untrained --port 8000
    python serve_retrieval.py --weights model.pth --gallery cases.npz --host 0.0.0.0 --token "$TOKEN"
"""
import os
import signal
import sys
import threading

from eval_retrieval import check, load
from gissl import cli, dist
from gissl import retrieval as R
from gissl import serve
from gissl.errors import UserError
from gissl.search import DescriptorIndex
from predict_retrieval import build_gallery


def get_args(argv=None):
    p = cli.task_parser("retrieval", "Serve polyp retrieval (EndoFinder online) over HTTP", stage="predict",
                        default_batch_size=16, default_arch="vit_b", encoder_checkpoint=True)
    R.add_arguments(p, "predict")
    p.add_argument("--gallery", default=None,
                   help="folder of past cases (<class>/<images> for labels) or a saved index (.npz); "
                        "default: the built-in synthetic gallery")
    p.add_argument("--weighted-vote", dest="weighted_vote", action="store_true",
                   help="weigh each neighbour's vote by its similarity")
    s = p.add_argument_group("service")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback (127.0.0.1, ::1) requires --token")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port, printed at start)")
    s.add_argument("--token", default=os.environ.get("GISSL_SERVE_TOKEN"),
                   help="shared secret clients send as 'Authorization: Bearer <token>' or 'X-Token' "
                        "(default: $GISSL_SERVE_TOKEN); wrong or missing -> 401")
    s.add_argument("--data-dir", dest="data_dir", default="Retrieval service",
                   help="folder of the service's index (index.npz unless --gallery is an .npz), added "
                        "cases (cases/<label>/) and audit log (audit.jsonl)")
    s.add_argument("--max-upload-mb", dest="max_upload_mb", type=float, default=20.0,
                   help="largest accepted upload, in MiB (larger -> 413)")
    s.add_argument("--max-pixels", dest="max_pixels", type=int, default=50_000_000,
                   help="largest accepted image, in pixels (width x height; larger, e.g. a "
                        "decompression bomb -> 400)")
    s.add_argument("--max-batch", dest="max_batch", type=int, default=16,
                   help="most concurrent queries the model runs as one batch (images)")
    s.add_argument("--batch-window-ms", dest="batch_window_ms", type=float, default=5.0,
                   help="milliseconds the model worker waits for more queries after the first of a batch")
    s.add_argument("--query-timeout", dest="query_timeout", type=float, default=30.0,
                   help="seconds a request waits for the model before answering 503")
    args = check(cli.parse(p, argv))
    if not 1 <= args.k <= serve.MAX_K:
        raise UserError(f"--k must be between 1 and {serve.MAX_K}, got {args.k}")
    serve.check_host(args.host, args.token)
    return args


def open_gallery(args, model, device):
    """(index, index file): the saved index, or the one indexed from the folder (saved at once)."""
    os.makedirs(args.data_dir, exist_ok=True)
    if args.gallery and args.gallery.endswith(".npz"):
        return build_gallery(args, model, device)[0], args.gallery
    path = os.path.join(args.data_dir, "index.npz")
    if os.path.isfile(path):
        print(f"reusing the gallery index {path} (delete it to re-index --gallery)", flush=True)
        return DescriptorIndex.load(path, device="cpu" if device.type == "cpu" else "auto"), path
    args.save_index, args.query = path, [None]  # build_gallery saves it; no default queries
    return build_gallery(args, model, device)[0], path


def main(args):
    device = dist.resolve_device(args.device)
    model = load(args, device)
    index, index_path = open_gallery(args, model, device)
    retriever = serve.Retriever(model=model, index=index, index_path=index_path,
                                cases_dir=os.path.join(args.data_dir, "cases"), image_size=args.image_size,
                                device=device, use_head=args.use_head, amp=not args.no_amp,
                                weighted=args.weighted_vote, max_batch=args.max_batch,
                                window_s=args.batch_window_ms / 1000, timeout_s=args.query_timeout)
    service = serve.Service(retriever=retriever, audit_log=os.path.join(args.data_dir, "audit.jsonl"),
                            token=args.token, max_upload_bytes=int(args.max_upload_mb * 2 ** 20),
                            max_pixels=args.max_pixels, default_k=args.k)
    server = serve.make_server(service=service, host=args.host, port=args.port,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
    retriever.start()
    host, port = server.server_address[:2]
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"serving {index.ntotal} cases ({index.kind} index{', GPU' if index.on_gpu else ''}) on "
          f"http://{host}:{port}/ (index file {index_path})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        retriever.stop()


if __name__ == "__main__":
    cli.run(main, get_args)
