"""groupgen's AVX-512 / AMX decode kernels (ar_model/cpu/csrc/cpu_decode*.cpp): the fp32 and bf16 GEMMs (both bf16
paths: AMX and AVX-512F) and the decode attention against fp64 references, the top-k selection against
torch.topk, their use by Linear, Attention.step and the sampler, and the fallback when unbuilt."""
import os

import pytest
import torch
import torch.nn.functional as F

from ar_model import GPT, gpt_config
from ar_model.cpu import kernels as cpu_kernels
from ar_model.cpu import nn_ops
from ar_model.cpu.nn_ops import _PACKED
from ar_model.layers import Linear
from groupgen.layout import TokenLayout

# Tests that run the kernels skip where they are not built (no AVX-512F or compiler, or
# GROUPGEN_CPU_KERNELS=0); routing tests simulate each CPU kind instead (``simulated_cpu``).
needs_kernels = pytest.mark.usefixtures("kernels_built")


def _amx_here() -> bool:
    return cpu_kernels.amx_bf16()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def no_kernels(cpu_kernel_path):
    """As on a machine where the kernels could not be built."""
    cpu_kernel_path(False)


@pytest.mark.skipif(os.environ.get("GROUPGEN_CPU_KERNELS", "1") == "0", reason="kernels turned off")
def test_kernels_build_on_an_avx512_cpu():
    if not cpu_kernels._read_cpu_profile().avx512f:
        assert cpu_kernels.kernels() is None and "AVX-512F" in cpu_kernels.unavailable_reason()
        return
    assert cpu_kernels.kernels() is not None, cpu_kernels.unavailable_reason()
    assert cpu_kernels.unavailable_reason() == ""


