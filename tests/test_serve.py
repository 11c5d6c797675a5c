"""EndoFinder online (issue #20): the real ``serve_retrieval.py`` on a free loopback port answers as
``predict_retrieval.py`` does, refuses every bad input with its status and keeps answering, batches a
concurrent load without errors, and keeps its index loadable when killed during a save."""
import io
import json
import os
import signal
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from gissl.errors import UserError
from serve_fixtures import Server, make_gallery, make_model, multipart, server_flags

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    gallery = make_gallery(str(base / "gallery"))
    model = make_model(base / "desc.pt")
    server = Server(server_flags(model, gallery, base / "svc", "--k", "5", "--token", TOKEN,
                                 "--max-upload-mb", "1"))
    yield {"base": base, "gallery": gallery, "model": model, "server": server}
    server.stop()


def _query(server, data, k=None, headers=AUTH):
    fields = {"image": data} if k is None else {"image": data, "k": str(k)}
    body, ctype = multipart(fields)
    return server.request("POST", "/api/query", body, {"Content-Type": ctype, **headers})


def test_query_equals_predict_retrieval(world, tmp_path, monkeypatch):
    import predict_retrieval
    server, query = world["server"], os.path.join(world["gallery"], "hyperplastic", "3.jpg")
    data = open(query, "rb").read()
    status, answer = _query(server, data)
    assert status == 200, answer
    monkeypatch.chdir(tmp_path)
    predict_retrieval.main(predict_retrieval.get_args(
        ["--descriptor-model", world["model"], "--gallery", world["gallery"], "--query", query, "--k", "5",
         "--image-size", "32", "--device", "cpu", "--no-amp", "--workers", "0"]))
    want = json.loads((tmp_path / "Predictions" / "retrieval-gallery" / "3.json").read_text())
    got = [{k: v for k, v in n.items() if k != "thumbnail"} for n in answer["neighbours"]]
    assert [{k: v for k, v in n.items() if k != "similarity"} for n in got] == \
           [{k: v for k, v in n.items() if k != "similarity"} for n in want["neighbours"]]
    np.testing.assert_allclose([n["similarity"] for n in got], [n["similarity"] for n in want["neighbours"]],
                               atol=1e-5)
    assert answer["vote"] == want["vote"] and len(got) == 5
    assert all(n["thumbnail"] == f"/thumb/{n['id']}" for n in answer["neighbours"])
    # a raw image/* body with k in the query string gives the same first 3 neighbours
    status, raw = server.request("POST", "/api/query?k=3", data, {"Content-Type": "image/jpeg", **AUTH})
    assert status == 200 and [n["id"] for n in raw["neighbours"]] == [n["id"] for n in got[:3]]
    status, thumb = server.request("GET", answer["neighbours"][0]["thumbnail"], headers=AUTH)
    assert status == 200 and Image.open(io.BytesIO(thumb)).format == "JPEG"
    audit = [json.loads(line) for line in (world["base"] / "svc" / "audit.jsonl").read_text().splitlines()]
    import hashlib
    entry = next(a for a in audit if a["image_sha256"] == hashlib.sha256(data).hexdigest())
    assert entry["vote"] == want["vote"] and len(entry["neighbours"]) == 5 and entry["time"].endswith("Z")
    assert entry["event"] == "query"


