"""The ``peers`` section of ``benchmark.py``: gissl next to what a user would pick instead.

- **pretraining step** (forward + backward + optimiser step, same backbone weights, batch, image
  size, autocast dtype and optimiser algorithm): gissl's ``pretrain.py`` model through the
  engine's train loop vs the model a lightly user builds from lightly's heads and losses on a
  torchvision / timm backbone, in a plain loop as lightly's examples write it. Methods both
  have: Barlow Twins and SimSiam (ResNet), MoCo v3 (ResNet and ViT; lightly has its heads and
  momentum utilities but no MoCo v3 loss, so that side uses the paper's Algorithm 1), SimCLR
  (ResNet and ViT, SLIP's form) and MAE (ViT, one view per image: its images per step are the
  batch, not twice it). :func:`pretrain_pairs` gives each pair with equal weights, so the tests
  can check both compute the same loss on the same batch (the comparison is fair).

  The closest pairs where the layouts differ: lightly's ``SimCLRProjectionHead`` with 3 layers
  (SimCLR v2) ends in a BatchNorm and a bias-free Linear, SLIP's head in a Linear with a bias and
  no BatchNorm, so the lightly side builds SLIP's head from lightly's ``ProjectionHead`` blocks
  (the class ``SimCLRProjectionHead`` is made of); its loss is lightly's ``NTXentLoss``, the same
  function as gissl's (each view's anchors against the other view and the rest of their own
  view, mean over both views). MAE follows lightly's ``examples/pytorch/mae.py``:
  ``MaskedVisionTransformerTIMM`` + ``MaskedVisionTransformerDecoderTIMM`` (lightly 1.6 deprecates
  ``MAEDecoderTIMM`` for it) + ``random_token_mask`` / ``get_at_index`` / ``patchify`` and
  ``nn.MSELoss`` on the masked patches; each side draws its own random mask while timed (the
  same number of kept patches), and :func:`gissl_mae_mask` hands gissl's draw to the lightly
  side for the equality test.
- **segmentation train step**: gissl's decoder vs segmentation-models-pytorch's on the same
  encoder (DeepLabV3+ on ResNets once gissl has it; DPT on ViTs).
- **metrics**: per-image Dice / IoU at original resolution, binary AUROC and COCO mAP: gissl's
  functions vs torchmetrics' (and pycocotools' for mAP) on the same predictions: items/s and
  the largest difference in value.
- **evaluation overhead**: each eval function's images/s vs the bare forward pass of the same
  model on pre-loaded tensors at the same batch and dtype.

lightly, segmentation-models-pytorch and torchmetrics are benchmark-only (dev) dependencies; a
pair whose peer is not installed is skipped with a message.
"""
import copy
import functools
import statistics
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from gissl.engine import FitOptions, amp_dtype, to_channels_last, train_one_epoch
from gissl.models import build_encoder, family

# (framework, encoder family) pairs lightly can build; ViT MoCo v3 follows the paper's ViT heads.
PRETRAIN_PAIRS = (("barlowtwins", "resnet"), ("simsiam", "resnet"), ("mocov3", "resnet"), ("mocov3", "vit"),
                  ("simclr", "resnet"), ("simclr", "vit"), ("mae", "vit"))


def _bench():
    import benchmark  # the measuring helpers; imported late (benchmark.py imports this module)
    return benchmark


# --------------------------------------------------------------------------- lightly models


def _reference_trunk(encoder, image_size):
    """The torchvision / timm backbone a lightly user would pass, holding ``encoder``'s weights."""
    if family(encoder.architecture) == "resnet":
        import torchvision
        trunk = getattr(torchvision.models, encoder.architecture)(weights=None)
        trunk.fc = nn.Identity()
    else:
        import timm
        names = {"vit_t": "vit_tiny_patch16_224", "vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224"}
        trunk = timm.create_model(names[encoder.architecture], pretrained=False, num_classes=0, img_size=image_size)
    trunk.load_state_dict(encoder.state_dict())
    return trunk


