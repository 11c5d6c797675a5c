"""Feature inversion with a deep image prior: what does a frozen encoder keep of an image?

The SSL-transfer study's reconstruction diagnostic (docs/transfer-study.md, "Feature inversion
(deep image prior)"), after Zhao et al., "What makes instance discrimination good for transfer
learning?" (ICLR 2021), which inverts features with the deep image prior of Ulyanov, Vedaldi
and Lempitsky, "Deep Image Prior" (CVPR 2018):

* a randomly initialised hourglass network with skip connections (the DIP paper's "skip"
  architecture, :class:`SkipHourglass`) maps fixed uniform noise to an image;
* its weights are optimised with Adam so that the frozen encoder's features of that image
  match the features of the target (MSE on features, :func:`invert`);
* the reconstruction shows what the features kept; PSNR and SSIM (:func:`psnr`, :func:`ssim`,
  Wang et al. 2004) and optionally LPIPS (:class:`LPIPS`, Zhang et al. 2018, from local weight
  files) measure how far it is from the input.

Images here are `(N, 3, H, W)` or `(3, H, W)` floats in [0, 1] unless said otherwise; the
encoder sees them normalised (``mean``/``std``), which the study's script forgot
(docs/transfer-study.md §b.4 item 10).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gissl.errors import UserError

# The study's generator (docs/transfer-study.md, "Feature inversion"): six levels, 1x1 skips of 4 channels.
DIP_CHANNELS = (16, 32, 64, 128, 128, 128)
DIP_SKIP_CHANNELS = (4, 4, 4, 4, 4, 4)
DIP_KERNELS = (7, 7, 5, 5, 3, 3)
DIP_INPUT_DEPTH = 32
DIP_ITERATIONS = 1000  # reconstruction.py's --max_iter (its cluster script passed 3000)
DIP_LR = 1e-3  # reconstruction.py's --lr (Adam)
FEATURE_LAYERS = ("stage1", "stage2", "stage3", "stage4", "pooled")


# --------------------------------------------------------------------------- the generator

def _conv_block(cin, cout, kernel, down=False):
    """Zero-padded conv -> (2x2 average pool when ``down``) -> BatchNorm -> LeakyReLU(0.2)."""
    layers = [nn.Conv2d(cin, cout, kernel, padding=(kernel - 1) // 2)]
    if down:
        layers.append(nn.AvgPool2d(2))
    return layers + [nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]


class _Level(nn.Module):
    """One scale of the hourglass: ``x`` -> cat(skip(x), up(deeper(down(x)))) -> convs."""

    def __init__(self, cin, channels, skips, kernels):
        super().__init__()
        c, s, k = channels[0], skips[0], kernels[0]
        self.down = nn.Sequential(*_conv_block(cin, c, k, down=True), *_conv_block(c, c, k))
        self.deeper = _Level(c, channels[1:], skips[1:], kernels[1:]) if len(channels) > 1 else None
        below = channels[1] if len(channels) > 1 else c  # channels coming back up from below
        self.skip = nn.Sequential(*_conv_block(cin, s, 1)) if s else None
        self.merge = nn.Sequential(nn.BatchNorm2d(s + below), *_conv_block(s + below, c, k), *_conv_block(c, c, 1))

    def forward(self, x):
        y = self.down(x)
        if self.deeper is not None:
            y = self.deeper(y)
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        if self.skip is not None:
            y = torch.cat([self.skip(x), y], 1)
        return self.merge(y)


class SkipHourglass(nn.Module):
    """The DIP "skip" encoder-decoder: `(N, input_depth, S, S)` noise -> `(N, 3, S, S)` image.

    Level i: conv ``kernels[i]`` + 2x2 average pool to ``channels[i]``, conv, the deeper levels,
    nearest 2x upsampling, concatenation with a 1x1-conv skip of ``skips[i]`` channels (0 = no
    skip), BatchNorm, conv ``kernels[i]``, 1x1 conv; every conv is followed by BatchNorm and
    LeakyReLU(0.2); a final 1x1 conv gives 3 channels, with no sigmoid (as the study). S must be
    a multiple of 2 ** len(channels).
    """

    def __init__(self, input_depth=DIP_INPUT_DEPTH, channels=DIP_CHANNELS, skips=DIP_SKIP_CHANNELS,
                 kernels=DIP_KERNELS):
        super().__init__()
        if not channels or not (len(channels) == len(skips) == len(kernels)):
            raise UserError(f"--dip-channels ({len(channels)} values), --dip-skip-channels ({len(skips)}) and "
                            f"--dip-kernels ({len(kernels)}) need one value per level, the same number each")
        if any(k % 2 == 0 or k < 1 for k in kernels):
            raise UserError(f"--dip-kernels {','.join(map(str, kernels))}: kernel sides must be odd")
        self.levels = len(channels)
        self.body = _Level(input_depth, tuple(channels), tuple(skips), tuple(kernels))
        self.out = nn.Conv2d(channels[0], 3, 1)

    def forward(self, z):
        return self.out(self.body(z))


def noise_side(image_size, levels):
    """Side of the input noise for an ``image_size`` output: the smallest multiple of
    ``2 ** levels`` that is at least ``image_size`` and leaves the deepest map at least 2x2
    (BatchNorm of one image needs more than one value). The output is cropped to
    ``image_size``, as the study's 256-px noise for 224-px images."""
    unit = 2 ** levels
    return max(unit * math.ceil(image_size / unit), 2 * unit)


