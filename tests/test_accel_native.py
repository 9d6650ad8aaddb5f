"""The native kernels: compiled once per source, compiler and CPU; torch's ops without them."""

from __future__ import annotations

import pytest
import torch

from eanet.accel import native
from eanet.accel.fused import double_normalize
from eanet.accel.upstream import mapped_libraries


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded library (restored afterwards)."""
    monkeypatch.setenv("EANET_KERNELS", str(tmp_path / "kernels"))
    native.library.cache_clear()
    yield tmp_path / "kernels"
    native.library.cache_clear()


def test_built_once_into_the_cache(fresh):
    assert native.library("double_normalize") is not None
    (built,) = fresh.glob("double_normalize-*.so")
    assert not list(fresh.glob(".*.tmp"))  # no stray temporary file
    stamp = built.stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library("double_normalize") is not None
    assert built.stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt


def test_shares_torchs_openmp_threads(fresh):
    """Built against the OpenMP runtime torch runs on: one pool of threads, not two."""
    before = mapped_libraries()
    runtime = native.openmp_runtime()
    assert runtime is None or "torch" in runtime  # not another package's libgomp
    lib = native.library("double_normalize")
    assert bool(lib.kernels_threaded()) == (runtime is not None)
    added = {p for p in mapped_libraries() - before if "gomp" in p}
    assert not added  # no second OpenMP runtime came with the kernels


def _normalize(z):
    z = z.detach().requires_grad_()
    q = double_normalize(z, token_dim=1)
    q.sum().backward()
    return q, z.grad


@pytest.mark.parametrize(
    "cc, message", [("/nonexistent/cc", "no C compiler"), ("false", "kernels are off")]
)
def test_without_a_working_compiler_torchs_ops_run(fresh, monkeypatch, caplog, cc, message):
    z = torch.randn(2, 8, 4, 4)
    monkeypatch.setenv("CC", cc)
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        q, grad = _normalize(z)
        assert not native.available("double_normalize")
    assert message in caplog.text and caplog.text.count("WARNING") == 1
    assert not list(fresh.glob("*"))  # nothing half-built left behind
    monkeypatch.setitem(native.ENABLED, "native", False)
    q_ref, grad_ref = _normalize(z)
    assert torch.equal(q, q_ref) and torch.equal(grad, grad_ref)


def test_an_unwritable_cache_turns_the_kernels_off(fresh, monkeypatch, caplog):
    blocker = fresh.parent / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("EANET_KERNELS", str(blocker / "kernels"))
    with caplog.at_level("WARNING", logger="eanet.accel.native"):
        assert native.library("double_normalize") is None
    assert "kernels are off" in caplog.text and str(blocker) in caplog.text


def test_other_devices_and_dtypes_use_torchs_ops(monkeypatch):
    from eanet.accel import fused

    assert fused._runs_native(torch.zeros(1, 4, 2, 2), 1)
    assert not fused._runs_native(torch.zeros(1, 4, 2, 2, dtype=torch.float64), 1)
    assert not fused._runs_native(torch.zeros(1, 4, 2, 2), 2)  # tokens not on axis 1
    assert not fused._runs_native(torch.zeros(4, 2, 2), 1)


def test_without_openmp_the_batch_is_split_over_python_threads(fresh, monkeypatch):
    monkeypatch.setattr(native, "openmp_runtime", lambda: None)
    assert not native.library("double_normalize").kernels_threaded()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    z = torch.randn(5, 16, 2, 8)
    q, grad = _normalize(z)
    monkeypatch.setitem(native.ENABLED, "native", False)
    q_ref, grad_ref = _normalize(z)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_native_dropout_keeps_each_element_with_probability_1_minus_p(dtype, p):
    from eanet.accel.fused import masked

    torch.manual_seed(0)
    n = 1 << 20
    x = (torch.rand(n) + 0.5).to(dtype).requires_grad_()  # no zeros of its own
    y = masked(x, p)
    keep = y != 0
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(y[keep], x[keep])  # kept values untouched (no rescale)
    # no structure along the tensor: every residue mod 64 and both neighbours agree with p
    by_residue = keep.view(-1, 64).float().mean(0)
    assert (by_residue - (1 - p)).abs().max() < 6 * (p * (1 - p) / (n / 64)) ** 0.5
    both = (keep[1:] & keep[:-1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 0.005
    g = torch.randn(n).to(dtype)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(keep, g, torch.zeros_like(g)))


def test_native_dropout_draws_anew_each_call_and_follows_torchs_seed():
    from eanet.accel.fused import masked

    x = torch.ones(4096)
    torch.manual_seed(1)
    a, b = masked(x, 0.5), masked(x, 0.5)
    agree = (a == b).float().mean().item()
    assert 0.45 < agree < 0.55  # independent masks agree half the time
    torch.manual_seed(1)
    assert torch.equal(masked(x, 0.5), a)


def test_native_dropout_zeroes_dropped_nans():
    from eanet.accel.fused import masked

    torch.manual_seed(0)
    y = masked(torch.full((1000,), float("nan")), 0.5)
    assert (y == 0).any() and y.isnan().any() and ((y == 0) | y.isnan()).all()


@pytest.mark.parametrize("n", [1, 1001, 4096])
def test_native_dropout_draws_the_same_mask_for_fp32_and_bf16(n, fresh, monkeypatch):
    """Element i's draw depends on i and the seeds only (bf16 goes two elements per word):
    odd lengths, either thread split, either dtype give one mask."""
    from eanet.accel.fused import masked

    x = torch.rand(n) + 0.5
    torch.manual_seed(3)
    a = masked(x, 0.3) != 0
    torch.manual_seed(3)
    b = masked(x.bfloat16(), 0.3) != 0
    monkeypatch.setattr(native, "openmp_runtime", lambda: None)  # Python threads, 3 of them
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    native.library.cache_clear()
    torch.manual_seed(3)
    c = masked(x.bfloat16(), 0.3) != 0
    assert not native.library("dropout").kernels_threaded()
    assert torch.equal(a, b) and torch.equal(a, c)
