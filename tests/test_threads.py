"""Work on the BLAS library's threads: threads.parallel_for / run_c, and the kernels that use
them (pooled GELU, LayerNorm, AdamW; attention split by heads). Each split result must
equal the one-thread result to the last bits: the chunks run the same loops on the same
numbers (compiled in another context, the compiler may order a fast-math sum differently,
so "equal" is a relative 1e-6 in float32 and 1e-13 in float64, far below any real error:
a chunk at a wrong offset would be off by O(1))."""
import math
import os
import threading

import numpy as np
import pytest

from minigrad import Tensor
from minigrad import attention as MA
from minigrad.kernels import attention as A
from minigrad import fused
from minigrad.kernels import cpu, pooled, threads

needs_pool = pytest.mark.skipif(not threads.blas_info()["pool"],
                                reason="no OpenBLAS pthreads pool next to NumPy: everything runs serially")


@pytest.fixture
def two_threads():
    """At least two BLAS threads for the test (a CI box may be set to one), restored after."""
    old = threads.get_blas_threads()
    threads.set_blas_threads(max(2, old))
    yield
    threads.set_blas_threads(old)


@pytest.fixture
def small_chunks(monkeypatch):
    """Split even small test arrays, so the pooled path runs."""
    monkeypatch.setattr(pooled, "MIN_ITEMS", 64)
    monkeypatch.setattr(A, "MIN_PARALLEL_WORK", 0)


def test_split_covers_range_in_order():
    for n in (1, 2, 7, 100):
        for parts in (1, 2, 3, 8):
            s = threads.split(n, parts)
            assert len(s) == min(parts, n)
            assert s[0].start == 0 and s[-1].stop == n
            assert all(a.stop == b.start for a, b in zip(s, s[1:]))
            assert all(x.stop > x.start for x in s)
            sizes = [x.stop - x.start for x in s]
            assert max(sizes) - min(sizes) <= 1


def test_row_chunks_respects_minimum(two_threads):
    assert threads.row_chunks(10, 100) == [slice(0, 10)]
    chunks = threads.row_chunks(1000, 10)
    assert chunks[0].start == 0 and chunks[-1].stop == 1000
    assert len(chunks) == threads.num_workers()


def test_library_is_numpys_own():
    info = threads.blas_info()
    root = os.path.dirname(os.path.realpath(np.__file__))
    shipped = [p for p in (os.path.join(root, "..", "numpy.libs"), os.path.join(root, ".dylibs"))
               if os.path.isdir(p) and any("openblas" in f for f in os.listdir(p))]
    if not shipped:
        pytest.skip("this NumPy does not ship its own OpenBLAS")
    assert info["library"] is not None
    assert os.path.realpath(os.path.dirname(info["library"])) in [os.path.realpath(p) for p in shipped]


def test_parallel_for_runs_each_chunk_once():
    seen = []
    lock = threading.Lock()

    def fn(c):
        with lock:
            seen.append(c)
    threads.parallel_for(fn, list(range(7)))
    assert sorted(seen) == list(range(7))


@needs_pool
def test_parallel_for_uses_two_threads_and_restores_blas_threads(two_threads):
    before = threads.get_blas_threads()
    ids, inner = [], []

    def fn(c):
        ids.append(threading.get_native_id())
        inner.append((threads.get_blas_threads(), threads.num_workers()))
    threads.parallel_for(fn, [0, 1])
    assert len(set(ids)) == 2                       # the caller's thread and a pool worker
    assert inner == [(1, 1), (1, 1)]                # one BLAS thread per chunk, no nesting
    assert threads.get_blas_threads() == before


@needs_pool
def test_parallel_for_reraises_and_recovers(two_threads):
    before = threads.get_blas_threads()

    def fn(c):
        if c == 1:
            raise ValueError("chunk 1 failed")
    with pytest.raises(ValueError, match="chunk 1 failed"):
        threads.parallel_for(fn, [0, 1])
    assert threads.get_blas_threads() == before
    out = []
    threads.parallel_for(out.append, [0, 1])      # still usable afterwards
    assert sorted(out) == [0, 1]


def test_disabled_runs_in_this_thread(two_threads):
    old = threads.enable(False)
    try:
        ids = []
        threads.parallel_for(lambda c: ids.append(threading.get_native_id()), [0, 1, 2])
        assert ids == [threading.get_native_id()] * 3
        assert threads.num_workers() == 1
        assert threads.run_c(0, np.zeros((2, 1), np.int64)) is False   # refused, nothing called
    finally:
        threads.enable(old)


def _same(a, b):
    tol = 1e-6 if a.dtype == np.float32 else 1e-13
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _both(fn):
    """fn() with the pool on, then off: the two results."""
    on = fn()
    old = threads.enable(False)
    try:
        off = fn()
    finally:
        threads.enable(old)
    return on, off


@pytest.mark.parametrize("n", [1, 127, 4099])
def test_pooled_gelu_equals_one_thread(n, two_threads, small_chunks):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 4).astype(np.float32)
    gy = rng.standard_normal(n).astype(np.float32)

    def run():
        y, gx = np.empty_like(x), np.empty_like(x)
        pooled.gelu_tanh_fwd(x, y)
        pooled.gelu_tanh_bwd(x, gy, gx)
        return y, gx
    (y1, g1), (y2, g2) = _both(run)
    ref = np.empty_like(x)
    cpu.gelu_tanh_fwd(x, ref)
    _same(y1, ref)
    _same(y1, y2)
    _same(g1, g2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 5), (37, 129), (300, 16)])