def _copy_head(src, dst):
    """Copy gissl's MLP ``src`` into lightly's head ``dst`` layer by layer (Linear and BatchNorm in
    order). Where lightly has a parameter gissl's head lacks (a bias, a BN affine) it is set to the
    identity (0 / 1), so both heads are the same function."""
    kinds = (nn.Linear, nn.BatchNorm1d)
    ours = [m for m in src.modules() if isinstance(m, kinds)]
    theirs = [m for m in dst.modules() if isinstance(m, kinds)]
    if [type(m) for m in ours] != [type(m) for m in theirs]:
        raise ValueError(f"head layouts differ: {ours} vs {theirs}")
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            for name in ("weight", "bias"):
                pa, pb = getattr(a, name, None), getattr(b, name, None)
                if pb is None:
                    continue
                if pa is not None:
                    pb.copy_(pa)
                else:
                    pb.fill_(1.0 if (name == "weight") else 0.0)
            if isinstance(a, nn.BatchNorm1d):
                b.running_mean.copy_(a.running_mean)
                b.running_var.copy_(a.running_var)


def _moco_v3_loss(q, k, temperature):
    """MoCo v3's ``ctr`` (Chen, Xie, He 2021, Algorithm 1), written from the paper: lightly has no
    MoCo v3 loss."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    return 2 * temperature * F.cross_entropy(logits, torch.arange(len(q), device=q.device))


class LightlyModel(nn.Module):
    """A pretraining model as lightly's examples build it: ``backbone`` + lightly heads + loss.
    ``forward(x1, x2) -> loss``; MoCo v3 also holds momentum copies (``update_momentum``)."""

    def __init__(self, framework, backbone, heads, criterion, temperature=None):
        super().__init__()
        self.framework, self.backbone, self.criterion, self.temperature = framework, backbone, criterion, temperature
        self.heads = nn.ModuleDict(heads)
        if framework == "mocov3":
            from lightly.models.utils import deactivate_requires_grad
            self.backbone_momentum = copy.deepcopy(backbone)
            self.projection_momentum = copy.deepcopy(self.heads["projection"])
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_momentum)

    def forward(self, x1, x2):
        h = self.heads
        if self.framework in ("barlowtwins", "simclr"):
            return self.criterion(h["projection"](self.backbone(x1)), h["projection"](self.backbone(x2)))
        if self.framework == "simsiam":
            z1, z2 = h["projection"](self.backbone(x1)), h["projection"](self.backbone(x2))
            p1, p2 = h["prediction"](z1), h["prediction"](z2)
            return 0.5 * (self.criterion(p1, z2.detach()) + self.criterion(p2, z1.detach()))
        q1 = h["prediction"](h["projection"](self.backbone(x1)))
        q2 = h["prediction"](h["projection"](self.backbone(x2)))
        with torch.no_grad():
            k1 = self.projection_momentum(self.backbone_momentum(x1))
            k2 = self.projection_momentum(self.backbone_momentum(x2))
        return _moco_v3_loss(q1, k2, self.temperature) + _moco_v3_loss(q2, k1, self.temperature)

    def update_momentum(self, m):
        """EMA of the momentum copies (MoCo v3); nothing to do for the other methods."""
        from lightly.models.utils import update_momentum
        if self.framework != "mocov3":
            return
        update_momentum(self.backbone, self.backbone_momentum, m)
        update_momentum(self.heads["projection"], self.projection_momentum, m)


class LightlyMAE(nn.Module):
    """MAE as lightly's example (``examples/pytorch/mae.py``) builds it on a timm ViT.

    ``forward(images (N, 3, H, W), idx_keep=None, idx_mask=None) -> loss``: the MSE of the
    predicted pixels of the masked patches. Without indices it draws lightly's
    ``random_token_mask`` (the class token, index 0, always kept); with them it uses those
    (:func:`gissl_mae_mask` gives gissl's).
    """

    def __init__(self, vit, *, mask_ratio, decoder_dim, decoder_depth, decoder_heads):
        super().__init__()
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        self.mask_ratio = mask_ratio
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=decoder_dim, depth=decoder_depth,
            num_heads=decoder_heads, num_prefix_tokens=vit.num_prefix_tokens, mlp_ratio=4.0)
        self.prediction_head = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        self.criterion = nn.MSELoss()

    def forward(self, images, idx_keep=None, idx_mask=None):
        from lightly.models import utils
        if idx_keep is None:
            idx_keep, idx_mask = utils.random_token_mask((images.shape[0], self.sequence_length),
                                                         mask_ratio=self.mask_ratio, device=images.device)
        x = self.decoder_embed(self.backbone.encode(images=images, idx_keep=idx_keep))
        # the encoded tokens scattered into a full-length sequence; the decoder puts its mask
        # token at the masked positions
        full = x.new_zeros(x.shape[0], self.sequence_length, x.shape[-1])
        full = utils.set_at_index(full, idx_keep, x.type_as(full))
        pred = self.prediction_head(utils.get_at_index(self.decoder(full, idx_mask=idx_mask), idx_mask))
        # token i > 0 is patch i - 1 (the class token comes first)
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return self.criterion(pred, target)


def gissl_mae_mask(n, num_patches, mask_ratio):
    """``(idx_keep (N, 1 + K), idx_mask (N, L - K))`` in lightly's token layout (the class token
    at 0, kept; patch i at i + 1) of the mask gissl's MAE draws from the global RNG in its current
    state: seed the RNG alike before this and before gissl's forward and both mask the same
    patches, kept ones in the same order."""
    from gissl.ssl.mae import random_masking
    ids_keep, _, ids_restore = random_masking(n, num_patches, mask_ratio)
    ids_masked = ids_restore.argsort(dim=1)[:, ids_keep.shape[1]:]  # argsort of ids_restore = the shuffle
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), ids_keep + 1], 1), ids_masked + 1


def _head_dims(quick):
    """Head widths: the papers' (full) or a quarter-size set for --quick / tests."""
    # MAE's decoder: 512-d, 8 blocks, 16 heads (He et al. 2022, §A.1); SimCLR's head: SLIP's
    # 4096 hidden, 256 out
    return {"bt": (1024,) * 3 if quick else (8192,) * 3, "dim": 256 if quick else 2048,
            "pred": 128 if quick else 512, "moco_mlp": 1024 if quick else 4096,
            "simclr_mlp": 1024 if quick else 4096, "simclr_dim": 256,
            "mae_decoder": (128, 2, 4) if quick else (512, 8, 16)}


