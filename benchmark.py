"""Throughput benchmark (not a test): images/s of full training steps, ours next to the references.

    python benchmark.py --quick --out benchmark.json

Section ``encoders``: one train step = forward + backward + AdamW step on a batch of random images,
for gissl's vit_b / resnet50 and, built in the same run, timm's ``vit_base_patch16_224`` and
torchvision's ``resnet50``, with AMP (bf16/fp16 autocast) on and off. Every model gets the same
optimiser (gissl's ``build_optimizer``: fused AdamW where the device has it), so the rows compare
encoders only. Each section is a function ``bench_<name>(args, device) -> list of row dicts``
listed in ``SECTIONS``; add data-pipeline or task-model sections the same way.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from gissl import dist
from gissl.engine import amp_dtype, autocast, build_optimizer
from gissl.errors import UserError
from gissl.models import build_encoder


def train_step_times(model, images, *, device, amp, warmup, steps):
    """Seconds per train step (forward + backward + optimiser step) for ``steps`` timed steps."""
    model.train()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with autocast(device, amp):
            out = model(images)
        # a scalar that depends on every output, in fp32 (the loss of a real task would be)
        loss = out.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _reference_encoder(name, image_size):
    """The reference implementation of ``name`` (timm / torchvision), classifier removed, or None."""
    if name == "resnet50":
        import torchvision
        model = torchvision.models.resnet50(weights=None)
        model.fc = torch.nn.Identity()
        return "torchvision resnet50", model
    if name == "vit_b":
        try:
            import timm
        except ImportError:  # timm is a dev requirement: the reference rows are then skipped
            return None
        return "timm vit_base_patch16_224", timm.create_model("vit_base_patch16_224", pretrained=False,
                                                               num_classes=0, img_size=image_size)
    return None


def bench_encoders(args, device):
    """Train-step images/s of our encoders and the references, AMP on and off."""
    rows = []
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    for amp in (True, False):
        for arch in args.archs:
            candidates = [(f"gissl {arch}", build_encoder(arch, img_size=args.image_size))]
            ref = _reference_encoder(arch, args.image_size)
            if ref is not None:
                candidates.append(ref)
            for label, model in candidates:  # ours and the reference back to back: same load
                model = model.to(device)
                times = train_step_times(model, images, device=device, amp=amp,
                                         warmup=args.warmup, steps=args.steps)
                step = statistics.median(times)
                rows.append({"section": "encoders", "model": label, "amp": str(amp_dtype(device, amp)).replace(
                    "torch.", "") if amp else "off", "batch": args.batch_size, "image_size": args.image_size,
                    "images_per_s": args.batch_size / step, "ms_per_step": 1000 * step,
                    "ms_per_step_min": 1000 * min(times), "ms_per_step_max": 1000 * max(times),
                    "timed_steps": len(times)})
                print(_format_row(rows[-1]), flush=True)
                del model
    return rows


SECTIONS = {"encoders": bench_encoders}


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


def _format_row(r):
    return (f"{r['section']:<9} {r['model']:<27} {r['amp']:<9} {r['images_per_s']:>9.2f} "
            f"{r['ms_per_step']:>10.0f} ms  (min {r['ms_per_step_min']:.0f}, max {r['ms_per_step_max']:.0f})")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=sorted(SECTIONS))
    p.add_argument("--archs", nargs="+", default=["vit_b", "resnet50"],
                   help="gissl encoders to time (vit_b and resnet50 have a reference beside them)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernel choice)")
    p.add_argument("--steps", type=int, default=10, help="timed steps; the median step time is reported")
    p.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed steps")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="benchmark.json", help="JSON file for the rows and machine description")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 3
    if args.steps < 1 or args.batch_size < 1:
        raise UserError("--steps and --batch-size must be at least 1")
    return args


def main(args):
    device = dist.resolve_device(args.device)
    torch.manual_seed(0)
    info = machine()
    print(f"device {device} | {info.get('gpu', info['cpu'])} | {info['cpu_count']} CPUs, {info['torch_threads']} "
          f"torch threads | load average {info.get('load_average_1min_at_start', 'n/a')}", flush=True)
    print(f"{'section':<9} {'model':<27} {'amp':<9} {'images/s':>9} {'median step':>13}", flush=True)
    rows = []
    for name in args.sections:
        rows += SECTIONS[name](args, device)
    if hasattr(os, "getloadavg"):
        info["load_average_1min_at_end"] = os.getloadavg()[0]
    result = {"command": " ".join(["python"] + sys.argv), "device": str(device), "machine": info,
              "warmup": args.warmup, "steps": args.steps, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from gissl.cli import run
    run(main, get_args)
