"""Causal attention kernels: a plain reference and two memory-lean versions.

All work on raw arrays q (..., Hq, T, D) and k, v (..., Hkv, S, D) with S >= T: the
queries are the last T of S positions (S > T when a KV cache holds the past). The leading
axes may be (B * H,) alone or (B, H); what matters is the head axis just before T.

- **Grouped-query attention.** Hq may be a multiple g of Hkv: query heads h*g .. h*g+g-1
  share key/value head h (g = Hq: multi-query attention). No kernel repeats K and V: the
  group is folded into the query rows (a (g * R, D) block of queries against one (S, D)
  block of keys is one matrix product, and dK, dV sum over the group inside that product).
- **Sliding window** ``window = w`` (0: none; causal only): query at position p sees keys
  p - w + 1 .. p. The kernels skip the key blocks wholly outside the band, so forward and
  backward cost O(T * (w + block)) instead of O(T * S).

- ``reference_*``: materialises the (T, S) score matrix; easy to read, the oracle.
- ``flash_*`` (Numba): FlashAttention's scheme written as loops. Tiles of queries and
  keys, an online softmax (running max and sum, rescaling the partial output), only the
  output and the row log-sum-exp kept for backward, which recomputes scores tile by tile.
  Parallel over (batch x head x query tile). Extra memory: O(tile x D) per thread.
- ``blocked_*``: the same saved state (output + log-sum-exp), but a block of query rows
  at a time against all the keys it may see, so the matrix products go to BLAS (NumPy or
  CuPy matmul) and the softmax work is array code, in place. Extra memory: O(block x S),
  linear in S, never S^2. Runs on NumPy and CuPy alike.

``rope_*``: rotary position embeddings on (..., T, D) arrays (the attention nodes rotate q
and k with them; ``minigrad.attention`` holds those nodes: nothing in ``kernels/`` imports
the engine).

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

# --------------------------------------------------------------------------- shapes
def groups(q, k) -> int:
    """g, the number of query heads per key/value head (axis -3; 1 for plain attention)."""
    hq, hkv = (q.shape[-3], k.shape[-3]) if q.ndim >= 3 else (1, 1)
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention: {hq} query heads cannot share {hkv} key/value heads "
                         f"(the query heads must be a multiple of the key/value heads)")
    return hq // hkv


def _grouped(x, g):
    """(..., Hq, T, D) -> a view (..., Hkv, g, T, D) (splitting an axis never copies)."""
    return x.reshape(x.shape[:-3] + (x.shape[-3] // g, g) + x.shape[-2:])


def _check_window(causal, window):
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0: none), got {window}")
    if window and not causal:
        raise ValueError("attention: a sliding window needs causal attention")


def band_mask(T, S, window, xp=np):
    """(T, S) mask, True where key j is hidden from query i (the last T of S positions):
    j in its future, or (``window`` > 0) j at least ``window`` positions behind it."""
    i = xp.arange(T)[:, None] + (S - T)
    j = xp.arange(S)[None, :]
    hide = j > i
    if window:
        hide |= j <= i - window
    return hide


# --------------------------------------------------------------------------- reference
def reference_forward(q, k, v, scale: float, causal: bool = True, window: int = 0):
    """Returns (o, lse): the output (..., Hq, T, D) and the log-sum-exp of each score row."""
    _check_window(causal, window)
    xp = backend.get_array_module(q)
    g = groups(q, k)
    T, S = q.shape[-2], k.shape[-2]
    q5, k5, v5 = _grouped(q, g), k[..., None, :, :], v[..., None, :, :]   # k, v broadcast over g
    s = (q5 @ xp.swapaxes(k5, -1, -2)) * scale                            # (..., Hkv, g, T, S)
    if causal:
        s = xp.where(band_mask(T, S, window, xp), -xp.inf, s)
    m = s.max(axis=-1, keepdims=True)
    p = xp.exp(s - m)
    tot = p.sum(axis=-1, keepdims=True)
    o = (p / tot) @ v5
    lse = (m + xp.log(tot))[..., 0]
    return o.reshape(q.shape).astype(q.dtype), lse.reshape(q.shape[:-1]).astype(q.dtype)


def reference_backward(q, k, v, o, lse, do, scale: float, causal: bool = True, window: int = 0):
    _check_window(causal, window)
    xp = backend.get_array_module(q)
    g = groups(q, k)
    T, S = q.shape[-2], k.shape[-2]
    lead = k.shape[:-2]                                                   # (..., Hkv)
    q5, k5, v5 = _grouped(q, g), k[..., None, :, :], v[..., None, :, :]
    s = (q5 @ xp.swapaxes(k5, -1, -2)) * scale
    p = xp.exp(s - _grouped(lse[..., None], g))
    if causal:
        p = xp.where(band_mask(T, S, window, xp), 0, p)
    do5 = _grouped(do, g)
    # the group folded into the rows: one product sums dV (and dK) over the g query heads
    pf = p.reshape(lead + (g * T, S))
    dv = xp.swapaxes(pf, -1, -2) @ do5.reshape(lead + (g * T, -1))
    dp = do5 @ xp.swapaxes(v5, -1, -2)
    delta = (do5 * _grouped(o, g)).sum(axis=-1, keepdims=True)            # rowsum(dO * O) = rowsum(P * dP)
    ds = p * (dp - delta) * scale
    dq = (ds @ k5).reshape(q.shape)
    dk = xp.swapaxes(ds.reshape(lead + (g * T, S)), -1, -2) @ q5.reshape(lead + (g * T, -1))
    return dq.astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)


def _future(T, S, xp):
    """(T, S) mask, True where key j lies in the future of query i (j > i + S - T)."""
    return band_mask(T, S, 0, xp)


# --------------------------------------------------------------------------- Numba flash
# Reassociation lets LLVM vectorise the dot-product loops; no "nnan"/"ninf" flags, because
# -inf (masked scores, the running max's start) and NaN (a diverging run) must behave.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

if HAVE_NUMBA:
    @numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _flash_fwd(q, k, v, scale, causal, window, tile, o, lse):
        # q (BH, T, D); k, v (BHkv, S, D): query row-batch b reads key/value batch b // g
        BH, T, D = q.shape
        S = k.shape[1]
        g = BH // k.shape[0]
        off = S - T
        ntile = (T + tile - 1) // tile
        for job in numba.prange(BH * ntile):
            b = job // ntile
            bk = b // g
            i0 = (job % ntile) * tile
            i1 = min(T, i0 + tile)
            n = i1 - i0
            m = np.full(n, -np.inf)
            lsum = np.zeros(n)
            acc = np.zeros((n, D))
            s = np.empty(tile)
            kend = min(S, i1 + off) if causal else S
            kbeg = max(0, i0 + off - window + 1) if window > 0 else 0
            for j0 in range(kbeg, kend, tile):
                j1 = min(kend, j0 + tile)
                for ii in range(n):
                    i = i0 + ii
                    jlim = min(j1, i + off + 1) if causal else j1
                    jfirst = max(j0, i + off - window + 1) if window > 0 else j0
                    if jlim <= jfirst:
                        continue
                    # scores of this query against the key tile, and their max
                    mt = -np.inf
                    for j in range(jfirst, jlim):
                        d0 = 0.0
                        for d in range(D):
                            d0 += q[b, i, d] * k[bk, j, d]
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
                    for j in range(jfirst, jlim):
                        pj = math.exp(s[j - j0] - mnew)
                        lsum[ii] += pj
                        for d in range(D):
                            acc[ii, d] += pj * v[bk, j, d]
                    m[ii] = mnew
            for ii in range(n):
                inv = 1.0 / lsum[ii]
                for d in range(D):
                    o[b, i0 + ii, d] = acc[ii, d] * inv
                lse[b, i0 + ii] = m[ii] + math.log(lsum[ii])

    @numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
    def _p_ds(q, k, v, do, lse, delta, scale, b, bk, i, j):
        # the recomputed probability p_ij and its score gradient ds_ij = p_ij (dp_ij - delta_i) scale
        sij = 0.0
        dpij = 0.0
        for d in range(q.shape[2]):
            sij += q[b, i, d] * k[bk, j, d]
            dpij += do[b, i, d] * v[bk, j, d]
        p = math.exp(sij * scale - lse[b, i])
        return p, p * (dpij - delta[b, i]) * scale

    @numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _flash_bwd_dq(q, k, v, delta, lse, do, scale, causal, window, dq):
        # one query row at a time: dq_i = sum_j ds_ij k_j
        BH, T, D = q.shape
        S = k.shape[1]
        g = BH // k.shape[0]
        off = S - T
        for job in numba.prange(BH * T):
            b = job // T
            i = job % T
            jlim = min(S, i + off + 1) if causal else S
            jfirst = max(0, i + off - window + 1) if window > 0 else 0
            for d in range(D):
                dq[b, i, d] = 0.0
            for j in range(jfirst, jlim):
                _, ds = _p_ds(q, k, v, do, lse, delta, scale, b, b // g, i, j)
                for d in range(D):
                    dq[b, i, d] += ds * k[b // g, j, d]

    @numba.njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _flash_bwd_dkv(q, k, v, delta, lse, do, scale, causal, window, dk, dv):
        # one key row at a time (no write conflicts between threads): sums over the queries
        # of every head in its group that see it
        BH, T, D = q.shape
        BK, S = k.shape[0], k.shape[1]
        g = BH // BK
        off = S - T
        for job in numba.prange(BK * S):
            bk = job // S
            j = job % S
            for d in range(D):
                dk[bk, j, d] = 0.0
                dv[bk, j, d] = 0.0
            i_first = max(0, j - off) if causal else 0
            i_end = min(T, j - off + window) if window > 0 else T
            for b in range(bk * g, bk * g + g):
                for i in range(i_first, i_end):
                    p, ds = _p_ds(q, k, v, do, lse, delta, scale, b, bk, i, j)
                    for d in range(D):
                        dv[bk, j, d] += p * do[b, i, d]
                        dk[bk, j, d] += ds * q[b, i, d]


def flash_forward(q, k, v, scale: float, causal: bool = True, tile: int = 64, window: int = 0):
    """q (BH, T, D), k and v (BHkv, S, D), contiguous."""
    _need_numba()
    _check_window(causal, window)
    groups(q, k)
    o = np.empty_like(q)
    lse = np.empty(q.shape[:2], dtype=q.dtype)
    _flash_fwd(q, k, v, scale, causal, window, tile, o, lse)
    return o, lse


def flash_backward(q, k, v, o, lse, do, scale: float, causal: bool = True, window: int = 0):
    _need_numba()
    _check_window(causal, window)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    delta = np.ascontiguousarray((do * o).sum(axis=-1))      # rowsum(dO * O), once per query
    _flash_bwd_dq(q, k, v, delta, lse, do, scale, causal, window, dq)
    _flash_bwd_dkv(q, k, v, delta, lse, do, scale, causal, window, dk, dv)
    return dq, dk, dv


def _need_numba():
    if not HAVE_NUMBA:
        raise RuntimeError("the 'flash' attention kernel needs Numba (pip install numba); "
                           "use impl='blocked' or 'reference'")


# --------------------------------------------------------------------------- blocked (BLAS + fused rows)
def _compiled_rows(*arrays) -> bool:
    """float32 NumPy scores go through the compiled row loops of ``kernels.cpu``."""
    return _cpu.accepts(*arrays, dtypes=(np.float32,))


def _softmax_rows(s, scale, row0, causal, lse, inv, window=0):
    """s (BH, R, S): raw scores of query rows row0.. -> exp(s * scale - row max), in place and
    unnormalised; inv (BH, R) = 1 / row sums and lse (BH, R) written. The caller scales the
    (R, D) output rows by inv: cheaper than dividing the (R, S) scores. Row r sees the
    tile's keys row0 + r - window + 1 .. row0 + r (from 0 without a window)."""
    if _compiled_rows(s):
        _cpu.softmax_rows_fwd(s, np.float32(scale), row0, causal, lse, inv, window)
        return
    xp = backend.get_array_module(s)
    s *= scale
    if causal:
        s += _causal_bias(row0, s.shape[1], s.shape[2], s.dtype, xp, window)   # -inf on hidden keys
    m = s.max(axis=-1, keepdims=True)
    xp.subtract(s, m, out=s)
    xp.exp(s, out=s)
    tot = s.sum(axis=-1)
    inv[...] = 1.0 / tot
    lse[...] = m[..., 0] + xp.log(tot)


