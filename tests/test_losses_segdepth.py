"""Segmentation and depth losses against straightforward NumPy re-computations."""
import numpy as np
import torch

from gissl.losses import align_median, align_scale_shift, scale_shift_invariant, soft_dice


def test_soft_dice_known_values():
    target = torch.zeros(2, 1, 4, 4)
    target[0, :, :2] = 1  # 8 foreground pixels
    logits = torch.full((2, 1, 4, 4), -30.0)
    logits[0, :, :2] = 30.0  # perfect on image 0; image 1 empty on empty (→ Dice 1 by smoothing)
    assert soft_dice(logits, target).item() < 1e-6
    # all-0.5 prediction on image 0: Dice = 2·4 / (16·0.25 + 8) = 2/3
    half = torch.zeros(1, 1, 4, 4)
    np.testing.assert_allclose(soft_dice(half, target[:1]).item(), 1 - 2 / 3, rtol=1e-6)


def test_soft_dice_has_gradient_under_bf16_inputs():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss = soft_dice(logits.bfloat16(), (torch.rand(2, 1, 8, 8) > 0.5).float())
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.abs().sum() > 0


def _np_scale_shift(p, d, m):
    a = np.stack([p[m], np.ones(m.sum())], 1)
    return np.linalg.lstsq(a, d[m], rcond=None)[0]


def test_align_scale_shift_matches_lstsq():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 16, 16, generator=g, dtype=torch.float64)
    d = 3 * p + 0.5 + 0.05 * torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
    m = torch.rand(3, 16, 16, generator=g) > 0.3
    m[2] = False  # no valid pixel → s = t = 0
    s, t = align_scale_shift(p, d, m)
    for i in range(2):
        ref = _np_scale_shift(p[i].numpy(), d[i].numpy(), m[i].numpy())
        np.testing.assert_allclose([s[i].item(), t[i].item()], ref, rtol=1e-4)
    assert s[2] == 0 and t[2] == 0


def test_align_median():
    p = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    d = torch.tensor([[2.0, 4.0, 6.0, 0.0]])
    assert align_median(p, d, d > 0).item() == 2.0


def _np_ssi(p, d, alpha):
    """Loop-per-image NumPy version of SSL4GIE's ScaleAndShiftInvariantLoss (docs/ssl4gie-study.md §4.3)."""
    m = d > 0
    aligned = np.zeros_like(p)
    for i in range(len(p)):
        if m[i].sum() >= 2:
            s, t = _np_scale_shift(p[i], d[i], m[i])
            aligned[i] = s * p[i] + t
    r = m * (aligned - d)
    total = (r ** 2).sum() / (2 * m.sum()) if m.sum() else 0.0
    for k in range(4):
        step = 2 ** k
        rk, mk = r[:, ::step, ::step], m[:, ::step, ::step].astype(float)
        gx = np.abs(np.diff(rk, axis=2)) * mk[:, :, 1:] * mk[:, :, :-1]
        gy = np.abs(np.diff(rk, axis=1)) * mk[:, 1:] * mk[:, :-1]
        if mk.sum():
            total += alpha * (gx.sum() + gy.sum()) / mk.sum()
    return total


def test_scale_shift_invariant_matches_numpy_reference():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(3, 1, 32, 32, generator=g, dtype=torch.float64)
    d = torch.rand(3, 1, 32, 32, generator=g, dtype=torch.float64)
    d[d < 0.2] = 0  # invalid pixels
    d[1] = 0  # a frame without any valid pixel contributes nothing
    got = scale_shift_invariant(p, d, alpha=0.1).item()
    np.testing.assert_allclose(got, _np_ssi(p[:, 0].numpy(), d[:, 0].numpy(), 0.1), rtol=1e-5)


def test_scale_shift_invariant_is_invariant_and_safe_without_valid_pixels():
    d = torch.rand(2, 1, 16, 16) + 0.1
    assert scale_shift_invariant(0.3 * d - 2.0, d).item() < 1e-6
    p = torch.rand(2, 1, 16, 16, requires_grad=True)
    loss = scale_shift_invariant(p, torch.zeros(2, 1, 16, 16))
    assert torch.is_tensor(loss) and loss.item() == 0.0
    loss.backward()  # still part of the graph: the engine can backpropagate it


def test_align_scale_shift_fits_like_numpy_lstsq_on_degenerate_frames():
    """Random, constant-prediction, one-pixel and empty frames in one batch: the fitted values
    equal numpy's least squares; a singular frame gets s = 0, t = mean(target)."""
    import numpy as np
    from gissl.losses import align_scale_shift
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 8, 8, generator=g)
    d = torch.rand(4, 8, 8, generator=g) * 50 + 10
    p[1] = 0.7
    m = torch.ones_like(p, dtype=torch.bool)
    m[2] = False
    m[2, 0, 0] = True
    m[3] = False
    s, t = align_scale_shift(p, d, m)
    for i in range(3):
        v = m[i].numpy()
        a = np.stack([p[i].numpy()[v], np.ones(v.sum())], 1)
        x = np.linalg.lstsq(a, d[i].numpy()[v], rcond=None)[0]
        np.testing.assert_allclose(a @ np.array([s[i], t[i]]), a @ x, rtol=1e-5, atol=1e-4)
    for i in (1, 2):
        assert s[i] == 0 and torch.isclose(t[i], d[i][m[i]].mean())
    assert s[3] == 0 and t[3] == 0
