"""Image batches off the training step's critical path: DataLoader workers decode (JPEG at 256^2 is
~10 ms an image), the main process gets pinned batches a few steps ahead.

The batches are given up front as a sequence of index lists (a trainer's step order), and each one's
random augmentation is seeded by (seed, batch number) alone, so a batch is the same with 0 or 16
workers, in any process, and after a resume. In-memory datasets (``.batch``: Fashion-MNIST, digits)
are sliced in the main process, where a worker would only add a copy.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .runs import cores_per_rank


def _seed_batch(seed: int, key: int) -> None:
    """Seed the global generators an augmentation draws from (numpy, random, torch) for one batch."""
    s = (seed * 1_000_003 + key) % (2 ** 63)
    np.random.seed(s % (2 ** 32))
    random.seed(s)
    torch.manual_seed(s)


class _Batches(Dataset):
    """Item ``j`` = the whole ``j``-th batch (its images stacked, its labels), fetched in one call."""

    def __init__(self, ds, batches: Sequence[Sequence[int]], seed: int, first: int):
        self.ds, self.batches, self.seed, self.first = ds, batches, seed, first

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int):
        idx = [int(i) for i in self.batches[j]]
        _seed_batch(self.seed, self.first + j)
        items = [self.ds[i] for i in idx]
        x = torch.stack([t for t, _ in items])
        y = torch.tensor([lab for _, lab in items], dtype=torch.long)
        return x, y


def _identity(batch):
    return batch[0]


def image_batches(ds, batches: Sequence[Sequence[int]], *, workers: int = 0, seed: int = 0, first: int = 0,
                  pin_memory: bool = False, prefetch: int = 2):
    """Iterate ``(images, labels)`` for each index list of ``batches`` in order. ``first`` numbers the
    first batch (a trainer passes its step, so augmentation seeds do not depend on where it resumed)."""
    if hasattr(ds, "batch"):   # in memory: a slice, no augmentation, nothing to overlap
        for idx in batches:
            yield ds.batch(idx)
        return
    work = _Batches(ds, batches, seed, first)
    # no more decoding processes than this rank's share of the node's cores (a 2-core box gets 1)
    workers = min(workers, max(1, cores_per_rank() - 1)) if workers > 0 else 0
    if workers <= 0:
        state = _save_rng()
        try:
            for j in range(len(work)):
                x, y = work[j]
                yield (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)
        finally:
            _restore_rng(state)   # batch seeding must not move the trainer's own generators
        return
    yield from DataLoader(work, batch_size=1, shuffle=False, num_workers=workers, collate_fn=_identity,
                          pin_memory=pin_memory, prefetch_factor=prefetch, persistent_workers=False,
                          generator=torch.Generator().manual_seed(seed))


class StepBatches:
    """``batches[j]`` = ``order(first + j)`` for a trainer's remaining steps, computed on demand."""

    def __init__(self, order: Callable[[int], Sequence[int]], first: int, last: int):
        self.order, self.first, self.last = order, first, last

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def __getitem__(self, j: int):
        return self.order(self.first + j)


def _save_rng():
    return np.random.get_state(), random.getstate(), torch.get_rng_state()


def _restore_rng(state) -> None:
    np.random.set_state(state[0])
    random.setstate(state[1])
    torch.set_rng_state(state[2])