@needs_kernels
@pytest.mark.parametrize("n,k", [(80, 48), (37, 33), (16, 768)])
def test_linear_kernel_equals_fp64_reference(n, k):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    packed = cpu_kernels.pack(w)
    assert packed.shape == ((n + 15) // 16, k, 16)
    for m in (1, 3, 16, 17, 40):                      # row tiles of 16 plus remainders
        x = torch.randn(m, k, generator=g)
        for bias in (None, b):
            y = cpu_kernels.linear(x, packed, bias, n)
            ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert _rel(y, ref) < 2e-6


@needs_kernels
def test_kernels_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(200, 64, generator=g), torch.randn(16, 64, generator=g)
    q, kc, vc = torch.randn(4, 6, 1, 32, generator=g), torch.randn(4, 3, 30, 32, generator=g), torch.randn(4, 3, 30, 32, generator=g)
    packed = cpu_kernels.pack(w)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append((cpu_kernels.linear(x, packed, None, 200), cpu_kernels.attention(q, kc, vc, 25),
                         *cpu_kernels.topk(torch.randn(64, 2048, generator=torch.Generator().manual_seed(2)), 300)))
            wb = torch.randn(1000, 768, generator=torch.Generator().manual_seed(3)).bfloat16()
            xb = x.bfloat16().repeat(1, 12)
            outs[-1] += (torch.ops.groupgen.linear_bf16_fma(xb, cpu_kernels.pack(wb), None, 1000),)
            if _amx_here():
                outs[-1] += (cpu_kernels.linear(xb, cpu_kernels.pack(wb), None, 1000),)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@needs_kernels
def test_linear_kernel_rejects_mismatched_shapes():
    packed = cpu_kernels.pack(torch.randn(32, 16))
    with pytest.raises(RuntimeError, match="does not fit"):
        cpu_kernels.linear(torch.randn(4, 17), packed, None, 32)
    with pytest.raises(RuntimeError, match="does not fit"):
        cpu_kernels.linear(torch.randn(4, 16), packed, None, 40)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_kernels.linear(torch.randn(4, 16), packed, torch.randn(31), 32)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,h,hk", [(64, 12, 12), (16, 4, 2), (128, 2, 1), (32, 3, 3)])
def test_decode_attention_equals_sdpa(dtype, d, h, hk):
    g = torch.Generator().manual_seed(d + h)
    B, T = 3, 41
    q = torch.randn(B, h, 1, d, generator=g).to(dtype)
    kc, vc = (torch.randn(B, hk, T, d, generator=g).to(dtype) for _ in range(2))
    for n in (1, 2, 17, 40, T):                       # n = 1: the output is V's first row
        o = cpu_kernels.attention(q, kc, vc, n)
        assert o.shape == q.shape and o.dtype == dtype
        k, v = (c[:, :, :n].double().repeat_interleave(h // hk, 1) for c in (kc, vc))
        ref = F.scaled_dot_product_attention(q.double(), k, v)
        if dtype == torch.float32:
            assert _rel(o, ref) < 1e-6
        else:   # bf16 in and out: within 2x of SDPA's own bf16 error (and SDPA needs the same GQA repeat)
            sdpa = F.scaled_dot_product_attention(q, k.to(dtype), v.to(dtype))
            assert _rel(o, ref) <= 2 * max(_rel(sdpa, ref), 4e-3)
        if n == 1:
            assert torch.allclose(o.float(), vc[:, :, :1].float().repeat_interleave(h // hk, 1), atol=1e-2 if dtype != torch.float32 else 1e-7)



@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rising", [True, False])
def test_decode_attention_online_softmax_survives_large_and_shifting_scores(dtype, rising):
    """The kernel keeps a running max over blocks of 16 positions: scores that grow block after block
    (each block rescales what came before) or fall (the first block holds the max), at magnitudes
    where exp without the max would overflow, still give SDPA's result; rows past the prefix are NaN
    and must not be read."""
    g = torch.Generator().manual_seed(7)
    B, H, T, D = 2, 3, 70, 64
    q = torch.randn(B, H, 1, D, generator=g)
    ramp = torch.linspace(0, 1, T) if rising else torch.linspace(1, 0, T)
    k = torch.randn(B, H, T, D, generator=g) * 0.1 + 30 * ramp[:, None] * q[:, :, 0, None, :] / q.norm(dim=-1, keepdim=True)
    v = torch.randn(B, H, T, D, generator=g)
    for n in (16, 33, 69):
        kc, vc = (c.clone().to(dtype) for c in (k, v))
        kc[:, :, n:], vc[:, :, n:] = float("nan"), float("nan")
        o = cpu_kernels.attention(q.to(dtype), kc, vc, n)
        ref = F.scaled_dot_product_attention(q.double(), kc[:, :, :n].double(), vc[:, :, :n].double())
        assert torch.isfinite(o).all()
        assert _rel(o, ref) < (1e-6 if dtype == torch.float32 else 8e-3)

@needs_kernels
def test_decode_attention_leaves_unsupported_cases_to_sdpa():
    q, kc = torch.randn(2, 2, 1, 24), torch.randn(2, 2, 9, 24)
    assert cpu_kernels.attention(q, kc, kc, 5) is None                     # head_dim 24
    q, kc = torch.randn(2, 2, 1, 16).half(), torch.randn(2, 2, 9, 16).half()
    assert cpu_kernels.attention(q, kc, kc, 5) is None                     # fp16
    kc = torch.randn(2, 9, 2, 16).transpose(1, 2)
    assert cpu_kernels.attention(q.float(), kc, kc, 5) is None             # strided cache
    with pytest.raises(RuntimeError, match="outside"):
        cpu_kernels.attention(q.float(), kc.contiguous(), kc.contiguous(), 10)


def _bf16_linear(path: str):
    """The bf16 decode GEMM by path: "amx" (skipped where AMX is not allowed) or "fma" (AVX-512F, the
    path of CPUs without AMX, run explicitly so AMX machines test it too)."""
    if path == "amx":
        if not _amx_here():
            pytest.skip("no AMX-BF16 here (CPU, OS permission or no kernels)")
        return cpu_kernels.linear
    return lambda x, packed, bias, n: torch.ops.groupgen.linear_bf16_fma(x.contiguous(), packed, bias, n)


@needs_kernels
@pytest.mark.parametrize("path", ["amx", "fma"])
@pytest.mark.parametrize("n,k", [(80, 48), (37, 33), (2048, 256), (16, 768)])
def test_bf16_linear_matches_fp64_like_onednn(path, n, k):
    linear = _bf16_linear(path)
    g = torch.Generator().manual_seed(n + k)
    w, b = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    packed = cpu_kernels.pack(w)
    assert packed.shape == ((n + 15) // 16, (k + 31) // 32, 16, 16, 2) and packed.dtype == torch.bfloat16
    for m in (1, 2, 5, 8, 9, 16, 17, 32):             # one or two row tiles, partial ones
        x = torch.randn(m, k, generator=g).bfloat16()
        for bias in (None, b):
            y = linear(x, packed, bias, n)
            ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            assert y.shape == (m, n) and y.dtype == torch.bfloat16
            # fp32 accumulation, one rounding to bf16: as accurate as PyTorch's own bf16 linear
            assert _rel(y, ref) <= 1.1 * _rel(F.linear(x, w, bias), ref) + 1e-4


@needs_kernels
@pytest.mark.parametrize("path", ["amx", "fma"])
def test_bf16_linear_errors_and_leaves_onednn_intact(path):
    linear = _bf16_linear(path)
    w = torch.randn(64, 96).bfloat16()
    packed = cpu_kernels.pack(w)
    with pytest.raises(RuntimeError, match="M <= 32"):
        linear(torch.randn(33, 96).bfloat16(), packed, None, 64)
    with pytest.raises(RuntimeError, match="does not fit"):
        linear(torch.randn(4, 128).bfloat16(), packed, None, 64)
    with pytest.raises(RuntimeError, match="does not fit"):
        linear(torch.randn(4, 96).bfloat16(), packed, None, 90)
    with pytest.raises(RuntimeError, match="bias"):
        linear(torch.randn(4, 96).bfloat16(), packed, torch.zeros(63).bfloat16(), 64)
    # oneDNN configures the AMX tiles itself: its results are the same after our kernel ran
    from ar_model.cpu.nn_ops import _pack_weight, _packed_mm
    x = torch.randn(16, 96).bfloat16()
    onednn = _pack_weight(w, 16)
    if onednn is None:
        pytest.skip("no oneDNN packed linear in this PyTorch build")
    before = _packed_mm(x, onednn, w, None, 16)
    ours = linear(x, packed, None, 64)
    after = _packed_mm(x, onednn, w, None, 16)
    assert torch.equal(before, after) and _rel(ours, F.linear(x.double(), w.double())) < 4e-3


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [768, 64, 40])
def test_pointwise_rms_norm_equals_the_pytorch_formulation(dtype, D):
    from ar_model.layers import RMSNorm
    g = torch.Generator().manual_seed(D)
    norm = RMSNorm(D, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g) * 0.5 + 1)
    for shape in [(1, D), (16, 1, D), (3, 7, D)]:
        x = (torch.randn(*shape, generator=g) * 3).to(dtype)
        with torch.no_grad():
            y = cpu_kernels.rms_norm(x, norm.weight, norm.eps)
            y_layer = norm(x)
        assert y is not None and y.dtype == dtype and y.shape == x.shape
        assert torch.equal(y, y_layer)                                   # the layer takes the kernel
        xf = x.float()                                                   # the PyTorch formulation
        want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype) * norm.weight
        tol = 1e-6 if dtype == torch.float32 else 8e-3                   # bf16: one rounding may differ
        assert ((y.float() - want.float()).abs() <= tol * want.float().abs().clamp_min(1)).all()
        if dtype == torch.bfloat16:                                      # rounding flips are rare
            assert (y != want).float().mean().item() < 1e-3
    assert cpu_kernels.rms_norm(torch.randn(65, D).to(dtype), norm.weight, 1e-5) is None   # not decode-sized
    assert cpu_kernels.rms_norm(torch.randn(2, D).to(dtype).requires_grad_(), norm.weight, 1e-5) is None


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 16, 24, 128])
def test_pointwise_rope_equals_apply_rope(dtype, D):
    from ar_model.layers import apply_rope, rope_angles_1d
    g = torch.Generator().manual_seed(D)
    ang = rope_angles_1d(40, D, 10000.0)
    for B, T, H in [(16, 1, 24), (3, 2, 5)]:
        qkv = torch.randn(B, T, 3 * H, D, generator=g).to(dtype)
        qk = qkv[:, :, : 2 * H]                                          # strided rows, as in Attention
        cos, sin = torch.cos(ang[7 : 7 + T]).float(), torch.sin(ang[7 : 7 + T]).float()
        with torch.no_grad():
            y = cpu_kernels.rope(qk, cos, sin)
            want = apply_rope(qk, cos, sin)
        assert y is not None and y.shape == want.shape and y.dtype == dtype
        if dtype == torch.float32:
            assert (y - want).abs().max().item() < 1e-5
        else:                                                            # same fp32 math, one rounding
            assert ((y.float() - want.float()).abs() <= 8e-3 * want.float().abs().clamp_min(1e-2)).all()
            assert (y != want).float().mean().item() < 1e-3
    with torch.no_grad(), pytest.raises(RuntimeError, match="tables"):
        cpu_kernels.rope(torch.randn(1, 2, 3, D), torch.randn(1, D // 2), torch.randn(1, D // 2))
    assert cpu_kernels.rope(torch.randn(1, 2, 3, D), cos, sin) is None      # autograd on: PyTorch's ops


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [2048, 704, 19])
def test_pointwise_swiglu_equals_silu_times_up(dtype, H):
    g = torch.Generator().manual_seed(H)
    h = (torch.randn(16, 1, 2 * H, generator=g) * 4).to(dtype)
    h[0, 0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])                   # saturated and zero gates
    with torch.no_grad():
        y = cpu_kernels.swiglu(h)
    a, b = h.split(H, -1)
    want = F.silu(a) * b
    assert y is not None and y.shape == want.shape and y.dtype == dtype
    err = (y.float() - want.float()).abs() / want.float().abs().clamp_min(1e-3)
    assert err.max().item() < (2e-6 if dtype == torch.float32 else 8e-3)
    if dtype == torch.bfloat16:   # rounding flips are rare (row 0: e^-x clamped at e^88 for x = -100)
        assert (y[1:] != want[1:]).float().mean().item() < 1e-3


def _check_topk(x: torch.Tensor, k: int, vals: torch.Tensor, idx: torch.Tensor) -> None:
    ref_vals = torch.topk(x, k).values
    assert vals.shape == idx.shape == (x.shape[0], k) and idx.dtype == torch.long
    assert torch.equal(vals.sort(-1).values, ref_vals.sort(-1).values)       # the k largest values
    assert torch.equal(vals, x.gather(-1, idx))
    assert bool((idx[:, 1:] > idx[:, :-1]).all())                             # in index order
    for r in range(x.shape[0]):                                               # ties: lowest indices
        thr = vals[r].min()
        taken = idx[r][vals[r] == thr]
        assert torch.equal(taken, (x[r] == thr).nonzero().flatten()[: len(taken)])


@needs_kernels
@pytest.mark.parametrize("K,k", [(2048, 256), (16384, 2000), (37, 5), (16, 16), (1000, 1), (33, 32)])
def test_topk_kernel_selects_the_k_largest_in_index_order(K, k):
    g = torch.Generator().manual_seed(K + k)
    for x in (torch.randn(5, K, generator=g) * 3,
              torch.randn(5, K, generator=g).bfloat16().float(),         # bf16 logits: many ties
              torch.randint(-2, 3, (5, K), generator=g).float(),         # mostly ties
              -torch.rand(5, K, generator=g)):                           # all negative
        vals, idx = cpu_kernels.topk(x, k)
        _check_topk(x, k, vals, idx)
    x = torch.randn(2, 3, K, generator=g).bfloat16()                     # leading dims and bf16 in
    vals, idx = cpu_kernels.topk(x, k)
    assert vals.shape == (2, 3, k) and vals.dtype == torch.bfloat16
    _check_topk(x.float().reshape(6, K), k, vals.float().reshape(6, k), idx.reshape(6, k))


@needs_kernels
def test_topk_kernel_errors_and_unsupported_cases():
    x = torch.randn(3, 50)
    x[1, 7] = float("nan")
    with pytest.raises(RuntimeError, match="row 1 of the logits contains NaN"):
        cpu_kernels.topk(x, 4)
    with pytest.raises(RuntimeError, match="outside 1..50"):
        cpu_kernels.topk(torch.randn(3, 50), 51)
    assert cpu_kernels.topk(torch.randn(3, 50).half(), 4) is None


def test_topk_is_none_without_kernels(no_kernels):
    assert cpu_kernels.topk(torch.randn(3, 50), 4) is None


@needs_kernels
def test_linear_takes_the_kernel_up_to_its_row_limit():
    lin = Linear(48, 80, bias=True)
    with torch.no_grad():
        for rows, kernel in [(16, True), (nn_ops.KERNEL_MAX_ROWS, True), (nn_ops.KERNEL_MAX_ROWS + 1, False)]:
            x = torch.randn(rows, 48)
            y = lin(x)
            assert (_PACKED[lin][0][3] == "kernel") == kernel
            assert _rel(y, F.linear(x.double(), lin.weight.double(), lin.bias.double())) < 2e-6
    assert nn_ops.linear_path(torch.bfloat16, 1) == ("kernel" if _amx_here() else None)   # oneDNN's GEMV wins without AMX
    bf16_kernel = "kernel" if cpu_kernels.linear_supports(torch.bfloat16) else "packed"
    assert nn_ops.linear_path(torch.bfloat16, 2) == nn_ops.linear_path(torch.bfloat16, 16) == bf16_kernel
    assert nn_ops.linear_path(torch.bfloat16, 33) == "packed" and nn_ops.linear_path(torch.float32, 2) is None


# Routing on each CPU kind README names: (kernels built, AMX, bf16 FMA path preferred, bf16 kernel from
# rows, paths of a bf16 linear at 1 / 2 / 16 / 33 rows, of an fp32 one at 2 / 16 rows, bf16 weight
# gradient on the kernel). Without AMX, oneDNN's single-row bf16 GEMV beats the FMA path; AMD's fast
# vdpbf16ps keeps oneDNN for bf16 until the FMA path is measured there; fp32 takes the kernel from 4
# rows wherever it is built; nothing above KERNEL_MAX_ROWS.
ROUTES = {
    "intel_amx": (True, True, True, 1, ("kernel", "kernel", "kernel", "packed"), (None, "kernel"), True),
    "intel_avx512": (True, False, True, 2, (None, "kernel", "kernel", "packed"), (None, "kernel"), False),
    "amd_zen4": (True, False, False, None, (None, "packed", "packed", "packed"), (None, "kernel"), False),
    "no_avx512": (False, False, None, None, (None, "packed", "packed", "packed"), (None, "packed"), False),
}


@pytest.mark.parametrize("kind", sorted(ROUTES))
def test_routing_on_each_cpu_kind(kind, simulated_cpu, monkeypatch):
    """Decided from the simulated CPU's vendor and flags, whatever CPU runs the test (the kernels'
    build stands in as a placeholder: routing never calls them here)."""
    built, amx, fma, bf16_from, bf16_paths, fp32_paths, wgrad = ROUTES[kind]
    monkeypatch.delenv("GROUPGEN_CPU_KERNELS", raising=False)   # the CPU decides, not the switch
    simulated_cpu(kind)
    if built:
        monkeypatch.setattr(cpu_kernels, "kernels", lambda: object())
    else:
        assert cpu_kernels.kernels() is None and cpu_kernels.unavailable_reason() == "this CPU has no AVX-512F"
    assert cpu_kernels.amx_bf16() == amx
    if fma is not None:
        assert cpu_kernels.bf16_fma_preferred() == fma
    assert cpu_kernels.linear_min_rows(torch.bfloat16) == bf16_from
    assert cpu_kernels.linear_min_rows(torch.float32) == (4 if built else None)
    assert cpu_kernels.linear_min_rows(torch.float16) is None
    assert tuple(nn_ops.linear_path(torch.bfloat16, r) for r in (1, 2, 16, nn_ops.KERNEL_MAX_ROWS + 1)) == bf16_paths
    assert tuple(nn_ops.linear_path(torch.float32, r) for r in (2, 16)) == fp32_paths
    g = torch.zeros(4, 1024, dtype=torch.bfloat16)
    assert cpu_kernels.weight_grad_supported(g, g) == wgrad
    if not built:   # every entry point keeps PyTorch's op
        assert cpu_kernels.topk(torch.randn(2, 50), 4) is None
        assert cpu_kernels.attention(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), 2) is None


