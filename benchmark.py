"""Throughput benchmark (not a test): gissl's default set-up next to the reference set-up, in one run.

    python benchmark.py --quick                 # a few minutes on a 2-core CPU
    python benchmark.py                          # full sizes (ViT-B / ResNet-50 everywhere; about half an
                                                 # hour on 2 cores, minutes on a GPU)
    python benchmark.py --device cuda            # on a GPU node

Sections (``--sections``, in this order; each prints progress, all rows end in one table and a
JSON file, ``--json``):

- ``peak``: bf16 and fp32 matmul TFLOP/s of this machine (best over sizes and probes, measured again at the end), the
  denominator of the model FLOPs utilisation (MFU) below.
- ``encoders``: train step (forward + backward + optimiser step) of vit_b and resnet50 in three
  set-ups whose steps take turns, so machine load hits them alike:
  gissl (default: bf16 autocast, fused AdamW, channels_last ResNets on CUDA and CPU),
  reference (timm / torchvision + default ``torch.optim.AdamW`` + fp32 on CPU, fp16 autocast
  with GradScaler on GPU, docs/ssl4gie-study.md §4.1) and best timm/torchvision (fused AdamW + bf16). The
  gissl row gives its ratio to both, and every row its MFU: FLOPs of one step counted by
  ``torch.utils.flop_counter.FlopCounterMode`` divided by step time and the matmul peak of the
  row's dtype (``mfu``: the best peak of the run; ``mfu sus``: the median of 2048^3 matmuls
  timed in turn with the steps, the speed the machine sustained meanwhile, which on a shared
  or turbo-boosting machine can be far below its best). ViT-B is also timed at ``--mfu-batch``
  (32).
- ``tasks``: every task model (classification, segmentation, depth, detection, retrieval and
  each pretraining method) through the engine's real train loop (``train_one_epoch``), AMP on
  and off: train images/s and peak memory; evaluation images/s through the real eval functions
  (batched, bf16 and fp32) next to the reference's batch-1 fp32 loop, with the metrics of each
  (batching does not change them).
- ``data``: the segmentation training pipeline, images/s per core, gissl vs the reference's
  (full-size JPEG decode + 25x25 blur), from ``benchmark_data.py``.
- ``peers``: gissl next to what users would pick instead (``benchmark_peers.py``): pretraining
  steps vs lightly's models, segmentation train steps vs segmentation-models-pytorch, metrics vs
  torchmetrics / pycocotools, and evaluation vs the bare forward pass (its overhead, and the
  forward's TFLOP/s and MFU). Its rows print in a second table.

Peak memory is the growth of resident memory (CPU; GPU: allocated memory) over what was in use
before the set-up was built: parameters, gradients, optimiser state and activations.
"""
import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time

import torch

from gissl import dist
from gissl.engine import FitOptions, amp_dtype, to_channels_last, train_one_epoch, use_channels_last
from gissl.loaders import make_loader
from gissl.optim import build_optimizer
from gissl.errors import UserError
from gissl.models import build_encoder, family, is_vit


# --------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _release_free_memory():
    """Give freed heap memory back to the OS (glibc), so that resident memory counts live data."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PeakMemory:
    """Peak memory growth inside the ``with`` block, in MiB (``.mb``; None if not measurable).

    CUDA: ``max_memory_allocated`` over the allocation at entry. CPU: resident set size sampled
    every 2 ms by a thread (torch releases the GIL in its kernels), over the size at entry.
    """

    def __init__(self, device):
        self.device, self.mb = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_memory()
        self.base = self.peak = _rss_bytes()
        self.stop = threading.Event()
        if self.base is not None:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
            return
        if self.base is not None:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, _rss_bytes())
            self.mb = (self.peak - self.base) / 2**20


def step_flops(model, images, loss_fn=lambda out: out.float().pow(2).mean()):
    """FLOPs of one forward + backward of ``model`` on ``images`` (N, 3, H, W), counted by
    ``FlopCounterMode`` (matmuls, convolutions, attention), on a batch of 1 scaled to N."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()  # BatchNorm in train mode refuses 1x1 maps of one image; the FLOPs are the same
    with counter:
        loss_fn(model(images[:1])).backward()
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() * images.shape[0]


