"""DPT decoder: output shapes for both encoder families, every parameter used, one train step."""
import pytest
import torch

from gissl.losses import soft_dice
from gissl.models import build_encoder
from gissl.models.dpt import DPT, DepthHead


@pytest.mark.parametrize("arch", ["vit_t", "resnet18"])
@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_dpt_shapes_and_every_trainable_parameter_gets_a_gradient(arch, task):
    torch.manual_seed(0)
    model = DPT(build_encoder(arch, img_size=224), task=task)
    # The heads differ only after the fusion stage: full sizes for one task keep this fast.
    sizes = (224, 256) if task == "segmentation" else (96,)
    with torch.no_grad():
        for size in sizes:
            out = model(torch.randn(1, 3, size, size))
            assert out.shape == (1, 1, size, size)
    if task == "depth":  # default linear head: unbounded; SSL4GIE's sigmoid head: in [0, 1]
        assert model.head.output == "linear"
        model.head.output = "sigmoid"
        with torch.no_grad():
            out = model(torch.randn(1, 3, 96, 96))
        assert out.min() >= 0 and out.max() <= 1
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    # Nothing trainable is left without a gradient, so DDP needs no find_unused_parameters;
    # the ViT's final norm (not on the forward_features path) is frozen by DPT itself.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    if arch == "vit_t":
        assert not model.encoder.norm.weight.requires_grad


def test_dpt_vit_reassemble_widths_and_non_square_input():
    model = DPT(build_encoder("vit_t", img_size=64), task="segmentation", num_classes=2)
    # DPT-Base uses 96/192/384/768 for D = 768; a 192-d ViT-T gets D/8 .. D
    assert model.reassemble.out_dims == [24, 48, 96, 192]
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 2, 64, 96)


def test_one_step_reduces_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = DPT(build_encoder("resnet18"), task="segmentation")
    x = torch.randn(4, 3, 64, 64)
    y = torch.zeros(4, 1, 64, 64)
    y[:, :, 16:48, 16:48] = 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.head.dropout.p = 0.0  # a deterministic loss to compare
    with torch.no_grad():
        before = soft_dice(model(x), y).item()
    for _ in range(2):
        loss = soft_dice(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = soft_dice(model(x), y).item()
    assert after < before - 0.01, (before, after)


def test_depth_head_output_stays_fp32_under_bf16_autocast():
    head = DepthHead(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(2, 32, 8, 8), (16, 16))
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.float32
    assert out.unique().numel() > 256  # finer than bf16's 8-bit mantissa could represent
