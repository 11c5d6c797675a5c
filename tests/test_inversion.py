"""Deep-image-prior feature inversion: the generator's shapes, the feature distance it reaches,
PSNR / SSIM / LPIPS against torchmetrics, and ``eval_transfer.py --protocol reconstruction``."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_transfer
from gissl import cli, inversion
from gissl.models import build_encoder
from gissl.optim import freeze

TINY = dict(channels=(8, 16, 16), skips=(4, 4, 4), kernels=(3, 3, 3), input_depth=8)


def _smooth_image(side, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, side // 4, side // 4, generator=g)
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)[0]


def test_generator_shapes_and_noise_side():
    net = inversion.SkipHourglass(8, (8, 16, 16), (4, 0, 4), (3, 5, 3))
    assert net(torch.rand(1, 8, 32, 32)).shape == (1, 3, 32, 32)
    # the study's 256-px noise for 224-px images; small images keep the deepest map >= 2x2
    assert inversion.noise_side(224, 6) == 256
    assert inversion.noise_side(64, 6) == 128 and inversion.noise_side(64, 3) == 64
    study = inversion.SkipHourglass()  # the study's six levels build and run at their noise size
    assert study(torch.rand(1, 32, 128, 128)).shape == (1, 3, 128, 128)


def _dip_skip_parameters(input_depth, down, up, skip, kernels, out=3):
    """Parameter count of DIP's ``skip()`` (models/skip.py of Ulyanov et al.'s code, with
    ``need1x1_up`` and biases), transcribed layer by layer: per level i, the skip branch conv
    1x1 + BN, two down convs + BNs, the BN after the concatenation, the up conv + BN and the
    1x1 conv + BN; then the final 1x1 conv."""
    total, cin = 0, input_depth
    for i, (c, s, k) in enumerate(zip(down, skip, kernels)):
        below = up[i + 1] if i + 1 < len(down) else c
        total += (cin * s + s + 2 * s) if s else 0
        total += cin * c * k * k + c + 2 * c + c * c * k * k + c + 2 * c
        total += 2 * (s + below)
        total += (s + below) * up[i] * k * k + up[i] + 2 * up[i] + up[i] * up[i] + up[i] + 2 * up[i]
        cin = c
    return total + up[0] * out + out


def test_generator_has_the_dip_skip_parameters():
    study = inversion.SkipHourglass()
    n = sum(p.numel() for p in study.parameters())
    assert n == _dip_skip_parameters(32, inversion.DIP_CHANNELS, inversion.DIP_CHANNELS,
                                     inversion.DIP_SKIP_CHANNELS, inversion.DIP_KERNELS)
    small = inversion.SkipHourglass(8, (8, 16, 16), (4, 0, 4), (3, 5, 3))
    assert sum(p.numel() for p in small.parameters()) == _dip_skip_parameters(8, (8, 16, 16), (8, 16, 16),
                                                                               (4, 0, 4), (3, 5, 3))


def test_feature_distance_falls_tenfold_in_30_steps():
    torch.manual_seed(0)
    encoder = freeze(build_encoder("resnet18")).eval()
    image = _smooth_image(32)
    for layer in ("stage2", "pooled"):
        out = inversion.invert(encoder, image, layer=layer, iterations=30, lr=1e-2, seed=0, **TINY)
        assert len(out["losses"]) == 31
        # stated factor: the feature MSE falls at least 10x (measured: ~150x for stage2)
        assert out["losses"][-1] <= out["losses"][0] / 10, (layer, out["losses"][0], out["losses"][-1])
        rec = out["reconstruction"]
        assert rec.shape == image.shape and float(rec.min()) >= 0 and float(rec.max()) <= 1
    again = inversion.invert(encoder, image, layer="pooled", iterations=30, lr=1e-2, seed=0, **TINY)
    assert torch.equal(again["reconstruction"], out["reconstruction"])  # seeded: same run, same picture


def test_psnr_ssim_equal_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 40, 48, generator=g, dtype=torch.float64)
    y = (0.7 * x + 0.3 * torch.rand(2, 3, 40, 48, generator=g, dtype=torch.float64)).clamp(0, 1)
    # tolerance 1e-5 dB: torchmetrics takes the log in float32
    assert inversion.psnr(x, y) == pytest.approx(float(peak_signal_noise_ratio(x, y, data_range=1.0)), abs=1e-5)
    # tolerance 1e-9 (float64). torchmetrics reflect-pads before filtering; its SSIM map cropped by
    # the 5-px window radius is Wang et al.'s "valid" map, which gissl averages
    _, full = structural_similarity_index_measure(x, y, data_range=1.0, return_full_image=True)
    assert inversion.ssim(x, y) == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-9)
    assert inversion.ssim(x[0], x[0]) == pytest.approx(1.0) and inversion.psnr(x, x) == float("inf")
    # 8-bit images: data range 255
    a, b = (x * 255).round(), (y * 255).round()
    _, full = structural_similarity_index_measure(a, b, data_range=255.0, return_full_image=True)
    assert inversion.ssim(a, b, data_range=255) == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-9)


def _lpips_files(folder):
    """torchmetrics' LPIPS with a random AlexNet, and the same weights as the two files gissl reads:
    a torchvision-keyed AlexNet state dict and the LPIPS package's linear layers (which
    torchmetrics ships as they are)."""
    import torchmetrics.functional.image.lpips as tm
    torch.manual_seed(0)
    ref = tm._LPIPS(pretrained=True, net="alex", pnet_rand=True).eval()
    backbone = {}
    for k, v in ref.net.state_dict().items():  # slice{n}.{i}.weight -> features.{i}.weight (torchvision)
        _, i, rest = k.split(".", 2)
        backbone[f"features.{i}.{rest}"] = v
    torch.save(backbone, folder / "alexnet.pth")
    return ref, folder / "alexnet.pth", os.path.join(os.path.dirname(tm.__file__), "lpips_models", "alex.pth")


def test_ssim_equals_a_transcription_of_wang_2004():
    """SSIM(x, y) = mean over window positions of (2 mx my + C1)(2 sxy + C2) / ((mx² + my² + C1)(sx² + sy² + C2)),
    moments weighted by the 11x11 Gaussian (σ 1.5, sum 1), written out position by position."""
    import math
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 1, 14, 13, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(1, 1, 14, 13, generator=g, dtype=torch.float64)).clamp(0, 1)
    r = [(i - 5) ** 2 for i in range(11)]
    w = torch.tensor([[math.exp(-(a + b) / (2 * 1.5 ** 2)) for b in r] for a in r], dtype=torch.float64)
    w = w / w.sum()
    c1, c2, vals = 0.01 ** 2, 0.03 ** 2, []
    for i in range(14 - 10):
        for j in range(13 - 10):
            a, b = x[0, 0, i:i + 11, j:j + 11], y[0, 0, i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cab = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    assert inversion.ssim(x, y) == pytest.approx(float(torch.stack(vals).mean()), abs=1e-12)


def test_lpips_equals_torchmetrics(tmp_path):
    ref, backbone, linear = _lpips_files(tmp_path)
    ours = inversion.load_lpips(backbone, linear)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    expected = ref(x, y, normalize=True).flatten()
    assert torch.allclose(ours(x, y), expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(ours(x, x), torch.zeros(2), atol=1e-6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    rng = np.random.default_rng(0)
    for c, col in enumerate([(200, 60, 60), (60, 200, 60)]):
        (root / f"class{c}").mkdir()
        for i in range(10):
            a = np.clip(rng.normal(0, 20, (32, 32, 3)) + np.array(col), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"class{c}" / f"img{i}.png")
    return root


def _args(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["eval_transfer.py"] + argv)
    return eval_transfer.get_args()


def test_eval_transfer_reconstruction(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--architecture", "resnet18", "--dataset", "folder", "--data-root", str(folder), "--image-size", "32",
              "--workers", "0", "--output-dir", str(tmp_path / "t"), "--protocol", "reconstruction"]
    tiny = ["--dip-channels", "8,16,16", "--dip-skip-channels", "4,4,4", "--dip-kernels", "3,3,3",
            "--dip-input-depth", "8", "--dip-iterations", "10", "--dip-lr", "0.01"]
    args = _args(monkeypatch, common + tiny + ["--idx", "0,1", "--feature-layer", "stage3"])
    res = eval_transfer.main(args)
    assert res["Images"] == 2 and res["LPIPS"].startswith("skipped") and res["Feature MSE ratio"] > 1
    assert 0 < res["SSIM"] <= 1 and res["PSNR (dB)"] > 0
    pictures = sorted((tmp_path / "Predictions" / "transfer-folder").glob("reconstruction*_resnet18-*.png"))
    assert [p.name.split("_")[0] for p in pictures] == ["reconstruction0", "reconstruction1"]
    assert Image.open(pictures[0]).size[0] > 2 * 256  # input | reconstruction, enlarged
    assert "LPIPS skipped" in capsys.readouterr().out
    assert "Transfer (reconstruction) results" in (tmp_path / "eval_results.txt").read_text()
    # the study's defaults, shown in --help
    defaults = _args(monkeypatch, common)
    assert (defaults.dip_iterations, defaults.dip_lr, defaults.feature_layer) == (1000, 1e-3, "stage4")
    assert defaults.dip_channels == (16, 32, 64, 128, 128, 128) and defaults.dip_kernels == (7, 7, 5, 5, 3, 3)
    _, backbone, linear = _lpips_files(tmp_path)
    args = _args(monkeypatch, common + tiny + ["--lpips-weights", linear, "--lpips-backbone", str(backbone)])
    assert eval_transfer.main(args)["LPIPS"] > 0
    for bad, flag in ((["--dip-channels", "8,16"], "--dip-channels"), (["--dip-kernels", "3,4,3"], "--dip-kernels"),
                      (["--lpips-weights", str(folder)], "--lpips-backbone"), (["--idx", "99"], "--idx")):
        monkeypatch.setattr(sys, "argv", ["eval_transfer.py"] + common + tiny + bad)
        with pytest.raises(SystemExit) as e:
            cli.run(eval_transfer.main, eval_transfer.get_args)
        assert e.value.code == 2 and flag in capsys.readouterr().err, bad