@functools.lru_cache(maxsize=4)
def _matmul_operands(device, dtype, n):
    return torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)


def _probe_repeats(device):
    return 1 if device.type == "cpu" else 20  # a GPU matmul is too short to time alone


def _matmul_once(device, dtype, n=2048):
    """``_probe_repeats`` n x n x n matmuls: one probe of the machine's current speed, timed by
    the caller; ``matmul_tflops`` turns a time into TFLOP/s."""
    a, b = _matmul_operands(device, dtype, n)
    for _ in range(_probe_repeats(device)):
        torch.mm(a, b)
    sync(device)


def _probe_tflops(device, seconds, n=2048):
    return 2 * n ** 3 * _probe_repeats(device) / seconds / 1e12


def matmul_tflops(device, dtype, n=2048, repeats=5):
    """Best TFLOP/s of an n x n x n matmul in ``dtype`` on ``device`` over ``repeats`` probes."""
    _matmul_once(device, dtype, n)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _matmul_once(device, dtype, n)
        best = min(best, time.perf_counter() - t)
    return _probe_tflops(device, best, n)


# Square sizes the peak is probed at: which one a BLAS runs fastest differs between machines
# (cache sizes, AMX tiles), and a peak from one size alone was beaten by model steps whose
# matmuls happened to suit the machine better (an fp32 "MFU" of 168 % under load).
PEAK_SIZES = (1024, 2048, 3072)


def matmul_peak(device, dtype, repeats=5):
    """Best TFLOP/s of ``dtype`` matmuls over the sizes of ``PEAK_SIZES``."""
    return max(matmul_tflops(device, dtype, n=n, repeats=repeats) for n in PEAK_SIZES)


def flag_impossible_mfu(row):
    """A utilisation above 100 % means the peak was measured too low (other programs ran, or
    the clock changed): report it as a measurement error, never as a number."""
    for key in ("mfu", "mfu_sustained"):
        if row.get(key) is not None and row[key] > 1.0:
            row.setdefault("measurement_errors", []).append(
                f"{key} {row[key]:.0%} > 100 %: the matmul peak was measured too low (machine under load?)")
            row[key] = None


def _amp_name(dtype):
    return str(dtype).replace("torch.", "") if dtype is not None else "off"


# --------------------------------------------------------------------------- peak

