"""benchmark.py's ``peers`` section: each pair of set-ups computes the same thing (so the speed
comparison is fair), and the section runs at tiny sizes."""
import math

import pytest
import torch

import benchmark
import benchmark_peers as P

pytest.importorskip("lightly")


def _views(n=6, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


@pytest.mark.parametrize("arch", ["resnet18", "vit_t"])
def test_gissl_and_lightly_models_compute_the_same_loss_and_gradients(arch):
    pairs = P.pretrain_pairs(arch, 32)
    assert {fw for fw, _, _ in pairs} == {fw for fw, fam in P.PRETRAIN_PAIRS if fam == benchmark.family(arch)}
    for fw, ours, theirs in pairs:
        ours.train(), theirs.train()
        views = _views()
        a, b = P.gissl_loss(ours, views), theirs(*views)
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6), fw
        a.backward(), b.backward()
        # the backbones get the same gradient (torchvision / timm names equal gissl's)
        theirs_grads = dict(theirs.backbone.named_parameters())
        for name, p in ours.encoder.named_parameters():
            if p.grad is not None:
                # float rounding relative to the gradient's scale (Barlow Twins' loss is ~1e3)
                scale = p.grad.abs().max().item()
                torch.testing.assert_close(p.grad, theirs_grads[name].grad, rtol=1e-3, atol=1e-5 * max(scale, 1.0),
                                           msg=f"{fw} {name}")


def test_momentum_update_moves_both_models_alike():
    (_, ours, theirs), = P.pretrain_pairs("resnet18", 32, frameworks=["mocov3"])
    with torch.no_grad():
        for p in ours.encoder.parameters():
            p.add_(0.1)
        for p in theirs.backbone.parameters():
            p.add_(0.1)
    ours.update_momentum(0.9), theirs.update_momentum(0.9)
    theirs_m = dict(theirs.backbone_momentum.named_parameters())
    for name, p in ours.momentum_encoder.named_parameters():
        torch.testing.assert_close(p, theirs_m[name])


def test_metric_functions_agree_with_torchmetrics_and_pycocotools():
    pytest.importorskip("torchmetrics")
    pytest.importorskip("pycocotools")
    cases = P.metric_cases(6, (60, 80))
    case_of = {"dice per image": "masks", "IoU per image": "masks", "AUROC": "auroc", "COCO mAP": "map"}
    fns = P.metric_functions()
    assert set(fns["COCO mAP"]) == {"gissl", "pycocotools", "torchmetrics"}
    for metric, setups in fns.items():
        values = {k: fn(cases[case_of[metric]]) for k, fn in setups.items()}
        assert len(values) >= 2 and not math.isnan(values["gissl"]), metric
        for k, v in values.items():
            # torchmetrics computes in float32; pycocotools in float64 like gissl
            assert v == pytest.approx(values["gissl"], abs=1e-12 if k == "pycocotools" else 1e-6), (metric, k)


def test_peers_section_runs_at_quick_sizes(tmp_path, capsys):
    args = benchmark.get_args(["--quick", "--sections", "peers", "--task-archs", "resnet18", "--task-image-size", "32",
                               "--task-batch-size", "2", "--steps", "1", "--warmup", "0", "--eval-images", "4",
                               "--eval-batch-size", "2", "--json", str(tmp_path / "b.json")])
    rows = benchmark.main(args)["rows"]
    models = {r["model"] for r in rows}
    assert {"pretrain barlowtwins resnet18", "pretrain simsiam resnet18", "pretrain mocov3 resnet18",
            "metric COCO mAP", "eval segmentation resnet18"} <= models
    gissl_rows = [r for r in rows if r["setup"] == "gissl" and r["model"].startswith("pretrain")]
    assert all(r["vs_peer"] > 0 for r in gissl_rows)
    evals = [r for r in rows if r["model"].startswith("eval ")]
    assert len(evals) == 3 and all(r["bare_images_per_s"] > 0 and r["eval_images_per_s"] > 0 for r in evals)
    assert "vs peer" in capsys.readouterr().out


def test_gissl_and_smp_deeplab_compute_the_same_loss():
    pytest.importorskip("segmentation_models_pytorch")
    from gissl import segmentation as S
    (decoder, ours, theirs), = P.segmentation_pairs("resnet18", 64)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, 64, 64, generator=g), "mask": (torch.rand(2, 1, 64, 64, generator=g) > 0.7).float()}
    ours.train(), theirs.train()
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(3)  # both have the ASPP dropout: the same draw on both sides
        losses.append(sum(S.compute_losses(model, batch).values()).item())
    assert decoder == "DeepLabV3+" and losses[0] == pytest.approx(losses[1], rel=1e-6)
