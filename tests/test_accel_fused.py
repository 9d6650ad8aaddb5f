"""The fused ops of `eanet.accel.fused` against torch's: double normalisation, GELU,
LayerNorm (with the residual add), the dropout masks; each by its kernel and by torch."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eanet.accel import native

_SKYLAKE_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return next(
        (
            set(line.split(":", 1)[1].split())
            for line in text.splitlines()
            if line.startswith("flags")
        ),
        set(),
    )


@pytest.fixture(params=["native", "haswell", "skylake-avx512"])
def build(request, monkeypatch, tmp_path_factory):
    """The kernels as built for this CPU (-march=native: the AVX-512 paths where it has them),
    for an AVX2 CPU (-march=haswell: the scalar loops the compiler vectorises) and, where
    this CPU can run it, for AVX-512 without avx512_bf16 (-march=skylake-avx512: bf16 rounded
    by integer arithmetic), each but the first into a cache of its own; each kernel test
    runs against all three."""
    if request.param == "skylake-avx512" and not _cpu_flags() >= _SKYLAKE_FLAGS:
        pytest.skip("this CPU cannot run AVX-512 code")
    if request.param != "native":
        flags = [f"-march={request.param}" if f == "-march=native" else f for f in native.FLAGS]
        monkeypatch.setattr(native, "FLAGS", tuple(flags))
        cache = tmp_path_factory.getbasetemp() / f"kernels-{request.param}"
        monkeypatch.setenv("EANET_KERNELS", str(cache))
    for cached in (native.library, native._setup, native.signatures):
        cached.cache_clear()
    yield request.param
    for cached in (native.library, native._setup, native.signatures):
        cached.cache_clear()


def test_double_normalize_gradient():
    from eanet.accel.fused import double_normalize

    z = torch.randn(2, 7, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: double_normalize(t, token_dim=1), (z,))
    q = double_normalize(z.detach(), token_dim=1)
    torch.testing.assert_close(q.sum(-1), torch.ones(2, 7, 3, dtype=torch.float64))


def _normalize_with_grad(z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from eanet.accel.fused import double_normalize

    z = z.detach().requires_grad_()
    q = double_normalize(z, token_dim=1)
    q.backward(g)
    return q.float(), z.grad.float()


def _normalize_both_ways(monkeypatch, z, g):
    """(q, dL/dz) by the native kernel and by torch's ops (the kernel switched off)."""
    from eanet.accel import native

    assert native.available("double_normalize")  # this machine has a C compiler
    fast = _normalize_with_grad(z, g)
    monkeypatch.setitem(native.ENABLED, "native", False)
    return fast, _normalize_with_grad(z, g)


@pytest.mark.parametrize("shape", [(3, 256, 16, 16), (1, 7, 3, 5), (5, 64, 4, 16)])
def test_native_double_normalize_matches_torch_in_fp32(build, monkeypatch, shape):
    """The kernel (S = 16 unrolled, any other S generic; batches split over threads) gives
    torch's values and gradients to fp32 rounding, also for a non-contiguous gradient."""
    torch.manual_seed(0)
    z = torch.randn(shape) * 4
    g = torch.randn(shape[:2] + (shape[3], shape[2])).transpose(-1, -2)  # strided
    (q, grad), (q_ref, grad_ref) = _normalize_both_ways(monkeypatch, z, g)
    torch.testing.assert_close(q, q_ref, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-4)


def test_native_double_normalize_matches_torch_in_bf16(build, monkeypatch):
    """bfloat16 in and out, fp32 inside either way: a unit or two of bf16's last place."""
    torch.manual_seed(0)
    z = (torch.randn(4, 64, 16, 16) * 4).bfloat16()
    g = torch.randn(4, 64, 16, 16).bfloat16()
    (q, grad), (q_ref, grad_ref) = _normalize_both_ways(monkeypatch, z, g)
    torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=2**-7)  # atol: values near 0
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=2**-7)


