"""Helpers of the retrieval-service tests: a tiny labelled gallery, a random descriptor model saved
to a file, the real ``serve_retrieval.py`` started on a free loopback port, and plain HTTP calls."""
import http.client
import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {"adenoma": (200, 60, 60), "hyperplastic": (60, 160, 200)}


def make_gallery(root, per_class=6, seed=0):
    """``root/<class>/<i>.png|jpg``: noisy 48-px images whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    for c, colour in CLASSES.items():
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            a = rng.random((48, 48, 3)) * 90 + np.array(colour) * rng.uniform(0.5, 1.0)
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(
                os.path.join(root, c, f"{i}.{'jpg' if i % 2 else 'png'}"))
    return root


def make_model(path, size=32):
    """A random-weight ResNet-18 descriptor model written as ``predict_retrieval.py
    --export-torchscript`` writes it (``DescriptorModel`` traced)."""
    from gissl import retrieval as R
    from gissl.models import build_encoder
    torch.manual_seed(0)
    model = R.RetrievalModel(build_encoder("resnet18"), dim=16).eval()
    torch.jit.trace(R.DescriptorModel(model), torch.zeros(1, 3, size, size)).save(str(path))
    return str(path)


def server_flags(model, gallery, data_dir, *extra):
    return ["--descriptor-model", str(model), "--gallery", str(gallery), "--data-dir", str(data_dir),
            "--image-size", "32", "--port", "0", "--device", "cpu", "--no-amp", "--workers", "0", *extra]


class Server:
    """``serve_retrieval.py`` in a subprocess; ``url`` once it prints its address. ``prelude``: Python
    run before the script in the same process (tests inject faults there)."""

    def __init__(self, flags, prelude="", timeout=90):
        code = (f"import runpy, sys\n{prelude}\nsys.argv = ['serve_retrieval.py'] + {list(map(str, flags))!r}\n"
                "runpy.run_path('serve_retrieval.py', run_name='__main__')\n")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        deadline, self.lines = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("serving "):
                self.url = line.split(" on ")[1].split()[0].rstrip("/")
                self.host, self.port = self.url[len("http://"):].rsplit(":", 1)
                self.port = int(self.port)
                return
        self.stop()
        raise RuntimeError("the service did not start: " + "".join(self.lines))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc.stdout.close()

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, JSON or bytes) of one request on a new connection."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            if r.getheader("Content-Type") == "application/json":
                data = json.loads(data)
            return r.status, data
        finally:
            conn.close()


def multipart(fields):
    """``{name: bytes or str}`` -> (body, Content-Type header) of a multipart/form-data request."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        value = value.encode() if isinstance(value, str) else value
        filename = '; filename="upload"' if name == "image" else ""
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode()
                     + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
