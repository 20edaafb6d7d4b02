"""Hand-written AVX-512 / AMX kernels for the CPU, built once on first use: decoding (``cpu_decode*.cpp``,
below) and the training step (``cpu_train.cpp``: ``weight_grad`` here, the rest through ``cpu_train_ops``).

Decode kernels, for inference only:
- ``linear(x, packed, bias, n)``: a GEMM for a few rows (decode: batch x 2 for guidance) against a
  weight packed once by ``pack(w)``. fp32 with AVX-512: a GPT-B step's 444 MB of fp32 weights at 16
  rows: MKL's packed sgemm 39 ms (10 GB/s), this kernel, which prefetches the weight stream, 30 ms
  (13 GB/s); a streaming read of the same bytes takes ~24 ms. bf16 (``cpu_decode_amx.cpp``, up to 32
  rows): with AMX where the CPU and OS allow it, the 222 MB of bf16 weights, oneDNN 19.6 ms (10 GB/s),
  this kernel 12.4 ms (16 GB/s); elsewhere with AVX-512F FMAs on the same packed weights (used where
  ``bf16_fma_preferred()``), against oneDNN's AVX512-BF16 path on an Intel CPU without AMX: 24.9 ->
  15.9 ms at 16 rows, 1.1-1.6x at 2-32 rows, 0.87x at 1 row (so one row stays on oneDNN there)
  (``bench/decode_linear.py``).
- ``attention(q, kc, vc, n)``: one query per head over the first ``n`` rows of an fp32 or bf16 KV
  cache, in one pass (online softmax over blocks of 16 positions). GPT-B's 12 layers at prefix 251:
  ~13 / ~7.4 ms (fp32 / bf16), reading the cache at 20-23 GB/s, the machine's streaming rate; SDPA
  takes ~1.7-1.9x as long (``bench/decode_attention.py``).
- ``rms_norm``, ``rope`` and ``swiglu`` (``cpu_decode_pointwise.cpp``): RMSNorm, RoPE and the
  SwiGLU gate of a decode step in one pass each instead of chains of small ops (GPT-B layer at 16
  rows, bf16: RMSNorm 88 -> 20 us, RoPE ~217 -> ~35 us; a 12-layer step 30.2 -> 25.4 ms).
- ``topk(x, k)``: the sampler's top-k selection (a radix select), kept columns in index order.
  [8, 16384], k = 2000: torch.topk 1.0-1.5 ms, this kernel 0.14-0.20 ms; [8, 2048], k = 256:
  0.18-0.25 vs 0.05-0.08 ms (``bench/sampler_topk.py``).

Routing decisions read one ``CpuProfile`` (vendor, flags, architecture): the real CPU's from
/proc/cpuinfo, or a simulated one (``simulate_cpu``) so that tests check every CPU kind's routing
on whatever machine they run: Intel with AMX, Intel AVX-512 without AMX, AMD Zen 4/5 (AVX512-BF16),
and a CPU without AVX-512.

The build needs x86-64 with AVX-512F, a C++ compiler and ninja (``torch.utils.cpp_extension``,
which DeepSpeed's JIT ops use too). It is cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) in a directory named by a hash of the source and its path, so an
edited source rebuilds. Where the build is impossible or fails, ``kernels()`` returns None after one warning and
callers keep their PyTorch path. ``GROUPGEN_CPU_KERNELS=0`` turns the kernels off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

_CSRC = Path(__file__).with_name("csrc")
SOURCES = [_CSRC / f for f in ("cpu_decode.cpp", "cpu_decode_amx.cpp", "cpu_decode_pointwise.cpp", "cpu_train.cpp")]
HEADERS = [_CSRC / "cpu_simd.h"]   # hashed with the sources (a change rebuilds)
# Pointwise kernels take inputs of at most this many rows (decode steps); larger ones keep PyTorch's ops.
POINTWISE_MAX_ROWS = 64
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma", "-fopenmp"]
_state: dict = {"tried": False, "ext": None, "why": ""}


@dataclass(frozen=True)
class CpuProfile:
    """What routing needs to know of a CPU: its vendor id, its /proc/cpuinfo flags, its architecture."""
    vendor: str = ""
    flags: frozenset = field(default_factory=frozenset)
    machine: str = "x86_64"

    @property
    def avx512f(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64") and "avx512f" in self.flags

    @property
    def amx_bf16(self) -> bool:
        """AMX tiles with bf16 products (whether the OS grants them is asked of the built kernels)."""
        return self.avx512f and {"amx_tile", "amx_bf16", "avx512_bf16"} <= self.flags


# The CPU kinds README names, for simulated routing (tests, benchmarks on another machine's behalf).
CPU_KINDS = {
    "intel_amx": CpuProfile("GenuineIntel", frozenset({"avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"})),
    "intel_avx512": CpuProfile("GenuineIntel", frozenset({"avx512f", "avx512bw", "avx512_bf16"})),
    "amd_zen4": CpuProfile("AuthenticAMD", frozenset({"avx512f", "avx512bw", "avx512_bf16"})),
    "no_avx512": CpuProfile("AuthenticAMD", frozenset({"avx2", "fma"})),
}


def _read_cpu_profile() -> CpuProfile:
    """The first CPU of /proc/cpuinfo (an empty profile where unreadable: no kernels)."""
    vendor, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("vendor_id") and not vendor:
                vendor = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return CpuProfile(vendor, frozenset(flags), platform.machine())


def cpu_profile() -> CpuProfile:
    """The profile routing reads: a simulated one (``simulate_cpu``), else this machine's."""
    if "profile" not in _state:
        _state["profile"] = _read_cpu_profile()
    return _state["profile"]


