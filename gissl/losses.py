"""Loss functions as plain functions of tensors.

None of them needs a process group: the ones that gather across ranks use
``gissl.dist`` helpers, which are no-ops in a single process.
"""
import torch
import torch.nn.functional as F

from gissl import dist

# ---- segmentation / depth (helper: seg-depth) ----

def soft_dice(logits, target, smooth=1e-8):
    """SSL4GIE's soft Dice loss (docs/ssl4gie-study.md §4.2): ``1 - mean_n Dice_n``.

    logits: (N, 1, H, W) raw scores; target: (N, 1, H, W) in [0, 1] (soft targets allowed).
    Per image ``Dice = 2 (Σ p·t + smooth) / (Σ p² + Σ t² + smooth)`` with p = sigmoid(logits),
    computed in fp32 so bf16 autocast does not round the sums.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    dice = 2 * ((p * t).sum(1) + smooth) / ((p * p).sum(1) + (t * t).sum(1) + smooth)
    return 1 - dice.mean()


# A prediction whose spread over the valid pixels is within this many fp32 rounding steps of its
# values carries no depth structure: its least-squares scale would only amplify rounding noise
# (s ~ 1/std grows past 1e6 and the fit loses every digit), so it is fitted as a constant.
_FLAT_ULPS = 8


def _centred_fit(pred, target, mask):
    """(scale, mean_p, mean_d, ok) per image, fp32; ``ok`` False where the fit is singular."""
    m = mask.float().flatten(1)
    p = pred.float().flatten(1)
    d = target.float().flatten(1)
    n = m.sum(1)
    mean_p = (m * p).sum(1) / n.clamp_min(1)
    mean_d = (m * d).sum(1) / n.clamp_min(1)
    # Same solution as the reference's 2×2 normal equations (its determinant is n·var), but
    # centred first: the uncentred form loses most fp32 digits to cancellation.
    pc = m * (p - mean_p[:, None])
    var = (pc * pc).sum(1)
    cov = (pc * (d - mean_d[:, None])).sum(1)
    peak = (m * p).abs().amax(1)
    ok = var > n * (_FLAT_ULPS * torch.finfo(torch.float32).eps * peak) ** 2
    ok = ok & (var > 0)
    scale = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), torch.zeros_like(var))
    return scale, mean_p, mean_d, ok


def flat_predictions(pred, mask):
    """(N,) bool: images whose prediction is constant over ``mask`` (up to fp32 rounding) or that
    have fewer than two valid pixels, i.e. where :func:`align_scale_shift` returns s = 0."""
    return ~_centred_fit(pred, pred, mask)[3]


def align_scale_shift(pred, target, mask):
    """Least-squares scale s and shift t per image minimising Σ_mask (s·pred + t − target)².

    pred, target: (N, H, W) or (N, 1, H, W); mask: same shape, bool. Returns (s, t), each (N,),
    in fp32. Where the 2×2 system is singular (a prediction constant over the mask up to fp32
    rounding, or a single valid pixel) the least-squares solutions are all fits by a constant;
    this returns s = 0, t = mean(target over the mask), so the aligned prediction is the best
    constant and never worse. (The reference, MiDaS ``compute_scale_and_shift``, returns
    s = t = 0 there: a constant-0 depth, worse than any constant.) No valid pixel: s = t = 0.
    """
    scale, mean_p, mean_d, _ = _centred_fit(pred, target, mask)
    return scale, mean_d - scale * mean_p


def scale_shift_aligned(pred, target, mask):
    """``s·pred + t`` of :func:`align_scale_shift`, same shape as ``pred``, fp32.

    Evaluated as ``s·(pred − mean pred) + mean target``: with a large s (a prediction of small
    spread) the literal ``s·pred + t`` cancels two large numbers and loses most fp32 digits.
    """
    scale, mean_p, mean_d, _ = _centred_fit(pred, target, mask)
    shape = (-1,) + (1,) * (pred.dim() - 1)
    return scale.view(shape) * (pred.float() - mean_p.view(shape)) + mean_d.view(shape)


def align_median(pred, target, mask):
    """Median scaling per image: s = median(target) / median(pred) over valid pixels.

    The alignment most monocular-depth papers report (e.g. Monodepth2). pred, target:
    (N, ...) ; mask: bool, same shape. Returns s (N,); 0 for an image without a valid pixel
    or with a zero median prediction.
    """
    scales = []
    for p, d, m in zip(pred.float().flatten(1), target.float().flatten(1), mask.flatten(1)):
        if not m.any():
            scales.append(p.new_zeros(()))
            continue
        # quantile(0.5) averages the two middle values like NumPy (torch.median takes the lower)
        mp = torch.quantile(p[m], 0.5)
        scales.append(torch.quantile(d[m], 0.5) / mp if mp > 0 else p.new_zeros(()))
    return torch.stack(scales)


def _masked_gradient_l1(residual, mask):
    """Σ |∇ residual| over pixel pairs valid at both ends, per image; residual, mask: (N, H, W)."""
    gx = (residual[:, :, 1:] - residual[:, :, :-1]).abs() * (mask[:, :, 1:] * mask[:, :, :-1])
    gy = (residual[:, 1:, :] - residual[:, :-1, :]).abs() * (mask[:, 1:, :] * mask[:, :-1, :])
    return gx.sum((1, 2)) + gy.sum((1, 2))


def scale_shift_invariant(pred, target, mask=None, alpha=0.1, scales=4):
    """MiDaS scale-and-shift-invariant loss with multi-scale gradient matching (docs/ssl4gie-study.md §4.3).

    pred: (N, 1, H, W) or (N, H, W); target: same shape; mask: bool, default ``target > 0``.
    Each prediction is aligned to its target by :func:`align_scale_shift` (gradients flow
    through s and t, as the reference), then

        loss = Σ_M (p' − d)² / (2 Σ|M|)  +  alpha · Σ_{k<scales} Σ|∇(M·(p' − d))|_k / Σ|M_k|

    with ``batch-based`` reduction (sums over the whole batch before dividing) and sub-sampling
    steps 1, 2, 4, 8. Images without a valid pixel add nothing to sums or counts; a batch with
    none at all gives a zero that is still connected to ``pred`` (not a Python 0).
    Computed in fp32. Returns a scalar tensor.
    """
    pred = pred.float().reshape(pred.shape[0], pred.shape[-2], pred.shape[-1])
    target = target.float().reshape(pred.shape)
    mask = (target > 0) if mask is None else mask.reshape(pred.shape)
    m = mask.float()
    residual = m * (scale_shift_aligned(pred, target, mask) - target)
    loss = (residual * residual).sum() / (2 * m.sum()).clamp_min(1)
    if alpha > 0:
        for k in range(scales):
            step = 2 ** k
            r, mk = residual[:, ::step, ::step], m[:, ::step, ::step]
            loss = loss + alpha * _masked_gradient_l1(r, mk).sum() / mk.sum().clamp_min(1)
    return loss

def masked_mse(pred, target, mask=None):
    """Mean squared error over valid pixels, ``Σ_M (p − d)² / Σ|M|``, in fp32.

    pred, target: same shape; mask: bool, default ``target > 0``. Depth training adds it with a
    small weight to the scale-and-shift-invariant loss as an anchor: that loss does not change
    when the output is scaled or shifted, so nothing else holds the output's level and range.
    """
    pred, target = pred.float(), target.float().reshape(pred.shape)
    m = ((target > 0) if mask is None else mask.reshape(pred.shape)).float()
    return (m * (pred - target) ** 2).sum() / m.sum().clamp_min(1)


# ---- self-supervised pretraining (helper: pretrain) ----
#
# Gradient convention under torchrun: every loss below returns, on each rank, a value whose
# gradient with respect to that rank's inputs is ``world_size`` times the gradient of the
# single-process loss on the concatenated batch; DDP averages parameter gradients over
# ranks, so the update equals the single-process one.


def _global_targets(z):
    """Positions of this rank's rows in the gathered batch: ``rank * N + arange(N)``."""
    return torch.arange(z.shape[0], device=z.device) + z.shape[0] * dist.get_rank()


