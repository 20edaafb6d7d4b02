"""A fused CPU nearest-code search (``nearest_cpu.cpp``), built once on first use like
``ar_model.cpu_kernels`` (``torch.utils.cpp_extension``, cached under ``TORCH_EXTENSIONS_DIR``).

``Codebooks.nearest`` takes it for large codebooks (K >= 2048, K % 16 == 0, code dim <= 64, fp32 on
the CPU): the GEMM path writes and re-reads a 2048 x 16384 distance block every step at K 16384, ~30 ms
of a 0.08-0.2 s ``fmnist_vq`` step; the kernel keeps the running argmin in registers. Same codes up
to the rounding of the distance (summation order); ties go to the first index, as ``argmin``. Where
it cannot be built, or ``GROUPGEN_CPU_KERNELS=0``, ``nearest`` returns None and the caller keeps the
PyTorch path. ``argmin_last`` is that path's argmin (two vectorised passes instead of one scalar one).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("nearest_cpu.cpp")
MIN_K = 2048     # below this the GEMM path costs little
# AVX-512F only, named, not -march=native: a build cached on a shared home must run on every node
_CFLAGS = ["-O3", "-mavx512f", "-mfma", "-fopenmp"]
_state: dict = {"tried": False, "ext": None}


def _has_avx512f() -> bool:
    try:
        return platform.machine().lower() in ("x86_64", "amd64") and any(
            line.startswith("flags") and "avx512f" in line.split() for line in open("/proc/cpuinfo"))
    except OSError:
        return False


def _ext():
    if _state["tried"]:
        return _state["ext"]
    _state["tried"] = True
    if os.environ.get("GROUPGEN_CPU_KERNELS", "1").lower() in ("0", "false", "off", "no") or not _has_avx512f():
        return None
    try:
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            log.setLevel(level)
        digest = hashlib.sha256(SOURCE.read_bytes() + str(SOURCE.resolve()).encode() + " ".join(_CFLAGS).encode()
                                + torch.__version__.encode()).hexdigest()[:12]
        name = f"groupgen_nearest_{digest}"
        if not any(Path(cpp_extension.get_default_build_root()).glob(f"**/{name}/{name}.so")):
            print("groupgen: building the nearest-code kernel once (~30 s)", file=sys.stderr, flush=True)
        _state["ext"] = cpp_extension.load(name, [str(SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                                           verbose=False)
    except Exception as e:  # no compiler / ninja, or a failed build: keep the PyTorch path
        warnings.warn(f"groupgen: nearest-code kernel unavailable ({type(e).__name__}: {str(e)[-300:]}); "
                      "using the GEMM path", RuntimeWarning, stacklevel=2)
    return _state["ext"]


def applies(x: torch.Tensor, e: torch.Tensor) -> bool:
    K, d = e.shape[1], e.shape[2]
    return (x.is_cpu and e.is_cpu and x.dtype == torch.float32 and e.dtype == torch.float32 and K >= MIN_K
            and K % 16 == 0 and d <= 64)


@torch.no_grad()
def nearest(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor | None:
    """argmin_k |x - e_k|^2 for ``x [p, N, d]``, ``e [p, K, d]`` -> ``[p, N]`` long, or None."""
    if not applies(x, e) or _ext() is None:
        return None
    e2 = (e * e).sum(-1).contiguous()
    return _state["ext"].nearest(x.contiguous(), e.transpose(1, 2).contiguous(), e2)


def argmin_last(s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``s.argmin(-1)`` with the same result (the first index of the minimum) in two cheap passes:
    ``amin`` over blocks of ``block`` codes, then argmin over the block minima and inside the winning
    block. The CPU argmin over a long last dim is scalar (~1 ns an element, 28 ms a step at
    2048 x 16384) while amin is vectorised (~15x faster)."""
    K = s.shape[-1]
    if K < 4 * block or K % block or not s.is_cpu:
        return s.argmin(-1)
    v = s.reshape(*s.shape[:-1], K // block, block)
    b = v.amin(-1).argmin(-1)                       # first block holding the minimum
    inner = v.gather(-2, b[..., None, None].expand(*b.shape, 1, block)).squeeze(-2).argmin(-1)
    return b * block + inner
