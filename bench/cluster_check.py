"""README's "ImageNet scale" commands, end to end at reduced size, under the real launchers.

    make gpu-check            # = python bench/cluster_check.py: one CUDA GPU, NCCL, under 5 minutes

The same stages back ``tests/test_launchers.py`` on the CPU with two processes (gloo). Every stage is
the README's command (torchrun / deepspeed, the ImageNet configs) plus overrides that shrink it:
  tokenizer  torchrun -m tokenizer.train, mgvq_g4_f16.yaml, bf16 on GPUs, GAN and LPIPS on; a few steps,
             then the same command with more steps (a resume)
  encode     torchrun -m tokenizer.encode, ten-crop (view_kind=crops views=10)
  ar_zero1 / ar_zero3   deepspeed --module ar_model.train, imagenet_gpt_b.yaml (GPT-B on a GPU), bf16
             on GPUs, a few steps, then a resume; the fp32 export is checked
  sample     torchrun -m sampling.sample, fid50k.yaml with CFG and top-k
  fid        python -m eval.generation against the samples' own folder with torch-fidelity's Inception
             on the device (weights from --inception-weights / $GROUPGEN_INCEPTION_WEIGHTS, else a
             clear skip)
Each stage prints one JSON line: stage, ok, seconds and its throughput (tokenizer img/s, AR tokens/s
and model FLOPs utilisation against the GPU's bf16 peak, sampling img/s). Without CUDA the script
says so in one line and exits 3.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_CUDA_EXIT = 3


@dataclass
class Plan:
    work: Path
    nproc: int = 1
    gpu: bool = True
    env: dict = field(default_factory=dict)
    timeout: float = 600.0

    @property
    def images(self) -> Path:
        return self.work / "imagenet"


def make_imagefolder(root: Path, classes: int = 4, per_class: int = 8, size: int = 64, seed: int = 0) -> Path:
    """A small ImageNet-like folder: ``train/`` and ``val/`` of ``classes`` class folders of JPEGs
    (smooth random colour fields with a class-dependent tint, so classes differ)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                low = rng.random((4, 4, 3)) * 0.6 + 0.4 * np.eye(3)[c % 3]
                img = Image.fromarray((low * 255).astype(np.uint8)).resize((size + 8 * (i % 3), size), Image.BICUBIC)
                img.save(d / f"img_{i:04d}.JPEG", quality=90)
    return root


def _torchrun(plan: Plan, module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(plan.nproc),
            "-m", module, *args]


def _deepspeed(plan: Plan, module: str, *args: str) -> list[str]:
    # --num_gpus explicitly: the CPU accelerator reports one device whatever the process count
    port = str(29600 + os.getpid() % 300)
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(plan.nproc), "--master_port", port,
            "--module", module, *args]


def tokenizer_cmd(plan: Plan, steps: int) -> list[str]:
    size = ["data.image_size=256", "model.image_size=256", "train.batch_size=4", "train.precision=bf16"] if plan.gpu \
        else ["data.image_size=32", "model.image_size=32", "model.ch=16", "model.ch_mult=[1,2,2]", "model.z_channels=16",
              "quantizer.codebook_size=64", "train.batch_size=2", "train.threads=1"]
    return _torchrun(plan, "tokenizer.train", "--config", "configs/tokenizer/mgvq_g4_f16.yaml",
                     "--out", str(plan.work / "tok"), f"data.root={plan.images}", f"train.steps={steps}",
                     "train.log_every=1", "train.ckpt_every=2", "train.sample_every=0", "train.workers=2",
                     "loss.disc_start=1", "loss.lpips_random=true", "quantizer.revive_every=2", *size)


def encode_cmd(plan: Plan) -> list[str]:
    return _torchrun(plan, "tokenizer.encode", "--ckpt", str(plan.work / "tok"), "--out", str(plan.work / "tokens"),
                     "view_kind=crops", "views=10", f"data={{root: {plan.images}}}", "batch_size=8",
                     "chunk_size=8", "workers=2", *([] if plan.gpu else ["threads=1"]))


def ar_cmd(plan: Plan, zero: int, steps: int) -> list[str]:
    size = ["train.batch_size=32", "train.precision=bf16"] if plan.gpu else \
        ["model.preset=micro", "train.batch_size=4", "train.precision=fp32", "train.threads=1"]
    return _deepspeed(plan, "ar_model.train", "--config", "configs/ar/imagenet_gpt_b.yaml",
                      "--tokens", str(plan.work / "tokens"), "--out", str(plan.work / f"ar_zero{zero}"),
                      f"train.zero_stage={zero}", f"train.steps={steps}", "train.log_every=1",
                      "train.ckpt_every=1000", "train.eval_every=0", *size)


def sample_cmd(plan: Plan) -> list[str]:
    size = ["num_samples=64", "batch_size=16"] if plan.gpu else ["num_samples=8", "batch_size=2", "precision=fp32"]
    return _torchrun(plan, "sampling.sample", "--config", "configs/sampling/fid50k.yaml",
                     "--ckpt", str(plan.work / "ar_zero1"), "--out", str(plan.work / "samples"),
                     "cfg_scale=2.0", "top_k=100", *size)


def fid_cmd(plan: Plan, weights: str) -> list[str]:
    return [sys.executable, "-m", "eval.generation", "--samples", str(plan.work / "samples" / "samples.npz"),
            "--ref", str(plan.work / "samples" / "samples.npz"), f"inception_weights={weights}", "pr=false",
            "isc_splits=2"]


def run(plan: Plan, cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **plan.env}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=plan.timeout)


def _rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _fail(stage: str, out: subprocess.CompletedProcess, t: float) -> dict:
    return {"stage": stage, "ok": False, "seconds": round(t, 1), "rc": out.returncode,
            "tail": (out.stdout + out.stderr)[-1500:]}