def test_native_double_normalize_keeps_extremes_finite(build, monkeypatch):
    """Logits far apart (exp underflows to 0 for all but the largest) still sum to 1."""
    z = torch.zeros(2, 8, 2, 4)
    z[:, 0] = 200.0  # token 0 takes all the weight of every column
    z[1, 3, 1, 2] = -1e30
    (q, grad), (q_ref, grad_ref) = _normalize_both_ways(monkeypatch, z, torch.ones_like(z))
    assert torch.isfinite(q).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_native_double_normalize_max_starts_at_minus_infinity(build, monkeypatch):
    """A column whose every logit is below -3e38 (finite, near fp32's limit) is a uniform
    softmax, as torch computes it: the column max starts at -inf, not at a finite floor."""
    z = torch.randn(2, 8, 2, 4)
    z[0, :, 1, 3] = -3.3e38
    z[1, :, 0, 0] = torch.finfo(torch.float32).min
    (q, grad), (q_ref, grad_ref) = _normalize_both_ways(monkeypatch, z, torch.ones_like(z))
    assert torch.isfinite(q).all() and torch.isfinite(q_ref).all()
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_tanh_gelu_matches_torch(build, dtype):
    """The GELU kernel against F.gelu(approximate="tanh"): values and gradients, for a
    non-contiguous input of odd length and the tails of tanh (|x| up to 30)."""
    from eanet.accel.ops.gelu import _native_gelu_applies, gelu_tanh

    torch.manual_seed(0)
    base = torch.cat([torch.randn(2, 1001) * 3, torch.linspace(-30, 30, 2002).view(2, -1)], 1)
    x = base.to(dtype).t()  # strided
    assert _native_gelu_applies(x)
    g = torch.randn(x.shape).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    gelu_tanh(a).backward(g)
    y_ref = F.gelu(b, approximate="tanh")
    y_ref.backward(g)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 2**-7}
    torch.testing.assert_close(gelu_tanh(x).float(), y_ref.float(), **tol)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)


@pytest.mark.parametrize("dim", [64, 20, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_gelu_adds_the_bias_its_linear_layer_left_out(build, dim, dtype):
    """Inference: GELU(x + bias) by the kernel, bias (D,) on each row, for rows of 16-wide
    vectors, with a tail (20) and longer than the kernel's 256-element chunk (300), against
    torch's add and GELU in fp32; with gradients, torch's add then the GELU kernel."""
    from eanet.accel import fused
    from eanet.accel.ops import gelu as gelu_ops

    torch.manual_seed(0)
    x, bias = (torch.randn(37, dim) * 3).to(dtype)[:, :], torch.randn(dim)
    expected = F.gelu(x.float() + bias, approximate="tanh")
    with torch.no_grad():
        direct = gelu_ops._native_gelu_bias(x, bias)
        y = fused.gelu_tanh(x.t().contiguous().t(), 0.0, bias)  # strided rows: copied first
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 2**-7}
    assert direct.dtype == dtype and torch.equal(direct, y)
    torch.testing.assert_close(direct.float(), expected, **tol)
    a = x.clone().requires_grad_()
    fused.gelu_tanh(a, 0.0, bias).float().sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(3, 20, 4, 16), (2, 256, 16, 16)])
def test_inference_chunks_write_the_kernels_results_into_their_buffers(build, shape):
    """The chunk loops' calls straight to the double normalisation and softmax kernels give
    the custom ops' results, written into the caller's buffer; where the kernel does not
    apply (fp32 softmax, a strided buffer) torch's op is copied in."""
    from eanet.accel import fused

    torch.manual_seed(0)
    z = (torch.randn(shape) * 4).bfloat16()
    with torch.no_grad():
        out = torch.empty_like(z)
        assert fused.double_normalize_into(z, out) is out
        assert torch.equal(out, fused.double_normalize(z, token_dim=1))
        assert fused.softmax_last_into(z, out) is out and torch.equal(out, fused.softmax_last(z))
        strided = torch.empty(shape[::-1], dtype=z.dtype).permute(3, 2, 1, 0)
        fused.double_normalize_into(z, strided)
        assert torch.equal(strided, fused.double_normalize(z, token_dim=1))
        x = z.float()
        assert torch.equal(fused.softmax_last_into(x, torch.empty_like(x)), x.softmax(-1))


