"""The cluster path without a cluster: joining a group (GPU of LOCAL_RANK set before NCCL starts),
collectives on the group's device, collectives at world size 1 under a launcher, and image batches
that do not depend on the number of loader workers."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

from groupgen import distributed
from groupgen.loader import StepBatches, image_batches


@pytest.fixture
def fake_cuda(monkeypatch):
    """Four GPUs that record what is asked of them; ``calls`` lists (what, argument) in order."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(dist, "is_initialized", lambda: any(c[0] == "init" for c in calls))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw.get("device_id"))))
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    return calls


def test_a_launched_rank_takes_its_gpu_before_the_nccl_group(fake_cuda, monkeypatch):
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    rank, world, device = distributed.init("auto")
    assert (rank, world, device) == (6, 8, torch.device("cuda", 2))
    assert fake_cuda == [("set_device", torch.device("cuda", 2)), ("init", "nccl", torch.device("cuda", 2))]
    assert distributed.collective_device() == torch.device("cuda", 2)


def test_world_size_one_under_a_launcher_still_joins_a_group(fake_cuda, monkeypatch):
    """``torchrun --nproc_per_node 1`` must run the collectives a cluster run runs (make gpu-check)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    distributed.init("cuda")
    assert [c[0] for c in fake_cuda] == ["set_device", "init"]


def test_a_plain_process_joins_nothing(fake_cuda, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.init("cpu") == (0, 1, torch.device("cpu"))
    assert not any(c[0] == "init" for c in fake_cuda)


def test_flag_reduction_uses_the_groups_device(fake_cuda, monkeypatch):
    """Under NCCL the tensor must live on the GPU (a CPU tensor fails at the first step)."""
    seen = []
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))   # stands in for cuda:2
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: torch.tensor([3.0, 1.0], dtype=torch.float64))
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: seen.append(t.device))
    assert distributed.all_reduce_sum([1.0, 0.0]) == [3.0, 1.0]
    assert seen == [torch.device("meta")]


def test_tokenizer_training_runs_its_collectives_at_world_size_one(tmp_path, monkeypatch):
    """Under a launcher's group of one, the step's flag reduction, the checkpoint's RNG gather and
    barrier all run (before, ``if world > 1`` skipped exactly the collectives that broke on NCCL)."""
    from tokenizer.train import TokenizerTrainConfig, train
    from groupgen.config import load_config
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    counts = {"all_reduce": 0, "all_gather_object": 0, "barrier": 0}
    for name in counts:
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _r=real, _n=name, **k: counts.__setitem__(_n, counts[_n] + 1) or _r(*a, **k))
    cfg = load_config(TokenizerTrainConfig, "configs/tokenizer/fmnist_vq.yaml",
                      ["train.steps=2", "train.batch_size=8", "train.ckpt_every=0", "train.sample_every=0",
                       "train.log_every=1", "data.limit=64", "train.threads=1"])
    joined_before = dist.is_initialized()   # an earlier in-process DeepSpeed test may have made one
    try:
        res = train(cfg, tmp_path / "run")
    finally:
        if not joined_before:   # destroying DeepSpeed's group would break later in-process tests
            distributed.destroy()
    assert res["step"] == 2
    assert counts["all_reduce"] >= 2 and counts["all_gather_object"] == 1 and counts["barrier"] >= 1


class _Augmented(torch.utils.data.Dataset):
    """Files stand-in: each item draws its own random augmentation from the global generators."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)) + float(np.random.uniform()) + torch.rand(()), i % 3


def test_batches_are_the_same_with_any_number_of_workers_and_after_a_resume():
    order = lambda step: list(range((step * 4) % 40, (step * 4) % 40 + 4))   # noqa: E731
    runs = {w: list(image_batches(_Augmented(), StepBatches(order, 0, 6), workers=w, seed=5)) for w in (0, 2)}
    resumed = list(image_batches(_Augmented(), StepBatches(order, 3, 6), workers=0, seed=5, first=3))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    list(image_batches(_Augmented(), StepBatches(order, 0, 2), workers=0, seed=5))
    assert torch.equal(torch.get_rng_state(), state)                   # the trainer's generator is untouched
    for a, b in zip(runs[0], runs[2]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(runs[0][3:], resumed):
        assert torch.equal(a[0], b[0])
    assert not torch.equal(runs[0][0][0], runs[0][1][0] - 4)            # augmentations differ per batch


def test_launcher_ranks_share_the_nodes_cores(monkeypatch):
    """The deepspeed launcher leaves OMP_NUM_THREADS unset: each of a node's ranks takes its share."""
    import os
    from groupgen.runs import set_threads
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        assert set_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert set_threads() == 16
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_threads() == 3 and set_threads(1) == 1
    finally:
        torch.set_num_threads(before)
