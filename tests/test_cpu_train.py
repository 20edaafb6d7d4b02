"""groupgen's CPU training kernels (ar_model/cpu/csrc/cpu_train.cpp via ar_model/cpu/train_ops.py): the bf16
transpose and weight gradient, and the RMSNorm / RoPE / SwiGLU forward and backward passes, each
against the PyTorch formulation in ar_model/layers.py (autograd's gradients, fp64 references);
their use by a GPT training step, thread-count invariance, and the fallback when unbuilt."""
import pytest
import torch
import torch.nn.functional as F

from ar_model import GPT, gpt_config
from ar_model.cpu import kernels as cpu_kernels, train_ops as cpu_train_ops
from ar_model.layers import Linear, RMSNorm, apply_rope
from groupgen.layout import TokenLayout

pytestmark = pytest.mark.usefixtures("kernels_built")   # skipped where the kernels are not built
BF16_ULP = 2.0 ** -8   # relative spacing of bf16 values (8 significant bits)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _bf16_close(a: torch.Tensor, ref: torch.Tensor, ulps: float = 1.0) -> None:
    """a and ref (both bf16-rounded results) differ by at most ``ulps`` bf16 steps of |ref|."""
    a, ref = a.double(), ref.double()
    assert ((a - ref).abs() <= ulps * BF16_ULP * ref.abs() + 1e-30).all(), (a - ref).abs().max()


@pytest.mark.parametrize("shape", [(64, 32), (2048, 768), (300, 70), (33, 1), (1, 40)])
def test_transpose2d_equals_torch(shape):
    x = torch.randn(*shape).bfloat16()
    assert torch.equal(torch.ops.groupgen.transpose2d(x), x.t().contiguous())


