"""Batches from a memory-mapped token store, as a pure function of (seed, rank, world, position).

The stream of micro-batches a rank sees is fully determined by ``(seed, rank, world, pos)``, where
``pos`` counts micro-batches this rank has consumed. A trainer therefore resumes the exact data order
by saving one integer. Per epoch: a permutation of the training indices from ``(seed, epoch)``, rank
``r`` takes every ``world``-th entry (the tail that does not divide evenly is dropped so all ranks run
the same number of batches), and each sample gets one random augmented view from ``(seed, epoch)``.
Batches are gathered by fancy-indexing the memmap: no per-sample file opens, no worker processes.
"""
from __future__ import annotations

import numpy as np
import torch

from groupgen.tokens import TokenStore, TokenStoreError

# Fixed, seed-independent split key: runs with different training seeds hold out the same samples.
_SPLIT_KEY = 20261


def split_indices(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) index arrays: a fixed random ``val_fraction`` of ``range(n)`` is held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    perm = np.random.default_rng(_SPLIT_KEY).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def gather(store: TokenStore, idx: np.ndarray, views: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [B, L, G] int64 and labels [B] int64 for samples ``idx`` at views ``views``."""
    # Sorted reads are sequential on the memmap; the batch order is restored afterwards.
    order = np.argsort(idx, kind="stable")
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    codes = np.asarray(store.codes[idx[order], views[order]])[inv]
    labels = np.asarray(store.labels[idx[order]])[inv]
    return torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))


class TokenBatches:
    """Deterministic, rank-sharded, epoch-permuted micro-batches over ``indices`` of a store."""

    def __init__(self, store: TokenStore, indices: np.ndarray, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.per_rank = len(self.indices) // world
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise TokenStoreError(
                f"{store.root}: {len(self.indices)} training samples cannot fill one batch of "
                f"{batch_size} per rank on {world} rank(s); lower train.batch_size")
        self._epoch, self._order, self._views = -1, None, None

    def _load_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        perm = self.indices[rng.permutation(len(self.indices))]
        views = rng.integers(0, self.store.views, size=len(perm))
        keep = slice(self.rank, self.per_rank * self.world, self.world)
        self._epoch, self._order, self._views = epoch, perm[keep], views[keep]

    def epoch_of(self, pos: int) -> int:
        return pos // self.batches_per_epoch

    def get(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``pos``-th micro-batch of this rank (codes [B, L, G], labels [B])."""
        epoch, i = divmod(pos, self.batches_per_epoch)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return gather(self.store, self._order[sl], self._views[sl])


def val_batches(store: TokenStore, indices: np.ndarray, batch_size: int, rank: int = 0, world: int = 1,
                max_batches: int = 0):
    """Fixed validation batches (view 0, natural order), sharded over ranks; yields (codes, labels, weight).

    Every rank yields the same number of batches (ZeRO-3 needs every rank in every forward): a rank
    whose share has run out gets a one-sample stand-in batch with weight 0.
    """
    indices = np.asarray(indices, dtype=np.int64)
    mine = indices[rank::world]
    n_b = (-(-len(indices) // world) + batch_size - 1) // batch_size
    if max_batches > 0:
        n_b = min(n_b, max_batches)
    for b in range(n_b):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        weight = len(idx)
        if weight == 0:
            idx = indices[:1]
        codes, labels = gather(store, idx, np.zeros_like(idx))
        yield codes, labels, weight


class Prefetch:
    """Micro-batches on the device one ahead: batch ``pos + 1`` is gathered from the memory-mapped store
    (and pinned, on CUDA, for an asynchronous copy) while batch ``pos`` trains."""

    def __init__(self, batches: TokenBatches, device: torch.device):
        self.batches, self.device, self.pin = batches, device, device.type == "cuda"
        self.ahead: tuple[int, tuple] | None = None

    def _load(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes, labels = self.batches.get(pos)
        if self.pin:
            codes, labels = codes.pin_memory(), labels.pin_memory()
        return codes.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def take(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = self.ahead[1] if self.ahead is not None and self.ahead[0] == pos else self._load(pos)
        self.ahead = (pos + 1, self._load(pos + 1))
        return got