def _softmax_grad_rows(s, dp, lse, delta, scale, row0, causal, window=0):
    """s: raw scores -> P in place; dp: dO V^T -> dS (times scale) in place. Causal: row r
    sees the tile's keys (row0 + r - window + 1 ..) 0 .. row0 + r (row0: first row's position
    minus first key's)."""
    if _compiled_rows(s, dp):
        _cpu.softmax_rows_bwd(s, dp, lse, delta, np.float32(scale), row0, causal, window)
        return
    xp = backend.get_array_module(s)
    s *= scale
    if causal:
        s += _causal_bias(row0, s.shape[1], s.shape[2], s.dtype, xp, window)   # exp(-inf) = 0 there
    s -= lse[..., None]
    xp.exp(s, out=s)
    dp -= delta[..., None]
    dp *= s
    dp *= scale


_bias_cache: dict = {}


def _causal_bias(row0, R, S, dtype, xp, window=0):
    """(R, S) array: 0 where query row0 + r may see key j, -inf where j lies in its future
    (or, with a window, ``window`` or more positions behind it).

    Adding it is one pass over the scores; a boolean-mask assignment was several. Cached,
    since a training run asks for the same few blocks at every step.
    """
    key = (row0, R, S, window, str(dtype), xp.__name__)
    b = _bias_cache.get(key)
    if b is None:
        j = xp.arange(S)[None, :]
        i = row0 + xp.arange(R)[:, None]
        hide = j > i
        if window:
            hide |= j <= i - window
        b = xp.where(hide, -xp.inf, 0.0).astype(dtype)
        if len(_bias_cache) > 256:
            _bias_cache.clear()
        _bias_cache[key] = b
    return b


