"""Process groups for every stage: one way to join a launcher's group and to run collectives on it.

Under a launcher (torchrun, deepspeed: ``RANK`` and ``WORLD_SIZE`` set) a stage always joins the
process group, even at world size 1, so that ``torchrun --nproc_per_node 1`` runs each collective
on NCCL exactly as a cluster run does (``make gpu-check``). On CUDA the process takes the GPU of
its ``LOCAL_RANK`` before the group exists (NCCL binds each rank's communicator to the current
device; without it every rank would use cuda:0), and collectives get tensors on that device.
A plain ``python -m`` run has no group, and every collective here is then a no-op.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether a launcher started this process (its rank variables are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment, else (0, 1, 0)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(pref: str = "auto") -> torch.device:
    """``auto``: this rank's GPU (``cuda:LOCAL_RANK``) where CUDA is present, else the CPU; ``cuda``
    means this rank's GPU too; anything else is taken as given."""
    if pref in ("auto", "cuda", "") and torch.cuda.is_available():
        return torch.device("cuda", rank_info()[2] % torch.cuda.device_count())
    if pref in ("auto", ""):
        return torch.device("cpu")
    return torch.device(pref)


def init(pref: str = "auto") -> tuple[int, int, torch.device]:
    """Join the launcher's group (if launched and not joined yet): set this rank's GPU first, NCCL on
    CUDA, gloo on the CPU. Returns (rank, world_size, device)."""
    rank, world, _ = rank_info()
    device = pick_device(pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return rank, world, device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where this group's collectives take their tensors: the current GPU under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few floats (flags, counters); the values themselves alone."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a group)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)   # pickles through tensors on collective_device() (set_device above)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a group)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


def barrier() -> None:
    if not active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def destroy() -> None:
    if active():
        dist.destroy_process_group()