def bench_peak(args, device, ctx):
    """Matmul peak of this machine in bf16 and fp32 (the MFU denominators)."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        tf = matmul_peak(device, dtype, repeats=6)
        ctx.setdefault("peak_tflops", {})[_amp_name(dtype)] = tf
        rows.append({"section": "peak", "model": "matmul " + "/".join(map(str, PEAK_SIZES)), "setup": "torch.mm", "amp": _amp_name(dtype),
                     "tflops": tf})
        _progress(rows[-1])
    return rows


def _peak_for(ctx, device, dtype):
    """The measured matmul peak (TFLOP/s) for a step computing in ``dtype`` (None: fp32)."""
    name = _amp_name(dtype) if dtype is not None else "float32"
    peaks = ctx.setdefault("peak_tflops", {})
    if name not in peaks:
        peaks[name] = matmul_peak(device, dtype or torch.float32, repeats=3)
    return peaks[name]


def refine_peak(rows, ctx, device):
    """Measure the matmul peaks again at the end and keep the higher value (other programs may
    have slowed one measurement down), then recompute every MFU with it; one still above 100 %
    is flagged as a measurement error (:func:`flag_impossible_mfu`)."""
    for name, tf in list(ctx["peak_tflops"].items()):
        again = matmul_peak(device, getattr(torch, name), repeats=6)
        ctx["peak_tflops"][name] = max(tf, again)
    for r in rows:
        if r["section"] == "peak":
            r["tflops"] = ctx["peak_tflops"][r["amp"]]
        elif r.get("mfu") is not None:
            r["mfu"] = r["tflops"] / ctx["peak_tflops"][r["mfu_vs_peak_of"]]
        flag_impossible_mfu(r)


# --------------------------------------------------------------------------- encoders

class TrainStep:
    """One set-up of an encoder train step: model, optimiser, precision, memory format."""

    def __init__(self, model, images, device, *, dtype, optimizer, scaler=None, channels_last=False):
        self.device, self.dtype, self.scaler = device, dtype, scaler
        self.model = model.to(device)
        self.images = images
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.images = images.contiguous(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = optimizer(self.model)

    def __call__(self):
        ctx = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
               else contextlib.nullcontext())
        with ctx:
            out = self.model(self.images)
        loss = out.float().pow(2).mean()  # a scalar depending on every output, in fp32 as a task loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)


def _reference_encoder(arch, image_size):
    """timm ``vit_base_patch16_224`` / torchvision ``resnet50`` without classifier, or None."""
    if arch in ("resnet18", "resnet50"):
        import torchvision
        model = getattr(torchvision.models, arch)(weights=None)
        model.fc = torch.nn.Identity()
        return f"torchvision {arch}", model
    names = {"vit_t": "vit_tiny_patch16_224", "vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224"}
    try:
        import timm
    except ImportError:  # timm is a dev requirement: the reference rows are then skipped
        return None
    return f"timm {names[arch]}", timm.create_model(names[arch], pretrained=False, num_classes=0,
                                                    img_size=image_size)


def _setups(arch, images, device, lr=1e-4):
    """(setup name, model label, TrainStep factory) of gissl default / fp32, reference, best reference."""
    best = amp_dtype(device, True)
    ours_opt = functools.partial(build_optimizer, lr=lr, weight_decay=0.05)
    cl = use_channels_last(device) and not is_vit(arch)
    out = [("gissl", f"gissl {arch}", lambda: TrainStep(build_encoder(arch, img_size=images.shape[-1]), images, device,
                                                        dtype=best, optimizer=ours_opt, channels_last=cl)),
           ("gissl fp32", f"gissl {arch}", lambda: TrainStep(build_encoder(arch, img_size=images.shape[-1]), images,
                                                             device, dtype=None, optimizer=ours_opt,
                                                             channels_last=cl))]
    probe = _reference_encoder(arch, images.shape[-1])
    if probe is None:
        return out
    ref_label = probe[0]
    del probe

    def reference():
        # docs/ssl4gie-study.md §4.1: torch.optim.AdamW(model.parameters(), lr) with every default, fp16
        # autocast + GradScaler on GPU; on CPU the reference had no AMP at all
        model = _reference_encoder(arch, images.shape[-1])[1]
        fp16 = device.type == "cuda"
        return TrainStep(model, images, device, dtype=torch.float16 if fp16 else None,
                         optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=lr),
                         scaler=torch.amp.GradScaler("cuda") if fp16 else None)

    def best_reference():
        model = _reference_encoder(arch, images.shape[-1])[1]
        return TrainStep(model, images, device, dtype=best,
                         optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=lr, fused=True))

    return out + [("reference", ref_label, reference), ("best reference", ref_label, best_reference)]


def time_interleaved(steps, warmup, timed):
    """Seconds per step of each callable in ``steps`` (dict); they take turns step by step (the
    order alternating each round) so that changing machine load affects all alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in steps}
    for r in range(timed):
        for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t)
    return times


