"""``--decoder residual``: SSL4GIE's residual depth decoder for ResNets, checked against a
transcription of SSL4GIE's ``ResNet_from_Any(dense="depth")`` (its Models/models.py:
``ResNet_Dec_Block``, ``ResNet_Dec_Level``, ``output_conv``) built here from torch.nn and
torchvision, with SSL4GIE's flat parameter names."""
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

from gissl import depth
from gissl.data.synthetic import generate
from gissl.errors import UserError
from gissl.models import build_encoder


class _Block(nn.Module):  # SSL4GIE's ResNet_Dec_Block
    def __init__(self, c, fusion):
        super().__init__()
        self.identity = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c)) if fusion else nn.Identity()
        self.process = nn.Sequential(nn.Conv2d(2 * c if fusion else c, c // 4, 1), nn.BatchNorm2d(c // 4),
                                     nn.ReLU(), nn.Conv2d(c // 4, c // 4, 3, padding=1),
                                     nn.BatchNorm2d(c // 4), nn.ReLU(), nn.Conv2d(c // 4, c, 1),
                                     nn.BatchNorm2d(c))
        self.relu = nn.ReLU()

    def forward(self, x):
        identity = self.identity(x)
        x = self.process(x)
        x += identity
        return self.relu(x)


class _Level(nn.Module):  # SSL4GIE's ResNet_Dec_Level
    def __init__(self, c, n_blocks=3):
        super().__init__()
        self.chan_reduce = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.blocks = nn.Sequential(_Block(c, True), *[_Block(c, False) for _ in range(1, n_blocks)])

    def forward(self, x_low, x_high):
        return self.blocks(torch.cat((self.up(self.chan_reduce(x_low)), x_high), 1))


class _SSL4GIEResNetDepth(torchvision.models.resnet.ResNet):
    """SSL4GIE's ``ResNet_from_Any(dense="depth")``: the torchvision trunk with ``fc = Identity``
    and the decoder at the top level of the module (``decoder_levels.*``, ``output_conv.*``).
    SSL4GIE hard-codes ResNet-50's widths (1024/512/256, 256 → 128 → 32); for ResNet-18 the
    same structure is built on its 256/128/64 stages."""

    def __init__(self, block, layers, c1):
        super().__init__(block, layers)
        self.fc = nn.Identity()
        self.decoder_levels = nn.ModuleList([_Level(4 * c1), _Level(2 * c1), _Level(c1)])
        self.output_conv = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(c1, c1 // 2, kernel_size=3, stride=1, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(c1 // 2, 32, kernel_size=3, stride=1, padding=1), nn.ReLU(True),
            nn.Conv2d(32, 1, kernel_size=1, stride=1, padding=0), nn.Sigmoid())

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        fmaps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            fmaps.append(x)
        out = self.decoder_levels[0](fmaps[-1], fmaps[-2])
        for i in range(1, len(self.decoder_levels)):
            out = self.decoder_levels[i](out, fmaps[-i - 2])
        return self.output_conv(out)


REFERENCES = {"resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], 64),
              "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], 256)}


def _reference(arch):
    torch.manual_seed(0)
    ref = _SSL4GIEResNetDepth(*REFERENCES[arch])
    for m in ref.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return ref.eval()


def _as_gissl(state):
    """SSL4GIE's flat names -> gissl's: the trunk moves under ``encoder.``, the decoder keeps its names."""
    return {(k if k.split(".")[0] in ("decoder_levels", "output_conv") else "encoder." + k): v
            for k, v in state.items()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_reference_weights_load_strictly_and_give_the_same_depth(arch):
    ref = _reference(arch)
    model = depth.build_model(build_encoder(arch), decoder_channels=256, depth_output="sigmoid",
                              decoder="residual").eval()
    state = _as_gissl(ref.state_dict())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), model(x)
    assert got.shape == (2, 1, 64, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the linear output is the same map before the sigmoid
    model.depth_output = "linear"
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(model(x)), want, rtol=1e-5, atol=1e-6)


def test_ssl4gie_resnet50_widths():
    model = depth.build_model(build_encoder("resnet50"), decoder_channels=256, decoder="residual")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # SSL4GIE's ResNet_Dec_Level(1024 / 512 / 256, 3) and output_conv 256 -> 128 -> 32 -> 1
    assert shapes["decoder_levels.0.chan_reduce.0.weight"] == (1024, 2048, 1, 1)
    assert shapes["decoder_levels.0.blocks.0.identity.0.weight"] == (1024, 2048, 1, 1)
    assert shapes["decoder_levels.2.blocks.2.process.6.weight"] == (256, 64, 1, 1)
    assert shapes["output_conv.1.weight"] == (128, 256, 3, 3)
    assert shapes["output_conv.3.weight"] == (32, 128, 3, 3)
    assert shapes["output_conv.5.weight"] == (1, 32, 1, 1)


def test_residual_decoder_refusals():
    with pytest.raises(UserError, match="--decoder residual needs a ResNet"):
        depth.build_model(build_encoder("vit_t", img_size=64), decoder_channels=256, decoder="residual")
    with pytest.raises(UserError, match="--decoder-channels 64 does not apply to --decoder residual"):
        depth.build_model(build_encoder("resnet18"), decoder_channels=64, decoder="residual")
    with pytest.raises(UserError, match="--decoder deeplabv3plus does not apply to depth"):
        depth.build_model(build_encoder("resnet18"), decoder_channels=256, decoder="deeplabv3plus")


def _run(module, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    module.main(module.get_args())


def test_train_then_eval_with_weights_alone_keeps_the_decoder(tmp_path, monkeypatch):
    import eval_depth
    import train_depth
    data = generate("C3VD", tmp_path / "c3vd", num=3)
    monkeypatch.chdir(tmp_path)
    _run(train_depth, monkeypatch, ["--architecture", "resnet18", "--image-size", "64", "--decoder", "residual",
                                    "--workers", "0", "--batch-size", "4", "--epochs", "1",
                                    "--data-root", str(data)])
    weights = tmp_path / "Trained models/depth/resnet18-random_init-frozen_False-dataset_C3VD.pth"
    state = torch.load(weights, weights_only=True)
    assert state["args"]["decoder"] == "residual"
    assert "decoder_levels.0.chan_reduce.0.weight" in state["model"]
    _run(eval_depth, monkeypatch, ["--weights", str(weights), "--workers", "0", "--data-root", str(data)])
    assert "RMSE: " in (tmp_path / "eval_results.txt").read_text()