def blocked_forward(q, k, v, scale: float, causal: bool = True, block: int = 128, out=None,
                    window: int = 0):
    """q (..., Hq, T, D), k and v (..., Hkv, S, D), any strides (BLAS reads strided rows):
    -> o (..., Hq, T, D) (written into ``out`` when given) and lse (..., Hq, T).

    A block of R query rows of the g heads of a group is one (g R, D) matrix against the
    keys it may see: those up to the last row's position, and (with a window) from the
    first row's position - window + 1.
    """
    _check_window(causal, window)
    xp = backend.get_array_module(q)
    g = groups(q, k)
    T = q.shape[-2]
    S = k.shape[-2]
    off = S - T
    lead = k.shape[:-2]                                   # (..., Hkv)
    o = xp.empty(q.shape, dtype=q.dtype) if out is None else out
    lse = xp.empty(q.shape[:-1], dtype=q.dtype)
    q5, o5, lse5 = _grouped(q, g), _grouped(o, g), _grouped(lse[..., None], g)[..., 0]
    kt = xp.swapaxes(k, -1, -2)
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        R = i1 - i0
        kend = min(S, i1 + off) if causal else S      # keys beyond the last row's position are unseen
        kbeg = max(0, i0 + off - window + 1) if window else 0
        qb = q5[..., i0:i1, :].reshape(lead + (g * R, q.shape[-1]))      # group folded into rows
        s = xp.matmul(qb, kt[..., kbeg:kend])                             # (..., Hkv, gR, n)
        s3 = s.reshape((-1, R, kend - kbeg))
        lse_blk = xp.empty(s3.shape[:2], dtype=q.dtype)
        inv = xp.empty(s3.shape[:2], dtype=q.dtype)
        _softmax_rows(s3, scale, i0 + off - kbeg, causal, lse_blk, inv, window)   # s -> exp, unnormalised
        lse5[..., i0:i1] = lse_blk.reshape(lse5.shape[:-1] + (R,))
        ob = xp.matmul(s, v[..., kbeg:kend, :])                            # (..., Hkv, gR, D)
        ob *= inv.reshape(ob.shape[:-1])[..., None]
        o5[..., i0:i1, :] = ob.reshape(o5.shape[:-2] + (R, q.shape[-1]))
    return o, lse