def _encoder_rows(arch, batch, image_size, device, ctx, args, only=None):
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    steps, labels, memory, flops = {}, {}, {}, {}
    for setup, label, make in _setups(arch, images, device):
        if only and setup not in only:
            continue
        print(f"  building {label} ({setup}), batch {batch}...", flush=True)
        with PeakMemory(device) as mem:
            step = make()
            for _ in range(max(args.warmup, 1)):  # the first steps allocate gradients and optimiser state
                step()
        steps[setup], labels[setup], memory[setup] = step, label, mem.mb
        flops[setup] = step_flops(step.model, step.images)
    # Matmul probes take turns with the steps: on a machine whose speed changes from second to
    # second (shared hosts, turbo), the peak seen alongside the steps is the fair denominator
    # of a "sustained" MFU; the "mfu" column keeps the best peak of the whole run.
    dtypes = {steps[s].dtype for s in steps}
    probes = {("matmul", d): functools.partial(_matmul_once, device, d or torch.float32) for d in dtypes}
    times = time_interleaved({**steps, **probes}, 0, args.steps)
    sustained = {d: _probe_tflops(device, statistics.median(times.pop(("matmul", d)))) for d in dtypes}
    rows = []
    for setup, ts in times.items():
        sec = statistics.median(ts)
        dtype = steps[setup].dtype
        achieved = flops[setup] / sec / 1e12
        peak = _peak_for(ctx, device, dtype)
        rows.append({"section": "encoders", "model": labels[setup], "setup": setup, "amp": _amp_name(dtype),
                     "batch": batch, "image_size": image_size, "train_images_per_s": batch / sec,
                     "ms_per_step": 1000 * sec, "ms_per_step_min": 1000 * min(ts), "ms_per_step_max": 1000 * max(ts),
                     "peak_mem_mb": memory[setup], "gflop_per_step": flops[setup] / 1e9, "tflops": achieved,
                     "mfu": achieved / peak, "mfu_vs_peak_of": _amp_name(dtype) if dtype is not None else "float32",
                     "matmul_tflops_alongside": sustained[dtype], "mfu_sustained": achieved / sustained[dtype],
                     "timed_steps": len(ts)})
    ours = next((r for r in rows if r["setup"] == "gissl"), None)
    for r in rows:
        for other, key in (("reference", "vs_reference"), ("best reference", "vs_best_reference")):
            ref = next((x for x in rows if x["setup"] == other), None)
            if ours is not None and ref is not None and r is ours:
                r[key] = ours["train_images_per_s"] / ref["train_images_per_s"]
    for r in rows:
        _progress(r)
    return rows


def bench_encoders(args, device, ctx):
    """Train-step images/s, memory and MFU of our encoders and the reference set-ups."""
    rows = []
    for arch in args.archs:
        rows += _encoder_rows(arch, args.batch_size, args.image_size, device, ctx, args)
        if is_vit(arch) and args.mfu_batch and args.mfu_batch != args.batch_size:
            rows += _encoder_rows(arch, args.mfu_batch, args.image_size, device, ctx, args, only=("gissl",))
    return rows


# --------------------------------------------------------------------------- tasks

