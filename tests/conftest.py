import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GROUPGEN_QUIET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# The reliability harness's fixtures, registered here so that both reliability modules share one
# session-scoped subprocess campaign.
pytest_plugins = ["_campaign"]


@pytest.fixture
def count_taken(monkeypatch):
    """``count_taken(module, names)`` wraps each ``module.<name>`` (a kernel entry point that returns
    None where it does not apply) and returns a dict counting the calls that took the kernel."""
    def wrap(module, names):
        calls = dict.fromkeys(names, 0)
        for name in names:
            def counted(*a, _f=getattr(module, name), _n=name):
                out = _f(*a)
                calls[_n] += out is not None
                return out
            monkeypatch.setattr(module, name, counted)
        return calls
    return wrap


@pytest.fixture
def cpu_kernel_path(monkeypatch):
    """``cpu_kernel_path(on)``: with ``on`` the test needs groupgen's CPU kernels (skipped where they
    cannot be built); without, ``ar_model.cpu.kernels`` behaves as on a machine where the build
    failed, for the rest of the test."""
    def use(on: bool) -> None:
        from ar_model.cpu import kernels as cpu_kernels
        if not on:
            monkeypatch.setattr(cpu_kernels, "_state", {"tried": True, "ext": None, "why": "test"})
        elif cpu_kernels.kernels() is None:
            pytest.skip(f"no CPU kernels here ({cpu_kernels.unavailable_reason()})")
    return use


@pytest.fixture
def kernels_built(cpu_kernel_path):
    """Skips the test where groupgen's CPU kernels are not built (no AVX-512F or compiler, or
    GROUPGEN_CPU_KERNELS=0): ``@pytest.mark.usefixtures("kernels_built")``."""
    cpu_kernel_path(True)


@pytest.fixture
def simulated_cpu(monkeypatch):
    """``simulated_cpu(kind)``: route as on a CPU of that kind (``cpu.kernels.CPU_KINDS`` name or
    ``CpuProfile``) for the rest of the test; this machine's routing returns after it."""
    from ar_model.cpu import kernels as cpu_kernels
    monkeypatch.setattr(cpu_kernels, "_state", dict(cpu_kernels._state))
    return cpu_kernels.simulate_cpu
