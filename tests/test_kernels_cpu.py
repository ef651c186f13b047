"""The compiled CPU loops of ``minigrad.kernels.cpu`` against float64 references.

The fused nodes are compared with their composites in ``test_fused.py`` (float64, where
GELU keeps NumPy's tanh); here the float32 paths, which use our own exp, are held to a few
float32 ulp of exact float64 results.
"""
import math

import numpy as np
import pytest

import minigrad as mg
from minigrad import functional as F
from minigrad.kernels import attention as katt
from minigrad.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.HAVE_NUMBA, reason="Numba not installed")

rng = np.random.default_rng(0)


def _gelu64(x):
    x = x.astype(np.float64)
    u = cpu.GELU_C * (x + cpu.GELU_A * x ** 3)
    t = np.tanh(u)
    y = 0.5 * x * (1 + t)
    d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * cpu.GELU_C * (1 + 3 * cpu.GELU_A * x * x)
    return y, d


def test_exp32_matches_float64_exp():
    x = np.concatenate([np.linspace(-87, 88, 1_000_001), rng.standard_normal(10_000)]).astype(np.float32)
    y = np.empty_like(x)
    cpu.exp32(x, y)
    ref = np.exp(x.astype(np.float64))
    assert (np.abs(y - ref) / ref).max() < 5e-7          # a few ulp (NumPy's float32 exp: ~2e-7)
    specials = np.array([np.nan, -np.inf, np.inf, -1000.0, 1000.0, 0.0], np.float32)
    out = np.empty_like(specials)
    cpu.exp32(specials, out)
    assert np.isnan(out[0]) and out[1] == 0 and out[2] == np.inf and out[3] == 0
    assert out[4] == np.inf and out[5] == 1.0