def simulate_cpu(profile: CpuProfile | str | None) -> None:
    """Route as on ``profile`` (a ``CpuProfile`` or a ``CPU_KINDS`` name; None: this machine again).
    Clears every cached routing answer. Kernels are only built where the real CPU can run them: a
    simulated AVX-512 CPU on a machine without one decides routes but cannot run them."""
    if isinstance(profile, str):
        profile = CPU_KINDS[profile]
    for key in ("profile", "fma_preferred", "amx"):
        _state.pop(key, None)
    if profile is not None:
        _state["profile"] = profile
        _state["simulated"] = True
    else:
        _state.pop("simulated", None)
    if _state.get("why") == "this CPU has no AVX-512F" or (profile is not None and not profile.avx512f):
        _state.update(tried=False, ext=None, why="")   # answer kernels() again for the new profile


def bf16_fma_preferred() -> bool:
    """Whether the bf16 decode GEMM should run on AVX-512F FMAs where AMX is missing. Measured on an
    Intel host that hides AMX: ``vdpbf16ps`` retires 4x fewer instructions per second than an FMA, so
    oneDNN's AVX512-BF16 GEMM takes 1.2-1.6x as long as the FMA path. On CPUs with AVX512-BF16 from
    other vendors (AMD Zen 4/5 run ``vdpbf16ps`` at up to twice an FMA's multiply-adds) it is not
    measured, so oneDNN keeps those; without AVX512-BF16 oneDNN has no native bf16 product at all."""
    if "fma_preferred" not in _state:
        prof = cpu_profile()
        _state["fma_preferred"] = prof.vendor == "GenuineIntel" or "avx512_bf16" not in prof.flags
    return _state["fma_preferred"]


def bf16_trains_faster() -> bool:
    """Whether bf16 training (DeepSpeed's bf16 mode, its GEMMs run by oneDNN) is faster than fp32 on this
    CPU: where it multiplies bf16 natively at more than an fp32 FMA's rate, i.e. with AMX, or with
    AVX512-BF16 on a CPU that is not Intel's (on Intel without AMX ``vdpbf16ps`` retires 4x fewer
    instructions than an FMA, see ``bf16_fma_preferred``). Measured on AMD EPYC (Zen 4, AVX512-BF16, no
    AMX): the demo's tiny prior trains at 1.39x fp32's tokens/s (BENCHMARKS.md, issue 24, session 16).
    The CPU alone decides it: oneDNN, not groupgen's kernels, runs these GEMMs."""
    prof = cpu_profile()
    return prof.amx_bf16 or (prof.avx512f and not bf16_fma_preferred())


def unavailable_reason() -> str:
    """Why the kernels cannot be used here, or '' when they can be built and loaded."""
    kernels()
    return _state["why"]


def kernels():
    """The compiled extension (its ops are ``torch.ops.groupgen.*``), or None (after one warning
    if a build was attempted)."""
    if _state["tried"]:
        return _state["ext"]
    _state["tried"] = True
    if os.environ.get("GROUPGEN_CPU_KERNELS", "1").lower() in ("0", "false", "off", "no"):
        _state["why"] = "turned off by GROUPGEN_CPU_KERNELS"
    elif not cpu_profile().avx512f or not _read_cpu_profile().avx512f:   # simulated, or real
        _state["why"] = "this CPU has no AVX-512F"
    else:
        try:
            _state["ext"] = _build()
        except Exception as e:  # a compiler or ninja missing, or a failed build: keep PyTorch's path
            _state["why"] = f"build failed: {type(e).__name__}: {str(e).strip()[-400:]}"
            warnings.warn(f"groupgen: CPU kernels unavailable ({_state['why']}); using PyTorch ops. "
                          "Set GROUPGEN_CPU_KERNELS=0 to skip the build.", RuntimeWarning, stacklevel=2)
    return _state["ext"]