def _gissl_model(framework, arch, image_size, dims):
    from gissl.models import vit_num_heads
    from gissl.ssl import build_ssl_model
    encoder = build_encoder(arch, img_size=image_size, num_heads=vit_num_heads(arch, framework))
    decoder_dim, decoder_depth, decoder_heads = dims["mae_decoder"]
    kw = {"barlowtwins": dict(proj_dims=dims["bt"]), "simsiam": dict(dim=dims["dim"], pred_dim=dims["pred"]),
          "mocov3": dict(mlp_dim=dims["moco_mlp"]), "simclr": dict(mlp_dim=dims["simclr_mlp"], dim=dims["simclr_dim"]),
          "mae": dict(decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads)}[framework]
    return build_ssl_model(framework, encoder, **kw)


def _lightly_mae(ours, image_size):
    """lightly's MAE holding ``ours``' weights (encoder, decoder, mask token, position embeddings)."""
    from gissl.ssl.mae import sincos_pos_embed
    vit = _reference_trunk(ours.encoder, image_size)
    theirs = LightlyMAE(vit, mask_ratio=ours.mask_ratio, decoder_dim=ours.decoder_dim,
                        decoder_depth=len(ours.decoder_blocks), decoder_heads=ours.decoder_blocks[0].attn.num_heads)
    with torch.no_grad():
        # lightly's wrapper re-initialises the ViT: gissl's weights (its fixed sin-cos
        # positions included) go back in
        theirs.backbone.vit.load_state_dict(ours.encoder.state_dict())
        theirs.decoder_embed.load_state_dict(ours.decoder_embed.state_dict())
        theirs.decoder.mask_token.copy_(ours.mask_token)
        theirs.decoder.pos_embed.copy_(sincos_pos_embed(*ours.encoder.pos_grid, ours.decoder_dim))
        theirs.decoder.blocks.load_state_dict(ours.decoder_blocks.state_dict())
        theirs.decoder.norm.load_state_dict(ours.decoder_norm.state_dict())
        theirs.prediction_head.load_state_dict(ours.decoder_pred.state_dict())
    return theirs


