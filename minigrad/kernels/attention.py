"""Causal attention kernels: a plain reference and two memory-lean versions.

All work on raw arrays q, k, v of shape (BH, T, D) and (BH, S, D) with S >= T: the
queries are the last T of S positions (S > T when a KV cache holds the past).

- ``reference_*``: materialises the (T, S) score matrix; easy to read, the oracle.
- ``flash_*`` (Numba): FlashAttention's scheme written as loops. Tiles of queries and
  keys, an online softmax (running max and sum, rescaling the partial output), only the
  output and the row log-sum-exp kept for backward, which recomputes scores tile by tile.
  Parallel over (batch x head x query tile). Extra memory: O(tile x D) per thread.
- ``blocked_*``: the same saved state (output + log-sum-exp), but a block of query rows
  at a time against all the keys it may see, so the matrix products go to BLAS (NumPy or
  CuPy matmul) and the softmax work is array code, in place. Extra memory: O(block x S),
  linear in S, never S^2. Runs on NumPy and CuPy alike.

The blocked version is the fast path: loops compiled by Numba reach a fraction of the
BLAS matmul throughput on these shapes (the flash kernel's parallel loops also contend
with BLAS's threads). Its softmax rows are compiled loops (``cpu.softmax_rows_*``), and the
autograd nodes split the heads over OpenBLAS's own threads (``threads.parallel_for``), each
half running its products on one thread. All are tested equal to the reference.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ._numba import HAVE_NUMBA, numba
from . import cpu as _cpu
from . import threads as _threads

# --------------------------------------------------------------------------- reference


def reference_forward(q, k, v, scale: float, causal: bool = True):
    """Returns (o, lse): the output (BH, T, D) and the log-sum-exp of each score row (BH, T)."""
    xp = backend.get_array_module(q)
    T, S = q.shape[1], k.shape[1]
    s = (q @ k.transpose(0, 2, 1)) * scale                                  # (BH, T, S)
    if causal:
        s = xp.where(_future(T, S, xp), -xp.inf, s)
    m = s.max(axis=-1, keepdims=True)
    p = xp.exp(s - m)
    tot = p.sum(axis=-1, keepdims=True)
    o = (p / tot) @ v
    lse = (m + xp.log(tot))[..., 0]
    return o.astype(q.dtype), lse.astype(q.dtype)


def reference_backward(q, k, v, o, lse, do, scale: float, causal: bool = True):
    xp = backend.get_array_module(q)
    T, S = q.shape[1], k.shape[1]
    s = (q @ k.transpose(0, 2, 1)) * scale
    p = xp.exp(s - lse[..., None])
    if causal:
        p = xp.where(_future(T, S, xp), 0, p)
    dv = p.transpose(0, 2, 1) @ do
    dp = do @ v.transpose(0, 2, 1)
    delta = (do * o).sum(axis=-1, keepdims=True)                          # rowsum(dO * O) = rowsum(P * dP)
    ds = p * (dp - delta) * scale
    return (ds @ k).astype(q.dtype), (ds.transpose(0, 2, 1) @ q).astype(q.dtype), dv.astype(q.dtype)


def _future(T, S, xp):
    """(T, S) mask, True where key j lies in the future of query i (j > i + S - T)."""
    return ~xp.tril(xp.ones((T, S), dtype=bool), S - T)


# --------------------------------------------------------------------------- Numba flash
# Reassociation lets LLVM vectorise the dot-product loops; no "nnan"/"ninf" flags, because
# -inf (masked scores, the running max's start) and NaN (a diverging run) must behave.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

if HAVE_NUMBA:
    @numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _flash_fwd(q, k, v, scale, causal, tile, o, lse):
        BH, T, D = q.shape
        S = k.shape[1]
        off = S - T
        ntile = (T + tile - 1) // tile
        for job in numba.prange(BH * ntile):
            b = job // ntile
            i0 = (job % ntile) * tile
            i1 = min(T, i0 + tile)
            n = i1 - i0
            m = np.full(n, -np.inf)
            lsum = np.zeros(n)
            acc = np.zeros((n, D))
            s = np.empty(tile)
            kend = min(S, i1 + off) if causal else S
            for j0 in range(0, kend, tile):
                j1 = min(kend, j0 + tile)
                for ii in range(n):
                    i = i0 + ii
                    jlim = min(j1, i + off + 1) if causal else j1
                    if jlim <= j0:
                        continue
                    # scores of this query against the key tile, and their max
                    mt = -np.inf
                    for j in range(j0, jlim):
                        d0 = 0.0
                        for d in range(D):
                            d0 += q[b, i, d] * k[b, j, d]
                        d0 *= scale
                        s[j - j0] = d0
                        if d0 > mt:
                            mt = d0
                    # online softmax: rescale what was accumulated under the old max
                    mnew = max(m[ii], mt)
                    corr = math.exp(m[ii] - mnew)
                    lsum[ii] *= corr
                    for d in range(D):
                        acc[ii, d] *= corr
                    for j in range(j0, jlim):
                        pj = math.exp(s[j - j0] - mnew)
                        lsum[ii] += pj
                        for d in range(D):
                            acc[ii, d] += pj * v[b, j, d]
                    m[ii] = mnew
            for ii in range(n):
                inv = 1.0 / lsum[ii]
                for d in range(D):
                    o[b, i0 + ii, d] = acc[ii, d] * inv
                lse[b, i0 + ii] = m[ii] + math.log(lsum[ii])

    @numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
    def _p_ds(q, k, v, do, lse, delta, scale, b, i, j):
        # the recomputed probability p_ij and its score gradient ds_ij = p_ij (dp_ij - delta_i) scale
        sij = 0.0
        dpij = 0.0
        for d in range(q.shape[2]):
            sij += q[b, i, d] * k[b, j, d]
            dpij += do[b, i, d] * v[b, j, d]
        p = math.exp(sij * scale - lse[b, i])
        return p, p * (dpij - delta[b, i]) * scale

    @numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _flash_bwd_dq(q, k, v, delta, lse, do, scale, causal, dq):
        # one query row at a time: dq_i = sum_j ds_ij k_j
        BH, T, D = q.shape
        S = k.shape[1]
        off = S - T
        for job in numba.prange(BH * T):
            b = job // T
            i = job % T
            jlim = min(S, i + off + 1) if causal else S
            for d in range(D):
                dq[b, i, d] = 0.0
            for j in range(jlim):
                _, ds = _p_ds(q, k, v, do, lse, delta, scale, b, i, j)
                for d in range(D):
                    dq[b, i, d] += ds * k[b, j, d]

    @numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _flash_bwd_dkv(q, k, v, delta, lse, do, scale, causal, dk, dv):
        # one key row at a time (no write conflicts between threads): sums over the queries that see it
        BH, T, D = q.shape
        S = k.shape[1]
        off = S - T
        for job in numba.prange(BH * S):
            b = job // S
            j = job % S
            for d in range(D):
                dk[b, j, d] = 0.0
                dv[b, j, d] = 0.0
            i_first = max(0, j - off) if causal else 0
            for i in range(i_first, T):
                p, ds = _p_ds(q, k, v, do, lse, delta, scale, b, i, j)
                for d in range(D):
                    dv[b, j, d] += p * do[b, i, d]
                    dk[b, j, d] += ds * q[b, i, d]


def flash_forward(q, k, v, scale: float, causal: bool = True, tile: int = 64):
    _need_numba()
    o = np.empty_like(q)
    lse = np.empty(q.shape[:2], dtype=q.dtype)
    _flash_fwd(q, k, v, scale, causal, tile, o, lse)
    return o, lse


def flash_backward(q, k, v, o, lse, do, scale: float, causal: bool = True):
    _need_numba()
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    delta = np.ascontiguousarray((do * o).sum(axis=-1))      # rowsum(dO * O), once per query
    _flash_bwd_dq(q, k, v, delta, lse, do, scale, causal, dq)
    _flash_bwd_dkv(q, k, v, delta, lse, do, scale, causal, dk, dv)
    return dq, dk, dv


def _need_numba():
    if not HAVE_NUMBA:
        raise RuntimeError("the 'flash' attention kernel needs Numba (pip install numba); "
                           "use impl='blocked' or 'reference'")


# --------------------------------------------------------------------------- blocked (BLAS + fused rows)
def _compiled_rows(*arrays) -> bool:
    """float32 NumPy scores go through the compiled row loops of ``kernels.cpu``."""
    return _cpu.accepts(*arrays, dtypes=(np.float32,))


def _softmax_rows(s, scale, row0, causal, lse, inv):
    """s (BH, R, S): raw scores of query rows row0.. -> exp(s * scale - row max), in place and
    unnormalised; inv (BH, R) = 1 / row sums and lse (BH, R) written. The caller scales the
    (R, D) output rows by inv: cheaper than dividing the (R, S) scores."""
    if _compiled_rows(s):
        _cpu.softmax_rows_fwd(s, np.float32(scale), row0, causal, lse, inv)
        return
    xp = backend.get_array_module(s)
    s *= scale
    if causal:
        s += _causal_bias(row0, s.shape[1], s.shape[2], s.dtype, xp)   # -inf on future keys
    m = s.max(axis=-1, keepdims=True)
    xp.subtract(s, m, out=s)
    xp.exp(s, out=s)
    tot = s.sum(axis=-1)
    inv[...] = 1.0 / tot
    lse[...] = m[..., 0] + xp.log(tot)


def _softmax_grad_rows(s, dp, lse, delta, scale, row0, causal):
    """s: raw scores -> P in place; dp: dO V^T -> dS (times scale) in place. Causal: row r
    sees the tile's keys 0 .. row0 + r (row0: first row's position minus first key's)."""
    if _compiled_rows(s, dp):
        _cpu.softmax_rows_bwd(s, dp, lse, delta, np.float32(scale), row0, causal)
        return
    xp = backend.get_array_module(s)
    s *= scale
    if causal:
        s += _causal_bias(row0, s.shape[1], s.shape[2], s.dtype, xp)   # exp(-inf) = 0 there
    s -= lse[..., None]
    xp.exp(s, out=s)
    dp -= delta[..., None]
    dp *= s
    dp *= scale


