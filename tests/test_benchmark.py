"""benchmark.py end to end at tiny sizes: every section runs and the JSON holds every figure."""
import json

import pytest
import torch

import benchmark

TINY = ["--archs", "vit_t", "resnet18", "--batch-size", "2", "--mfu-batch", "4", "--image-size", "32",
        "--task-archs", "resnet18", "--task-image-size", "32", "--task-batch-size", "2",
        "--decoder-channels", "8", "--eval-images", "3", "--eval-batch-size", "2", "--eval-repeats", "1",
        "--warmup", "1", "--steps", "1", "--data-frames", "1", "--data-repeats", "1"]


def run(tmp_path, extra=()):
    out = tmp_path / "bench.json"
    result = benchmark.main(benchmark.get_args(TINY + ["--json", str(out)] + list(extra)))
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    return saved


def rows(result, section, **match):
    return [r for r in result["rows"] if r["section"] == section and all(r.get(k) == v for k, v in match.items())]


@pytest.mark.slow  # ~15 s idle, 35 s on the shared 2-core machine
def test_benchmark_sections_and_keys(tmp_path, capsys):
    result = run(tmp_path, ["--tasks", "classification", "segmentation", "depth", "simsiam"])
    assert set(result["machine"]["peak_tflops"]) == {"bfloat16", "float32"}
    assert all(r["tflops"] > 0 for r in rows(result, "peak"))
    for arch in ("vit_t", "resnet18"):
        setups = {r["setup"] for r in rows(result, "encoders") if arch in r["model"] or
                  (arch == "vit_t" and "vit_tiny" in r["model"])}
        assert setups == {"gissl", "gissl fp32", "reference", "best reference"}
        ours = rows(result, "encoders", model=f"gissl {arch}", setup="gissl", batch=2)[0]
        for key in ("train_images_per_s", "peak_mem_mb", "gflop_per_step", "tflops", "mfu",
                    "vs_reference", "vs_best_reference"):
            assert ours[key] is not None and ours[key] > 0, key
        assert ours["amp"] == "bfloat16"
    assert rows(result, "encoders", model="gissl vit_t", batch=4)[0]["mfu"] > 0  # the MFU batch
    for task in ("classification", "segmentation", "depth"):
        train = rows(result, "tasks", model=f"{task} resnet18", setup="gissl train")
        assert {r["amp"] for r in train} == {"bfloat16", "off"}
        assert all(r["train_images_per_s"] > 0 and r["peak_mem_mb"] is not None for r in train)
        evals = {r["setup"]: r for r in rows(result, "tasks", model=f"{task} resnet18") if "eval" in r["setup"]}
        assert set(evals) == {"gissl eval", "gissl fp32 eval", "reference eval"}
        assert evals["reference eval"]["batch"] == 1 and evals["gissl eval"]["batch"] == 2
        assert evals["gissl fp32 eval"]["metrics_equal_reference"] is True  # batching changes no number
        assert all(r["eval_images_per_s"] > 0 for r in evals.values())
    assert rows(result, "tasks", model="pretrain simsiam resnet18")
    data = {r["setup"]: r for r in rows(result, "data")}
    assert set(data) == {"reference", "gissl"} and data["gissl"]["images_per_s_per_core"] > 0
    table = capsys.readouterr().out
    assert "train/s" in table and "gissl resnet18" in table and "wrote" in table


@pytest.mark.slow
def test_benchmark_every_task_model(tmp_path):
    result = run(tmp_path, ["--sections", "tasks", "--task-archs", "vit_t", "resnet18"])
    models = {r["model"] for r in rows(result, "tasks")}
    for arch in ("vit_t", "resnet18"):
        for task in ("classification", "segmentation", "depth", "detection", "retrieval", "pretrain mocov3"):
            assert f"{task} {arch}" in models
    assert {"pretrain mae vit_t", "pretrain barlowtwins resnet18", "pretrain simsiam resnet18",
            "pretrain fpsiam resnet18"} <= models


def test_benchmark_arguments_and_table():
    args = benchmark.get_args(["--quick"])
    assert args.archs == ["vit_b", "resnet50"] and args.task_archs == ["vit_t", "resnet18"] and args.steps == 3
    assert benchmark.get_args([]).task_archs == ["vit_b", "resnet50"]
    with pytest.raises(benchmark.UserError, match="multiple of 32"):
        benchmark.get_args(["--image-size", "100"])
    table = benchmark.format_table([{"section": "encoders", "model": "gissl vit_b", "setup": "gissl", "amp": "bfloat16",
                                     "batch": 8, "train_images_per_s": 4.5, "mfu": 0.25, "vs_reference": 2.0}])
    assert "4.50" in table and "25.0%" in table and "2.00x" in table


def test_an_mfu_above_100_percent_is_reported_as_a_measurement_error(monkeypatch):
    # The run's peak measured too low (as under load): a step "faster than the machine" must
    # not print as 168 % but as an error that says why.
    rows = [{"section": "peak", "model": "matmul 2048x2048", "setup": "torch.mm", "amp": "float32", "tflops": 0.1},
            {"section": "encoders", "model": "gissl vit_b", "setup": "gissl", "amp": "off", "batch": 8,
             "tflops": 0.168, "mfu": 1.68, "mfu_vs_peak_of": "float32", "mfu_sustained": 0.5},
            {"section": "encoders", "model": "gissl resnet50", "setup": "gissl", "amp": "off", "batch": 8,
             "tflops": 0.05, "mfu": 0.5, "mfu_vs_peak_of": "float32", "mfu_sustained": 0.4}]
    monkeypatch.setattr(benchmark, "matmul_peak", lambda device, dtype, repeats=5: 0.1)
    benchmark.refine_peak(rows, {"peak_tflops": {"float32": 0.1}}, torch.device("cpu"))
    bad, good = rows[1], rows[2]
    assert bad["mfu"] is None and bad["mfu_sustained"] == 0.5
    assert "168%" in bad["measurement_errors"][0] and "too low" in bad["measurement_errors"][0]
    assert good["mfu"] == pytest.approx(0.5) and "measurement_errors" not in good
    table = benchmark.format_table(rows)
    assert "error" in table.splitlines()[3] and "168.0%" not in table


def test_the_matmul_peak_is_the_best_over_several_sizes(monkeypatch):
    seen = {}
    monkeypatch.setattr(benchmark, "matmul_tflops", lambda device, dtype, n=2048, repeats=5: seen.setdefault(n, n / 1000))
    assert benchmark.matmul_peak(torch.device("cpu"), torch.float32) == max(benchmark.PEAK_SIZES) / 1000
    assert set(seen) == set(benchmark.PEAK_SIZES) and len(seen) >= 3
