"""Grouped-query attention, sliding windows and rotary positions in every attention kernel and node.

The oracle for the kernels is the plainest possible attention: K and V repeated for every query
head (np.repeat), the (T, S) scores masked with the band, a softmax; its gradients come from
central differences (gradcheck) of the graph nodes in float64.
"""
import math

import numpy as np
import pytest

import minigrad as mg
from minigrad import attention as MA
from minigrad import backend as B
from minigrad.gradcheck import gradcheck
from minigrad.kernels import attention as A


def naive(q, k, v, scale, window):
    """(BH, T, D) queries, (BHkv, S, D) keys: repeat K, V per query head, band mask, softmax."""
    g = q.shape[0] // k.shape[0]
    kk, vv = np.repeat(k, g, axis=0), np.repeat(v, g, axis=0)
    T, S = q.shape[1], k.shape[1]
    s = q @ kk.transpose(0, 2, 1) * scale
    i = np.arange(T)[:, None] + S - T
    j = np.arange(S)[None, :]
    hide = (j > i) | ((j <= i - window) if window else False)
    s = np.where(hide, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ vv


def _inputs(BH, BK, T, S, D, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in ((BH, T, D), (BK, S, D), (BK, S, D), (BH, T, D))]


# (query heads, kv heads): n_kv_head in {n_head, n_head / 2, 1}; odd lengths, S > T (a cache)
CASES = [(4, 4, 37, 37, 8), (4, 2, 37, 37, 8), (4, 1, 37, 37, 8), (6, 3, 29, 50, 4), (4, 1, 1, 9, 4),
         (2, 1, 70, 70, 8)]
WINDOWS = [0, 1, 5, 33, 200]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", WINDOWS)
def test_reference_equals_repeated_kv_band_mask(case, window):
    q, k, v, _ = _inputs(*case)
    o, lse = A.reference_forward(q, k, v, 0.3, True, window)
    np.testing.assert_allclose(o, naive(q, k, v, 0.3, window), atol=1e-12)


@pytest.mark.parametrize("impl", ["flash", "blocked"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", WINDOWS)
def test_kernels_match_reference_with_groups_and_window(impl, case, window):
    q, k, v, do = _inputs(*case)
    o, lse = A.reference_forward(q, k, v, 0.3, True, window)
    grads = A.reference_backward(q, k, v, o, lse, do, 0.3, True, window)
    fwd, bwd = A.IMPLS[impl]
    kw = {"tile": 16} if impl == "flash" else {"block": 16}
    o2, lse2 = fwd(q, k, v, 0.3, True, window=window, **kw)
    grads2 = bwd(q, k, v, o2, lse2, do, 0.3, True, window=window, **({} if impl == "flash" else kw))
    np.testing.assert_allclose(o2, o, atol=1e-12)
    np.testing.assert_allclose(lse2, lse, atol=1e-12)
    for a, b, name in zip(grads2, grads, "qkv"):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=1e-11, err_msg=f"d{name}")


@pytest.mark.parametrize("window", [0, 3])
def test_blocked_float32_compiled_rows_with_window_and_groups(window, monkeypatch):
    q, k, v, do = _inputs(4, 2, 70, 70, 16, np.float32)
    got = A.blocked_forward(q, k, v, 0.25, True, 32, window=window)
    got = got + A.blocked_backward(q, k, v, *got, do, 0.25, True, 32, window=window)
    monkeypatch.setattr(A, "_compiled_rows", lambda *a: False)                 # array-code twin
    want = A.blocked_forward(q, k, v, 0.25, True, 32, window=window)
    want = want + A.blocked_backward(q, k, v, *want, do, 0.25, True, 32, window=window)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_window_skips_key_blocks():
    """O(T * w): with a window the blocked kernel multiplies only the band's key blocks."""
    q, k, v, _ = _inputs(1, 1, 512, 512, 4, np.float32)
    calls = []
    real = np.matmul

    class Spy:
        def __getattr__(self, n):
            return getattr(np, n)

        @staticmethod
        def matmul(a, b, **kw):
            calls.append(a.shape[-2] * b.shape[-1])
            return real(a, b, **kw)
    import minigrad.kernels.attention as mod
    orig = mod.backend.get_array_module
    mod.backend.get_array_module = lambda *a: Spy()
    try:
        A.blocked_forward(q, k, v, 0.5, True, 64)
        full = sum(calls)
        calls.clear()
        A.blocked_forward(q, k, v, 0.5, True, 64, window=32)
        win = sum(calls)
    finally:
        mod.backend.get_array_module = orig
    assert win < full / 3


def test_decode_kernel_groups_fold_into_rows():
    q, k, v, _ = _inputs(6, 2, 1, 11, 8)
    np.testing.assert_allclose(A.decode_attention(q, k, v, 0.3), naive(q, k, v, 0.3, 0), atol=1e-12)


def test_kernels_reject_bad_groups_and_windows():
    q, k, v, _ = _inputs(3, 2, 4, 4, 2)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        A.reference_forward(q, k, v, 1.0)
    q, k, v, _ = _inputs(2, 2, 4, 4, 2)
    with pytest.raises(ValueError, match="window"):
        A.blocked_forward(q, k, v, 1.0, True, window=-1)
    with pytest.raises(ValueError, match="causal"):
        A.blocked_forward(q, k, v, 1.0, False, window=2)


# --------------------------------------------------------------------------- graph nodes
@pytest.mark.parametrize("impl", ["reference", "flash", "blocked"])
@pytest.mark.parametrize("nkv,window", [(2, 0), (1, 3), (2, 2)])
def test_attention_node_gradcheck(impl, nkv, window):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 7, 3))
    k, v = (rng.standard_normal((1, nkv, 7, 3)) for _ in range(2))
    assert gradcheck(lambda a, b, c: MA.attention(a, b, c, impl=impl, block=3, window=window), [q, k, v])


