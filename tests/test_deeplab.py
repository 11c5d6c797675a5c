"""``--decoder deeplabv3plus``: DeepLabV3+ on a gissl ResNet equals segmentation_models_pytorch's
``DeepLabV3Plus`` (SSL4GIE's ResNet segmentation model) given the same state dict."""
import sys

import pytest
import torch

from gissl import segmentation as seg
from gissl.data.synthetic import generate
from gissl.errors import UserError
from gissl.models import build_encoder

smp = pytest.importorskip("segmentation_models_pytorch")


def _smp_deeplab(arch):
    torch.manual_seed(0)
    ref = smp.DeepLabV3Plus(encoder_name=arch, encoder_weights=None, classes=1)
    # non-trivial BatchNorm statistics, so that eval-mode outputs test every running buffer
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return ref.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_smp_state_dict_loads_strictly_and_gives_the_same_logits(arch):
    ref = _smp_deeplab(arch)
    model = seg.build_model(build_encoder(arch), decoder_channels=256, decoder="deeplabv3plus").eval()
    ref_state = ref.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref_state.items()}
    model.load_state_dict(ref_state, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), model(x)
    assert got.shape == (2, 1, 64, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_output_stride_16_dilates_every_conv_of_layer4_as_smp():
    encoder = build_encoder("resnet18").set_output_stride(16)
    ref = smp.encoders.get_encoder("resnet18", weights=None, output_stride=16)
    ref.load_state_dict({k: v for k, v in encoder.state_dict().items()})
    ref.eval(), encoder.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats, want = encoder.forward_features(x), ref(x)[2:]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 4] and encoder.feature_strides == [4, 8, 16, 16]
    for f, w in zip(feats, want):
        torch.testing.assert_close(f, w, rtol=1e-5, atol=1e-5)
    # torchvision's replace_stride_with_dilation keeps the first layer4 block undilated: not smp's
    first = encoder.layer4[0].conv1
    assert first.dilation == (2, 2) and first.stride == (1, 1) and first.padding == (2, 2)


def test_deeplab_needs_a_resnet():
    with pytest.raises(UserError, match="--decoder deeplabv3plus needs a ResNet"):
        seg.build_model(build_encoder("vit_t", img_size=64), decoder_channels=256, decoder="deeplabv3plus")
    with pytest.raises(UserError, match="--decoder residual does not apply to segmentation"):
        seg.build_model(build_encoder("resnet18"), decoder_channels=256, decoder="residual")


def _run(module, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    module.main(module.get_args())


def test_train_then_eval_with_weights_alone_keeps_the_decoder(tmp_path, monkeypatch, capsys):
    import eval_segmentation
    import train_segmentation
    data = generate("Kvasir", str(tmp_path / "kv"), num=12, seed=3)
    monkeypatch.chdir(tmp_path)
    _run(train_segmentation, monkeypatch, ["--architecture", "resnet18", "--image-size", "64", "--decoder",
                                           "deeplabv3plus", "--decoder-channels", "32", "--workers", "0",
                                           "--batch-size", "4", "--epochs", "1", "--data-root", str(data)])
    weights = tmp_path / "Trained models/segmentation/resnet18-random_init-frozen_False-dataset_Kvasir.pth"
    state = torch.load(weights, weights_only=True)
    assert state["args"]["decoder"] == "deeplabv3plus"
    assert any(k.startswith("decoder.aspp.0.convs.") for k in state["model"])
    capsys.readouterr()
    _run(eval_segmentation, monkeypatch, ["--weights", str(weights), "--workers", "0", "--data-root", str(data)])
    assert "Dice: " in (tmp_path / "eval_results.txt").read_text()