def test_simulated_cpu_returns_to_this_machine(simulated_cpu):
    real = cpu_kernels._read_cpu_profile()
    simulated_cpu("no_avx512")
    assert cpu_kernels.cpu_profile() == cpu_kernels.CPU_KINDS["no_avx512"] and cpu_kernels.kernels() is None
    simulated_cpu(None)
    assert cpu_kernels.cpu_profile() == real


def test_no_kernel_rows_without_kernels(no_kernels):
    assert all(cpu_kernels.linear_min_rows(d) is None for d in (torch.float32, torch.bfloat16))
    assert nn_ops.linear_path(torch.bfloat16, 16) == "packed" and nn_ops.linear_path(torch.float32, 16) == "packed"


def _decode_logits(m: GPT, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    out = []
    with torch.no_grad():
        m.init_cache(labels.shape[0])
        h = m.prefill(labels)
        for pos in range(codes.shape[1]):
            out.append(torch.cat(m.head_logits(h, codes[:, pos]), -1))
            h = m.decode(codes[:, pos], pos)
        m.clear_cache()
    return torch.stack(out, 1)


@needs_kernels
@pytest.mark.parametrize("extra", [{}, dict(n_kv_head=2)])
def test_gpt_decoding_with_kernels_equals_pytorch_ops(extra, count_taken, cpu_kernel_path):
    lay = TokenLayout("grid", 9, (7, 5), 3, 3)
    cfg = gpt_config("micro", dim=64, n_head=4, n_layer=2, **extra)
    torch.manual_seed(0)
    m = GPT(cfg, lay, 3).eval()
    with torch.no_grad():                                           # the heads start at zero
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 1, 1])                 # 8 rows: inside the kernel's range
    codes = torch.stack([torch.randint(0, k, (8, lay.L)) for k in lay.K], -1)
    calls = count_taken(cpu_kernels, ["linear", "attention", "rms_norm", "rope", "swiglu"])
    with_kernels = _decode_logits(m, labels, codes)
    assert calls["linear"] > 0 and calls["attention"] == cfg.n_layer * (lay.L + 1)   # prefill + L steps
    assert calls["rope"] == calls["swiglu"] == calls["attention"]
    assert calls["rms_norm"] == (2 * cfg.n_layer + 1) * (lay.L + 1)
    with torch.no_grad():
        full = torch.cat(m(codes, labels), -1)
    cpu_kernel_path(False)
    without = _decode_logits(m, labels, codes)
    assert (with_kernels - without).abs().max().item() < 1e-5
    assert (with_kernels - full).abs().max().item() < 1e-5