_bias_cache: dict = {}


def _causal_bias(row0, R, S, dtype, xp):
    """(R, S) array: 0 where query row0 + r may see key j, -inf where j lies in its future.

    Adding it is one pass over the scores; a boolean-mask assignment was several. Cached,
    since a training run asks for the same few blocks at every step.
    """
    key = (row0, R, S, str(dtype), xp.__name__)
    b = _bias_cache.get(key)
    if b is None:
        fut = xp.arange(S)[None, :] > (row0 + xp.arange(R))[:, None]
        b = xp.where(fut, -xp.inf, 0.0).astype(dtype)
        if len(_bias_cache) > 256:
            _bias_cache.clear()
        _bias_cache[key] = b
    return b


def blocked_forward(q, k, v, scale: float, causal: bool = True, block: int = 128, out=None):
    """q (..., T, D), k and v (..., S, D), any leading axes and strides (BLAS reads strided
    rows): -> o (..., T, D) (written into ``out`` when given) and lse (..., T)."""
    xp = backend.get_array_module(q)
    T = q.shape[-2]
    S = k.shape[-2]
    off = S - T
    o = xp.empty(q.shape, dtype=q.dtype) if out is None else out
    lse = xp.empty(q.shape[:-1], dtype=q.dtype)
    kt = xp.swapaxes(k, -1, -2)
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        kend = min(S, i1 + off) if causal else S      # keys beyond the last row's position are unseen
        s = xp.matmul(q[..., i0:i1, :], kt[..., :kend])                   # (..., R, kend)
        s3 = s.reshape((-1,) + s.shape[-2:])
        lse_blk = xp.empty(s3.shape[:2], dtype=q.dtype)
        inv = xp.empty(s3.shape[:2], dtype=q.dtype)
        _softmax_rows(s3, scale, i0 + off, causal, lse_blk, inv)              # s -> exp, unnormalised
        lse[..., i0:i1] = lse_blk.reshape(s.shape[:-1])
        ob = xp.matmul(s, v[..., :kend, :])                                # (..., R, D)
        ob *= inv.reshape(s.shape[:-1])[..., None]
        o[..., i0:i1, :] = ob
    return o, lse