def _task_specs(arch, size, batch, args):
    """(task, build() -> model, batch, compute_losses, optimiser kwargs) for every task model."""
    from gissl import classification as C, depth as D, detection as Det, segmentation as S
    from gissl.models.detection import build_detector
    from gissl.models.dpt import DPT
    from gissl.retrieval import RetrievalModel
    from gissl.models import SS_FRAMEWORKS
    from gissl.ssl import build_ssl_model, recipe
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, size, size, generator=g)
    enc = functools.partial(build_encoder, arch, img_size=size)
    specs = [
        ("classification", lambda: C.Classifier(enc(), 4), {"image": img, "label": torch.arange(batch) % 4},
         C.make_compute_losses(torch.ones(4)), {}),
        ("segmentation", lambda: DPT(enc(), "segmentation", features=args.decoder_channels),
         {"image": img, "mask": (torch.rand(batch, 1, size, size, generator=g) > 0.7).float()}, S.compute_losses, {}),
        ("depth", lambda: DPT(enc(), "depth", features=args.decoder_channels),
         {"image": img, "depth": 5 + 90 * torch.rand(batch, 1, size, size, generator=g)}, D.compute_losses, {}),
    ]
    # the ViT detector's canvas must be a multiple of 64 (exact stride-64 level)
    det = -(-size // 64) * 64 if is_vit(arch) else size
    boxes = torch.tensor([[det * 0.2, det * 0.25, det * 0.6, det * 0.7]])
    det_kw = dict(fixed_size=det) if is_vit(arch) else dict(min_size=det, max_size=det)
    specs.append(("detection", lambda: build_detector(build_encoder(arch, img_size=det), **det_kw),
                  {"images": list(torch.rand(batch, 3, det, det, generator=g)),
                   "targets": [{"boxes": boxes.clone(), "labels": torch.ones(1, dtype=torch.int64)} for _ in range(batch)]},
                  Det.compute_losses, {}))
    import train_retrieval
    two = torch.randn(batch, 2, 3, size, size, generator=g)
    specs.append(("retrieval", lambda: RetrievalModel(enc()),
                  {"image": two, "mask": (torch.rand(batch, 2, 1, size, size, generator=g) > 0.7).float()},
                  functools.partial(train_retrieval.compute_losses, temperature=0.05, entropy_weight=5.0,
                                    mse_weight=0.5, mixup_prob=0.05), {"betas": (0.9, 0.95)}))
    for fw, families in SS_FRAMEWORKS.items():
        if family(arch) not in families:
            continue
        rec = recipe(fw, arch)
        views = (img,) if fw == "mae" else (img, torch.randn(batch, 3, size, size, generator=g))
        opt = {"kind": rec["optimizer"], **({"betas": rec["betas"]} if "betas" in rec else {})}
        specs.append((f"pretrain {fw}", functools.partial(lambda fw: build_ssl_model(fw, enc()), fw), views,
                      lambda m, v: m(*v), opt))
    return specs


def _train_rate(spec, device, amp, args):
    """Train images/s of one task model through ``engine.train_one_epoch`` and its peak memory."""
    task, build, batch, compute_losses, opt_kw = spec
    opt_kw = dict(opt_kw)
    kind = opt_kw.pop("kind", "adamw")
    n = len(batch["images"]) if isinstance(batch, dict) and "images" in batch else (
        batch[0].shape[0] if isinstance(batch, tuple) else batch["image"].shape[0])
    if isinstance(batch, tuple):
        n *= len(batch)  # images per step: every view is an image through the encoder
    elif "image" in batch and batch["image"].ndim == 5:
        n *= batch["image"].shape[1]
    torch.manual_seed(0)
    with PeakMemory(device) as mem:
        model = to_channels_last(build().to(device), device)  # as engine.fit does
        optimizer = build_optimizer(model, 1e-4, kind=kind, **opt_kw)
        run = functools.partial(train_one_epoch, model, optimizer=optimizer, compute_losses=compute_losses,
                                device=device, epoch=1,
                                options=FitOptions(amp=amp, show_progress=False, log_every=args.steps + 1))
        run([batch] * max(args.warmup, 1))
        sync(device)
        t = time.perf_counter()
        run([batch] * args.steps)
        sync(device)
        sec = (time.perf_counter() - t) / args.steps
    return model, {"train_images_per_s": n / sec, "ms_per_step": 1000 * sec, "peak_mem_mb": mem.mb}


def _eval_sets(size, count, orig):
    """In-memory eval samples with original-size targets: classification, segmentation, depth."""
    g = torch.Generator().manual_seed(1)
    h, w = orig
    seg, dep, cls = [], [], []
    for i in range(count):
        image = torch.randn(3, size, size, generator=g)
        mask = torch.zeros(1, h, w, dtype=torch.bool)
        mask[:, h // 4: h // 4 + (i % 3 + 1) * h // 8, w // 3: w // 3 + w // 4] = True
        seg.append({"image": image, "mask": torch.nn.functional.interpolate(mask[None].float(), (size, size))[0],
                    "mask_orig": mask, "path": f"{i}.jpg", "index": i})
        d = 10 + 80 * torch.rand(1, h, w, generator=g)
        d[:, :, : w // 10] = 0  # invalid pixels, as C3VD's
        dep.append({"image": image, "depth": torch.nn.functional.interpolate(d[None], (size, size))[0],
                    "depth_orig": d, "path": f"{i}_color.png", "index": i})
        cls.append({"image": image, "label": torch.tensor(i % 4), "index": i})
    return {"classification": cls, "segmentation": seg, "depth": dep}


def _eval_runs(task, model, data, device, batch):
    """Eval set-ups of ``task``: name -> (callable returning a metrics dict)."""
    from gissl import classification as C, depth as D, segmentation as S
    from gissl.metrics import classification_metrics, summarize_segmentation

    def loader(b):
        return make_loader(data, batch_size=b, train=False, workers=0, device=device)

    if task == "classification":
        def run(b, amp):
            out = C.predict(model, loader(b), device, amp=amp)
            m = classification_metrics(out["targets"], out["preds"], num_classes=4)
            return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
    elif task == "segmentation":
        def run(b, amp):
            return {k: v for k, v in summarize_segmentation(S.evaluate(model, loader(b), device, amp=amp)).items()
                    if k in ("Dice", "IoU")}
    else:
        def run(b, amp):
            s = D.summarize(D.evaluate(model, loader(b), device, "scale-shift", amp=amp), "scale-shift")
            return {"RMSE": s["RMSE"], "Absolute Error": s["Absolute Error"]}
    return {("gissl", True, batch): lambda: run(batch, True),
            ("gissl fp32", False, batch): lambda: run(batch, False),
            # the reference evaluates one image at a time in fp32 (docs/ssl4gie-study.md §2.6, §5)
            ("reference", False, 1): lambda: run(1, False)}


def _eval_rows(task, model, data, device, args, arch, size):
    model.eval()
    runs = _eval_runs(task, model, data, device, args.eval_batch_size)
    for fn in runs.values():  # warm-up (kernel choice, allocator)
        fn()
    times = {k: [] for k in runs}
    metrics = {}
    for r in range(args.eval_repeats):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t = time.perf_counter()
            metrics[k] = runs[k]()
            times[k].append(time.perf_counter() - t)
    rows = []
    ref_key = next(k for k in runs if k[0] == "reference")
    ref_rate = len(data) / statistics.median(times[ref_key])
    for (setup, amp, b), ts in times.items():
        rate = len(data) / statistics.median(ts)
        rows.append({"section": "tasks", "model": f"{task} {arch}", "setup": setup + " eval",
                     "amp": _amp_name(amp_dtype(device, amp)), "batch": b, "image_size": size,
                     "eval_images_per_s": rate, "vs_reference": rate / ref_rate, "metrics": metrics[(setup, amp, b)],
                     "metrics_max_abs_diff": max(abs(metrics[(setup, amp, b)][m] - metrics[ref_key][m])
                                                 for m in metrics[ref_key]),
                     "metrics_equal_reference": all(abs(metrics[(setup, amp, b)][m] - metrics[ref_key][m]) <= 1e-6
                                                    for m in metrics[ref_key])})
        _progress(rows[-1])
    return rows


def bench_tasks(args, device, ctx):
    """Train (AMP on/off) and eval images/s of every task model, with peak memory."""
    rows = []
    size, batch = args.task_image_size, args.task_batch_size
    orig = (120, 150) if args.quick else (1072, 1280)
    eval_data = _eval_sets(size, args.eval_images, orig)
    for arch in args.task_archs:
        for spec in _task_specs(arch, size, batch, args):
            task = spec[0]
            if task.split()[-1] not in args.tasks:
                continue
            model = None
            for amp in (True, False):
                print(f"  {task} {arch} train, amp {'on' if amp else 'off'}...", flush=True)
                model, r = _train_rate(spec, device, amp, args)
                rows.append({"section": "tasks", "model": f"{task} {arch}", "setup": "gissl train",
                             "amp": _amp_name(amp_dtype(device, amp)), "batch": batch, "image_size": size, **r})
                _progress(rows[-1])
            if task in ("classification", "segmentation", "depth"):
                print(f"  {task} {arch} eval...", flush=True)
                rows += _eval_rows(task, model, eval_data[task], device, args, arch, size)
            del model
    return rows


# --------------------------------------------------------------------------- data

def bench_data(args, device, ctx):
    """Segmentation train pipeline, images/s per core: gissl vs the reference (benchmark_data.py)."""
    from benchmark_data import ReferencePipeline, make_frames, rates
    from gissl.data import SegmentationDataset
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core numbers: one process, one thread, CPU time
    random.seed(0)
    torch.manual_seed(0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"  writing {args.data_frames} 1280x1072 JPEG frames...", flush=True)
            samples = make_frames(tmp, args.data_frames)
            ref = ReferencePipeline(args.image_size)
            ours = SegmentationDataset(samples, args.image_size, train=True)
            rate = rates({"reference": lambda ss: [ref(s) for s in ss],
                          "gissl": lambda ss: [ours[i] for i in range(len(ss))]}, samples, args.data_repeats)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for setup, label in (("reference", "SSL4GIE seg. train pipeline"), ("gissl", "SegmentationDataset(train=True)")):
        rows.append({"section": "data", "model": label, "setup": setup, "amp": "-", "batch": 1,
                     "image_size": args.image_size, "source": "1280x1072 JPEG",
                     "images_per_s_per_core": rate[setup], "vs_reference": rate[setup] / rate["reference"]})
        _progress(rows[-1])
    return rows


TASKS = ("classification", "segmentation", "depth", "detection", "retrieval",
         "mocov3", "barlowtwins", "mae", "simsiam", "fpsiam")
def bench_peers(args, device, ctx):
    """gissl vs lightly (pretraining), smp (segmentation), torchmetrics (metrics), bare forward (eval)."""
    from benchmark_peers import bench_peers as run
    return run(args, device, ctx)


SECTIONS = {"peak": bench_peak, "encoders": bench_encoders, "tasks": bench_tasks, "data": bench_data,
            "peers": bench_peers}


# --------------------------------------------------------------------------- output

def machine():
    """What the numbers were measured on, including the load other processes put on it."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
        info["bf16_instructions"] = sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        info["load_average_1min_at_start"] = os.getloadavg()[0]
    return info


COLUMNS = [("section", 8, "{}"), ("model", 30, "{}"), ("setup", 20, "{}"), ("amp", 8, "{}"), ("batch", 5, "{}"),
           ("train_images_per_s", 9, "{:.2f}"), ("eval_images_per_s", 9, "{:.2f}"),
           ("images_per_s_per_core", 9, "{:.1f}"), ("tflops", 7, "{:.3f}"), ("mfu", 6, "{:.1%}"),
           ("mfu_sustained", 7, "{:.1%}"), ("peak_mem_mb", 8, "{:.0f}"), ("vs_reference", 7, "{:.2f}x"),
           ("vs_best_reference", 8, "{:.2f}x"), ("metrics_equal_reference", 9, "{}")]
HEADERS = {"train_images_per_s": "train/s", "eval_images_per_s": "eval/s", "images_per_s_per_core": "img/s/core",
           "mfu_sustained": "mfu sus", "tflops": "TFLOP/s", "peak_mem_mb": "peak MB", "vs_reference": "vs ref", "vs_best_reference": "vs best",
           "metrics_equal_reference": "=ref metr"}


PEER_COLUMNS = [("model", 30, "{}"), ("setup", 12, "{}"), ("amp", 8, "{}"), ("batch", 5, "{}"),
                ("train_images_per_s", 9, "{:.2f}"), ("eval_images_per_s", 9, "{:.2f}"), ("items_per_s", 10, "{:.0f}"),
                ("vs_peer", 7, "{:.2f}x"), ("max_abs_diff", 8, "{:.1e}"), ("bare_images_per_s", 9, "{:.2f}"),
                ("overhead", 8, "{:.1%}"), ("tflops", 7, "{:.3f}"), ("mfu", 6, "{:.1%}")]
HEADERS.update({"items_per_s": "items/s", "vs_peer": "vs peer", "max_abs_diff": "max |d|", "bare_images_per_s": "bare/s",
                "overhead": "overhead"})


def format_row(r, columns=COLUMNS):
    cells = []
    for key, width, fmt in columns:
        v = r.get(key)
        flagged = any(e.startswith(key + " ") for e in r.get("measurement_errors", ()))
        text = "error" if flagged else "-" if v is None else fmt.format(v)
        cells.append(text.ljust(width) if key in ("section", "model", "setup", "amp") else text.rjust(width))
    return " ".join(cells)


def format_table(rows, columns=COLUMNS):
    head = " ".join((HEADERS.get(k, k).ljust(w) if k in ("section", "model", "setup", "amp") else HEADERS.get(k, k).rjust(w))
                    for k, w, _ in columns)
    return "\n".join([head, "-" * len(head)] + [format_row(r, columns) for r in rows])


def format_tables(rows):
    """The main table, then the peers section's own (its columns differ)."""
    peers = [r for r in rows if r["section"] == "peers"]
    rest = [r for r in rows if r["section"] != "peers"]
    return "\n\n".join(([format_table(rest)] if rest else []) + ([format_table(peers, PEER_COLUMNS)] if peers else []))


def _progress(row):
    print("  " + format_row(row, PEER_COLUMNS if row["section"] == "peers" else COLUMNS), flush=True)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                   help="what to measure (default: all, in this order)")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps, small task models (resnet18 / vit_t at 128 px) and a short data run: "
                        "a few minutes on a 2-core CPU; the encoder section keeps vit_b / resnet50")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", default="benchmark.json", help="where to write the rows and the machine description")
    g = p.add_argument_group("sizes (defaults depend on --quick)")
    g.add_argument("--archs", nargs="+", default=["vit_b", "resnet50"], help="encoders of the encoders section")
    g.add_argument("--batch-size", type=int, default=8, help="encoder train-step batch")
    g.add_argument("--mfu-batch", type=int, default=32, help="extra ViT train-step batch for MFU (0: none)")
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--task-archs", nargs="+", default=None,
                   help="encoders of the task models (default vit_b resnet50; --quick: vit_t resnet18)")
    g.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS),
                   help="task models of the tasks section (pretraining methods by framework name)")
    g.add_argument("--task-image-size", type=int, default=None, help="default 224 (--quick: 128)")
    g.add_argument("--task-batch-size", type=int, default=None, help="default 8 (--quick: 4)")
    g.add_argument("--decoder-channels", type=int, default=None, help="DPT width, default 256 (--quick: 64)")
    g.add_argument("--eval-images", type=int, default=None, help="images per eval pass, default 32 (--quick: 8)")
    g.add_argument("--eval-batch-size", type=int, default=16, help="gissl's eval batch")
    g.add_argument("--eval-repeats", type=int, default=None, help="timed eval passes, default 3 (--quick: 1)")
    g.add_argument("--warmup", type=int, default=None, help="untimed steps first, default 2 (--quick: 1)")
    g.add_argument("--steps", type=int, default=None,
                   help="timed steps; the median is reported (default 5, --quick: 3)")
    g.add_argument("--data-frames", type=int, default=None, help="1280x1072 frames, default 24 (--quick: 8)")
    g.add_argument("--data-repeats", type=int, default=None, help="passes over the frames, default 3 (--quick: 1)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"task_archs": ["vit_t", "resnet18"] if quick else ["vit_b", "resnet50"],
                "task_image_size": 128 if quick else 224, "task_batch_size": 4 if quick else 8,
                "decoder_channels": 64 if quick else 256, "eval_images": 8 if quick else 32,
                "eval_repeats": 1 if quick else 3, "warmup": 1 if quick else 2, "steps": 3 if quick else 5,
                "data_frames": 8 if quick else 24, "data_repeats": 1 if quick else 3}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "batch_size", "task_batch_size", "eval_images", "eval_batch_size", "eval_repeats",
              "data_frames", "data_repeats"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be at least 1")
    for k in ("image_size", "task_image_size"):
        if getattr(args, k) % 32:
            raise UserError(f"--{k.replace('_', '-')} {getattr(args, k)} must be a multiple of 32")
    return args