def test_gelu_float32_compiled_matches_float64():
    x = (rng.standard_normal((37, 129)) * 4).astype(np.float32)     # odd sizes: vector tails
    x[0, :5] = [0.0, -12.0, 12.0, 1e-6, -30.0]
    t = mg.Tensor(x, requires_grad=True)
    y = F.gelu(t)
    assert y.creator.compiled and y.dtype == np.float32
    gy = rng.standard_normal(x.shape).astype(np.float32)
    y.backward(mg.Tensor(gy))
    y64, d64 = _gelu64(x)
    np.testing.assert_allclose(y.data, y64, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(t.grad.data, gy * d64, rtol=2e-6, atol=2e-6)


def test_gelu_float32_saves_only_its_input_and_propagates_nan():
    x = np.array([1.0, np.nan, -2.0, np.inf], np.float32)
    y = F.gelu(mg.Tensor(x, requires_grad=True))
    assert y.creator.saved[1] is None                     # tanh is recomputed in backward
    assert np.isnan(y.data[1]) and y.data[3] == np.inf and np.isfinite(y.data[[0, 2]]).all()


def test_gelu_non_contiguous_input():
    x = (rng.standard_normal((6, 8)) * 2).astype(np.float32)
    t = mg.Tensor(x.T, requires_grad=True)               # a transposed view
    y = F.gelu(t)
    y.backward(mg.Tensor(np.ones((8, 6), np.float32)))
    y64, d64 = _gelu64(x.T)
    np.testing.assert_allclose(y.data, y64, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(t.grad.data, d64, rtol=2e-6, atol=2e-6)


def _gelu_erf64(x):
    x = x.astype(np.float64)
    one_plus_erf = np.vectorize(math.erfc)(-x / math.sqrt(2.0))   # 1 + erf(v) = erfc(-v), no cancellation
    y = 0.5 * x * one_plus_erf
    d = 0.5 * one_plus_erf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return y, d


def test_exact_gelu_float32_compiled_matches_float64():
    x = (rng.standard_normal((37, 129)) * 4).astype(np.float32)     # odd sizes: vector tails
    x[0, :6] = [0.0, -12.0, 12.0, 1e-6, -30.0, -5.0]
    t = mg.Tensor(x, requires_grad=True)
    y = F.gelu(t, approximate="none")
    assert y.creator.compiled and y.dtype == np.float32 and y.creator.saved[1] is None
    gy = rng.standard_normal(x.shape).astype(np.float32)
    y.backward(mg.Tensor(gy))
    y64, d64 = _gelu_erf64(x)
    np.testing.assert_allclose(y.data, y64, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(t.grad.data, gy * d64, rtol=2e-6, atol=2e-6)
    # the negative tail keeps its relative accuracy (1 + erf is formed as erfc there)
    tail = np.array([-3.0, -5.0, -8.0], np.float32)
    yt = F.gelu(mg.Tensor(tail), approximate="none").data
    np.testing.assert_allclose(yt, _gelu_erf64(tail)[0], rtol=1e-5)
    # NaN propagates, inf stays inf
    sp = F.gelu(mg.Tensor(np.array([np.nan, np.inf, 1.0], np.float32)), approximate="none").data
    assert np.isnan(sp[0]) and sp[1] == np.inf


def test_exact_gelu_compiled_matches_the_array_code_in_float64():
    x = (rng.standard_normal((5, 40)) * 3)
    t32 = mg.Tensor(x.astype(np.float32), requires_grad=True)
    t64 = mg.Tensor(x, requires_grad=True)
    y32, y64 = F.gelu(t32, approximate="none"), F.gelu(t64, approximate="none")
    assert y32.creator.compiled and not y64.creator.compiled
    y32.sum().backward()
    y64.sum().backward()
    np.testing.assert_allclose(y32.data, y64.data, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(t32.grad.data, t64.grad.data, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
def test_layer_norm_compiled_matches_composite_in_float64(dtype, tol):
    x = (rng.standard_normal((3, 5, 33)) * 3 + 7).astype(dtype)
    w, b = rng.standard_normal(33).astype(dtype), rng.standard_normal(33).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    outs = []
    for arrs, fused_ in (((x, w, b), True), ((x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)), False)):
        ts = [mg.Tensor(a, requires_grad=True) for a in arrs]
        y = F.layer_norm(*ts, fused=fused_)
        if fused_:
            assert y.creator.compiled and y.dtype == dtype
        y.backward(mg.Tensor(gy.astype(y.dtype)))
        outs.append([y.data] + [t.grad.data for t in ts])
    for a, ref in zip(*outs):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_layer_norm_compiled_without_weight_or_bias(affine):
    x = rng.standard_normal((5, 7)).astype(np.float32)
    w = mg.Tensor(rng.standard_normal(7).astype(np.float32), requires_grad=True) if affine == "weight" else None
    b = mg.Tensor(rng.standard_normal(7).astype(np.float32), requires_grad=True) if affine == "bias" else None
    t = mg.Tensor(x, requires_grad=True)
    y = F.layer_norm(t, w, b)
    assert y.creator.compiled
    y.backward(mg.Tensor(np.ones_like(x)))
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    ref = ref * (w.data if w is not None else 1) + (b.data if b is not None else 0)
    np.testing.assert_allclose(y.data, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t.grad.data.sum(-1), 0, atol=1e-4)
    if b is not None:
        np.testing.assert_allclose(b.grad.data, np.full(7, 5.0), rtol=1e-6)


def test_layer_norm_compiled_only_some_grads():
    x = rng.standard_normal((4, 6))
    w = mg.Tensor(rng.standard_normal(6), requires_grad=False)
    b = mg.Tensor(rng.standard_normal(6), requires_grad=True)
    t = mg.Tensor(x, requires_grad=True)
    F.layer_norm(t, w, b).sum().backward()
    assert w.grad is None
    np.testing.assert_allclose(b.grad.data, np.full(6, 4.0))
    np.testing.assert_allclose(t.grad.data.sum(axis=-1), 0, atol=1e-12)   # LN's gradient is centred


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,S", [(37, 37), (5, 70), (130, 130)])
def test_attention_compiled_rows_match_array_code(monkeypatch, causal, T, S):
    q = rng.standard_normal((3, T, 16)).astype(np.float32)
    k, v = (rng.standard_normal((3, S, 16)).astype(np.float32) for _ in range(2))
    do = rng.standard_normal(q.shape).astype(np.float32)
    sc = 1 / math.sqrt(16)

    def run():
        o, lse = katt.blocked_forward(q, k, v, sc, causal, block=32)
        return (o, lse) + katt.blocked_backward(q, k, v, o, lse, do, sc, causal, block=32)

    got = run()
    monkeypatch.setattr(katt, "_compiled_rows", lambda *arrays: False)
    want = run()
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_fused_kernels_fall_back_without_numba(monkeypatch):
    monkeypatch.setattr(cpu, "HAVE_NUMBA", False)
    x = mg.Tensor(rng.standard_normal((2, 8)).astype(np.float32), requires_grad=True)
    y = F.gelu(F.layer_norm(x))
    assert not y.creator.compiled and not cpu.accepts(x.data)
    y.sum().backward()
    assert x.grad.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_rows_equals_add_at(dtype):
    from minigrad import backend
    idx = np.array([[3, 1, 3], [-1, 0, 3]])                    # repeats and a negative index
    vals = rng.standard_normal((2, 3, 5)).astype(dtype)
    got, want = np.zeros((6, 5), dtype), np.zeros((6, 5), dtype)
    assert backend._rows_kernel_fits(got, idx, vals)
    backend.scatter_add(got, idx, vals)
    np.add.at(want, idx, vals)
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-15)


def test_embedding_gradient_uses_row_kernel_and_matches_one_hot():
    w = mg.Tensor(rng.standard_normal((7, 4)), requires_grad=True)
    idx = np.array([[0, 6, 6], [2, 0, 6]])
    gy = rng.standard_normal((2, 3, 4))
    F.embedding(idx, w).backward(mg.Tensor(gy))
    onehot = np.eye(7)[idx.reshape(-1)]                          # (6, 7)
    np.testing.assert_allclose(w.grad.data, onehot.T @ gy.reshape(-1, 4), rtol=1e-13)