def test_pooled_layer_norm_equals_one_thread(dtype, shape, two_threads, small_chunks):
    rng = np.random.default_rng(1)
    N, C = shape
    x = rng.standard_normal(shape).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)

    def run():
        y, mean, rstd = np.empty_like(x), np.empty(N), np.empty(N)
        pooled.layer_norm_fwd(x, w, b, 1e-5, y, mean, rstd)
        gx = np.empty_like(x)
        gw, gb = pooled.layer_norm_bwd(x, w, mean, rstd, gy, gx)
        return y, mean, rstd, gx, gw, gb
    on, off = _both(run)
    for a, c in zip(on, off):
        _same(a, c)
    # and the composite, as everywhere else
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(on[0], xhat * w + b, rtol=tol, atol=tol)
    np.testing.assert_allclose(on[5], gy.sum(0), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooled_adam_equals_one_thread(dtype, two_threads, small_chunks):
    rng = np.random.default_rng(2)
    start = [rng.standard_normal(1001).astype(dtype) for _ in range(4)]
    start[3] = np.abs(start[3])

    def run():
        p, g, m, v = [a.copy() for a in start]
        pooled.adam_step(p, g, m, v, 1e-3, 0.9, 0.99, 1e-8, 0.1, math.sqrt(0.01), 1e-4)
        return p, m, v
    for a, c in zip(*_both(run)):
        _same(a, c)


@pytest.mark.parametrize("B,nh,T", [(1, 4, 33), (3, 2, 20), (1, 1, 17)])
def test_attention_split_by_heads_equals_one_thread(B, nh, T, two_threads, small_chunks):
    hs = 8
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((B, T, 3 * nh * hs)).astype(np.float32)
    gy = rng.standard_normal((B, T, nh * hs)).astype(np.float32)

    def run():
        x = Tensor(qkv, requires_grad=True)
        y = MA.attention_qkv(x, nh)
        (y * Tensor(gy)).sum().backward()
        return y.data.copy(), x.grad.data.copy()
    (y1, g1), (y2, g2) = _both(run)
    _same(y1, y2)
    _same(g1, g2)


def test_head_chunks_pick_an_axis(two_threads, monkeypatch):
    monkeypatch.setattr(A, "MIN_PARALLEL_WORK", 0)
    n = threads.num_workers()
    whole = [((Ellipsis,), (Ellipsis,))]
    q = np.zeros((1, 4, 8, 2), np.float32)
    parts = A._head_chunks(q, q)
    if n < 2:
        assert parts == whole
        return
    assert [p[0][:1] for p in parts] == [(slice(None),)] * len(parts)   # batch of 1: split heads
    assert all(iq == ik for iq, ik in parts)
    kv = np.zeros((1, 2, 8, 2), np.float32)                             # 2 query heads per kv head
    parts = A._head_chunks(q, kv)
    assert [iq[1] for iq, _ in parts] == [slice(2 * ik[1].start, 2 * ik[1].stop) for _, ik in parts]
    q = np.zeros((6, 4, 8, 2), np.float32)
    assert all(len(iq) == 1 and iq == ik for iq, ik in A._head_chunks(q, q))   # split the batch axis
    assert A._head_chunks(np.zeros((1, 1, 8, 2), np.float32), q[:1, :1]) == whole   # nothing to split
    monkeypatch.setattr(A, "MIN_PARALLEL_WORK", 1 << 60)
    assert A._head_chunks(q, q) == whole                                    # too little work


def test_fused_nodes_use_the_pooled_kernels(two_threads, small_chunks):
    """GeluTanh and LayerNorm nodes on the pooled path still match their composites."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, 70)).astype(np.float32)
    y = fused.GeluTanh()(Tensor(x)).data
    ref = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 3), (301, 17)])
def test_pooled_bias_add_and_row_sums(dtype, shape, two_threads, small_chunks):
    rng = np.random.default_rng(5)
    y0 = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(shape[1]).astype(dtype)

    def run():
        y = y0.copy()
        pooled.add_bias(y, b)
        return y, pooled.sum_rows(y0)
    (y1, s1), (y2, s2) = _both(run)
    _same(y1, y0 + b)
    _same(y1, y2)
    np.testing.assert_allclose(s1, y0.astype(np.float64).sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s1, s2, rtol=1e-12, atol=1e-12)


def test_pooled_falls_back_when_arrays_do_not_fit(two_threads, small_chunks):
    """Strided or mixed-dtype arrays never go to the C entry points (they read bare
    addresses): the serial loop takes them, with the right result."""
    rng = np.random.default_rng(6)
    base = rng.standard_normal((200, 40)).astype(np.float32)
    y = base.copy()[:, ::2]                          # strided rows
    b = rng.standard_normal(20).astype(np.float32)
    expect = y + b
    pooled.add_bias(y, b)
    _same(y, expect)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    w64, b64 = np.ones(16), np.zeros(16)             # float64 weights with float32 rows
    out, mean, rstd = np.empty_like(x), np.empty(300), np.empty(300)
    pooled.layer_norm_fwd(x, w64, b64, 1e-5, out, mean, rstd)
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, xhat, rtol=1e-5, atol=1e-5)