def blocked_backward(q, k, v, o, lse, do, scale: float, causal: bool = True, block: int = 128,
                     out=None):
    """Gradients (dq, dk, dv) for blocked_forward's inputs; ``out``: three arrays to write
    them into (any strides, contents overwritten).

    The loop runs over blocks of keys (where the forward ran over blocks of queries): for
    key block j only the queries that may see it take part, and dk_j and dv_j come out of
    one product each over all of them, written once; only dq accumulates across blocks.
    """
    xp = backend.get_array_module(q)
    T = q.shape[-2]
    S = k.shape[-2]
    off = S - T
    delta = (do * o).sum(axis=-1)                                           # (..., T)
    if out is None:
        dq, dk, dv = xp.empty(q.shape, q.dtype), xp.empty(k.shape, k.dtype), xp.empty(v.shape, v.dtype)
    else:
        dq, dk, dv = out
    for j0 in range(0, S, block):
        j1 = min(S, j0 + block)
        r0 = max(0, j0 - off) if causal else 0          # first query that may see key j0
        if r0 >= T:                                     # keys no query sees (S > T, causal)
            dk[..., j0:j1, :] = 0
            dv[..., j0:j1, :] = 0
            continue
        qb, dob = q[..., r0:, :], do[..., r0:, :]
        kb, vb = k[..., j0:j1, :], v[..., j0:j1, :]
        s = xp.matmul(qb, xp.swapaxes(kb, -1, -2))                          # (..., R, Bk)
        dp = xp.matmul(dob, xp.swapaxes(vb, -1, -2))                        # (..., R, Bk)
        R, Bk = T - r0, j1 - j0
        _softmax_grad_rows(s.reshape(-1, R, Bk), dp.reshape(-1, R, Bk),
                           lse[..., r0:].reshape(-1, R), delta[..., r0:].reshape(-1, R),
                           scale, r0 + off - j0, causal)                    # s -> P, dp -> dS
        dv[..., j0:j1, :] = xp.matmul(xp.swapaxes(s, -1, -2), dob)
        dk[..., j0:j1, :] = xp.matmul(xp.swapaxes(dp, -1, -2), qb)
        if j0 == 0:                                     # every query sees key 0: r0 == 0
            dq[...] = xp.matmul(dp, kb)
        else:
            dq[..., r0:, :] += xp.matmul(dp, kb)
    return dq, dk, dv