def test_transpose2d_takes_strided_rows_and_rejects_other_layouts():
    x = torch.randn(100, 300).bfloat16()
    cols = x[:, 37:250]                                        # row stride 300, rows contiguous
    assert torch.equal(torch.ops.groupgen.transpose2d(cols), cols.t().contiguous())
    with pytest.raises(RuntimeError, match="2-byte elements"):
        torch.ops.groupgen.transpose2d(torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        torch.ops.groupgen.transpose2d(x.t())


@pytest.mark.parametrize("T,N,K", [(512, 96, 64), (300, 2100, 40), (256, 4096, 48), (2048, 4200, 256)])   # 4200: two chunks
def test_weight_grad_equals_fp64_within_bf16_rounding(T, N, K):
    g, x = torch.randn(T, N).bfloat16(), torch.randn(T, K).bfloat16()
    dw = cpu_kernels.weight_grad(g, x)
    ref = g.double().t() @ x.double()
    assert dw.shape == (N, K) and dw.dtype == torch.bfloat16
    assert _rel(dw, ref) < 0.6 * BF16_ULP                         # one rounding of fp32 sums
    assert _rel(dw, ref) <= 1.05 * _rel(g.t() @ x, ref) + 1e-4    # as accurate as autograd's product


@pytest.mark.parametrize("bias", [False, True])
def test_linear_bf16_training_path_matches_autograd(bias, monkeypatch):
    min_rows, min_numel = cpu_train_ops.MIN_ROWS, cpu_kernels.WEIGHT_GRAD_MIN_NUMEL
    monkeypatch.setattr(cpu_kernels, "WEIGHT_GRAD_MIN_NUMEL", 0)      # this small weight takes the kernel too
    monkeypatch.setattr(cpu_kernels, "amx_bf16", lambda: True)         # as on an AMX machine (the kernel runs anywhere)
    calls = []
    monkeypatch.setattr(cpu_kernels, "weight_grad", lambda g, x, _f=cpu_kernels.weight_grad: calls.append(1) or _f(g, x))
    torch.manual_seed(0)
    lin = Linear(96, 160, bias=bias)
    x = torch.randn(4, 128, 96, requires_grad=True)
    g = torch.randn(4, 128, 160).bfloat16()
    out = {}
    for mode, rows in (("kernel", min_rows), ("autograd", 10 ** 9)):
        monkeypatch.setattr(cpu_train_ops, "MIN_ROWS", rows)
        x.grad = None
        lin.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(x)
        y.backward(g)
        out[mode] = (y.detach(), x.grad, lin.weight.grad, lin.bias.grad if bias else None)
    (yk, dxk, dwk, dbk), (ya, dxa, dwa, dba) = out["kernel"], out["autograd"]
    assert yk.dtype == torch.bfloat16 and torch.equal(yk, ya)      # same forward GEMM
    assert dxk.dtype == torch.float32 and torch.equal(dxk, dxa)    # same input-gradient GEMM
    ref = g.double().reshape(-1, 160).t() @ x.detach().bfloat16().double().reshape(-1, 96)
    assert dwk.dtype == torch.float32 and _rel(dwk, ref) <= 1.05 * _rel(dwa, ref) + 1e-4
    if bias:
        assert _rel(dbk, dba) < 1e-2
    assert len(calls) == 1
    monkeypatch.setattr(cpu_train_ops, "MIN_ROWS", min_rows)         # defaults again, weight_grad still counted
    monkeypatch.setattr(cpu_kernels, "WEIGHT_GRAD_MIN_NUMEL", min_numel)
    lin.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    y.backward(g)
    assert torch.equal(lin.weight.grad, dwa) and len(calls) == 1   # small weights: autograd's product


@pytest.mark.parametrize("autocast", [False, True])
def test_rms_norm_training_kernel_matches_the_pytorch_formulation(autocast):
    torch.manual_seed(0)
    norm = RMSNorm(80)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = (3 * torch.randn(3, 100, 80)).requires_grad_()
    dy = torch.randn(3, 100, 80)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * w64
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = norm(x)
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    if autocast:
        _bf16_close(y, y64.bfloat16(), ulps=1)
        dy = dy.bfloat16()
    else:
        assert _rel(y, y64) < 1e-6
    y.backward(dy)
    y64.backward(dy.double())
    assert _rel(x.grad, x64.grad) < 1e-5 and _rel(norm.weight.grad, w64.grad) < 1e-5


def test_rope_training_kernel_matches_apply_rope_and_its_gradient():
    torch.manual_seed(0)
    ang = torch.rand(64, 16) * 6
    cos, sin = ang.cos(), ang.sin()
    qkv = torch.randn(4, 64, 9, 32).bfloat16().requires_grad_()
    qk = qkv[:, :, :6]                                          # strided rows, as in Attention._qkv
    g = torch.randn(4, 64, 6, 32).bfloat16()
    y = cpu_train_ops.rope(qk, cos, sin)
    assert y is not None
    y.backward(g)
    dk = qkv.grad.clone()
    qkv.grad = None
    ref = apply_rope(qkv[:, :, :6], cos, sin)
    ref.backward(g)
    _bf16_close(y, ref, ulps=1)
    assert _rel(dk, qkv.grad) < 1e-3 and dk[:, :, 6:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_training_kernel_matches_silu_times_up(dtype):
    torch.manual_seed(0)
    h = (2 * torch.randn(2, 200, 2 * 48)).to(dtype).requires_grad_()
    g = torch.randn(2, 200, 48).to(dtype)
    y = cpu_train_ops.swiglu(h)
    y.backward(g)
    dh = h.grad.clone()
    h.grad = None
    a, b = h.split(48, -1)
    ref = F.silu(a) * b
    ref.backward(g)
    if dtype == torch.float32:
        assert _rel(y, ref) < 1e-6 and _rel(dh, h.grad) < 1e-6
    else:
        _bf16_close(y, ref, ulps=1)
        assert _rel(dh, h.grad) < 2e-3


def test_rms_norm_backward_does_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    x, w, dy = torch.randn(1000, 96), torch.randn(96), torch.randn(1000, 96).bfloat16()
    _, rstd = torch.ops.groupgen.rms_norm_train(x, w, 1e-5, True)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.groupgen.rms_norm_backward(dy, x, w, rstd))
    finally:
        torch.set_num_threads(before)
    for dx, dw in outs[1:]:
        assert torch.equal(dx, outs[0][0]) and torch.equal(dw, outs[0][1])


def _micro_gpt():
    lay = TokenLayout("grid", 64, (40, 24), 8, 8)
    torch.manual_seed(0)
    m = GPT(gpt_config("micro", dim=64, n_head=4, n_layer=2, dropout=0.0, token_dropout=0.0,
                       class_dropout=0.0), lay, 5).train()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    codes = torch.stack([torch.randint(0, k, (8, lay.L)) for k in lay.K], -1)
    return m, codes, torch.arange(8) % 5


@pytest.mark.parametrize("autocast", [False, True])
def test_gpt_training_step_with_kernels_matches_pytorch_ops(autocast, monkeypatch, count_taken):
    m, codes, labels = _micro_gpt()
    calls = count_taken(cpu_train_ops, ["linear", "rms_norm", "rope", "swiglu"])

    def step():
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = m.loss(codes, labels)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss_k, grads_k = step()
    n_layer = 2
    assert calls["rms_norm"] >= 2 * n_layer + 1 and calls["rope"] == calls["swiglu"] == n_layer
    assert calls["linear"] >= (4 * n_layer if autocast else 0) and (autocast or calls["linear"] == 0)
    monkeypatch.setattr(cpu_train_ops, "MIN_ROWS", 10 ** 9)
    loss_p, grads_p = step()
    assert abs(loss_k - loss_p) <= (2e-3 if autocast else 1e-5) * abs(loss_p)
    worst = max(_rel(grads_k[n], g) for n, g in grads_p.items())
    assert worst < (3e-2 if autocast else 1e-4), worst


def test_training_ops_stay_off_without_kernels_or_autograd(cpu_kernel_path):
    x = torch.randn(4, 100, 32)
    with torch.no_grad():
        assert cpu_train_ops.swiglu(x) is None                  # inference keeps the decode paths
    cpu_kernel_path(False)
    assert cpu_train_ops.swiglu(x.requires_grad_()) is None
    assert cpu_train_ops.rms_norm(x, torch.ones(32), 1e-5) is None
    assert cpu_train_ops.linear(x.bfloat16(), torch.randn(8, 32).bfloat16(), None) is None


# ------------------------------------------------------------------------------------------ dropout

_M0, _M1, _W0, _W1, _U32 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def _philox_ref(ctr, seed):
    """Philox4x32-10 in Python integers (Salmon et al., SC'11)."""
    c, k0, k1 = list(ctr), seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        p0, p1 = _M0 * c[0], _M1 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & _U32, (p0 >> 32) ^ c[3] ^ k1, p0 & _U32]
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return c