def stage_tokenizer(plan: Plan) -> dict:
    t0 = time.perf_counter()
    for steps in (2, 4):   # the second call resumes from the first one's checkpoint
        out = run(plan, tokenizer_cmd(plan, steps))
        if out.returncode:
            return _fail("tokenizer", out, time.perf_counter() - t0)
    rows = [r for r in _rows(plan.work / "tok" / "metrics.jsonl") if "step_time" in r]
    per_rank = 4 if plan.gpu else 2
    ok = [r["step"] for r in rows] == [1, 2, 3, 4] and any(r.get("gan") for r in rows)
    return {"stage": "tokenizer", "ok": ok, "seconds": round(time.perf_counter() - t0, 1), "resumed": "resumed from" in out.stdout,
            "img_per_s": round(per_rank * plan.nproc / rows[-1]["step_time"], 2) if rows else None}


def stage_encode(plan: Plan) -> dict:
    t0 = time.perf_counter()
    out = run(plan, encode_cmd(plan))
    if out.returncode:
        return _fail("encode", out, time.perf_counter() - t0)
    h = json.loads((plan.work / "tokens" / "header.json").read_text())
    return {"stage": "encode", "ok": bool(h.get("complete")) and h["V"] == 10, "seconds": round(time.perf_counter() - t0, 1),
            "images": h["N"], "views": h["V"]}


def stage_ar(plan: Plan, zero: int, peak_tflops: float) -> dict:
    from safetensors import safe_open

    name, t0 = f"ar_zero{zero}", time.perf_counter()
    steps = (6, 10) if plan.gpu else (2, 3)
    for n in steps:   # then a resume
        out = run(plan, ar_cmd(plan, zero, n))
        if out.returncode:
            return _fail(name, out, time.perf_counter() - t0)
    run_dir = plan.work / name
    rows = [r for r in _rows(run_dir / "metrics.jsonl") if "loss" in r]
    ck = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    dtypes = {t.dtype for t in tensors}
    n_params = sum(t.numel() for t in tensors)
    world = json.loads((ck / "meta.json").read_text()).get("world_size")
    res = {"stage": name, "ok": [r["step"] for r in rows] == list(range(1, steps[1] + 1)) and all(
        str(d) == "torch.float32" for d in dtypes), "seconds": round(time.perf_counter() - t0, 1),
        "loss_first": rows[0]["loss"] if rows else None, "loss_last": rows[-1]["loss"] if rows else None,
        "export_dtypes": sorted(str(d) for d in dtypes), "world_size": world, "params": n_params}
    tok_s = rows[-1].get("tok_per_s") if rows else None
    if tok_s:
        res["tokens_per_s"] = round(tok_s, 1)
        if plan.gpu:   # 6 N FLOPs a token (forward + backward), attention aside
            res["mfu"] = round(6 * n_params * tok_s / (peak_tflops * 1e12 * plan.nproc), 4)
    return res


def stage_sample(plan: Plan) -> dict:
    t0 = time.perf_counter()
    out = run(plan, sample_cmd(plan))
    if out.returncode:
        return _fail("sample", out, time.perf_counter() - t0)
    info = json.loads((plan.work / "samples" / "sampling.json").read_text())
    return {"stage": "sample", "ok": info["num_samples"] == (64 if plan.gpu else 8), "seconds": round(time.perf_counter() - t0, 1),
            "img_per_s": round(info["timings"]["images_per_s"], 2)}


def stage_fid(plan: Plan, weights: str) -> dict:
    if not weights or not Path(weights).is_file():
        return {"stage": "fid", "ok": None, "skipped": "no Inception weights: pass --inception-weights PATH "
                "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth) or set GROUPGEN_INCEPTION_WEIGHTS"}
    t0 = time.perf_counter()
    out = run(plan, fid_cmd(plan, weights))
    if out.returncode:
        return _fail("fid", out, time.perf_counter() - t0)
    return {"stage": "fid", "ok": True, "seconds": round(time.perf_counter() - t0, 1), "tail": out.stdout[-300:]}


def check(plan: Plan, peak_tflops: float, weights: str, emit=print) -> list[dict]:
    # GPU: 128 training images, so GPT-B's batch of 32 fits; CPU tests make their own small folder
    make_imagefolder(plan.images, per_class=32 if plan.gpu else 8, size=288 if plan.gpu else 40)
    results = []
    for fn in (stage_tokenizer, stage_encode, lambda p: stage_ar(p, 1, peak_tflops), lambda p: stage_ar(p, 3, peak_tflops),
               stage_sample, lambda p: stage_fid(p, weights)):
        r = fn(plan)
        results.append(r)
        emit(json.dumps(r))
        if r["ok"] is False and r["stage"] in ("tokenizer", "encode", "ar_zero1"):
            break   # the later stages read this one's output
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/gpu_check", help="scratch folder (replaced)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--inception-weights", default=os.environ.get("GROUPGEN_INCEPTION_WEIGHTS", ""))
    a = ap.parse_args(argv)
    import importlib.util
    missing = [m for m in ("torch", "deepspeed", "lpips", "torch_fidelity") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu-check: {', '.join(missing)} not installed for {sys.executable}: run `make setup`, or on a GPU "
              f"image with its own CUDA PyTorch install groupgen's requirements and `make gpu-check GPU_PY=python3`",
              flush=True)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with one",
              flush=True)
        return NO_CUDA_EXIT
    import shutil
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    results = check(Plan(work.resolve(), nproc=1, gpu=True), a.peak_tflops, a.inception_weights)
    return 0 if all(r["ok"] is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