def _png_claiming(width, height):
    """A valid 8x8 PNG whose header says width x height (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    ihdr = png[12:29]  # type + data of the IHDR chunk (the first, after the 8-byte signature + length)
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


def test_bad_inputs_get_their_status_and_the_service_keeps_answering(world):
    server = world["server"]
    good = open(os.path.join(world["gallery"], "adenoma", "1.jpg"), "rb").read()
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    cases = {
        "no token": (_query(server, good, headers={}), 401),
        "wrong token": (_query(server, good, headers={"Authorization": "Bearer nope"}), 401),
        "wrong X-Token": (server.request("GET", "/api/info", headers={"X-Token": "nope"}), 401),
        "not an image": (_query(server, b"%PDF-1.4 not an image at all"), 400),
        "truncated image": (_query(server, jpeg.getvalue()[:len(jpeg.getvalue()) // 2]), 400),
        "decompression bomb": (_query(server, _png_claiming(100_000, 100_000)), 400),
        "empty image": (_query(server, b""), 400),
        "k not a number": (_query(server, good, k="ten"), 400),
        "k too large": (_query(server, good, k=1000), 400),
        "k zero": (_query(server, good, k=0), 400),
        "malformed multipart": (server.request("POST", "/api/query", b"--xyz\r\nnonsense",
                                               {"Content-Type": "multipart/form-data; boundary=xyz", **AUTH}), 400),
        "multipart without image": (server.request("POST", "/api/query", *_fields({"k": "3"})), 400),
        "no boundary": (server.request("POST", "/api/query", good,
                                       {"Content-Type": "multipart/form-data", **AUTH}), 400),
        "wrong content type": (server.request("POST", "/api/query", good,
                                              {"Content-Type": "text/plain", **AUTH}), 400),
        "bad label": (server.request("POST", "/api/cases", *_fields({"image": good, "label": "../../etc"})), 400),
        "no label": (server.request("POST", "/api/cases", *_fields({"image": good})), 400),
        "thumbnail traversal": (server.request("GET", "/thumb/../../../etc/passwd", headers=AUTH), 404),
        "thumbnail encoded traversal": (server.request("GET", "/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                                                       headers=AUTH), 404),
        "thumbnail out of range": (server.request("GET", "/thumb/99999", headers=AUTH), 404),
        "thumbnail negative": (server.request("GET", "/thumb/-1", headers=AUTH), 404),
        "unknown endpoint": (server.request("POST", "/api/delete", b"x", AUTH), 404),
        "upload too large": (_declared_upload(server, 2 << 20), 413),
        "no content length": (_raw(server, b"POST /api/query HTTP/1.1\r\nHost: x\r\nX-Token: " + TOKEN.encode()
                                   + b"\r\nContent-Type: image/png\r\n\r\n"), 400),
        "bad request line": (_raw(server, b"GET /health HTTP/1.1 extra\r\n\r\n"), 400),
        "TLS hello on the plain port": (_raw(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 x\r\n\r\n"), 400),
    }
    wrong = {name: (got[0], want, got[1]) for name, (got, want) in cases.items() if got[0] != want}
    assert not wrong, wrong
    for name, (got, _) in cases.items():  # every refusal is JSON with a reason
        assert isinstance(got[1], dict) and got[1].get("error"), (name, got)
    assert server.request("GET", "/health") == (200, {"status": "ok", "cases": 12})
    assert _query(server, good)[0] == 200


def _fields(fields):
    body, ctype = multipart(fields)
    return body, {"Content-Type": ctype, **AUTH}


def _raw(server, data):
    """(status, JSON body or None) of raw bytes sent on a socket."""
    with socket.create_connection((server.host, server.port), timeout=20) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    try:
        body = json.loads(body)
    except ValueError:
        pass
    return int(head.split()[1]), body


def _declared_upload(server, size):
    """Headers announcing ``size`` bytes then only a little of them: the service must refuse from the
    header alone, without reading (or waiting for) the body."""
    head = (f"POST /api/query HTTP/1.1\r\nHost: x\r\nX-Token: {TOKEN}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    with socket.create_connection((server.host, server.port), timeout=20) as s:
        s.sendall(head + b"\x89PNG" * 16)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_listening_beyond_loopback_needs_a_token():
    import serve_retrieval
    from gissl import serve
    with pytest.raises(UserError, match="--token"):
        serve_retrieval.get_args(["--host", "0.0.0.0"])
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and not serve.is_loopback("10.0.0.5")
    serve.check_host("0.0.0.0", "a-token")  # with a token it is allowed


def test_concurrent_load_is_batched_without_errors(world):
    """8 clients x 50 queries at once: no error, the worker batches; p50 / p95 / p99 printed (README)."""
    server = world["server"]
    images = [open(os.path.join(world["gallery"], c, f"{i}.{'jpg' if i % 2 else 'png'}"), "rb").read()
              for c in ("adenoma", "hyperplastic") for i in range(6)]
    latencies, errors = [], []

    def client(seed):
        rng = np.random.default_rng(seed)
        for _ in range(50):
            t = time.perf_counter()
            try:
                status, answer = _query(server, images[rng.integers(len(images))], k=5)
                if status != 200 or len(answer["neighbours"]) != 5:
                    errors.append((status, answer))
            except OSError as e:
                errors.append(repr(e))
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wall = time.perf_counter() - t0
    assert not errors, errors[:3]
    assert len(latencies) == 400
    p50, p95, p99 = (1000 * np.percentile(latencies, q) for q in (50, 95, 99))
    info = server.request("GET", "/api/info", headers=AUTH)[1]
    print(f"\nload 8 clients x 50 queries: {400 / wall:.1f} queries/s, latency p50 {p50:.1f} ms, "
          f"p95 {p95:.1f} ms, p99 {p99:.1f} ms; largest model batch {info['largest_batch']}")
    assert info["largest_batch"] > 1  # concurrent queries shared model calls
    assert server.request("GET", "/health")[0] == 200


# kill switch for the save: os.replace of the index file sleeps, so a SIGKILL lands mid-save
SLOW_SAVE = """
import os, time
_replace = os.replace
def _slow_replace(src, dst, *a, **kw):
    if str(dst).endswith("index.npz"):
        open(str(dst) + ".saving", "w").close()
        time.sleep(120)
    return _replace(src, dst, *a, **kw)