@pytest.mark.parametrize("ctr,seed,expected", [   # Random123's known-answer vectors for philox4x32_10
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((_U32,) * 4, (_U32 << 32) | _U32, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0x299F31D0 << 32) | 0xA4093822,
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_the_known_answers(ctr, seed, expected):
    signed = seed - (1 << 64) if seed >= 1 << 63 else seed
    out = torch.ops.groupgen.philox4x32_10_words(torch.tensor([ctr], dtype=torch.int64), signed)
    assert tuple(out[0].tolist()) == expected == tuple(_philox_ref(ctr, seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_kernel_mask_is_philox_of_the_element_index(dtype):
    """Element e = 128 c + 16 k + l keeps where 16 bits of Philox(16 c + l) are >= round(p * 65536),
    scaled by 1 / (1 - p) in fp32 and rounded once; a tail of 300 % 128 elements included."""
    n, p, seed = 300, 0.3, 0x1234_5678_9ABC
    x = torch.randn(n).to(dtype)
    y = torch.ops.groupgen.dropout_apply(x, seed, p)
    thr = round(p * 65536)
    keep = []
    for e in range(n):
        c, k, lane = e // 128, (e % 128) // 16, e % 16
        word = _philox_ref((16 * c + lane, 0, 0, 0), seed)[k // 2]
        keep.append(((word >> 16) if k % 2 else (word & 0xFFFF)) >= thr)
    keep = torch.tensor(keep)
    expected = torch.where(keep, (x.float() * torch.tensor(1 / (1 - p), dtype=torch.float32)).to(dtype),
                           torch.zeros((), dtype=dtype))
    assert y.dtype == dtype and torch.equal(y, expected)


def test_dropout_rate_independence_and_thread_count():
    x = torch.ones(3, 1_000_003)
    p = 0.1
    y = torch.ops.groupgen.dropout_apply(x, 7, p)
    m = (y != 0).float().flatten()
    assert abs(m.mean().item() - (1 - p)) < 0.002
    for lag in (1, 2, 16, 128):   # neighbours share no bits (other lane, other half, other counter)
        assert abs((m[:-lag] * m[lag:]).mean().item() - (1 - p) ** 2) < 0.003
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.groupgen.dropout_apply(x, 7, p)
        torch.set_num_threads(2)
        assert torch.equal(torch.ops.groupgen.dropout_apply(x, 7, p), one)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, y)
    assert not torch.equal(torch.ops.groupgen.dropout_apply(x, 8, p), y)   # another seed, another mask


def test_dropout_backward_regenerates_the_forward_mask(count_taken):
    calls = count_taken(cpu_train_ops, ["dropout"])
    from ar_model.layers import Dropout
    d = Dropout(0.25).train()
    x = (torch.rand(4, 257, 33) + 0.5).requires_grad_()        # no zeros: y == 0 marks a dropped element
    g = torch.randn(4, 257, 33)
    torch.manual_seed(3)
    y = d(x)
    y.backward(g)
    assert calls["dropout"] == 1
    kept = y.detach() != 0
    assert torch.equal(x.grad, torch.where(kept, g * torch.tensor(1 / 0.75), torch.zeros(())))
    torch.manual_seed(3)
    assert torch.equal(d(x), y)                                # the global generator drives the seed
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        torch.ops.groupgen.dropout_apply(torch.ones(3, dtype=torch.float64), 0, 0.1)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.groupgen.dropout_apply(torch.ones(3), 0, 1.0)