def infonce(q, k, temperature=0.2):
    """InfoNCE of MoCo v3 (Chen, Xie, He 2021, Alg. 1 ``ctr``), without its ``2 * tau`` factor.

    q: (N, D) queries of this rank; k: (N, D) keys of this rank. Both are L2-normalised here.
    Keys are gathered from every rank so the negatives are the whole global batch; the
    positive of query ``i`` on rank ``r`` is key ``r * N + i``. When ``k`` requires grad
    (no momentum encoder), the gradient of the gathered keys flows back to the local slice
    only. Returns the mean cross-entropy over the local queries (a scalar).
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    k_all = dist.all_gather_with_grad(k) if k.requires_grad else dist.concat_all_gather(k)
    logits = q @ k_all.t() / temperature
    return F.cross_entropy(logits.float(), _global_targets(q))


def clip_contrastive(image_emb, text_emb, logit_scale):
    """CLIP's symmetric image–text contrastive loss (Radford et al. 2021, Fig. 3).

    image_emb, text_emb: (N, D) embeddings of this rank's N pairs (L2-normalised here).
    logit_scale: the multiplier s = exp(learnt log-scale), a scalar tensor; the caller clamps
    the log-scale to at most ln 100 after each step. Every rank scores its N images against
    the texts of the whole global batch and its N texts against all images; the positive of
    pair i is its own partner. Returns the mean of the image→text and text→image
    cross-entropies over the local rows; averaged over ranks it is the loss of the global
    batch. Gathered embeddings keep their gradient (SLIP's code gathers without it, which
    drops the gradient through other ranks' negatives).
    """
    image_emb = F.normalize(_at_least_fp32(image_emb), dim=1)
    text_emb = F.normalize(_at_least_fp32(text_emb), dim=1)
    images_all, texts_all = dist.all_gather_with_grad(image_emb), dist.all_gather_with_grad(text_emb)
    targets = _global_targets(image_emb)
    per_image = logit_scale * image_emb @ texts_all.t()
    per_text = logit_scale * text_emb @ images_all.t()
    return (F.cross_entropy(per_image, targets) + F.cross_entropy(per_text, targets)) / 2


def simclr(z1, z2, temperature=0.1):
    """NT-Xent of SimCLR (Chen et al. 2020, eq. 1) in SLIP's form (Mu et al. 2022).

    z1, z2: (N, D) projections of two views of this rank's N images (L2-normalised here).
    Each anchor is scored against the other view of every image in the global batch and the
    same view of every other image (its own similarity masked out): 2 * global N - 1
    candidates, the other view of itself the positive. Gathered with gradients. Returns the
    mean over both views of the local anchors' cross-entropy; averaged over ranks it is the
    loss of the global batch.
    """
    z1, z2 = F.normalize(_at_least_fp32(z1), dim=1), F.normalize(_at_least_fp32(z2), dim=1)
    all1, all2 = dist.all_gather_with_grad(z1), dist.all_gather_with_grad(z2)
    targets = _global_targets(z1)
    is_self = F.pad(F.one_hot(targets, all1.shape[0]).bool(), (all1.shape[0], 0))  # (N, 2 N_all)

    def view_loss(anchor, other_view, same_view):
        logits = torch.cat([anchor @ other_view.t(), anchor @ same_view.t()], 1) / temperature
        return F.cross_entropy(logits.masked_fill(is_self, -1e9), targets)

    return (view_loss(z1, all2, all1) + view_loss(z2, all1, all2)) / 2


def _all_reduce_sum_grad(t):
    # Sum over ranks whose backward is also a sum over ranks: every rank computes the same
    # global loss, so the gradient of a local contribution is the sum of all ranks' gradients.
    if not dist.is_dist():
        return t
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t)


def barlow_twins(z1, z2, lambd=0.0051, eps=1e-5):
    """Barlow Twins redundancy-reduction loss (Zbontar et al. 2021, eq. 1-2).

    z1, z2: (N, D) projector outputs of the two views on this rank. Each dimension is
    standardised over the *global* batch (mean and variance all-reduced across ranks), and
    the (D, D) cross-correlation ``C = z1n^T z2n / N_global`` is all-reduced too, so the loss
    equals the single-process loss on the concatenated batch.
    ``L = sum_i (1 - C_ii)^2 + lambd * sum_i sum_{j != i} C_ij^2`` (lambda = 0.0051, paper §4).
    """
    z1, z2 = z1.float(), z2.float()
    n = _all_reduce_sum_grad(torch.tensor(float(z1.shape[0]), device=z1.device))

    def standardise(z):
        # Batch-norm without affine over the global batch (biased variance, as BatchNorm1d).
        mean = _all_reduce_sum_grad(z.sum(0)) / n
        var = _all_reduce_sum_grad(((z - mean) ** 2).sum(0)) / n
        return (z - mean) / torch.sqrt(var + eps)

    c = _all_reduce_sum_grad(standardise(z1).t() @ standardise(z2)) / n
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def simsiam(p1, z1, p2, z2):
    """Symmetric SimSiam loss (Chen & He 2021, eq. 2 with stop-gradient, eq. 3).

    p1, p2: (N, D) predictor outputs; z1, z2: (N, D) projector outputs of views 1 and 2.
    ``L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` with ``D(p, z) = -mean cos(p, z)``; its
    minimum is -1. Per-sample, so no communication across ranks.
    """
    def neg_cos(p, z):
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()
    return 0.5 * neg_cos(p1, z2) + 0.5 * neg_cos(p2, z1)


def masked_patch_mse(pred, target, mask, norm_pix=False, eps=1e-6):
    """MAE reconstruction loss (He et al. 2022, §3): mean squared error on masked patches only.

    pred, target: (N, L, P) per-patch pixel values (P = patch * patch * 3, see
    ``gissl.ssl.mae.patchify``); mask: (N, L) with 1 for a masked (removed) patch and 0 for
    a visible one. ``norm_pix`` normalises each target patch by its own mean and variance
    (the paper's "normalized pixels" variant, Table 1d).
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


# ---- retrieval (helper: retrieval) ----
#
# SSCD (Pizzi et al., CVPR 2022) as used by EndoFinder (docs/endofinder-retrieval.md §1.4): the embeddings
# of every view in the global batch are compared; rows are this rank's views, columns the
# views of all ranks. Instance ids are per-rank (a view matches only views of the same rank
# with an overlapping id), so ranks need no shared numbering. Each returned value is the
# mean over this rank's rows: its mean over ranks is the single-process loss on the
# concatenated batch, and with the summed gradient of ``all_gather_with_grad`` the DDP
# update equals the single-process one.


def _at_least_fp32(z):
    # bf16 / fp16 autocast outputs are promoted: exp(S / 0.05) needs fp32 range and precision
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _sscd_pairs(z, instance_ids):
    """Similarities and match masks of this rank's views against the global batch.

    z: (N, D) L2-normalised embeddings of this rank; instance_ids: (N,) int64 instance id of
    each view, or (N, K) soft labels (Mixup/CutMix: two views match when their label vectors
    overlap). Returns ``sim (N, N_all)``, ``positive (N, N_all)`` (matches other than the view
    itself) and ``negative (N, N_all)`` bool masks.
    """
    n, rank = z.shape[0], dist.get_rank()
    z_all = dist.all_gather_with_grad(z)
    ids = instance_ids if instance_ids.dim() == 2 else instance_ids.view(-1, 1)
    ids_all = dist.concat_all_gather(ids)
    ranks = torch.full((n,), rank, device=z.device, dtype=torch.long)
    ranks_all = dist.concat_all_gather(ranks)
    if instance_ids.dim() == 2:
        match = (ids.float() @ ids_all.float().t()) > 0
    else:
        match = ids == ids_all.view(1, -1)
    match &= ranks.view(-1, 1) == ranks_all.view(1, -1)
    self_mask = torch.zeros_like(match)
    self_mask[torch.arange(n, device=z.device), _global_targets(z)] = True
    return z @ z_all.t(), match & ~self_mask, ~match


def sscd_infonce(z, instance_ids, temperature=0.05, mixup=None):
    """SSCD's InfoNCE over all views of the global batch (Pizzi et al. 2022, eq. 2).

    z: (N, D) embeddings of this rank (normalised here); instance_ids: (N,) int64 or (N, K)
    soft labels, see ``_sscd_pairs``. For a positive pair (i, j), j != i,
    ``p_ij = e^(S_ij/T) / (e^(S_ij/T) + sum_{k in neg(i)} e^(S_ik/T) + 1e-6)`` (SSCD's 1e-6 kept,
    evaluated in log space so T = 0.05 cannot overflow). Without mixup the loss is the sum of
    ``-log p_ij`` over all positive pairs divided by the number of rows; with mixup (default:
    when ``instance_ids`` are soft labels) each row is averaged over its positives first.
    """
    sim, pos, neg = _sscd_pairs(F.normalize(_at_least_fp32(z), dim=1), instance_ids)
    mixup = instance_ids.dim() == 2 if mixup is None else mixup
    logits = sim / temperature
    neg_lse = torch.logsumexp(logits.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)
    # log(e^neg_lse + 1e-6) (-13.8155... = log 1e-6); logaddexp also handles rows without
    # negatives (neg_lse = -inf)
    neg_lse = torch.logaddexp(neg_lse, torch.full_like(neg_lse, -13.815510557964274))
    log_p = logits - torch.logaddexp(logits, neg_lse)
    nll = -(log_p * pos).sum(dim=1)
    if mixup:
        return (nll / pos.sum(dim=1).clamp_min(1)).mean()
    return nll.sum() / sim.shape[0]


def koleo(z, instance_ids=None, eps=1e-6):
    """Kozachenko-Leonenko differential-entropy regulariser (Sablayrolles et al. 2019; SSCD eq. 3).

    z: (N, D) embeddings of this rank (normalised here). For each row the distance to its
    nearest *non-matching* embedding in the global batch is
    ``d_i = sqrt(clamp(2 - 2 max_{k in neg(i)} S_ik, eps))`` and the loss is ``-mean_i log d_i``.
    instance_ids as ``sscd_infonce``; None means every other view is a non-match (plain KoLeo).
    Rows without any non-match use SSCD's fill similarity -100.
    """
    z = F.normalize(_at_least_fp32(z), dim=1)
    if instance_ids is None:
        instance_ids = torch.arange(z.shape[0], device=z.device)
    sim, _, neg = _sscd_pairs(z, instance_ids)
    nearest = sim.masked_fill(~neg, -100.0).max(dim=1).values
    return -(2 - 2 * nearest).clamp_min(eps).sqrt().log().mean()