# --------------------------------------------------------------------------- decode
def decode_attention(q, k, v, scale: float):
    """One new query per row against all cached keys (no mask needed): q (BH, 1, D)."""
    xp = backend.get_array_module(q)
    s = xp.matmul(q, k.transpose(0, 2, 1)) * scale                          # (BH, 1, S)
    s -= s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return xp.matmul(p, v)                                                  # (BH, 1, D)


IMPLS = {
    "reference": (reference_forward, reference_backward),
    "flash": (flash_forward, flash_backward),
    "blocked": (blocked_forward, blocked_backward),
}


def pick_impl(impl: str, xp) -> str:
    """'auto': the blocked kernel (fastest measured on CPU, and the one CuPy runs)."""
    if impl == "auto":
        return "blocked"
    if impl not in IMPLS:
        raise ValueError(f"unknown attention kernel {impl!r}; choose auto, {', '.join(IMPLS)}")
    if impl == "flash" and xp is not np:
        raise ValueError("the Numba 'flash' kernel runs on CPU arrays only; use 'blocked' on CUDA")
    return impl


# --------------------------------------------------------------------------- autograd node
from ..tensor import Function, Tensor  # noqa: E402  (kernels above are engine-free)


def _flat3(xp, *arrays):
    """Contiguous (BH, T, d) copies of (..., T, d) arrays, for the kernels that want them."""
    return [xp.ascontiguousarray(x).reshape((-1,) + x.shape[-2:]) for x in arrays]