def _lightly_model(framework, ours, image_size):
    from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import (BarlowTwinsProjectionHead, BYOLPredictionHead, MoCoProjectionHead,
                                        SimSiamPredictionHead, SimSiamProjectionHead)
    from lightly.models.modules.heads import ProjectionHead
    if framework == "mae":
        return _lightly_mae(ours, image_size)
    backbone = _reference_trunk(ours.encoder, image_size)
    width = ours.encoder.embed_dim
    projector = ours.image_mlp if framework == "simclr" else ours.projector
    lin = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if framework == "simclr":
        # SLIP's head (Linear-BN-ReLU twice, then a Linear with a bias): lightly's SimCLR v2 head
        # would end in a BatchNorm instead, so it is built from lightly's ProjectionHead blocks
        mlp_dim, dim = lin[0].out_features, lin[-1].out_features
        heads = {"projection": ProjectionHead([(width, mlp_dim, nn.BatchNorm1d(mlp_dim), nn.ReLU()),
                                               (mlp_dim, mlp_dim, nn.BatchNorm1d(mlp_dim), nn.ReLU()),
                                               (mlp_dim, dim, None, None)])}
        criterion = NTXentLoss(temperature=ours.temperature)
    elif framework == "barlowtwins":
        heads = {"projection": BarlowTwinsProjectionHead(width, lin[0].out_features, lin[-1].out_features)}
        criterion = BarlowTwinsLoss(lambda_param=ours.lambd)
    elif framework == "simsiam":
        pred = [m for m in ours.predictor.modules() if isinstance(m, nn.Linear)]
        heads = {"projection": SimSiamProjectionHead(width, lin[0].out_features, lin[-1].out_features),
                 "prediction": SimSiamPredictionHead(lin[-1].out_features, pred[0].out_features,
                                                     lin[-1].out_features)}
        criterion = NegativeCosineSimilarity()
    else:
        vit = family(ours.encoder.architecture) == "vit"
        mlp_dim, dim = lin[0].out_features, lin[-1].out_features
        # the ViT predictor ends in a BatchNorm (as the official MoCo_ViT): lightly's MoCo head
        # with 2 layers is that MLP; the ResNet predictor is BYOL's
        predictor = MoCoProjectionHead(dim, mlp_dim, dim, num_layers=2, batch_norm=True) if vit else \
            BYOLPredictionHead(dim, mlp_dim, dim)
        heads = {"projection": MoCoProjectionHead(width, mlp_dim, dim, num_layers=len(lin), batch_norm=True),
                 "prediction": predictor}
        criterion = None
    theirs = LightlyModel(framework, backbone, heads, criterion, getattr(ours, "temperature", None))
    _copy_head(projector, theirs.heads["projection"])
    if "prediction" in theirs.heads:
        _copy_head(ours.predictor, theirs.heads["prediction"])
    if framework == "mocov3":
        theirs.backbone_momentum.load_state_dict(ours.momentum_encoder.state_dict())
        _copy_head(ours.momentum_projector, theirs.projection_momentum)
    return theirs


def pretrain_pairs(arch, image_size, quick=True, frameworks=None):
    """``[(framework, gissl model, lightly model)]`` with equal weights, for every method both
    libraries have on ``arch``'s family. Raises ImportError when lightly is missing."""
    import lightly  # noqa: F401
    torch.manual_seed(0)
    out = []
    for fw, fam in PRETRAIN_PAIRS:
        if fam != family(arch) or (frameworks and fw not in frameworks):
            continue
        ours = _gissl_model(fw, arch, image_size, _head_dims(quick))
        out.append((fw, ours, _lightly_model(fw, ours, image_size)))
    return out


def gissl_loss(model, views):
    """gissl's total loss of ``views`` (what the engine backpropagates)."""
    return sum(model(*views).values())


# --------------------------------------------------------------------------- steps


def _optimizers(framework, arch, ours, theirs, lr):
    """The recipe's optimiser algorithm for both: gissl's (fused AdamW, its LARS) and the one a
    lightly user takes (torch's AdamW / SGD, lightly's LARS), same lr and weight decay."""
    import pretrain
    from lightly.utils.lars import LARS
    from gissl.ssl import recipe
    r = recipe(framework, arch)
    mine = pretrain.build_optimizer_for(ours, types.SimpleNamespace(optimizer=None, weight_decay=None), r, lr)
    params = [p for p in theirs.parameters() if p.requires_grad]
    wd = r["weight_decay"]
    kind = r["optimizer"]
    if kind == "lars":
        other = LARS(params, lr=lr, momentum=0.9, weight_decay=wd)
    elif kind == "sgd":
        other = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    else:
        other = torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=r.get("betas", (0.9, 0.999)))
    return mine, other


def _gissl_step(model, optimizer, views, device, amp):
    """One optimiser step through the engine's train loop, as ``pretrain.py`` takes it."""
    after = (lambda bare, step: bare.update_momentum(0.99)) if hasattr(model, "update_momentum") else None
    opts = FitOptions(amp=amp, show_progress=False, log_every=10**9, after_step=after)
    batch = [tuple(v.to(device) for v in views)]
    return functools.partial(train_one_epoch, model, batch, optimizer, lambda m, v: m(*v), device=device,
                             epoch=1, options=opts)


