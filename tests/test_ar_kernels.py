"""The CPU training fast paths: matmul causal attention and cross entropy (the kernel and the blocked
PyTorch formulation), against the reference PyTorch ops (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F

import ar_model.cpu.nn_ops as cpu_nn_ops
from ar_model import GPT, gpt_config
from ar_model.cpu import kernels as cpu_kernels
from ar_model.cpu.nn_ops import _MatmulCausalAttention
from ar_model.layers import causal_attention
from ar_model.loss import cross_entropy
from groupgen.layout import TokenLayout


def _qkv(dtype, shape=(2, 3, 17, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def _attn_and_grads(fn, q, k, v, go):
    for t in (q, k, v):
        t.grad = None
    o = fn(q, k, v)
    o.backward(go)
    return o.detach(), [t.grad.clone() for t in (q, k, v)]


def test_matmul_attention_equals_sdpa_in_fp64():
    q, k, v = _qkv(torch.float64)
    go = torch.randn_like(q)
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    o1, g1 = _attn_and_grads(_MatmulCausalAttention.apply, q, k, v, go)
    o2, g2 = _attn_and_grads(sdpa, q, k, v, go)
    assert torch.allclose(o1, o2, atol=1e-12)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12)
    # causality: the first query only sees the first key/value
    assert torch.allclose(o1[:, :, 0], v[:, :, 0].detach(), atol=1e-12)


def test_bf16_training_attention_is_as_accurate_as_sdpa():
    """``causal_attention`` takes the matmul path for bf16 with grad on the CPU; its error against
    an fp64 reference stays within 2x of SDPA's own bf16 error."""
    q, k, v = _qkv(torch.bfloat16, shape=(2, 4, 64, 16))
    go = torch.randn(q.shape).bfloat16()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref, g_ref = _attn_and_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                   q64, k64, v64, go.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    o_mm, g_mm = _attn_and_grads(causal_attention, q, k, v, go)
    o_sd, g_sd = _attn_and_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                 q, k, v, go)
    assert o_mm.grad_fn is None and o_mm.dtype == torch.bfloat16
    assert rel(o_mm, o_ref) < max(2 * rel(o_sd, o_ref), 4e-3)
    for a, b, r in zip(g_mm, g_sd, g_ref):
        assert rel(a, r) < max(2 * rel(b, r), 8e-3)


def test_causal_attention_dispatch():
    q, k, v = _qkv(torch.bfloat16)
    assert causal_attention(q, k, v).grad_fn.name().endswith("_MatmulCausalAttentionBackward")
    assert "MatmulCausal" not in causal_attention(q, k, v, dropout_p=0.1).grad_fn.name()
    with torch.no_grad():   # inference keeps SDPA (its forward is the faster one)
        assert torch.allclose(causal_attention(q, k, v).float(),
                              F.scaled_dot_product_attention(q, k, v, is_causal=True).float())
    q32, k32, v32 = _qkv(torch.float32)
    assert "MatmulCausal" not in causal_attention(q32, k32, v32).grad_fn.name()


@pytest.fixture(params=["kernel", "blocked"])
def ce_path(request, cpu_kernel_path):
    """Both CPU cross entropies: the kernel (where built) and the blocked PyTorch formulation."""
    cpu_kernel_path(request.param == "kernel")
    return request.param


@pytest.mark.parametrize("V", [13, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_f_cross_entropy(dtype, V, ce_path, monkeypatch):
    monkeypatch.setattr(cpu_nn_ops, "BLOCK_ELEMS", 40)   # blocked: a few rows a block, many blocks and a tail
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(37, V, generator=g)).to(dtype).requires_grad_()
    t = torch.randint(0, V, (37,), generator=g)
    t[0], t[1] = 0, V - 1                              # the first and last column (the kernel's tail)
    before = x.detach().clone()
    loss = cross_entropy(x, t)
    loss.backward()
    assert torch.equal(x.detach(), before)            # the saved logits are not written
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, t)
    (2.0 * ref).backward()
    gx = x.grad.clone()
    x.grad = None
    (2.0 * cross_entropy(x, t)).backward()    # the upstream gradient is applied
    assert abs(loss.item() - ref.item()) < 1e-6
    tol = 1e-7 if dtype == torch.float32 else 2e-3
    assert (x.grad.double() - x64.grad).abs().max().item() < tol
    assert torch.allclose(2 * gx.double(), x.grad.double(), atol=tol)


@pytest.mark.usefixtures("kernels_built")
def test_cross_entropy_kernel_nan_rows_targets_and_thread_count(count_taken):
    calls = count_taken(cpu_kernels, ["kernels"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 100, generator=g).bfloat16().requires_grad_()
    t = torch.randint(0, 100, (9,), generator=g)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            x.grad = None
            loss = cross_entropy(x, t)
            loss.backward()
            outs.append((loss.detach(), x.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert calls["kernels"] >= 2                          # the kernel path was taken
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    bad = x.detach().clone()
    bad[3, 50] = float("nan")                            # a diverged row shows in the loss and its gradient
    bad.requires_grad_()
    loss = cross_entropy(bad, t)
    loss.backward()
    assert loss.isnan() and bad.grad[3].isnan().all() and bad.grad[[0, 8]].isfinite().all()
    with pytest.raises(RuntimeError, match=r"targets outside \[0, 100\): min 0, max 100"):
        torch.ops.groupgen.cross_entropy_forward(x.detach(), torch.tensor([0] * 8 + [100]))


def test_cross_entropy_shape_errors():
    with pytest.raises(ValueError, match=r"expected logits \[N, V\] and target \[N\], got \(4, 3\) and \(5,\)"):
        cross_entropy(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="got \\(2, 4, 3\\)"):
        cross_entropy(torch.zeros(2, 4, 3), torch.zeros(2, dtype=torch.long))


def test_bf16_training_step_close_to_sdpa_and_f_cross_entropy(monkeypatch):
    """A whole bf16-autocast loss and gradient with the fast paths vs with SDPA + F.cross_entropy."""
    lay = TokenLayout("grid", 16, (32, 8), 4, 4)
    torch.manual_seed(0)
    m = GPT(gpt_config("micro", dropout=0.0, token_dropout=0.0, class_dropout=0.0), lay, 10).train()
    for p in m.parameters():   # non-trivial heads (zero-initialised by default)
        p.data.add_(0.02 * torch.randn_like(p))
    codes = torch.stack([torch.randint(0, k, (4, 16)) for k in lay.K], -1)
    labels = torch.randint(0, 10, (4,))

    def loss_and_grads():
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = m.loss(codes, labels)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])

    fast_loss, fast_g = loss_and_grads()
    import ar_model.cpu.nn_ops as nn_ops
    import ar_model.model as model
    monkeypatch.setattr(nn_ops, "MATMUL_ATTENTION_MAX_T", 0)
    monkeypatch.setattr(model, "cross_entropy", lambda lg, t: F.cross_entropy(lg.float(), t.long()))
    ref_loss, ref_g = loss_and_grads()
    assert abs(fast_loss - ref_loss) < 2e-3
    assert ((fast_g - ref_g).norm() / ref_g.norm()).item() < 2e-2