@pytest.mark.parametrize(("rows", "dim"), [(300, 64), (7, 33)])
def test_native_add_layer_norm_adds_the_branchs_bias_each_way(build, rows, dim):
    """s = x + (h + bias) in fp32 (the branch's last bias, left out by its linear layer) and
    LayerNorm(s) in bf16, in the kernel's one pass: the sum exactly torch's, the norm to
    bf16's rounding; in place over an owned stream and into a copy alike (the input left
    as it was); in training too, with the bias's gradient (dL/dh's rows summed) from the
    kernel's backward."""
    from eanet.accel.fused import add_layer_norm

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, h, bias = torch.randn(rows, dim) * 2 + 1, torch.randn(rows, dim).bfloat16(), torch.randn(dim)
    before = x.clone()
    expected_s = x + (h.float() + bias)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected_y = norm(expected_s).bfloat16()
        s, y = add_layer_norm(norm, x.clone(), h, in_place=True, bias=bias)
        s2, y2 = add_layer_norm(norm, x, h, bias=bias)
    assert torch.equal(x, before) and torch.equal(s, expected_s) and torch.equal(s2, s)
    assert y.dtype == torch.bfloat16 and torch.equal(y2, y)
    torch.testing.assert_close(y.float(), expected_y.float(), atol=1e-6, rtol=2**-7)
    g_s, g_y = torch.randn(rows, dim), torch.randn(rows, dim).bfloat16()

    def grads(fused):  # training: the bias inside the kernel each way, or by torch
        a, c = x.clone().requires_grad_(), bias.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                s, y = add_layer_norm(norm, a, h, bias=c)
            else:
                s = a + (h.float() + c)
                y = norm(s).bfloat16()
        torch.autograd.backward([s, y], [g_s, g_y])
        return s.detach(), a.grad, c.grad

    (s3, gx, gc), ref = grads(True), grads(False)
    assert torch.equal(s3, expected_s)
    torch.testing.assert_close(gx, ref[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gc, ref[2], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(("n", "dtype"), [(1001, torch.float32), (4099, torch.bfloat16)])
def test_native_gelu_applies_the_dropout_of_its_seeds(build, n, dtype):
    """The MLP's dropout inside the GELU kernel (vector rows and odd tails, both thread
    halves starting anywhere): the result is the undropped GELU where the hash of common.h
    keeps it, else 0, and the gradient the undropped one of the masked gradient."""
    from eanet.accel.ops.dropout import threshold
    from eanet.accel.ops.gelu import _native_gelu, _native_gelu_backward

    torch.manual_seed(0)
    x, g = (torch.randn(n) * 3).to(dtype), torch.randn(n).to(dtype)
    p = 0.25
    torch.manual_seed(7)
    y, seeds = _native_gelu(x, p)
    torch.manual_seed(7)
    assert torch.equal(seeds, torch.randint(0, 2**32, (2,), dtype=torch.int64))  # torch's RNG
    y0, none = _native_gelu(x, 0.0)
    assert torch.equal(none, torch.zeros(2, dtype=torch.int64))
    keep = _reference_keep(n, *(int(s) for s in seeds), threshold(p))
    assert abs(keep.float().mean().item() - 0.75) < 0.05
    assert torch.equal(y, torch.where(keep, y0, torch.zeros_like(y0)))
    grad = _native_gelu_backward(g, x, seeds, p)
    masked_g = torch.where(keep, g, torch.zeros_like(g))
    assert torch.equal(grad, _native_gelu_backward(masked_g, x, none, 0.0))


def _layer_norm_both_ways(dim, rows, grad_dtype):
    """(fused.layer_norm, torch's LayerNorm cast to bf16) under CPU bf16 autocast: outputs
    and the gradients of x, weight and bias for the same upstream gradient."""
    from eanet.accel.ops.layer_norm import _native_norm_applies, layer_norm

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(rows, 3, dim) * 3 + 1  # a mean far from 0: no cancellation allowed
    g = torch.randn(rows, 3, dim).to(grad_dtype)
    results = []
    for fn in (layer_norm, lambda module, t: module(t).bfloat16()):
        a = x.clone().requires_grad_()
        norm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _native_norm_applies(norm, a)
            y = fn(norm, a)
        y.backward(g)
        results.append((y, a.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
    return results


@pytest.mark.parametrize(
    ("dim", "rows", "grad_dtype"),
    [(64, 700, torch.bfloat16), (48, 5, torch.bfloat16), (64, 9, torch.float32)]
    + [(64, 100, torch.float32)],  # fp32 gradients, 16 rows at a time and a tail
)
def test_native_layer_norm_matches_torch(build, dim, rows, grad_dtype):
    """The LayerNorm kernel against torch's LayerNorm + cast: the result in bf16 (the same
    rounding of the same fp32 values, to a unit of bf16's last place), the gradients in fp32
    (the weight's summed over 3 x 700 rows: more than one block of the kernel)."""
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = _layer_norm_both_ways(dim, rows, grad_dtype)
    assert native.available("layer_norm")
    assert y.dtype == torch.bfloat16 and gx.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), atol=1e-6, rtol=2**-7)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, gw_ref, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gb, gb_ref, atol=1e-3, rtol=1e-4)


def test_native_add_layer_norm_matches_torch(build):
    """The residual add fused into the norm: s = x + h (fp32 stream, bf16 branch) and
    LayerNorm(s) in bf16, against torch's add, LayerNorm and cast; gradients of x, h, the
    weights, with gradients arriving both through the norm and along the stream."""
    from eanet.accel.fused import add_layer_norm

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, h = torch.randn(300, 64) * 2 + 1, torch.randn(300, 64).bfloat16()
    g_s, g_y = torch.randn(300, 64), torch.randn(300, 64).bfloat16()

    def run(fused):
        a, b = x.clone().requires_grad_(), h.clone().requires_grad_()
        norm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                s, y = add_layer_norm(norm, a, b)
            else:
                s = a + b
                y = norm(s).bfloat16()
        torch.autograd.backward([s, y], [g_s, g_y])
        return s, y, a.grad, b.grad, norm.weight.grad.clone(), norm.bias.grad.clone()

    (s, y, gx, gh, gw, gb), ref = run(True), run(False)
    assert torch.equal(s, ref[0]) and y.dtype == torch.bfloat16 and gh.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref[1].float(), atol=1e-6, rtol=2**-7)
    torch.testing.assert_close(gx, ref[2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gh.float(), ref[3].float(), atol=1e-6, rtol=2**-7)
    torch.testing.assert_close(gw, ref[4], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gb, ref[5], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(("rows", "dim"), [(300, 64), (7, 33)])
def test_native_add_layer_norm_applies_the_dropout_of_its_seeds(build, rows, dim):
    """The branch's dropout inside the residual add + LayerNorm (rows of 64 sixteen at a
    time in registers and a tail group; rows of 33 starting at odd elements): s and the norm
    are those of the undropped kernel given h zeroed where the hash of common.h drops it, and
    the residual's gradient is the undropped one zeroed there too."""
    from eanet.accel.ops.dropout import threshold
    from eanet.accel.ops.layer_norm import _native_add_layer_norm, _native_layer_norm_backward

    torch.manual_seed(0)
    x, h = torch.randn(rows, dim) * 2 + 1, torch.randn(rows, dim).bfloat16()
    w, b, p = torch.randn(dim), torch.randn(dim), 0.3
    g_y, g_s = torch.randn(rows, dim).bfloat16(), torch.randn(rows, dim)
    s, y, mean, rstd, seeds = _native_add_layer_norm(x, h, None, w, b, 1e-6, p)
    keep = _reference_keep(rows * dim, *(int(v) for v in seeds), threshold(p)).view(rows, dim)
    assert abs(keep.float().mean().item() - 0.7) < 0.07
    s0, y0, mean0, rstd0, none = _native_add_layer_norm(x, h * keep, None, w, b, 1e-6, 0.0)
    assert torch.equal(none, torch.zeros(2, dtype=torch.int64))
    assert torch.equal(s, s0) and torch.equal(y, y0)
    assert torch.equal(mean, mean0) and torch.equal(rstd, rstd0)
    back = _native_layer_norm_backward(g_y, g_s, s, w, mean, rstd, True, seeds, p)
    back0 = _native_layer_norm_backward(g_y, g_s, s, w, mean, rstd, True, none, 0.0)
    assert torch.equal(back[0], back0[0]) and torch.equal(back[2], back0[2])
    assert torch.equal(back[1], torch.where(keep, back0[1], torch.zeros_like(back0[1])))
    # a bias on the residual: its gradient, the kept rows of dL/dh summed before rounding
    kept_rows = torch.where(keep, back0[0], torch.zeros_like(back0[0])).sum(0)
    torch.testing.assert_close(back[4], kept_rows, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(back0[4], back0[0].sum(0), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 4, 256, 256), (3, 5, 48), (2, 7), (2, 300), (3, 1)])
def test_native_softmax_matches_torch(build, shape):
    """The softmax kernel of self-attention's weights (bf16 in and out, fp32 inside) against
    torch's bf16 softmax: rows in registers (L a multiple of 16 up to 256) and through scratch
    (other lengths); rows with -inf (masked) and with a huge spread."""
    from eanet.accel.fused import softmax_last

    torch.manual_seed(0)
    x = (torch.randn(shape) * 4).bfloat16()
    x.view(-1, shape[-1])[0, 0] = float("-inf")
    x.view(-1, shape[-1])[-1, -1] = 300.0  # the rest of that row underflows to 0
    assert native.available("softmax")
    y = softmax_last(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    expected = torch.softmax(x, -1).float()  # a row of one -inf: NaN, in torch as here
    torch.testing.assert_close(y.float(), expected, atol=1e-6, rtol=2**-7, equal_nan=True)
    # rounded to nearest even as torch rounds (truncation would miss about half the values)
    same = (y == torch.softmax(x, -1)) | (y.isnan() & expected.isnan())
    assert same.float().mean() > 0.99
    x.requires_grad_()
    assert softmax_last(x).grad_fn is not None  # with a gradient wanted: torch's own op


@pytest.mark.parametrize("shape", [(4, 4, 256, 256), (3, 5, 48), (2, 300)])
def test_native_softmax_dropout_matches_torch(build, shape):
    """Attention weights in bf16 training: softmax, dropout mask and backward in one kernel
    pass each way, against torch's softmax under the dropout kernel's mask for the same
    seeds (the same draws), and torch's gradient through both."""
    from eanet.accel.ops.dropout import _keep
    from eanet.accel.ops.softmax import softmax_dropout

    torch.manual_seed(0)
    x = (torch.randn(shape) * 4).bfloat16().requires_grad_()
    d, y, seeds = torch.ops.eanet.softmax_dropout_cpu(x.detach(), 0.25)
    y_ref = torch.softmax(x.detach(), -1)
    keep = _keep(torch.ones_like(y_ref), seeds, 0.25) != 0
    assert abs(keep.float().mean().item() - 0.75) < 0.05
    torch.testing.assert_close(y.float(), y_ref.float(), atol=1e-6, rtol=2**-7)
    assert torch.equal(d, torch.where(keep, y, torch.zeros_like(y)))
    g = torch.randn(shape).bfloat16()
    x.grad = None
    torch.manual_seed(1)
    out = softmax_dropout(x, 0.25)
    out.backward(g)
    kept = out != 0
    ref = x.detach().clone().requires_grad_()  # torch's bf16 softmax and its backward
    (torch.softmax(ref, -1) * kept).backward(g)
    # the row sums differ in order only: where gy - sum cancels, a unit of bf16 more
    torch.testing.assert_close(x.grad.float(), ref.grad.float(), atol=1e-3, rtol=2**-7)
    assert torch.equal(softmax_dropout(x.detach(), 0.0), torch.softmax(x.detach(), -1))


def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


def _reference_keep(n: int, s1: int, s2: int, threshold: int):
    """The dropout decisions as common.h defines them: the pair k = i // 2's hash of k and
    the two seeds, its low 16 bits for the even element, its high 16 for the odd one."""
    import numpy as np

    with np.errstate(over="ignore"):
        k = np.arange(n, dtype=np.uint32) // 2
        bits = _lowbias32(_lowbias32(k ^ np.uint32(s1)) + np.uint32(s2))
        half = (bits >> (16 * (np.arange(n, dtype=np.uint32) & 1))) & 0xFFFF
    return torch.from_numpy(half >= threshold)


@pytest.mark.parametrize("n", [1, 33, 1001, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_dropout_masks_are_the_hash_of_common_h(build, n, dtype):
    """Every build (vector paths, scalar tails, either element size, the softmax kernel's
    mask) draws exactly the decisions of the hash as written down in Python."""
    from eanet.accel.ops.dropout import _keep, threshold

    seeds, p = torch.tensor([123456789, 4000000000]), 0.3
    expected = _reference_keep(n, 123456789, 4000000000, threshold(p))
    assert torch.equal(_keep(torch.ones(n, dtype=dtype), seeds, p) != 0, expected)
    if dtype == torch.bfloat16 and n % 16 == 0:  # rows of 64, 16: registers; 8, 1024: scratch
        for length in (64, 16, 8, 1024 if n % 1024 == 0 else 8):
            x = torch.zeros(n // length, length, dtype=dtype)  # every softmax weight > 0
            d, _, drawn = torch.ops.eanet.softmax_dropout_cpu(x, p)
            mask = _reference_keep(n, *(int(v) for v in drawn), threshold(p))
            assert torch.equal(d != 0, mask.view_as(d))


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((4, 64, 16, 16), torch.bfloat16),
        ((2, 32, 16, 16), torch.float32),
        ((2, 8, 3, 5), torch.float32),
        ((2, 8, 3, 11), torch.float32),  # rows of 33: every other one starts at an odd element
        ((3, 8, 5, 7), torch.bfloat16),
    ],
)
def test_native_double_normalize_applies_the_dropout_of_its_seeds(build, shape, dtype):
    """The attention dropout inside the double normalisation's kernel (S = 16 on intrinsics,
    other S by the loops): the result is the undropped one where the hash of common.h keeps
    it, else 0, and the backward is the undropped backward of the masked gradient."""
    from eanet.accel.ops.double_normalize import _native_backward, _native_forward
    from eanet.accel.ops.dropout import threshold

    torch.manual_seed(0)
    z, g = (torch.randn(shape) * 3).to(dtype), torch.randn(shape).to(dtype)
    seeds, p, none = torch.tensor([987654321, 123]), 0.2, torch.zeros(2, dtype=torch.int64)
    q, colmax, colinv = _native_forward(z, seeds, p)
    q0, *_ = _native_forward(z, none, 0.0)
    keep = _reference_keep(z.numel(), 987654321, 123, threshold(p)).view(shape)
    assert abs(keep.float().mean().item() - 0.8) < 0.05
    assert torch.equal(q, torch.where(keep, q0, torch.zeros_like(q0)))
    grad = _native_backward(g, z, colmax, colinv, seeds, p)
    masked_g = torch.where(keep, g, torch.zeros_like(g))
    assert torch.equal(grad, _native_backward(masked_g, z, colmax, colinv, none, 0.0))


def test_keep_mask_rate_and_reproducibility():
    from eanet.accel.fused import keep_mask, masked

    like = torch.zeros(200, 1000)
    torch.manual_seed(1)
    m = keep_mask(like, 0.2)
    assert m.dtype == torch.float32 and set(m.unique().tolist()) == {0.0, 1.0}
    assert abs(m.mean().item() - 0.8) < 0.005  # 200k draws: std 0.0009
    torch.manual_seed(1)
    assert torch.equal(m, keep_mask(like, 0.2))
    assert keep_mask(like.bfloat16(), 0.2).dtype == torch.bfloat16
    x = torch.randn(10)
    assert masked(x, 0.0) is x


@pytest.mark.slow
def test_compiled_masks_are_independent_draws_with_the_right_gradient():
    """Under torch.compile every mask is its own draw (graphs merge calls with equal
    arguments: two masks of one shape once came out identical), and the backward
    multiplies by the very mask of the forward (not a fresh one)."""
    from eanet.accel.fused import masked

    x = torch.randn(64, 512, requires_grad=True)
    y = torch.randn(64, 512, requires_grad=True)
    a, b = torch.compile(lambda x, y: (masked(x, 0.3), masked(y, 0.3)))(x, y)
    assert not torch.equal(a != 0, b != 0)
    assert abs((a != 0).float().mean().item() - 0.7) < 0.01
    (a.sum() + 2 * b.sum()).backward()
    assert torch.equal(x.grad, (a != 0).float()) and torch.equal(y.grad, 2 * (b != 0).float())