def _plain_step(model, optimizer, loss_of, device, dtype):
    """A peer's loop as its examples write it: loss, backward, step, zero_grad (under autocast
    when ``dtype``); ``loss_of(model)`` computes the loss of the fixed batch."""

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_of(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if hasattr(model, "update_momentum"):
            model.update_momentum(0.99)
    return step


def _timed_pair(args, device, label, peer, make_steps, images_per_step, batch, size):
    """Rows of gissl vs ``peer`` for AMP on and off; ``make_steps(amp, dtype)`` gives both step
    callables, which take turns (``benchmark.time_interleaved``)."""
    b = _bench()
    rows = []
    for amp in (True, False):
        dtype = amp_dtype(device, amp)
        print(f"  {label}, amp {'on' if amp else 'off'}: timing gissl and {peer} in turn...", flush=True)
        times = b.time_interleaved(make_steps(amp, dtype), args.warmup, args.steps)
        rate = {k: images_per_step / statistics.median(v) for k, v in times.items()}
        for setup in ("gissl", peer):
            rows.append({"section": "peers", "model": label, "setup": setup, "amp": b._amp_name(dtype),
                         "batch": batch, "image_size": size, "train_images_per_s": rate[setup],
                         "ms_per_step": 1000 * images_per_step / rate[setup],
                         **({"vs_peer": rate["gissl"] / rate[peer]} if setup == "gissl" else {})})
            b._progress(rows[-1])
    return rows


def _pretrain_rows(args, device, arch, size, batch):
    rows = []
    for fw, ours, theirs in pretrain_pairs(arch, size, quick=args.quick):
        g = torch.Generator().manual_seed(0)
        n_views = 1 if fw == "mae" else 2  # MAE reconstructs one view of each image
        views = tuple(torch.randn(batch, 3, size, size, generator=g) for _ in range(n_views))

        def make_steps(amp, dtype, fw=fw, ours=ours, theirs=theirs, views=views):
            m1 = to_channels_last(copy.deepcopy(ours).to(device), device)
            m2 = copy.deepcopy(theirs).to(device).train()
            o1, o2 = _optimizers(fw, arch, m1, m2, lr=1e-3)
            on_device = tuple(v.to(device) for v in views)
            return {"gissl": _gissl_step(m1, o1, views, device, amp),
                    "lightly": _plain_step(m2, o2, lambda m: m(*on_device), device, dtype)}
        # every view is an image through the encoder
        rows += _timed_pair(args, device, f"pretrain {fw} {arch}", "lightly", make_steps, n_views * batch, batch, size)
    return rows


# --------------------------------------------------------------------------- segmentation


def segmentation_pairs(arch, image_size, quick=True):
    """``[(decoder, gissl model, smp model)]`` on the same encoder family where smp has the
    decoder; an empty list when segmentation-models-pytorch is missing."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        return []
    torch.manual_seed(0)
    out = []
    if family(arch) == "resnet":
        try:
            from gissl.models.deeplab import DeepLabV3Plus
        except ImportError:  # not yet in gissl: no matched pair
            return []
        ours = DeepLabV3Plus(build_encoder(arch, img_size=image_size), num_classes=1)
        theirs = smp.DeepLabV3Plus(encoder_name=arch, encoder_weights=None, classes=1)
        ours.load_state_dict(theirs.state_dict())  # smp's names: the same weights on both sides
        out.append(("DeepLabV3+", ours, theirs))
    return out


def _seg_rows(args, device, arch, size, batch):
    from gissl import segmentation as S
    from gissl.optim import build_optimizer
    rows = []
    for decoder, ours, theirs in segmentation_pairs(arch, size, quick=args.quick):
        g = torch.Generator().manual_seed(0)
        data = {"image": torch.randn(batch, 3, size, size, generator=g),
                "mask": (torch.rand(batch, 1, size, size, generator=g) > 0.7).float()}

        def make_steps(amp, dtype, ours=ours, theirs=theirs, data=data):
            m1 = to_channels_last(copy.deepcopy(ours).to(device), device)
            m2 = copy.deepcopy(theirs).to(device).train()
            on_device = {k: v.to(device) for k, v in data.items()}
            opts = FitOptions(amp=amp, show_progress=False, log_every=10**9)
            return {"gissl": functools.partial(train_one_epoch, m1, [data], build_optimizer(m1, 1e-4),
                                               S.compute_losses, device=device, epoch=1, options=opts),
                    "smp": _plain_step(m2, torch.optim.AdamW(m2.parameters(), lr=1e-4),
                                       lambda m: sum(S.compute_losses(m, on_device).values()), device, dtype)}
        rows += _timed_pair(args, device, f"segmentation {decoder} {arch}", "smp", make_steps, batch, batch, size)
    return rows


# --------------------------------------------------------------------------- metrics


def metric_cases(n_images, size, seed=0):
    """Predictions on which gissl and its peers compute the same metric: binary masks at an
    original resolution ``size`` (H, W), scores/labels for AUROC and detection lists for mAP."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    target = torch.zeros(n_images, h, w, dtype=torch.bool)
    for i in range(n_images):
        y, x = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
        target[i, y: y + h // 3, x: x + w // 3] = True
    pred = target ^ (torch.rand(n_images, h, w, generator=g) > 0.9)
    scores = torch.rand(20 * n_images, generator=g)
    positive = torch.rand(20 * n_images, generator=g) < scores  # informative scores
    dets, gts = [], []
    for _ in range(n_images):
        gt = torch.rand(3, 2, generator=g) * 200
        gt = torch.cat([gt, gt + 20 + torch.rand(3, 2, generator=g) * 100], 1)
        dt = torch.cat([gt + torch.randn(3, 4, generator=g) * 5, torch.rand(4, 2, generator=g).repeat(1, 2) * 250 +
                        torch.tensor([0, 0, 30, 30])])
        dets.append({"boxes": dt, "scores": torch.rand(len(dt), generator=g), "labels": torch.ones(len(dt), dtype=torch.long)})
        gts.append({"boxes": gt, "labels": torch.ones(3, dtype=torch.long)})
    return {"masks": (pred, target), "auroc": (scores, positive), "map": (dets, gts)}


def _pycocotools_map(dets, gts):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib
    import io
    images, anns, results = [], [], []
    for i, (d, t) in enumerate(zip(dets, gts)):
        images.append({"id": i})
        for j, box in enumerate(t["boxes"].tolist()):
            x0, y0, x1, y1 = box
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for box, s in zip(d["boxes"].tolist(), d["scores"].tolist()):
            x0, y0, x1, y1 = box
            results.append({"image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def metric_functions():
    """``{metric: {setup: fn(case) -> value}}``: gissl's function and its peers' on one case."""
    from gissl.metrics import binary_auroc, coco_map, segmentation_scores
    fns = {"dice per image": {"gissl": lambda c: segmentation_scores(*c)["dice"].mean().item()},
           "IoU per image": {"gissl": lambda c: segmentation_scores(*c)["iou"].mean().item()},
           "AUROC": {"gissl": lambda c: binary_auroc(*c)},
           "COCO mAP": {"gissl": lambda c: coco_map(*c)["map"]}}
    try:
        import pycocotools  # noqa: F401
        fns["COCO mAP"]["pycocotools"] = lambda c: _pycocotools_map(*c)
    except ImportError:
        pass
    try:
        from torchmetrics.functional.classification import binary_auroc as tm_auroc
        from torchmetrics.functional.segmentation import dice_score, mean_iou
    except ImportError:
        return fns

    def tm_masks(fn, c, **kw):
        pred, target = (x.reshape(x.shape[0], 1, *x.shape[1:]).long() for x in c)
        return fn(pred, target, num_classes=1, input_format="one-hot", **kw).mean().item()
    fns["dice per image"]["torchmetrics"] = lambda c: tm_masks(dice_score, c, include_background=True, average="micro")
    fns["IoU per image"]["torchmetrics"] = lambda c: tm_masks(mean_iou, c, include_background=True, per_class=False)
    fns["AUROC"]["torchmetrics"] = lambda c: tm_auroc(c[0], c[1].long()).item()
    try:
        from torchmetrics.detection import MeanAveragePrecision

        def tm_map(c):
            m = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
            m.update(*c)
            return float(m.compute()["map"])
        fns["COCO mAP"]["torchmetrics"] = tm_map
    except (ImportError, ModuleNotFoundError):
        pass
    return fns


def _metric_rows(args):
    b = _bench()
    n, size = (16, (240, 300)) if args.quick else (64, (1072, 1280))
    cases = metric_cases(n, size)
    case_of = {"dice per image": "masks", "IoU per image": "masks", "AUROC": "auroc", "COCO mAP": "map"}
    rows = []
    for metric, fns in metric_functions().items():
        case = cases[case_of[metric]]
        values = {k: fn(case) for k, fn in fns.items()}
        times = b.time_interleaved({k: functools.partial(fn, case) for k, fn in fns.items()}, 1, args.steps)
        rate = {k: n / statistics.median(v) for k, v in times.items()}
        peers = [k for k in fns if k != "gissl"]
        for setup in fns:
            row = {"section": "peers", "model": f"metric {metric}", "setup": setup, "amp": "-", "batch": n,
                   "image_size": f"{size[0]}x{size[1]}" if case_of[metric] == "masks" else "-",
                   "items_per_s": rate[setup], "value": values[setup]}
            if setup == "gissl" and peers:
                row["vs_peer"] = min(rate["gissl"] / rate[p] for p in peers)
                row["max_abs_diff"] = max(abs(values["gissl"] - values[p]) for p in peers)
            rows.append(row)
            b._progress(row)
    return rows


# --------------------------------------------------------------------------- eval overhead


def forward_flops(model, images):
    """FLOPs of one inference forward of ``model`` on ``images`` (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return counter.get_total_flops()


def _eval_overhead_rows(args, device, ctx, arch, size):
    """Eval images/s through each eval function vs the bare forward on pre-loaded batches."""
    b = _bench()
    from gissl import classification as C
    from gissl.dense import predict_logits
    from gissl.models.dpt import DPT
    orig = (120, 150) if args.quick else (1072, 1280)
    data = b._eval_sets(size, args.eval_images, orig)
    models = {"classification": C.Classifier(build_encoder(arch, img_size=size), 4),
              "segmentation": DPT(build_encoder(arch, img_size=size), "segmentation", features=args.decoder_channels),
              "depth": DPT(build_encoder(arch, img_size=size), "depth", features=args.decoder_channels)}
    rows, batch = [], args.eval_batch_size
    for task, model in models.items():
        model = to_channels_last(model.to(device).eval(), device)
        run = b._eval_runs(task, model, data[task], device, batch)[("gissl", True, batch)]
        images = torch.stack([s["image"] for s in data[task]])
        chunks = [images[i: i + batch].to(device) for i in range(0, len(images), batch)]

        def bare(model=model, chunks=chunks, task=task):
            for x in chunks:
                if task == "classification":
                    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype(device, True)):
                        model(x)
                else:
                    predict_logits(model, x, device, amp=True)
            b.sync(device)
        times = b.time_interleaved({"eval": run, "bare forward": bare}, 1, max(args.eval_repeats, 2))
        t_eval, t_bare = (statistics.median(times[k]) for k in ("eval", "bare forward"))
        flops = forward_flops(model, images[:1].to(device)) * len(images)
        row = {"section": "peers", "model": f"eval {task} {arch}", "setup": "gissl eval", "amp": b._amp_name(
            amp_dtype(device, True)), "batch": batch, "image_size": size, "eval_images_per_s": len(images) / t_eval,
            "bare_images_per_s": len(images) / t_bare, "overhead": t_eval / t_bare - 1}
        # the forward's FLOP/s over the matmul peak: benchmark.refine_peak re-checks and flags it
        dtype = amp_dtype(device, True)
        row["tflops"] = flops / t_bare / 1e12
        row["mfu"] = row["tflops"] / b._peak_for(ctx, device, dtype)
        row["mfu_vs_peak_of"] = b._amp_name(dtype) if dtype is not None else "float32"
        rows.append(row)
        b._progress(row)
    return rows


def bench_peers(args, device, ctx):
    """gissl vs lightly (pretraining), smp (segmentation), torchmetrics (metrics), bare forward (eval)."""
    size, batch = args.task_image_size, args.task_batch_size
    rows = []
    for arch in args.task_archs:
        try:
            rows += _pretrain_rows(args, device, arch, size, batch)
        except ImportError as e:
            print(f"  pretraining pairs skipped: {e}", flush=True)
        rows += _seg_rows(args, device, arch, size, batch)
    rows += _metric_rows(args)
    for arch in args.task_archs:
        rows += _eval_overhead_rows(args, device, ctx, arch, size)
    return rows