@needs_kernels
def test_bf16_gpt_decoding_with_the_kernel_is_as_accurate_as_onednn(monkeypatch, cpu_kernel_path, simulated_cpu):
    """The bf16 decode GEMM (AMX where allowed, else AVX-512F) against oneDNN, in a whole model."""
    lay = TokenLayout("grid", 9, (7, 5), 3, 3)
    cfg = gpt_config("micro", dim=64, n_head=4, n_layer=2)
    torch.manual_seed(0)
    m = GPT(cfg, lay, 3).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
            p.copy_(p.bfloat16().float())                               # the same weights in both dtypes
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 1, 1])
    codes = torch.stack([torch.randint(0, k, (8, lay.L)) for k in lay.K], -1)
    ref = _decode_logits(m, labels, codes).double()                      # fp32 model: the reference
    if not cpu_kernels.linear_supports(torch.bfloat16):
        simulated_cpu("intel_avx512")   # e.g. AMD: route bf16 to the AVX-512F kernel as Intel would
    mb = m.to(torch.bfloat16)
    calls = {"bf16": 0}
    def counted(x, *a, _f=cpu_kernels.linear):
        calls["bf16"] += x.dtype == torch.bfloat16
        return _f(x, *a)
    monkeypatch.setattr(cpu_kernels, "linear", counted)
    ours = _decode_logits(mb, labels, codes)
    assert calls["bf16"] > 0
    cpu_kernel_path(False)
    onednn = _decode_logits(mb, labels, codes)
    err = lambda a: ((a.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(ours) <= 1.25 * err(onednn) + 1e-3, (err(ours), err(onednn))


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(cpu_kernels, "_state", {"tried": False, "ext": None, "why": ""})
    monkeypatch.setattr(cpu_kernels, "_build", broken)
    monkeypatch.setattr(cpu_kernels, "_read_cpu_profile", lambda: cpu_kernels.CPU_KINDS["amd_zen4"])
    monkeypatch.setitem(cpu_kernels._state, "profile", cpu_kernels.CPU_KINDS["amd_zen4"])
    monkeypatch.delenv("GROUPGEN_CPU_KERNELS", raising=False)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert cpu_kernels.kernels() is None
    assert "no compiler here" in cpu_kernels.unavailable_reason()
    lin = Linear(48, 80)
    with torch.no_grad():
        x = torch.randn(16, 48)
        y = lin(x)                                                   # MKL's packed path (or F.linear)
    assert _rel(y, F.linear(x.double(), lin.weight.double(), lin.bias.double())) < 2e-6
    assert lin not in _PACKED or _PACKED[lin][0][3] == 16


def test_kernels_can_be_turned_off(monkeypatch, no_kernels):
    monkeypatch.setattr(cpu_kernels, "_state", {"tried": False, "ext": None, "why": ""})
    monkeypatch.setenv("GROUPGEN_CPU_KERNELS", "0")
    assert cpu_kernels.kernels() is None
    assert "GROUPGEN_CPU_KERNELS" in cpu_kernels.unavailable_reason()
    assert cpu_kernels.attention(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), 2) is None


@pytest.mark.parametrize("kind,fast", [("intel_amx", True), ("intel_avx512", False), ("amd_zen4", True),
                                       ("no_avx512", False)])
def test_train_precision_fast_picks_bf16_only_where_the_cpu_multiplies_it_faster(kind, fast, simulated_cpu,
                                                                                 monkeypatch):
    """``train.precision=fast`` trains in bf16 with AMX or AMD's AVX512-BF16 (1.39x fp32's tokens/s
    measured on Zen 4) and in fp32 elsewhere; ``auto`` stays fp32 on every CPU; a GPU always takes bf16."""
    from ar_model.cpu import dispatch
    from ar_model.train import use_bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    simulated_cpu(kind)
    assert use_bf16("fast") == fast
    assert (use_bf16("auto"), use_bf16("fp32"), use_bf16("bf16")) == (False, False, True)
    assert dispatch.bf16_trains_faster(torch.device("cuda"))
