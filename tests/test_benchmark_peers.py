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


def _losses(fw, ours, theirs, views, seed=7):
    """gissl's and lightly's loss on ``views``; MAE reconstructs the first view with the same
    mask on both sides (gissl's draw after ``seed``, handed to lightly)."""
    if fw != "mae":
        return P.gissl_loss(ours, views), theirs(*views)
    torch.manual_seed(seed)
    a = P.gissl_loss(ours, views[:1])
    torch.manual_seed(seed)
    n, grid = len(views[0]), ours.encoder.pos_grid
    return a, theirs(views[0], *P.gissl_mae_mask(n, grid[0] * grid[1], ours.mask_ratio))


@pytest.mark.parametrize("arch", ["resnet18", "vit_t"])
def test_gissl_and_lightly_models_compute_the_same_loss_and_gradients(arch):
    pairs = P.pretrain_pairs(arch, 32)
    assert {fw for fw, _, _ in pairs} == {fw for fw, fam in P.PRETRAIN_PAIRS if fam == benchmark.family(arch)}
    for fw, ours, theirs in pairs:
        ours.train(), theirs.train()
        a, b = _losses(fw, ours, theirs, _views())
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6), fw
        a.backward(), b.backward()
        # the backbones get the same gradient (torchvision / timm names equal gissl's; lightly's
        # MAE wraps the timm ViT as ``backbone.vit``)
        theirs_grads = dict(getattr(theirs.backbone, "vit", theirs.backbone).named_parameters())
        for name, p in ours.encoder.named_parameters():
            if p.grad is not None:
                # float rounding relative to the gradient's scale (Barlow Twins' loss is ~1e3)
                scale = p.grad.abs().max().item()
                torch.testing.assert_close(p.grad, theirs_grads[name].grad, rtol=1e-3, atol=1e-5 * max(scale, 1.0),
                                           msg=f"{fw} {name}")


def test_mae_pair_masks_alike_and_decoders_get_the_same_gradients():
    (_, ours, theirs), = P.pretrain_pairs("vit_t", 64, frameworks=["mae"])  # 16 patches, 4 kept
    x = _views(4, 64)[:1]
    a, b = _losses("mae", ours, theirs, x, seed=3)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    # the handed-over mask: the class token and 4 patches kept, the other 12 masked, each patch once
    torch.manual_seed(3)
    ik, im = P.gissl_mae_mask(4, 16, 0.75)
    assert ik.shape == (4, 5) and im.shape == (4, 12) and (ik[:, 0] == 0).all()
    assert sorted(torch.cat([ik[:, 1:], im], 1)[0].tolist()) == list(range(1, 17))
    with torch.no_grad():
        other = theirs(x[0], *P.gissl_mae_mask(4, 16, 0.75))  # another mask: another loss
    assert other.item() != pytest.approx(b.item(), rel=1e-4)
    a.backward(), b.backward()
    pairs = {"decoder_embed.weight": theirs.decoder_embed.weight, "mask_token": theirs.decoder.mask_token,
             "decoder_blocks.1.mlp.fc2.weight": theirs.decoder.blocks[1].mlp.fc2.weight,
             "decoder_norm.weight": theirs.decoder.norm.weight, "decoder_pred.weight": theirs.prediction_head.weight,
             "encoder.patch_embed.proj.weight": theirs.backbone.vit.patch_embed.proj.weight}
    ours_p = dict(ours.named_parameters())
    for name, p in pairs.items():
        torch.testing.assert_close(ours_p[name].grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)
    assert theirs.backbone.vit.pos_embed.grad is None and ours.encoder.pos_embed.grad is None  # fixed sin-cos
    # while timed, each side draws its own mask: lightly's keeps as many patches (plus the class token)
    from lightly.models.utils import random_token_mask
    keep, masked = random_token_mask((4, 17), mask_ratio=0.75)
    assert (keep.shape, masked.shape) == (ik.shape, im.shape)


def test_simclr_loss_is_lightly_ntxent():
    from lightly.loss import NTXentLoss
    from gissl.losses import simclr
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    for t in (0.1, 0.5):
        assert simclr(z1, z2, t).item() == pytest.approx(NTXentLoss(temperature=t)(z1, z2).item(), rel=1e-6)


def test_vit_pretrain_rows_count_one_view_for_mae():
    import types
    args = types.SimpleNamespace(quick=True, warmup=0, steps=1)
    rows = P._pretrain_rows(args, torch.device("cpu"), "vit_t", 32, 2)
    per_step = {r["model"]: round(r["train_images_per_s"] * r["ms_per_step"] / 1000)
                for r in rows if r["setup"] == "lightly"}
    assert per_step == {"pretrain mocov3 vit_t": 4, "pretrain simclr vit_t": 4, "pretrain mae vit_t": 2}


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
            "pretrain simclr resnet18", "metric COCO mAP", "eval segmentation resnet18"} <= models
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