# Below this many multiply-adds (batch x heads x T x S x d) a call runs on one thread: the
# hand-over to the pool costs tens of microseconds.
MIN_PARALLEL_WORK = 1 << 21


def _head_chunks(q, k):
    """Index tuples cutting the leading (batch, head, ...) axes of q and k into one part per
    pool thread, along the first axis long enough (else the longest); [(...,)], one part
    holding everything, when the work is small, the arrays are not NumPy's or there is no
    pool."""
    whole = [(Ellipsis,)]
    if not (isinstance(q, np.ndarray) and q.ndim > 2):
        return whole
    lead = q.shape[:-2]
    if math.prod(lead) * q.shape[-2] * k.shape[-2] * q.shape[-1] < MIN_PARALLEL_WORK:
        return whole
    n = _threads.num_workers()
    ax = next((i for i, m in enumerate(lead) if m >= n), int(np.argmax(lead)))
    if n < 2 or lead[ax] < 2:
        return whole
    return [(slice(None),) * ax + (s,) for s in _threads.split(lead[ax], n)]


def _run_forward(impl, q, k, v, scale, causal, block, out):
    """Kernel ``impl`` on (..., T, d) arrays of any strides: the output goes into ``out``,
    the row log-sum-exp (..., T) is returned. The blocked kernel reads the arrays in place,
    its heads split over the BLAS library's threads (``threads.parallel_for``, which runs a
    single part in this thread); the reference and flash kernels get contiguous (BH, T, d)
    copies."""
    xp = backend.get_array_module(q)
    if impl == "blocked":
        lse = xp.empty(q.shape[:-1], dtype=q.dtype)

        def run(ix):
            lse[ix] = blocked_forward(q[ix], k[ix], v[ix], scale, causal, block, out=out[ix])[1]
        _threads.parallel_for(run, _head_chunks(q, k))
        return lse
    o3, lse = IMPLS[impl][0](*_flat3(xp, q, k, v), scale, causal)
    out[...] = o3.reshape(out.shape)
    return lse.reshape(q.shape[:-1])


def _run_backward(impl, q, k, v, o, lse, do, scale, causal, block, out):
    """Gradients of ``_run_forward`` written into the three arrays of ``out``."""
    if impl == "blocked":
        def run(ix):
            blocked_backward(q[ix], k[ix], v[ix], o[ix], lse[ix], do[ix], scale, causal, block,
                             out=tuple(g[ix] for g in out))
        _threads.parallel_for(run, _head_chunks(q, k))
        return
    q3, k3, v3, o3, do3 = _flat3(backend.get_array_module(q), q, k, v, o, do)
    grads = IMPLS[impl][1](q3, k3, v3, o3, lse.reshape(q3.shape[:2]), do3, scale, causal)
    for dst, src in zip(out, grads):
        dst[...] = src.reshape(dst.shape)


