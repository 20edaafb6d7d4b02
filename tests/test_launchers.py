"""README's ImageNet commands under the real launchers on the CPU: torchrun x2 (tokenizer training
with a resume, ten-crop encoding, sampling) and deepspeed --num_gpus 2 (ZeRO-1 and ZeRO-3 with a
resume, gloo), each at tiny size, through the stages ``make gpu-check`` runs on a GPU."""
import subprocess
import sys

import pytest

from _env import REPO, child_env
from bench import cluster_check as cc


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONPATH",)}
    p = cc.Plan(work, nproc=2, gpu=False, env=env, timeout=420)
    cc.make_imagefolder(p.images, classes=4, per_class=8, size=40)
    return p


def _ok(r: dict) -> None:
    assert r["ok"], r


def test_tokenizer_training_two_ranks_and_resume(plan):
    r = cc.stage_tokenizer(plan)
    _ok(r)
    assert r["resumed"] and r["img_per_s"] > 0


def test_ten_crop_encode_two_ranks(plan):
    _ok(cc.stage_encode(plan))


@pytest.mark.parametrize("zero", [1, 3])
def test_deepspeed_two_ranks_and_resume(plan, zero):
    r = cc.stage_ar(plan, zero, peak_tflops=1.0)
    _ok(r)
    assert r["export_dtypes"] == ["torch.float32"] and r["tokens_per_s"] > 0 and r["world_size"] == 2


def test_sampling_two_ranks(plan):
    _ok(cc.stage_sample(plan))


def test_fid_without_inception_weights_is_a_clear_skip(plan):
    r = cc.stage_fid(plan, "")
    assert r["ok"] is None and "--inception-weights" in r["skipped"]


def test_gpu_check_without_cuda_says_so_and_exits_3():
    out = subprocess.run([sys.executable, "bench/cluster_check.py"], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == cc.NO_CUDA_EXIT
    assert out.stdout.strip().count("\n") == 0 and "no CUDA GPU" in out.stdout
