"""Attention kernels: every fast version equals the reference, forward and gradients."""
import numpy as np
import pytest

import minigrad as mg
from minigrad import functional as F
from minigrad.gradcheck import gradcheck
from minigrad import attention as MA
from minigrad.kernels import attention as A

SHAPES = [(2, 37, 37, 8), (1, 64, 64, 16), (3, 50, 70, 4), (1, 1, 5, 4), (2, 129, 129, 8)]


def _inputs(BH, T, S, D, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape in
            ((BH, T, D), (BH, S, D), (BH, S, D), (BH, T, D))]


@pytest.mark.parametrize("impl", ["flash", "blocked"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_reference(impl, shape, dtype, causal):
    q, k, v, do = _inputs(*shape, dtype)
    scale = 1 / np.sqrt(shape[-1])
    o, lse = A.reference_forward(q, k, v, scale, causal)
    grads = A.reference_backward(q, k, v, o, lse, do, scale, causal)
    fwd, bwd = A.IMPLS[impl]
    kw = {"tile": 16} if impl == "flash" else {"block": 32}   # T not a multiple of the tile
    o2, lse2 = fwd(q, k, v, scale, causal, **kw)
    grads2 = bwd(q, k, v, o2, lse2, do, scale, causal, **({} if impl == "flash" else kw))
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(o2, o, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse2, lse, atol=tol, rtol=tol)
    for a, b in zip(grads2, grads):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, atol=10 * tol, rtol=10 * tol)


def test_reference_matches_composite_sdpa():
    q, k, v, do = _inputs(2, 9, 13, 4, np.float64)
    o, _ = A.reference_forward(q, k, v, 0.5, True)
    y = F.scaled_dot_product_attention(mg.Tensor(q[None] * 1.0), mg.Tensor(k[None]), mg.Tensor(v[None]), causal=True)
    # the composite scales by 1/sqrt(d) = 0.5 for d = 4
    np.testing.assert_allclose(y.data[0], o, atol=1e-12)


@pytest.mark.parametrize("impl", ["flash", "blocked", "reference"])
def test_attention_function_gradcheck(impl):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 2, 7, 3)) for _ in range(3))
    assert gradcheck(lambda a, b, c: MA.attention(a, b, c, impl=impl, block=3), [q, k, v])


@pytest.mark.parametrize("impl", ["flash", "blocked"])
def test_attention_function_equals_composite(impl):
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((2, 3, 11, 4)) for _ in range(3)]
    ta = [mg.Tensor(a, requires_grad=True) for a in arrays]
    tb = [mg.Tensor(a, requires_grad=True) for a in arrays]
    w = rng.standard_normal((2, 3, 11, 4))
    (MA.attention(*ta, impl=impl, block=4) * mg.Tensor(w)).sum().backward()
    (F.scaled_dot_product_attention(*tb, causal=True) * mg.Tensor(w)).sum().backward()
    for a, b in zip(ta, tb):
        np.testing.assert_allclose(a.grad.data, b.grad.data, atol=1e-12)


def test_decode_kernel_matches_reference():
    q, k, v, _ = _inputs(4, 1, 9, 8, np.float64)
    o, _ = A.reference_forward(q, k, v, 0.3, causal=True)   # one query sees every key
    np.testing.assert_allclose(A.decode_attention(q, k, v, 0.3), o, atol=1e-12)


def test_attention_errors():
    t = mg.Tensor(np.zeros((1, 2, 4, 3)))
    with pytest.raises(ValueError, match="attention"):
        MA.attention(t, mg.Tensor(np.zeros((1, 2, 4, 5))), t)
    with pytest.raises(ValueError, match="fewer keys"):
        MA.attention(t, mg.Tensor(np.zeros((1, 2, 3, 3))), mg.Tensor(np.zeros((1, 2, 3, 3))))
    with pytest.raises(ValueError, match="unknown attention kernel"):
        MA.attention(t, t, t, impl="magic")


def test_nan_inputs_propagate_instead_of_raising():
    q, k, v, _ = _inputs(1, 4, 4, 2, np.float32)
    q[0, 0, 0] = np.inf
    k[0, 0, 0] = -np.inf
    o, _ = A.blocked_forward(q, k, v, 1.0, True)
    assert not np.isfinite(o).all()


def test_numba_cache_dir_is_writable_or_default():
    import os
    from minigrad.kernels import _numba
    d = os.environ.get("NUMBA_CACHE_DIR")
    assert d is None or os.access(d, os.W_OK) or not os.path.exists(d)
    assert _numba.HAVE_NUMBA


def test_keep_freed_memory_applies_on_linux_and_never_raises():
    import sys
    from minigrad import backend
    ok = backend.keep_freed_memory()
    assert isinstance(ok, bool)
    if sys.platform.startswith("linux"):
        import platform
        if platform.libc_ver()[0] == "glibc":
            assert ok is True


def _split_heads_path(x, nh, impl):
    """The step-by-step version of attention_qkv: split, heads forward, attention, heads back."""
    from minigrad import ops
    B, T, C3 = x.shape
    C = C3 // 3
    q, k, v = (t.reshape(B, T, nh, C // nh).transpose(0, 2, 1, 3) for t in ops.split(x, 3, axis=2))
    return MA.attention(q, k, v, impl=impl).transpose(0, 2, 1, 3).reshape(B, T, C)


@pytest.mark.parametrize("impl", ["blocked", "flash", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,T,nh,hs", [(2, 37, 3, 8), (1, 1, 2, 4), (1, 70, 1, 16)])
def test_attention_qkv_equals_split_heads(impl, dtype, B, T, nh, hs):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, 3 * nh * hs)).astype(dtype)
    gy = rng.standard_normal((B, T, nh * hs)).astype(dtype)
    outs = []
    for run in (lambda t: MA.attention_qkv(t, nh, impl=impl, block=16), lambda t: _split_heads_path(t, nh, "reference")):
        t = mg.Tensor(x, requires_grad=True)
        y = run(t)
        y.backward(mg.Tensor(gy))
        outs.append((y.data, t.grad.data))
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for a, b in zip(*outs):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_attention_qkv_gradcheck_and_non_contiguous_input():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((2, 6, 12))
    xt = base.transpose(0, 2, 1)                                   # (2, 12, 6), strided
    y1 = MA.attention_qkv(mg.Tensor(xt), 1, impl="blocked")
    y2 = _split_heads_path(mg.Tensor(np.ascontiguousarray(xt)), 1, "reference")
    np.testing.assert_allclose(y1.data, y2.data, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda t: MA.attention_qkv(t, 2, block=4), [rng.standard_normal((1, 9, 12))])


def test_attention_qkv_bad_shapes():
    from minigrad.ops import ShapeError
    with pytest.raises(ShapeError, match="2 \\* n_kv_head"):
        MA.attention_qkv(mg.Tensor(np.zeros((1, 4, 10))), 2)
    with pytest.raises(ShapeError, match="2 \\* n_kv_head"):
        MA.attention_qkv(mg.Tensor(np.zeros((1, 4, 12))), 3)
    with pytest.raises(ShapeError, match=r"\(B, T, 3C\)"):
        MA.attention_qkv(mg.Tensor(np.zeros((4, 12))), 2)
