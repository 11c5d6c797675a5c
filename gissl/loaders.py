"""Data loading for every task: batches, collation, and per-sample seeding.

:func:`make_loader` is the one way a dataset becomes batches. For training, the order
depends only on ``(seed, epoch)`` and each sample's augmentation only on ``(seed, epoch,
index)`` (:class:`EpochSampler` + :class:`SeededDataset`), so results do not depend on the
number of workers or ranks, and a resumed run repeats an uninterrupted one exactly.
"""
import math
import random

import numpy as np
import torch

from gissl import dist
from gissl.errors import UserError


def move_to(batch, device, non_blocking=True):
    """Move every tensor in a nested structure of lists/tuples/dicts to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to(v, device, non_blocking) for v in batch]
        return type(batch)(moved) if isinstance(batch, list) else tuple(moved)
    return batch


def collate(samples):
    """Collate dict (or tuple) samples: tensors of one shape are stacked, anything else
    (variable-size originals, detection targets, paths) is kept as a list."""
    first = samples[0]
    if isinstance(first, dict):
        return {k: collate([s[k] for s in samples]) for k in first}
    if isinstance(first, tuple):
        return tuple(collate(list(parts)) for parts in zip(*samples))
    if torch.is_tensor(first) and all(s.shape == first.shape for s in samples):
        return torch.stack(samples)
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return torch.tensor(samples)
    return list(samples)


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, sample_seed)`` pairs for one rank's shard.

    The order depends only on ``(seed, epoch)`` and each sample's seed only on
    ``(seed, epoch, index)``: with :class:`SeededDataset` the augmentation of a sample is
    then the same whatever the number of workers or ranks, and a resumed run (even one
    resumed in the middle of an epoch, see ``skip``) repeats an uninterrupted one exactly.
    Under torchrun each rank takes every world-th item of the same permutation.
    """

    def __init__(self, n, shuffle, seed=0, drop_last=False):
        self.n, self.shuffle, self.seed, self.drop_last = n, shuffle, seed, drop_last
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.epoch, self.skip = 0, 0
        self.per_rank = n // self.world if drop_last else math.ceil(n / self.world)

    def set_epoch(self, epoch, skip=0):
        """Select the epoch; ``skip`` drops this rank's first ``skip`` samples (mid-epoch resume)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        if total > len(order):  # pad by repeating, as DistributedSampler, so ranks stay in step
            order += order[: total - len(order)]
        mine = order[self.rank:total:self.world][self.skip:]
        base = (self.seed * 1_000_003 + self.epoch * 7_919) * 1_000_033
        return iter((i, (base + i) % 2**62) for i in mine)

    def __len__(self):
        return self.per_rank - self.skip


class SeededDataset(torch.utils.data.Dataset):
    """Reads a sample with python, numpy and torch's CPU generator seeded from the sampler's
    per-sample seed, and gives the process its own generator states back afterwards.

    With ``--workers 0`` the samples are read in the training process itself: leaving the
    generators re-seeded there would change the model's own random draws (dropout,
    drop-path, MAE / retrieval masking), and a run would end with other weights than with
    worker processes. Only the CPU generator is seeded (``torch.manual_seed`` would also
    re-seed every GPU's); augmentations draw on the CPU."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


def make_loader(dataset, *, batch_size, train, workers=2, seed=0, device="cpu",
                collate_fn=None, drop_last=None):
    """A DataLoader for one process.

    Training (``train=True``): ``batch_size`` is global (as SSL4GIE's ``--batch-size``), so
    each of the ``world`` ranks loads ``batch_size // world`` samples of its own shard; the
    order is fixed by (seed, epoch), the last incomplete batch is dropped, and every
    sample's augmentation is seeded from (seed, epoch, index), so ranks and workers draw
    distinct random streams (the reference gave every rank the same stream, docs/ssl4gie-study.md
    §8 item 8) and results do not depend on the number of workers.
    Evaluation (``train=False``): every sample, in order, on this process alone —
    validation runs on rank 0 only, and must see the whole split.
    Workers persist across epochs; memory is pinned on CUDA. The loader draws its workers'
    base seed from a generator of its own, not from torch's global one: with persistent
    workers that draw happens once, with ``workers=0`` once per epoch, so drawing it from
    the global generator would shift the model's random draws by the number of workers.
    """
    if len(dataset) == 0:
        raise UserError("the dataset is empty; check --data-root and --dataset")
    pin = torch.device(device).type == "cuda"
    generator = torch.Generator().manual_seed(int(seed))
    if not train:
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
            collate_fn=collate_fn or collate, drop_last=bool(drop_last), pin_memory=pin,
            persistent_workers=workers > 0, generator=generator)
    world = dist.get_world_size()
    if batch_size < world:
        raise UserError(f"--batch-size {batch_size} is smaller than the number of processes "
                        f"({world}); it is the global batch and must be at least {world}")
    per_rank = batch_size // world
    drop_last = True if drop_last is None else drop_last
    if len(dataset) < batch_size:
        drop_last = False  # a tiny dataset still trains, with one short batch per epoch
    sampler = EpochSampler(len(dataset), shuffle=True, seed=seed, drop_last=drop_last)
    return torch.utils.data.DataLoader(
        SeededDataset(dataset), batch_size=per_rank, sampler=sampler, num_workers=workers,
        collate_fn=collate_fn or collate, drop_last=drop_last, pin_memory=pin,
        persistent_workers=workers > 0, generator=generator)
