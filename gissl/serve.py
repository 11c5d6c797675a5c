"""EndoFinder online: the retrieval service behind ``serve_retrieval.py``.

One process holds the descriptor model and the gallery index and answers over HTTP (standard
library ``http.server.ThreadingHTTPServer``: one thread per connection, no extra dependency):

- ``GET /``: the page (``gissl/serve_page.html``, self-contained: no CDN, no web fonts);
- ``GET /health``: ``{"status": "ok", "cases": N}`` (no token needed: it says nothing about cases);
- ``GET /api/info``: class names, gallery size, default k, limits;
- ``POST /api/query``: an image (multipart field ``image``, or a raw ``image/*`` body) and optional
  ``k`` -> the neighbours and the vote, the same JSON as ``predict_retrieval.py`` writes
  (:func:`gissl.retrieval.vote_results`) plus each neighbour's ``thumbnail`` URL;
- ``GET /thumb/<id>``: a JPEG thumbnail of gallery case ``id`` (its position in the index);
- ``POST /api/cases``: an image and its ``label`` -> the image is written under the cases folder,
  its descriptor added to the index, and index + metadata saved atomically.

Every query (time, image SHA-256, neighbours, vote) and every added case is appended to a
JSON-lines audit log.

Concurrency: handler threads decode and check the upload, then hand the (3, S, S) tensor to the
one worker thread (:class:`Retriever`), which takes whatever else arrived within a short window,
runs the model once on the batch and searches the index for all of it. The model therefore runs
in one thread only; a handler waits for its answer with a timeout (503 when it expires).
"""
import hashlib
import hmac
import io
import ipaddress
import json
import os
import queue
import re
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import torch
from PIL import Image

from gissl.data.datasets import decode_resized, to_image_tensor
from gissl.data.images import open_rgb
from gissl.data.transforms import normalize
from gissl.errors import DataError, UserError
from gissl.retrieval import vote_results

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_page.html")
# file extension per decoded format, for cases kept as uploaded (other formats are re-encoded as PNG)
KEPT_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()+-]{0,63}$")
MAX_K = 100