@pytest.mark.parametrize("nkv,window", [(4, 0), (2, 4), (1, 0), (1, 6)])
def test_composite_equals_node(nkv, window):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 4, 11, 4))
    k, v = (rng.standard_normal((2, nkv, 11, 4)) for _ in range(2))
    w = mg.Tensor(rng.standard_normal(q.shape))
    outs = []
    for f in (lambda *t: MA.attention(*t, impl="blocked", block=4, window=window),
              lambda *t: MA.attention_composite(*t, window=window)):
        ts = [mg.Tensor(a, requires_grad=True) for a in (q, k, v)]
        (f(*ts) * w).sum().backward()
        outs.append([t.grad.data for t in ts])
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_rope_gradcheck_and_rotation():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5, 6))
    assert gradcheck(lambda t: MA.rope(t, 4), [x])
    y = MA.rope(mg.Tensor(x), 4).data
    h = 3
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))   # a rotation
    # by hand: pair (x_i, x_{i+h}) at position p turns by p * 10000^(-2i/6)
    p, i = 4 + 2, 1
    a = p * 10000.0 ** (-2 * i / 6)
    x1, x2 = x[0, 0, 2, i], x[0, 0, 2, i + h]
    np.testing.assert_allclose(y[0, 0, 2, [i, i + h]],
                               [x1 * math.cos(a) - x2 * math.sin(a), x2 * math.cos(a) + x1 * math.sin(a)])


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((2, 1, 1, 8))
    s = []
    for m, n in ((3, 1), (10, 8), (50, 48)):
        qm = MA.rope(mg.Tensor(q), m).data
        kn = MA.rope(mg.Tensor(k), n).data
        s.append(float((qm * kn).sum()))
    np.testing.assert_allclose(s, s[0], rtol=1e-12)


def _split_path(x, nh, nkv, window, rope, pos0=0):
    """attention_qkv by hand: split, heads forward, rotate (Rope nodes), attention, heads back."""
    from minigrad import ops
    Bn, T, W = x.shape
    hs = W // (nh + 2 * nkv)
    q, k, v = ops.split(x, [nh * hs, (nh + nkv) * hs], axis=2)
    q = q.reshape(Bn, T, nh, hs).transpose(0, 2, 1, 3)
    k, v = (t.reshape(Bn, T, nkv, hs).transpose(0, 2, 1, 3) for t in (k, v))
    if rope:
        q, k = MA.rope(q, pos0), MA.rope(k, pos0)
    y = MA.attention_composite(q, k, v, window=window)
    return y.transpose(0, 2, 1, 3).reshape(Bn, T, nh * hs)


@pytest.mark.parametrize("impl", ["blocked", "flash", "reference"])
@pytest.mark.parametrize("nh,nkv,window,rope", [(4, 2, 0, False), (4, 1, 5, False), (4, 4, 0, True),
                                                (4, 2, 3, True), (2, 1, 0, True)])
def test_attention_qkv_equals_split_path(impl, nh, nkv, window, rope):
    rng = np.random.default_rng(5)
    hs = 4
    x = rng.standard_normal((2, 13, (nh + 2 * nkv) * hs))
    gy = mg.Tensor(rng.standard_normal((2, 13, nh * hs)))
    outs = []
    for f in (lambda t: MA.attention_qkv(t, nh, impl=impl, block=4, n_kv_head=nkv, window=window, rope=rope),
              lambda t: _split_path(t, nh, nkv, window, rope)):
        t = mg.Tensor(x, requires_grad=True)
        y = f(t)
        y.backward(gy)
        outs.append((y.data, t.grad.data))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_attention_qkv_rope_gradcheck():
    rng = np.random.default_rng(6)
    assert gradcheck(lambda t: MA.attention_qkv(t, 2, n_kv_head=1, window=3, rope=True, block=2),
                     [rng.standard_normal((1, 6, 16))])


def test_attention_qkv_errors():
    from minigrad.ops import ShapeError
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        MA.attention_qkv(mg.Tensor(np.zeros((1, 4, 20))), 4, n_kv_head=3)
    with pytest.raises(ShapeError, match="even head size"):
        MA.attention_qkv(mg.Tensor(np.zeros((1, 4, 12))), 2, n_kv_head=1, rope=True)   # hs = 3


def test_variants_on_each_backend(backend):
    """GQA + window + RoPE through the node on every usable backend (CUDA: the blocked kernel
    in CuPy array code) equals the NumPy float64 composite."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 21, 32))                       # nh 4, nkv 2, hs 4
    gy = rng.standard_normal((2, 21, 16))
    t = mg.Tensor(B.to_device(x, backend), requires_grad=True)
    y = MA.attention_qkv(t, 4, n_kv_head=2, window=6, rope=True, block=8)
    y.backward(mg.Tensor(B.to_device(gy, backend)))
    ref = mg.Tensor(x, requires_grad=True)
    yr = _split_path(ref, 4, 2, 6, True)
    yr.backward(mg.Tensor(gy))
    np.testing.assert_allclose(B.to_numpy(y.data), yr.data, atol=1e-10)
    np.testing.assert_allclose(B.to_numpy(t.grad.data), ref.grad.data, atol=1e-10)


def test_attention_kernels_import_no_engine():
    """kernels/attention.py is array code: the graph nodes live in minigrad/attention.py."""
    import ast
    tree = ast.parse(open(A.__file__).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 2:
            assert [a.name for a in node.names] == ["backend"], node.module
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            assert node.module in ("_numba", None), node.module