def blocked_backward(q, k, v, o, lse, do, scale: float, causal: bool = True, block: int = 128,
                     out=None, window: int = 0):
    """Gradients (dq, dk, dv) for blocked_forward's inputs; ``out``: three arrays to write
    them into (any strides, contents overwritten).

    The loop runs over blocks of keys (where the forward ran over blocks of queries): for
    key block j only the queries that may see it take part (with a window: at most
    block + window - 1 of them), and dk_j and dv_j come out of one product each over all
    of them and all heads of the group, written once; only dq accumulates across blocks.
    """
    _check_window(causal, window)
    xp = backend.get_array_module(q)
    g = groups(q, k)
    T = q.shape[-2]
    S = k.shape[-2]
    D = q.shape[-1]
    off = S - T
    lead = k.shape[:-2]
    delta = (do * o).sum(axis=-1)                                           # (..., Hq, T)
    if out is None:
        dq, dk, dv = xp.empty(q.shape, q.dtype), xp.empty(k.shape, k.dtype), xp.empty(v.shape, v.dtype)
    else:
        dq, dk, dv = out
    q5, do5, dq5 = _grouped(q, g), _grouped(do, g), _grouped(dq, g)
    lse5, delta5 = _grouped(lse[..., None], g)[..., 0], _grouped(delta[..., None], g)[..., 0]
    if window:
        dq[...] = 0                                     # not every query sees key 0
    for j0 in range(0, S, block):
        j1 = min(S, j0 + block)
        r0 = max(0, j0 - off) if causal else 0          # first query that may see key j0
        r1 = min(T, j1 - 1 + window - off) if window else T   # last query seeing key j1 - 1, + 1
        if r0 >= r1:                                    # keys no query sees (S > T, causal)
            dk[..., j0:j1, :] = 0
            dv[..., j0:j1, :] = 0
            continue
        R, Bk = r1 - r0, j1 - j0
        qb = q5[..., r0:r1, :].reshape(lead + (g * R, D))                   # group folded into rows
        dob = do5[..., r0:r1, :].reshape(lead + (g * R, D))
        kb, vb = k[..., j0:j1, :], v[..., j0:j1, :]
        s = xp.matmul(qb, xp.swapaxes(kb, -1, -2))                          # (..., Hkv, gR, Bk)
        dp = xp.matmul(dob, xp.swapaxes(vb, -1, -2))                        # (..., Hkv, gR, Bk)
        _softmax_grad_rows(s.reshape(-1, R, Bk), dp.reshape(-1, R, Bk),
                           lse5[..., r0:r1].reshape(-1, R), delta5[..., r0:r1].reshape(-1, R),
                           scale, r0 + off - j0, causal, window)            # s -> P, dp -> dS
        dv[..., j0:j1, :] = xp.matmul(xp.swapaxes(s, -1, -2), dob)          # sums over the group
        dk[..., j0:j1, :] = xp.matmul(xp.swapaxes(dp, -1, -2), qb)
        dqb = xp.matmul(dp, kb).reshape(dq5.shape[:-2] + (R, D))
        if j0 == 0 and not window:                      # every query sees key 0: r0 == 0
            dq5[...] = dqb
        else:
            dq5[..., r0:r1, :] += dqb
    return dq, dk, dv