def _build():
    log = logging.getLogger("torch.utils.cpp_extension")   # its import warns that CUDA is absent
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)

    # The source's path is part of the name: ninja rebuilds whenever the path in its build file
    # changes, so two checkouts sharing one cache would otherwise rebuild each other's copy.
    digest = hashlib.sha256(b"".join(p.read_bytes() + str(p.resolve()).encode() for p in SOURCES + HEADERS)
                            + " ".join(_CFLAGS).encode() + torch.__version__.encode())
    name = f"groupgen_cpu_kernels_{digest.hexdigest()[:12]}"
    root = Path(cpp_extension.get_default_build_root())
    if not any(root.glob(f"**/{name}/{name}.so")):
        print(f"groupgen: building the CPU kernels once (about a minute) under {root}",
              file=sys.stderr, flush=True)
    return cpp_extension.load(name, [str(p) for p in SOURCES], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                              verbose=False)


def amx_bf16() -> bool:
    """Whether the bf16 GEMM can run: the kernels are built, the CPU has AMX-BF16 and the OS lets
    this process use the tile registers."""
    if "amx" not in _state:
        ok = kernels() is not None and cpu_profile().amx_bf16
        if ok and not _state.get("simulated"):
            ok = bool(torch.ops.groupgen.amx_bf16_ready())   # the OS must grant the tile registers
        _state["amx"] = ok
    return _state["amx"]


def linear_supports(dtype: torch.dtype) -> bool:
    """Whether ``pack``/``linear`` have a kernel for weights of ``dtype`` that decoding should use on
    this machine: fp32 wherever the kernels are built; bf16 on AMX where allowed, else on AVX-512F
    FMAs where ``bf16_fma_preferred()``."""
    if dtype == torch.float32:
        return kernels() is not None
    return dtype == torch.bfloat16 and kernels() is not None and (amx_bf16() or bf16_fma_preferred())


def linear_min_rows(dtype: torch.dtype) -> int | None:
    """The fewest rows for which ``linear`` beats the library's packed GEMM here (measured with
    ``bench/decode_linear.py``): fp32 4 (MKL is as fast below); bf16 1 on AMX, 2 on the AVX-512F
    path (oneDNN's single-row bf16 GEMV is faster). None where there is no kernel for ``dtype``."""
    if not linear_supports(dtype):
        return None
    if dtype == torch.float32:
        return 4
    return 1 if amx_bf16() else 2


def pack(w: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] in the layout ``linear`` streams: fp32 -> [ceil(N/16), K, 16]; bf16 ->
    AMX tiles [ceil(N/16), ceil(K/32), 16, 16, 2] (check ``linear_supports`` first)."""
    kernels()
    w = w.detach().contiguous()
    if w.dtype == torch.bfloat16:
        return torch.ops.groupgen.pack_bf16(w)
    return torch.ops.groupgen.pack_f32(w)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x [M, K] -> x @ W^T (+ bias) [M, n] with W packed by ``pack``; fp32 any M, bf16 M <= 32 (AMX
    where ``amx_bf16()``, else AVX-512F)."""
    if x.dtype == torch.bfloat16:
        return torch.ops.groupgen.linear_bf16(x.contiguous(), packed, bias, n)
    return torch.ops.groupgen.linear_f32(x.contiguous(), packed, bias, n)


def attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n: int) -> torch.Tensor | None:
    """Scaled dot-product attention of q [B, H, 1, D] over ``kc``/``vc`` [B, Hk, T, D] rows 0..n-1
    (no mask: the query is the newest position). Computes in fp32 over an fp32 or bf16 cache (q of
    any float dtype, e.g. fp32 over a bf16 cache). Returns [B, H, 1, D] in q's dtype, or None
    where the kernel does not apply (no kernels, head_dim not 16/32/64/128, other dtypes, strided
    caches), so the caller falls back to SDPA."""
    ext = kernels()
    D = q.shape[-1]
    if (ext is None or kc.dtype not in (torch.float32, torch.bfloat16) or vc.dtype != kc.dtype
            or D not in (16, 32, 64, 128)
            or q.shape[2] != 1 or not (kc.is_contiguous() and vc.is_contiguous())):
        return None
    B, H = q.shape[0], q.shape[1]
    out = torch.ops.groupgen.decode_attention(q.reshape(B, H, D).float().contiguous(), kc, vc, n)
    return out.view(B, H, 1, D).to(q.dtype)


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``k`` largest entries of each row of ``x`` [..., K] as (values, indices) [..., k], in
    ascending index order (ties at the threshold: lowest indices first), or None where the kernel
    does not apply (no kernels, not a CPU tensor, not fp32 or bf16) so the caller uses torch.topk.
    NaN in a row raises (no order to select by)."""
    ext = kernels()
    if ext is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() < 1:
        return None
    K = x.shape[-1]
    vals, idx = torch.ops.groupgen.topk_select(x.reshape(-1, K).float().contiguous(), int(k))
    lead = x.shape[:-1]
    return vals.view(*lead, k).to(x.dtype), idx.view(*lead, k)


def _pointwise_ok(x: torch.Tensor, rows: int) -> bool:
    return (rows <= POINTWISE_MAX_ROWS and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled() and kernels() is not None)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``layers.RMSNorm`` in one pass for a few rows (same roundings), or None where it does not
    apply (no kernels, autograd on, more than ``POINTWISE_MAX_ROWS`` rows, dtypes that differ)."""
    D = x.shape[-1] if x.dim() else 0
    if not D or w.dtype != x.dtype or not _pointwise_ok(x, x.numel() // D):
        return None
    return torch.ops.groupgen.rms_norm(x.contiguous(), w.contiguous(), float(eps))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``layers.apply_rope`` for x [B, T, H, D] in one pass (B*T at most ``POINTWISE_MAX_ROWS``), or
    None where it does not apply."""
    if x.dim() != 4 or x.shape[-1] % 2 or not _pointwise_ok(x, x.shape[0] * x.shape[1]):
        return None
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        x = x.contiguous()
    return torch.ops.groupgen.rope(x, cos.float().contiguous(), sin.float().contiguous())


def swiglu(h: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(a) * b`` for ``h = [a | b]`` [..., 2H] in one pass (same roundings), or None where
    it does not apply (as ``rms_norm``)."""
    D = h.shape[-1] if h.dim() else 0
    if not D or D % 2 or not _pointwise_ok(h, h.numel() // D):
        return None
    return torch.ops.groupgen.swiglu(h.contiguous())


# ----------------------------------------------------------------------------------- training


# Largest transposed copy weight_grad makes at once (bytes). Copies above glibc's 32 MB mmap threshold
# come from fresh pages every time: GPT-B's output head, [2048, 16384] bf16 = 64 MB, spent ~25 ms in
# page faults per copy on this VM, so larger gradients go in equal column chunks below it.
WEIGHT_GRAD_CHUNK_BYTES = 16 << 20
# Weights smaller than this (N * K) keep autograd's product: at [768, 768] the copy costs more than
# the faster GEMM saves (bench/train_kernels.py: 0.90x).
WEIGHT_GRAD_MIN_NUMEL = 1 << 20


def weight_grad_supported(g: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``weight_grad`` applies to these operands: bf16 on the CPU, a weight of at least
    ``WEIGHT_GRAD_MIN_NUMEL`` elements, and AMX (the contiguous source is what oneDNN's AMX GEMM
    prefers; without AMX its AVX512-BF16 GEMM runs both forms alike and the copy costs 0-2%:
    ``bench/train_kernels.py`` 0.98-1.00x on GPT-B's linears)."""
    return (g.dtype == x.dtype == torch.bfloat16 and g.device.type == x.device.type == "cpu"
            and g.shape[-1] * x.shape[-1] >= WEIGHT_GRAD_MIN_NUMEL and amx_bf16())


def weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g^T @ x for g [T, N] and x [T, K] (a linear layer's weight gradient, reducing over T tokens)
    as [N, K], computed as transpose(g) @ x (in equal column chunks of g for large N): oneDNN's AMX
    GEMM runs a contiguous source ~1.7x faster than the transposed one autograd's mm passes it."""
    T, N = g.shape
    x = x.contiguous()
    g = g if g.stride(1) == 1 else g.contiguous()
    chunks = max(1, -(-T * N * g.element_size() // WEIGHT_GRAD_CHUNK_BYTES))
    if chunks == 1:
        return torch.ops.groupgen.transpose2d(g) @ x
    step = -(-N // chunks)
    dw = torch.empty(N, x.shape[1], dtype=x.dtype)
    for n0 in range(0, N, step):
        n1 = min(n0 + step, N)
        torch.mm(torch.ops.groupgen.transpose2d(g[:, n0:n1]), x, out=dw[n0:n1])
    return dw