def main(args):
    device = dist.resolve_device(args.device)
    torch.manual_seed(0)
    info = machine()
    print(f"device {device} | {info.get('gpu', info['cpu'])} {info.get('bf16_instructions', '')} | "
          f"{info['cpu_count']} CPUs, {info['torch_threads']} torch threads | load average "
          f"{info.get('load_average_1min_at_start', 'n/a')}", flush=True)
    rows, ctx, start = [], {}, time.time()
    for name in args.sections:
        print(f"[{name}] {SECTIONS[name].__doc__.splitlines()[0]}", flush=True)
        rows += SECTIONS[name](args, device, ctx)
    if ctx.get("peak_tflops"):
        refine_peak(rows, ctx, device)
    if hasattr(os, "getloadavg"):
        info["load_average_1min_at_end"] = os.getloadavg()[0]
    info["peak_tflops"] = ctx.get("peak_tflops", {})
    print()
    print(format_tables(rows))
    for r in rows:
        for e in r.get("measurement_errors", ()):
            print(f"measurement error in {r['model']} ({r['setup']}, {r['amp']}): {e}")
    result = {"command": " ".join(["python"] + sys.argv), "device": str(device), "machine": info,
              "seconds": round(time.time() - start, 1), "args": vars(args), "rows": rows}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    from gissl.cli import run
    run(main, get_args)