# --------------------------------------------------------------------------- decode
def decode_attention(q, k, v, scale: float):
    """One new query per head against all cached keys (no mask: the cache holds exactly the
    positions it may see): q (BH, 1, D), k and v (BHkv, S, D). The g query heads sharing a
    key/value head are one (g, D) matrix, so K and V are read once per group."""
    xp = backend.get_array_module(q)
    g = q.shape[0] // k.shape[0]
    qg = q.reshape(k.shape[0], g, q.shape[-1])                              # (BHkv, g, D)
    s = xp.matmul(qg, xp.swapaxes(k, -1, -2)) * scale                       # (BHkv, g, S)
    s -= s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return xp.matmul(p, v).reshape(q.shape)                                 # (BH, 1, D)


# --------------------------------------------------------------------------- rotary positions
def rope_tables(pos0: int, T: int, D: int, dtype, xp=np, base: float = 10000.0):
    """cos, sin (T, D / 2) for positions pos0 .. pos0 + T - 1: pair i turns by
    position * base^(-2i / D). Computed in float64, cast to ``dtype``; cached."""
    key = (pos0, T, D, base, str(np.dtype(dtype)), xp.__name__)
    t = _rope_cache.get(key)
    if t is None:
        inv_freq = base ** (-np.arange(0, D // 2, dtype=np.float64) * 2.0 / D)
        ang = np.arange(pos0, pos0 + T, dtype=np.float64)[:, None] * inv_freq[None, :]
        t = (xp.asarray(np.cos(ang).astype(dtype)), xp.asarray(np.sin(ang).astype(dtype)))
        if len(_rope_cache) > 64:
            _rope_cache.clear()
        _rope_cache[key] = t
    return t


_rope_cache: dict = {}


def rope_apply(x, cos, sin, out=None, inverse: bool = False):
    """Rotate the pairs (x_i, x_{i + D/2}) of x (..., T, D) by the angles of the tables
    (``inverse``: by minus them, which is the transpose: the backward pass). Returns ``out``
    (a new array when None; it must not overlap x)."""
    xp = backend.get_array_module(x)
    h = x.shape[-1] // 2
    if out is None:
        out = xp.empty(x.shape, dtype=x.dtype)
    x1, x2 = x[..., :h], x[..., h:]
    if inverse:
        sin = -sin
    xp.multiply(x1, cos, out=out[..., :h])
    out[..., :h] -= x2 * sin
    xp.multiply(x2, cos, out=out[..., h:])
    out[..., h:] += x1 * sin
    return out


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




# --------------------------------------------------------------------------- running a kernel
# The attention nodes (``minigrad.attention``) call these two: array in, array out.
def _flat3(xp, *arrays):
    """Contiguous (BH, T, d) copies of (..., T, d) arrays, for the kernels that want them."""
    return [xp.ascontiguousarray(x).reshape((-1,) + x.shape[-2:]) for x in arrays]


# Below this many multiply-adds (batch x heads x T x S x d) a call runs on one thread: the
# hand-over to the pool costs tens of microseconds.
MIN_PARALLEL_WORK = 1 << 21


def _head_chunks(q, k):
    """Index pairs (for q, for k) cutting the leading (batch, head, ...) axes into one part
    per pool thread, along the first axis of k's long enough (else the longest); a cut of
    the head axis takes the g query heads of each key/value head with it. [((...,), (...,))],
    one part holding everything, when the work is small, the arrays are not NumPy's or
    there is no pool."""
    whole = [((Ellipsis,), (Ellipsis,))]
    if not (isinstance(q, np.ndarray) and q.ndim > 2):
        return whole
    lead = k.shape[:-2]
    if math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * q.shape[-1] < MIN_PARALLEL_WORK:
        return whole
    n = _threads.num_workers()
    ax = next((i for i, m in enumerate(lead) if m >= n), int(np.argmax(lead)))
    if n < 2 or lead[ax] < 2:
        return whole
    g = groups(q, k) if ax == len(lead) - 1 else 1
    return [((slice(None),) * ax + (slice(s.start * g, s.stop * g),), (slice(None),) * ax + (s,))
            for s in _threads.split(lead[ax], n)]


def run_forward(impl, q, k, v, scale, causal, block, out, window=0):
    """Kernel ``impl`` on q (..., Hq, T, d), k, v (..., Hkv, S, d) of any strides: the output
    goes into ``out``, the row log-sum-exp (..., Hq, T) is returned. The blocked kernel reads
    the arrays in place, its heads split over the BLAS library's threads
    (``threads.parallel_for``, which runs a single part in this thread); the reference and
    flash kernels get contiguous (BH, T, d) copies."""
    xp = backend.get_array_module(q)
    if impl == "blocked":
        lse = xp.empty(q.shape[:-1], dtype=q.dtype)

        def run(ix):
            iq, ik = ix
            lse[iq] = blocked_forward(q[iq], k[ik], v[ik], scale, causal, block, out=out[iq],
                                      window=window)[1]
        _threads.parallel_for(run, _head_chunks(q, k))
        return lse
    o3, lse = IMPLS[impl][0](*_flat3(xp, q, k, v), scale, causal, window=window)
    out[...] = o3.reshape(out.shape)
    return lse.reshape(q.shape[:-1])


def run_backward(impl, q, k, v, o, lse, do, scale, causal, block, out, window=0):
    """Gradients of ``run_forward`` written into the three arrays of ``out``."""
    if impl == "blocked":
        def run(ix):
            iq, ik = ix
            blocked_backward(q[iq], k[ik], v[ik], o[iq], lse[iq], do[iq], scale, causal, block,
                             out=(out[0][iq], out[1][ik], out[2][ik]), window=window)
        _threads.parallel_for(run, _head_chunks(q, k))
        return
    q3, k3, v3, o3, do3 = _flat3(backend.get_array_module(q), q, k, v, o, do)
    grads = IMPLS[impl][1](q3, k3, v3, o3, lse.reshape(q3.shape[:2]), do3, scale, causal,
                           window=window)
    for dst, src in zip(out, grads):
        dst[...] = src.reshape(dst.shape)