os.replace = _slow_replace
"""


def test_added_case_persists_and_a_kill_during_the_save_leaves_a_loadable_index(world, tmp_path):
    from gissl.search import DescriptorIndex
    flags = server_flags(world["model"], world["gallery"], tmp_path / "svc", "--k", "3")
    rng = np.random.default_rng(5)
    new = io.BytesIO()
    Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(new, "PNG")
    server = Server(flags)
    try:
        body, ctype = multipart({"image": new.getvalue(), "label": "sessile serrated"})
        status, added = server.request("POST", "/api/cases", body, {"Content-Type": ctype})
        assert status == 201 and added["id"] == 12 and added["cases"] == 13, added
        assert server.request("POST", "/api/cases", body, {"Content-Type": ctype})[0] == 409  # same image again
    finally:
        server.stop()
    index_file = tmp_path / "svc" / "index.npz"
    assert DescriptorIndex.load(index_file, device="cpu").ntotal == 13
    audit = [json.loads(line) for line in (tmp_path / "svc" / "audit.jsonl").read_text().splitlines()]
    assert [(a["event"], a["id"], a["label"]) for a in audit] == [("add_case", 12, "sessile serrated")]
    server = Server(flags, prelude=SLOW_SAVE)  # restart: the case is still there
    try:
        status, answer = server.request("POST", "/api/query", new.getvalue(), {"Content-Type": "image/png"})
        top = answer["neighbours"][0]
        assert top["id"] == 12 and top["label"] == "sessile serrated" and top["similarity"] > 0.999
        other = io.BytesIO()
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(other, "JPEG")
        body, ctype = multipart({"image": other.getvalue(), "label": "adenoma"})
        thread = threading.Thread(target=lambda: _ignore(server.request, "POST", "/api/cases", body,
                                                         {"Content-Type": ctype}, timeout=30), daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not (tmp_path / "svc" / "index.npz.saving").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "svc" / "index.npz.saving").exists(), "the save never started"
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
    finally:
        server.stop()
    leftovers = [p.name for p in (tmp_path / "svc").iterdir() if p.name.startswith(".tmp-index.npz")]
    assert leftovers  # the new index was written in full beside the old one, not over it
    loaded = DescriptorIndex.load(index_file, device="cpu")
    assert loaded.ntotal == 13 and loaded.label_names[-1] == "sessile serrated"


def _ignore(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except OSError:
        pass