class Attention(Function):
    """Causal attention as one node: saves q, k, v, the output and the row log-sum-exp."""

    def __init__(self, causal: bool = True, impl: str = "auto", block: int = 128):
        self.causal, self.impl, self.block = causal, impl, block

    def forward(self, q, k, v):
        xp = backend.get_array_module(q)
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        self.impl = pick_impl(self.impl, xp)
        o = xp.empty(q.shape, dtype=q.dtype)
        lse = _run_forward(self.impl, q, k, v, self.scale, self.causal, self.block, o)
        self.save_for_backward(q, k, v, o, lse)
        return o

    def backward(self, do):
        q, k, v, o, lse = self.saved
        xp = backend.get_array_module(do)
        grads = tuple(xp.empty(a.shape, dtype=a.dtype) for a in (q, k, v))
        _run_backward(self.impl, q, k, v, o, lse, do, self.scale, self.causal, self.block, grads)
        return grads


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, impl: str = "auto", block: int = 128):
    """softmax(q k^T / sqrt(d)) v for (..., T, d) tensors, without storing the (T, S) scores."""
    if q.shape[:-2] != k.shape[:-2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        from ..ops import ShapeError
        raise ShapeError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit (..., T, d)")
    if k.shape[-2] < q.shape[-2]:
        from ..ops import ShapeError
        raise ShapeError(f"attention: fewer keys ({k.shape[-2]}) than queries ({q.shape[-2]})")
    return Attention(causal, impl, block)(q, k, v)


class QKVAttention(Function):
    """Multi-head causal self-attention from the packed projection: (B, T, 3C) -> (B, T, C).

    The same result as splitting q, k, v, moving heads forward ((B, nh, T, hs) each), running
    ``Attention`` and moving heads back, as one node. The blocked kernel reads q, k and v as
    strided views of the packed array and writes the output straight into the (B, T, C)
    layout, and backward writes dq, dk, dv straight into one packed gradient: none of the
    ten copies and reorderings of the step-by-step version. The reference and flash kernels
    get contiguous (B * nh, T, hs) copies (``_run_forward``), as in ``Attention``.
    """

    def __init__(self, n_head: int, causal: bool = True, impl: str = "auto", block: int = 128):
        self.n_head, self.causal, self.impl, self.block = n_head, causal, impl, block

    def _heads(self, packed, parts: int):
        """(B, T, parts * C) -> `parts` strided views (B, nh, T, hs)."""
        B, T, _ = packed.shape
        h = packed.reshape(B, T, parts, self.n_head, -1)
        return [h[:, :, i].transpose(0, 2, 1, 3) for i in range(parts)]

    def forward(self, qkv):
        xp = backend.get_array_module(qkv)
        B, T, C3 = qkv.shape
        if C3 % 3 or (C3 // 3) % self.n_head:
            from ..ops import ShapeError
            raise ShapeError(f"attention_qkv: last axis {C3} is not 3 * n_head ({self.n_head}) * head size")
        qkv = xp.ascontiguousarray(qkv)
        q, k, v = self._heads(qkv, 3)
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        self.impl = pick_impl(self.impl, xp)
        y = xp.empty((B, T, C3 // 3), dtype=qkv.dtype)
        (o,) = self._heads(y, 1)
        lse = _run_forward(self.impl, q, k, v, self.scale, self.causal, self.block, o)
        self.save_for_backward(qkv, y, lse)
        return y

    def backward(self, gy):
        qkv, y, lse = self.saved
        xp = backend.get_array_module(gy)
        q, k, v = self._heads(qkv, 3)
        (o,) = self._heads(y, 1)
        (do,) = self._heads(xp.ascontiguousarray(gy), 1)
        g = xp.empty_like(qkv)
        _run_backward(self.impl, q, k, v, o, lse, do, self.scale, self.causal, self.block,
                      self._heads(g, 3))
        return g


def attention_qkv(qkv: Tensor, n_head: int, causal: bool = True, impl: str = "auto", block: int = 128):
    """Causal multi-head self-attention of a packed (B, T, 3C) q|k|v projection -> (B, T, C).

    Equal to ``attention`` on the split heads, with the heads moved back (tests hold them
    equal); see ``QKVAttention`` for what it saves.
    """
    if qkv.ndim != 3:
        from ..ops import ShapeError
        raise ShapeError(f"attention_qkv: expected (B, T, 3C), got shape {qkv.shape}")
    return QKVAttention(n_head, causal, impl, block)(qkv)