class RequestError(Exception):
    """An HTTP error answer: ``status`` and a message for the JSON body."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = int(status), message


def is_loopback(host):
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Uploads: multipart parsing and safe image decoding
# ---------------------------------------------------------------------------------------------

def parse_multipart(body, content_type):
    """``multipart/form-data`` body -> ``{field name: bytes}``; malformed -> RequestError 400."""
    m = re.search(r'boundary="?([^";]{1,200})"?', content_type)
    if not m:
        raise RequestError(400, "multipart body without a boundary")
    delimiter = b"--" + m.group(1).encode("latin-1")
    if not body.startswith(delimiter) or delimiter + b"--" not in body:
        raise RequestError(400, "malformed multipart body (no opening or closing boundary)")
    fields = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        if not part.startswith(b"\r\n") or b"\r\n\r\n" not in part:
            raise RequestError(400, "malformed multipart part (no header block)")
        head, _, data = part[2:].partition(b"\r\n\r\n")
        if not data.endswith(b"\r\n"):
            raise RequestError(400, "malformed multipart part (no line break before the boundary)")
        name = re.search(rb'content-disposition:[^\r\n]*\bname="([^"\r\n]{1,64})"', head, re.I)
        if not name:
            raise RequestError(400, "multipart part without a Content-Disposition name")
        fields[name.group(1).decode("utf-8", "replace")] = data[:-2]
    return fields


def check_image(data, max_pixels):
    """Header-check an upload: returns its PIL format name. A non-image or one of more than
    ``max_pixels`` pixels (decompression bomb) -> RequestError 400. The pixels are decoded once,
    by :func:`image_tensor`, which answers a truncated file with 400 too."""
    if not data:
        raise RequestError(400, "the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            fmt = im.format
            if w * h > max_pixels:
                raise RequestError(400, f"the image has {w}x{h} pixels, more than the {max_pixels} allowed "
                                        "(--max-pixels); send a smaller image")
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(400, f"the image is too large to decode safely ({e})") from None
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...)
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise RequestError(400, f"the upload is not a readable image ({type(e).__name__}: {reason})") from None
    return fmt


def image_tensor(data, image_size):
    """Upload bytes -> (3, S, S) normalised tensor, exactly as ``ImageListDataset`` prepares a file."""
    try:
        pil = decode_resized(io.BytesIO(data), (image_size, image_size))
    except DataError as e:
        raise RequestError(400, re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(upload)", str(e))) from None
    return normalize()(to_image_tensor(pil)).as_subclass(torch.Tensor)


# ---------------------------------------------------------------------------------------------
# The model worker and the gallery
# ---------------------------------------------------------------------------------------------

class _Job:
    def __init__(self, image, k):
        self.image, self.k = image, k
        self.done = threading.Event()
        self.result = self.error = None


class Retriever:
    """The descriptor model, the gallery index and the one thread that runs the model.

    ``query(image (3, S, S), k)`` -> the answer dict; ``add_case(data, label)`` stores a case.
    ``max_batch`` queries at most per model call; ``window_s``: how long the worker waits for more
    queries after the first one (seconds); ``timeout_s``: how long a caller waits for its answer.
    """

    def __init__(self, *, model, index, index_path, cases_dir, image_size, device, use_head=False,
                 amp=True, weighted=False, max_batch=16, window_s=0.005, timeout_s=30.0):
        self.model, self.index, self.index_path = model.eval(), index, os.fspath(index_path)
        self.cases_dir, self.image_size, self.device = os.fspath(cases_dir), image_size, device
        self.use_head, self.amp, self.weighted = use_head, amp, weighted
        self.max_batch, self.window_s, self.timeout_s = max_batch, window_s, timeout_s
        self.index_lock = threading.Lock()  # search / add / save of the index
        self.jobs = queue.Queue()
        self.model_calls, self.largest_batch = 0, 0  # how well concurrent queries share model calls
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="gissl-retriever", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)

    def _work(self):
        while not self._stop.is_set():
            try:
                first = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            batch, deadline = [first], time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._run(batch)
            except Exception as e:  # answer every waiting caller, never kill the worker
                for job in batch:
                    job.error = e
            for job in batch:
                job.done.set()

    @torch.inference_mode()
    def _run(self, batch):
        from gissl.engine import autocast
        images = torch.stack([job.image for job in batch]).to(self.device)
        with autocast(self.device, self.amp):
            desc = self.model.descriptor(images, use_head=self.use_head).float().cpu().numpy()
        self.model_calls, self.largest_batch = self.model_calls + 1, max(self.largest_batch, len(batch))
        if self.index.transform is not None:
            desc = self.index.transform(desc)
        queries = [i for i, job in enumerate(batch) if job.k is not None]
        for i, job in enumerate(batch):
            job.result = desc[i:i + 1]
        if queries:
            with self.index_lock:
                k = min(max(batch[i].k for i in queries), self.index.ntotal)
                scores, ids = self.index.search(desc[queries], k)
                for i, scores_i, ids_i in zip(queries, scores, ids):
                    kk = min(batch[i].k, k)  # a smaller k is the prefix of the larger search
                    batch[i].result = vote_results(self.index, scores_i[None, :kk], ids_i[None, :kk],
                                                   weighted=self.weighted)[0]

    def _submit(self, image, k):
        if self._stop.is_set():
            raise RequestError(503, "the service is stopping")
        job = _Job(image, k)
        self.jobs.put(job)
        if not job.done.wait(self.timeout_s):
            raise RequestError(503, f"no answer within {self.timeout_s:.0f} s (the service is busy); retry")
        if job.error is not None:
            raise job.error
        return job.result

    def query(self, image, k):
        """image: (3, S, S) normalised -> ``{"neighbours": [...], "vote": {...}}``."""
        return self._submit(image, int(k))

    def add_case(self, data, label, fmt):
        """Store an uploaded case under ``cases_dir/<label>/``, add it to the index, save the index
        atomically. Returns ``{"id", "reference", "label", "cases"}``."""
        digest = hashlib.sha256(data).hexdigest()
        desc = self._submit(image_tensor(data, self.image_size), None)
        folder = os.path.join(self.cases_dir, label)
        ext = KEPT_FORMATS.get(fmt)
        path = os.path.abspath(os.path.join(folder, digest[:20] + (ext or ".png")))
        with self.index_lock:
            if path in self.index.names:
                raise RequestError(409, f"this image is already case {self.index.names.index(path)} of the gallery")
            os.makedirs(folder, exist_ok=True)
            _write_case(path, data, ext is None)
            names = list(self.index.label_names or [])
            if label not in names:
                names.append(label)
            self.index.label_names = names
            self.index.add(desc, names=[path], labels=[names.index(label)])
            try:
                self.index.save(self.index_path)
            except BaseException:
                # the file still holds the previous gallery (atomic save): go back to it
                from gissl.search import DescriptorIndex
                self.index = DescriptorIndex.load(self.index_path, device=self.index.device)
                raise
            return {"id": self.index.ntotal - 1, "reference": path, "label": label, "cases": self.index.ntotal}


def _write_case(path, data, reencode):
    """Write an uploaded image atomically (the decoded pixels as PNG when its format is not kept)."""
    if reencode:
        buf = io.BytesIO()
        open_rgb(io.BytesIO(data)).save(buf, format="PNG")
        data = buf.getvalue()
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class AuditLog:
    """Append-only JSON-lines file: one line per query and per added case (``event``), flushed and
    fsynced before the answer."""

    def __init__(self, path):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.lock = threading.Lock()

    def write(self, record):
        line = json.dumps(record, sort_keys=True) + "\n"
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------

class Service:
    """What the HTTP handlers share: the retriever, the audit log, the limits and the token."""

    def __init__(self, *, retriever, audit_log, token=None, max_upload_bytes=20 << 20, max_pixels=50_000_000,
                 default_k=10, thumb_size=160, demo=False):
        self.retriever, self.audit = retriever, AuditLog(audit_log)
        self.token, self.max_upload_bytes, self.max_pixels = token, int(max_upload_bytes), int(max_pixels)
        self.default_k, self.thumb_size, self.demo = int(default_k), int(thumb_size), demo
        self._thumbs, self._thumbs_lock = OrderedDict(), threading.Lock()
        with open(PAGE, encoding="utf-8") as f:
            self.page = f.read().encode("utf-8")

    def authorised(self, headers):
        if not self.token:
            return True
        given = headers.get("X-Token") or ""
        auth = headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def info(self):
        index = self.retriever.index
        return {"cases": index.ntotal, "labels": list(index.label_names or []), "default_k": self.default_k,
                "max_k": MAX_K, "max_upload_mb": self.max_upload_bytes / 2 ** 20, "index": index.kind,
                "token_required": bool(self.token), "model_calls": self.retriever.model_calls,
                "largest_batch": self.retriever.largest_batch}

    def query(self, data, k):
        if not 1 <= k <= MAX_K:
            raise RequestError(400, f"k must be between 1 and {MAX_K}, got {k}")
        check_image(data, self.max_pixels)
        answer = self.retriever.query(image_tensor(data, self.retriever.image_size), k)
        for n in answer["neighbours"]:
            n["thumbnail"] = f"/thumb/{n['id']}"
        digest = hashlib.sha256(data).hexdigest()
        self.audit.write({"event": "query", "time": _now(), "image_sha256": digest, "k": k, "neighbours": [[n["id"], n["reference"], n["label"], round(n["similarity"], 6)]
                                                 for n in answer["neighbours"]],
                          "vote": answer["vote"]})
        return {"query": {"sha256": digest, "bytes": len(data)}, "k": k, **answer}

    def add_case(self, data, label):
        label = (label or "").strip()
        if not LABEL_RE.match(label):
            raise RequestError(400, "label must be 1-64 letters, digits, spaces or _ . ( ) + - (the diagnosis, "
                                    "e.g. adenoma), starting with a letter or digit")
        fmt = check_image(data, self.max_pixels)
        added = self.retriever.add_case(data, label, fmt)
        self.audit.write({"event": "add_case", "time": _now(), "image_sha256": hashlib.sha256(data).hexdigest(),
                          **added})
        return added

    def thumbnail(self, case_id):
        """JPEG bytes of gallery case ``case_id`` (an int string) or RequestError 404."""
        index = self.retriever.index
        if not re.fullmatch(r"\d{1,12}", case_id) or int(case_id) >= index.ntotal:
            raise RequestError(404, "no such case")
        path = index.names[int(case_id)]
        with self._thumbs_lock:
            if path in self._thumbs:
                self._thumbs.move_to_end(path)
                return self._thumbs[path]
        if not os.path.isfile(path):  # names are gallery files; anything else is not served
            raise RequestError(404, "the image of this case is not on disk")
        try:
            im = open_rgb(path)
        except DataError:
            raise RequestError(404, "the image of this case cannot be read") from None
        im.thumbnail((self.thumb_size, self.thumb_size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        with self._thumbs_lock:
            self._thumbs[path] = buf.getvalue()
            while len(self._thumbs) > 2048:
                self._thumbs.popitem(last=False)
        return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    """Routes of :mod:`gissl.serve`; every error is a JSON ``{"error": ...}`` with its status."""

    server_version = "gissl-retrieval"
    timeout = 60  # seconds a slow client may take per read: it holds only its own thread

    def log_message(self, fmt, *a):  # one line per request on stderr, without the default's DNS lookup
        self.server.log(f"{self.address_string()} {fmt % a}")

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, headers too long, ...) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9" or not hasattr(self, "command") or self.command is None:
            self.request_version, self.command = "HTTP/1.0", "GET"  # always answer with a status line
        self._send(code, {"error": message or HTTPStatus(code).phrase})

    def _send(self, status, body, content_type="application/json", extra=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _guard(self, route):
        try:
            route()
        except RequestError as e:
            self._send(e.status, {"error": e.message})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug answers 500 and the service keeps running
            self.server.log(f"error: {type(e).__name__}: {e}")
            self._send(500, {"error": f"internal error ({type(e).__name__}); see the service log"})

    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _get(self):
        service, url = self.server.service, urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            csp = ("default-src 'none'; img-src 'self' blob: data:; style-src 'unsafe-inline'; "
                   "script-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'")
            return self._send(200, service.page, "text/html; charset=utf-8",
                              {"Content-Security-Policy": csp, "X-Frame-Options": "DENY"})
        if url.path == "/health":
            return self._send(200, {"status": "ok", "cases": service.retriever.index.ntotal})
        self._authorise()
        if url.path == "/api/info":
            return self._send(200, service.info())
        if url.path.startswith("/thumb/"):
            return self._send(200, service.thumbnail(url.path[len("/thumb/"):]), "image/jpeg")
        raise RequestError(404, f"no such page: {url.path}")

    def _authorise(self):
        if not self.server.service.authorised(self.headers):
            raise RequestError(401, "missing or wrong token: send the service's --token as "
                                    "'Authorization: Bearer <token>' or 'X-Token: <token>'")

    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None or not re.fullmatch(r"\d{1,12}", length.strip()):
            raise RequestError(400, "a request body needs a valid Content-Length header")
        length, limit = int(length), self.server.service.max_upload_bytes
        if length > limit:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise RequestError(413, f"the upload has {length} bytes, more than --max-upload-mb "
                                    f"({limit / 2 ** 20:g} MiB)")
        data = self.rfile.read(length)
        if len(data) != length:
            raise RequestError(400, "the request body ended before Content-Length bytes")
        return data

    def _fields(self):
        """(image bytes, other fields as str) of a multipart or a raw image/* body."""
        content_type = self.headers.get("Content-Type") or ""
        params = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        body = self._body()
        if content_type.lower().startswith("multipart/form-data"):
            fields = parse_multipart(body, content_type)
            if "image" not in fields:
                raise RequestError(400, "the multipart body has no 'image' field")
            image = fields.pop("image")
            params.update({k: v.decode("utf-8", "replace") for k, v in fields.items()})
            return image, params
        if content_type.lower().startswith("image/"):
            return body, params
        raise RequestError(400, "send the image as multipart/form-data (field 'image') or as an image/* body")

    def _post(self):
        service, path = self.server.service, urlsplit(self.path).path
        if path not in ("/api/query", "/api/cases"):
            raise RequestError(404, f"no such endpoint: {path}")
        self._authorise()
        image, params = self._fields()
        if path == "/api/query":
            k = params.get("k") or str(service.default_k)
            if not re.fullmatch(r"\d{1,4}", k.strip()):
                raise RequestError(400, f"k must be a whole number, got {k[:20]!r}")
            return self._send(200, service.query(image, int(k)))
        return self._send(201, service.add_case(image, params.get("label")))


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process from stopping
    request_queue_size = 64

    def __init__(self, address, service, log=None):
        self.service = service
        self.log = log or (lambda line: None)
        super().__init__(address, Handler)


def check_host(host, token):
    """Anything but loopback needs a token: UserError naming --token otherwise."""
    if not is_loopback(host) and not token:
        raise UserError(f"--host {host} listens beyond this machine: give --token (a long random secret, "
                        "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`) so that "
                        "only holders of it can query or add cases")


def make_server(*, service, host="127.0.0.1", port=8000, log=None):
    """The HTTP server bound to ``host``:``port`` (0 = a free port; ``server.server_address``
    says which). Anything but loopback needs ``service.token`` (:func:`check_host`)."""
    check_host(host, service.token)
    try:
        return Server((host, port), service, log)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