# --------------------------------------------------------------------------- features

def feature_function(encoder, layer):
    """``fn(normalised (N, 3, H, W)) -> features`` of ``encoder`` at ``layer``: ``stage1`` ..
    ``stage4`` = ``forward_features(x)[0..3]`` `(N, C, h, w)` (ResNet stages, ViT blocks;
    ``stage4`` is the study's ``layer4``), ``pooled`` = ``encoder(x)`` `(N, D)`."""
    if layer == "pooled":
        return encoder
    if layer not in FEATURE_LAYERS:
        raise UserError(f"unknown --feature-layer '{layer}'; choose from {', '.join(FEATURE_LAYERS)}")
    index = FEATURE_LAYERS.index(layer)
    return lambda x: encoder.forward_features(x)[index]


def _normaliser(mean, std, device):
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return lambda x: (x - m) / s


def invert(encoder, image, *, layer="stage4", iterations=DIP_ITERATIONS, lr=DIP_LR, channels=DIP_CHANNELS,
           skips=DIP_SKIP_CHANNELS, kernels=DIP_KERNELS, input_depth=DIP_INPUT_DEPTH, seed=0,
           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), log_every=0):
    """Reconstruct `image (3, H, W)` in [0, 1] from ``encoder``'s features at ``layer``.

    A :class:`SkipHourglass` (seeded by ``seed``) is fed fixed noise U(0, 0.1) of
    ``input_depth`` channels (:func:`noise_side`); Adam at ``lr`` runs ``iterations`` steps on
    ``MSE(f(norm(G(z))), f(norm(image)))``, ``G(z)`` cropped to H x W (top-left, as the study).
    The generator trains in train mode (BatchNorm over its one image, as DIP); ``encoder``
    must be frozen and in eval mode. Returns ``{"reconstruction": (3, H, W) clipped to [0, 1],
    "losses": [feature MSE before each step ..., after the last], "seconds"}``.
    """
    import time
    device = image.device
    h, w = image.shape[-2:]
    fn, norm = feature_function(encoder, layer), _normaliser(mean, std, device)
    with torch.no_grad():
        target = fn(norm(image[None].float())).float()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SkipHourglass(input_depth, channels, skips, kernels).to(device).train()
    side = noise_side(max(h, w), len(channels))
    z = (torch.rand(1, input_depth, side, side, generator=g) * 0.1).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses, start = [], time.perf_counter()
    with torch.enable_grad():
        for step in range(iterations + 1):
            out = net(z)[:, :, :h, :w]
            loss = F.mse_loss(fn(norm(out)).float(), target)
            losses.append(float(loss.detach()))
            if log_every and step % log_every == 0:
                print(f"  DIP step {step}/{iterations}: feature MSE {losses[-1]:.6g}", flush=True)
            if step == iterations:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {"reconstruction": out.detach()[0].clamp(0, 1), "losses": losses,
            "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- distances

def _batched(x):
    x = torch.as_tensor(x).double()
    return x[None] if x.dim() == 3 else x


def psnr(x, y, data_range=1.0):
    """Peak signal-to-noise ratio in dB, ``10 log10(range² / MSE)`` over all pixels of `x`, `y`
    (same shape); infinite for identical images."""
    mse = float(((_batched(x) - _batched(y)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size, sigma):
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x, y, data_range=1.0, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity of Wang, Bovik, Sheikh and Simoncelli (IEEE TIP 2004): local means,
    variances and covariance under an 11x11 Gaussian window of σ 1.5 (population moments, no
    Bessel correction), ``C1 = (k1·L)²``, ``C2 = (k2·L)²``, the SSIM map over the positions where
    the window fits inside the image ("valid"), averaged over positions, channels and images.
    `x`, `y`: `(N, C, H, W)` or `(C, H, W)` with H, W >= ``window``."""
    x, y = _batched(x), _batched(y)
    if min(x.shape[-2:]) < window:
        raise UserError(f"SSIM needs images of at least {window}x{window} pixels; got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    k = _gaussian_window(window, sigma).to(x.device).expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, k, groups=c)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


class LPIPS(nn.Module):
    """LPIPS distance with the AlexNet backbone (Zhang et al., CVPR 2018), built from local files.

    ``backbone``: a torchvision ``alexnet`` state dict (``features.*`` keys; the classifier is
    ignored); ``linear``: the LPIPS package's linear-layer file (``lin0.model.1.weight`` ..
    ``lin4.model.1.weight``, each `(1, C, 1, 1)`). forward(x, y) with images in [0, 1]
    `(N, 3, H, W)` -> `(N,)`: inputs scaled to [-1, 1] and shifted/scaled per channel, the
    five ReLU outputs unit-normalised along channels, squared differences weighted by the
    linear layers, averaged over space and summed over layers.
    """

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)
    CUTS = (2, 5, 8, 10, 12)  # torchvision alexnet.features indices ending relu1 .. relu5

    def __init__(self, backbone, linear):
        super().__init__()
        from torchvision.models import alexnet
        feats = {k[len("features."):]: v for k, v in backbone.items() if k.startswith("features.")}
        self.features = alexnet(weights=None).features[:12]
        missing = [k for k in self.features.state_dict() if k not in feats]
        if missing:
            raise UserError(f"--lpips-backbone lacks the AlexNet keys features.{missing[0]} ...; pass torchvision's "
                            "alexnet state dict (e.g. alexnet-owt-7be5be79.pth)")
        self.features.load_state_dict({k: feats[k] for k in self.features.state_dict()})
        names = [f"lin{i}.model.1.weight" for i in range(5)]
        if any(n not in linear for n in names):
            raise UserError(f"--lpips-weights has no {next(n for n in names if n not in linear)}: pass the LPIPS "
                            "package's AlexNet linear layers (weights/v0.1/alex.pth)")
        self.lins = nn.ParameterList([nn.Parameter(linear[n].float(), requires_grad=False) for n in names])
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _taps(self, x):
        x = ((x * 2 - 1) - self.shift) / self.scale
        out, start = [], 0
        for cut in self.CUTS:
            x = self.features[start:cut](x)
            out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            start = cut
        return out

    @torch.no_grad()
    def forward(self, x, y):
        total = 0
        for a, b, w in zip(self._taps(x.float()), self._taps(y.float()), self.lins):
            total = total + ((a - b) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return total


def _load_cpu(path, flag):
    # the LPIPS package's weight files hold CUDA tensors: map them to the CPU
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{flag} '{path}' is not a readable weight file: {e}") from None
    if not isinstance(state, dict):
        raise UserError(f"{flag} '{path}' does not hold a state dict")
    return state


def load_lpips(backbone_path, linear_path):
    """:class:`LPIPS` from two local files (``torch.load(weights_only=True)``, on the CPU)."""
    return LPIPS(_load_cpu(backbone_path, "--lpips-backbone"), _load_cpu(linear_path, "--lpips-weights"))


# --------------------------------------------------------------------------- pictures

def reconstruction_panel(image, reconstruction, caption_text, scale=None):
    """A PIL picture: input | reconstruction (both `(3, H, W)` in [0, 1]) side by side, enlarged
    to at least 256 px, ``caption_text`` on the reconstruction."""
    from PIL import Image

    from gissl.pictures import caption, hstack

    def pil(t):
        a = (t.detach().cpu().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(a)
    a, b = pil(image), pil(reconstruction)
    scale = scale or max(1, 256 // max(a.size))
    a, b = (im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in (a, b))
    return hstack([caption(a, "input"), caption(b, caption_text)])
