"""Compiled CPU loops for the fused nodes (GELU, LayerNorm) and the attention softmax.

Why loops: NumPy evaluates ``0.5 * x * (1 + tanh(c * (x + a x^3)))`` as ~8 passes over
memory with a temporary array each; one loop reads ``x`` once and writes ``y`` once.

Why these loops are fast: LLVM turns a simple loop into SIMD code (8 float32 lanes with
AVX2, 16 with AVX-512) if nothing in the body blocks it. Two things do in Numba:

* a division under Numba's default ``error_model="python"`` (it must be able to raise
  ZeroDivisionError, a branch per element). ``error_model="numpy"`` gives IEEE results
  (inf/nan) instead and the loop vectorizes;
* a call into the C math library (``math.tanh``, ``math.exp``): one scalar call per
  element, 10-50x slower than NumPy's own SIMD ``np.tanh``. So ``exp`` is written here as
  arithmetic that LLVM can vectorize (``_exp32``), and ``tanh`` is built on it.

Why each loop is serial: a parallel Numba loop next to OpenBLAS's thread pool made the
matrix products around it up to 2x slower (both pools spin-wait for work on the same
cores). The loops are split over cores another way: ``pooled.py`` runs them in chunks on
OpenBLAS's own threads (see ``threads.py``), each chunk one call of the serial loop.

``fastmath`` is given as a set of flags without ``nnan``/``ninf``: the compiler may
reorder sums and contract multiply-adds, but it may not assume that NaN and inf never
occur, so a NaN still propagates to the loss, where the trainer catches it.

Every kernel has an array-code twin (the ``xp`` path in ``minigrad/fused.py`` and
``attention.py``) that runs on CuPy, without Numba, and on float64 (``_exp32`` is a
float32 function); ``tests/test_kernels_cpu.py`` holds the two equal to float32 accuracy.
"""
from __future__ import annotations

import math

import numpy as np

from ._numba import HAVE_NUMBA, numba

# No nnan/ninf: see the module docstring.
FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

def accepts(*arrays, dtypes=(np.float32, np.float64)) -> bool:
    """True when the compiled loops can take these arrays: Numba is there and each is a
    NumPy array of one of ``dtypes`` (CuPy arrays, and runs without Numba, use array code)."""
    return HAVE_NUMBA and all(isinstance(a, np.ndarray) and a.dtype in dtypes for a in arrays)


GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715

# --------------------------------------------------------------------------- exp
# exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2; exp(r) by its Taylor series
# to r^7 (truncation error below 6e-9 relative, under float32's 6e-8 rounding); 2^n built
# directly in the exponent bits of a float32. ln 2 is split into a part exact in float32
# and a remainder, so that x - n ln 2 loses nothing for large n (Cody and Waite's method).
EXP_HI = 88.0                    # above: inf (float32 max is 3.4e38 ~ e^88.7)
EXP_LO = -87.0                   # below: 0 (keeps 2^n a normal number; e^-87 ~ 1.6e-38)
LN2_HI = 0.693145751953125       # ln 2 rounded to 16 significant bits: n * LN2_HI is exact
LN2_LO = 1.428606820309417e-06   # ln 2 - LN2_HI


if HAVE_NUMBA:
    _JIT = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
    _f = np.float32
    _GC = np.float32(GELU_C)
    _GC3 = np.float32(GELU_C * GELU_A)
    _GD3 = np.float32(3.0 * GELU_C * GELU_A)

    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic

    def bitcast(src, dst):
        """An intrinsic reading a ``src`` number's bits as a ``dst`` of the same width (an
        LLVM bitcast: free, vectorizable)."""
        @_intrinsic
        def cast(typingctx, bits):
            if bits != src:
                return None

            def codegen(context, builder, signature, args):
                return builder.bitcast(args[0], context.get_value_type(dst))
            return dst(src), codegen
        return cast

    _bits_to_f32 = bitcast(_types.int32, _types.float32)

    _LOG2E = np.float32(1.0 / math.log(2.0))
    _LN2_HI, _LN2_LO = np.float32(LN2_HI), np.float32(LN2_LO)
    _EXP_HI, _EXP_LO = np.float32(EXP_HI), np.float32(EXP_LO)
    _C = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))

    @numba.njit(inline="always", **_JIT)
    def _exp32(x):
        xc = min(max(x, _EXP_LO), _EXP_HI)
        n = np.int32(math.floor(xc * _LOG2E + _f(0.5)))
        nf = _f(n)
        r = (xc - nf * _LN2_HI) - nf * _LN2_LO
        p = ((((((_C[7] * r + _C[6]) * r + _C[5]) * r + _C[4]) * r + _C[3]) * r + _C[2]) * r
             + _C[1]) * r + _C[0]
        e = p * _bits_to_f32(np.int32((n + np.int32(127)) << np.int32(23)))
        if x < _EXP_LO:
            e = _f(0.0)
        elif x > _EXP_HI:
            e = _f(np.inf)
        return e if x == x else x                     # NaN in, NaN out

    @numba.njit(**_JIT)
    def exp32(x, y):
        """y = exp(x) over flat float32 arrays (for tests; the kernels inline _exp32)."""
        for i in range(x.size):
            y[i] = _exp32(x[i])

    @numba.njit(inline="always", **_JIT)
    def _one_minus_abs_tanh(u):
        """1 - |tanh(u)| = 2 / (1 + exp(2|u|)): exact to a few ulp even where tanh ~ +-1."""
        return _f(2.0) / (_f(1.0) + _exp32(_f(2.0) * abs(u)))

    @numba.njit(**_JIT)
    def gelu_tanh_fwd(x, y):
        """y = 0.5 x (1 + tanh(c (x + a x^3))) over flat float32 arrays.

        1 + tanh(u) is formed as 2 - em (u >= 0) or em (u < 0), em = 1 - |tanh u|, so the
        output keeps its relative accuracy where it goes to 0 (large negative x).
        """
        for i in range(x.size):
            v = x[i]
            u = v * (_GC + _GC3 * v * v)
            em = _one_minus_abs_tanh(u)
            one_plus_t = _f(2.0) - em if u >= 0 else em
            y[i] = _f(0.5) * v * one_plus_t

    # erfc(z) for z >= 0 by the Chebyshev fit of Numerical Recipes (2nd ed., section 6.2,
    # ``erfcc``): t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), fractional error below 1.2e-7
    # everywhere. Relative accuracy in the tail is what the exact GELU needs: for x < 0,
    # 1 + erf(x / sqrt 2) = erfc(|x| / sqrt 2), which goes to 0.
    _ERFC = tuple(np.float32(c) for c in (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
                                          0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277))
    _RSQRT2 = np.float32(1.0 / math.sqrt(2.0))
    _RSQRT2PI = np.float32(1.0 / math.sqrt(2.0 * math.pi))

    @numba.njit(inline="always", **_JIT)
    def _erfc_poly(t):
        c = _ERFC
        return c[0] + t * (c[1] + t * (c[2] + t * (c[3] + t * (c[4] + t * (c[5] + t * (c[6] + t * (
            c[7] + t * (c[8] + t * c[9]))))))))

    @numba.njit(inline="always", **_JIT)
    def _one_plus_erf(v):
        """1 + erf(v / sqrt 2), with its relative accuracy kept where it goes to 0."""
        z = abs(v) * _RSQRT2
        t = _f(1.0) / (_f(1.0) + _f(0.5) * z)
        ec = t * _exp32(_erfc_poly(t) - z * z)
        return _f(2.0) - ec if v >= 0 else ec

    @numba.njit(**_JIT)
    def gelu_erf_fwd(x, y):
        """y = 0.5 x (1 + erf(x / sqrt 2)) (the exact GELU) over flat float32 arrays."""
        for i in range(x.size):
            v = x[i]
            y[i] = _f(0.5) * v * _one_plus_erf(v)

    @numba.njit(**_JIT)
    def gelu_erf_bwd(x, gy, gx):
        """gx = gy * (0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi))."""
        for i in range(x.size):
            v = x[i]
            d = _f(0.5) * _one_plus_erf(v) + v * _RSQRT2PI * _exp32(_f(-0.5) * v * v)
            gx[i] = gy[i] * d

    @numba.njit(**_JIT)
    def gelu_tanh_bwd(x, gy, gx):
        """gx = gy * d/dx gelu(x), tanh recomputed from x (nothing else is saved).

        d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2), with 1 - t^2 = em (2 - em).
        """
        for i in range(x.size):
            v = x[i]
            v2 = v * v
            u = v * (_GC + _GC3 * v2)
            em = _one_minus_abs_tanh(u)
            one_plus_t = _f(2.0) - em if u >= 0 else em
            sech2 = em * (_f(2.0) - em)
            d = _f(0.5) * one_plus_t + _f(0.5) * v * sech2 * (_GC + _GD3 * v2)
            gx[i] = gy[i] * d

    @numba.njit(**_JIT)
    def layer_norm_fwd(x, w, b, eps, y, mean, rstd):
        """Rows of x (N, C) -> y; row statistics in float64, mean/rstd (N,) float64 out."""
        N, C = x.shape
        for i in range(N):
            s = 0.0
            for j in range(C):
                s += x[i, j]
            mu = s / C
            s2 = 0.0
            for j in range(C):
                d = x[i, j] - mu
                s2 += d * d
            r = 1.0 / np.sqrt(s2 / C + eps)
            mean[i] = mu
            rstd[i] = r
            for j in range(C):
                y[i, j] = (x[i, j] - mu) * r * w[j] + b[j]

    @numba.njit(**_JIT)
    def layer_norm_bwd(x, w, mean, rstd, gy, gx, gw, gb):
        """gx (N, C) written; gw, gb (C,) float64 accumulated (zeroed by the caller)."""
        N, C = x.shape
        for i in range(N):
            mu = mean[i]
            r = rstd[i]
            s1 = 0.0
            s2 = 0.0
            for j in range(C):
                xh = (x[i, j] - mu) * r
                g = gy[i, j] * w[j]
                s1 += g
                s2 += g * xh
                gw[j] += gy[i, j] * xh
                gb[j] += gy[i, j]
            m1 = s1 / C
            m2 = s2 / C
            for j in range(C):
                xh = (x[i, j] - mu) * r
                gx[i, j] = (gy[i, j] * w[j] - m1 - xh * m2) * r

    # ----------------------------------------------------------------------- softmax rows
    # A max over a row in one chain of comparisons runs one element per step (LLVM vectorizes
    # a max-reduction only if it may assume there is no NaN). Eight independent running
    # maxima, combined at the end, let the compiler use vector compares: 30% faster rows.
    @numba.njit(inline="always", **_JIT)
    def _row_max(row, lo, n):
        m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[lo]
        j = lo
        while j + 8 <= n:
            m0 = max(m0, row[j])
            m1 = max(m1, row[j + 1])
            m2 = max(m2, row[j + 2])
            m3 = max(m3, row[j + 3])
            m4 = max(m4, row[j + 4])
            m5 = max(m5, row[j + 5])
            m6 = max(m6, row[j + 6])
            m7 = max(m7, row[j + 7])
            j += 8
        m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
        while j < n:
            m = max(m, row[j])
            j += 1
        return m

    @numba.njit(**_JIT)
    def softmax_rows_fwd(s, scale, row0, causal, lse, inv, window=0):
        """s (BH, R, S) raw scores of query rows row0.. -> exp(s scale - row max) in place,
        unnormalised; inv (BH, R) = 1 / row sum, lse (BH, R) = log-sum-exp of s scale.

        The caller scales the (R, D) output rows by inv instead of the (R, S) probabilities.
        Causal: row row0 + r sees keys 0 .. row0 + r (with ``window`` > 0: only from
        row0 + r - window + 1); the rest is set to 0 and never exp'd.
        """
        BH, R, S = s.shape
        for b in range(BH):
            for r in range(R):
                n = min(S, row0 + r + 1) if causal else S
                lo = max(0, row0 + r - window + 1) if (causal and window > 0) else 0
                row = s[b, r]
                # the visible keys as a view from 0: index arithmetic from a run-time start
                # kept LLVM from vectorizing the loops (8x slower rows)
                seg = row[lo:n]
                m = _row_max(seg, 0, n - lo) * scale
                tot = _f(0.0)
                for j in range(n - lo):
                    e = _exp32(seg[j] * scale - m)
                    seg[j] = e
                    tot += e
                for j in range(lo):
                    row[j] = _f(0.0)
                for j in range(n, S):
                    row[j] = _f(0.0)
                inv[b, r] = _f(1.0) / tot
                lse[b, r] = m + math.log(tot)

    @numba.njit(**_JIT)
    def softmax_rows_bwd(s, dp, lse, delta, scale, row0, causal, window=0):
        """s: raw scores -> P = exp(s scale - lse) in place; dp = dO V^T -> dS scale in place.

        Causal: row r sees the tile's keys 0 .. row0 + r (with ``window`` > 0: from
        row0 + r - window + 1), row0 being the position of the first row counted from the
        tile's first key.
        """
        BH, R, S = s.shape
        for b in range(BH):
            for r in range(R):
                n = max(0, min(S, row0 + r + 1)) if causal else S
                lo = min(n, max(0, row0 + r - window + 1)) if (causal and window > 0) else 0
                l = lse[b, r]
                dl = delta[b, r]
                sv = s[b, r, lo:n]                       # views from 0 (see softmax_rows_fwd)
                dv = dp[b, r, lo:n]
                for j in range(n - lo):
                    p = _exp32(sv[j] * scale - l)
                    sv[j] = p
                    dv[j] = p * (dv[j] - dl) * scale
                for j in range(lo):
                    s[b, r, j] = _f(0.0)
                    dp[b, r, j] = _f(0.0)
                for j in range(n, S):
                    s[b, r, j] = _f(0.0)
                    dp[b, r, j] = _f(0.0)

    # ----------------------------------------------------------------------- scatter-add rows
    @numba.njit(**_JIT)
    def scatter_add_rows(target, index, values):
        """target[index[i]] += values[i] for a 2-D target, repeats accumulated in order
        (the embedding gradient; ``np.add.at`` does the same one element at a time)."""
        V, C = target.shape
        for i in range(index.size):
            r = index[i]
            if r < 0:
                r += V
            for j in range(C):
                target[r, j] += values[i, j]

    # ----------------------------------------------------------------------- AdamW update
    # No fastmath here: the same operation order as the optimizer's array code, so the two
    # agree to rounding (tests/test_optim.py holds them together).
    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def adam_step(p, g, m, v, lr, b1, b2, eps, bc1, bc2_sqrt, decay):
        """One AdamW update of flat arrays p, m, v in place: one pass over memory instead of
        ~8 array operations with a temporary each."""
        for i in range(p.size):
            gi = g[i]
            if decay != 0.0:
                p[i] *= 1.0 - decay
            mi = m[i] * b1 + (1.0 - b1) * gi
            vi = v[i] * b2 + (1.0 - b2) * (gi * gi)
            m[i] = mi
            v[i] = vi
            p[i] -= (lr / bc1) * (mi / (np.sqrt(vi) / bc2_sqrt + eps))

    # ----------------------------------------------------------------------- bias rows
    @numba.njit(**_JIT)
    def add_bias_rows(y, b):
        """y (N, C) += b (C,) in place: a Linear layer's bias."""
        N, C = y.shape
        for i in range(N):
            for j in range(C):
                y[i, j] += b[j]

    @numba.njit(**_JIT)
    def sum_rows(g, out):
        """out (C,) float64 += the sum of g's rows (N, C): a bias gradient, accumulated in
        float64 (NumPy's float32 ``g.sum(axis=0)`` adds row after row in float32)."""
        N, C = g.shape
        for i in range(N):
            for j in range(C):
                out[j] += g[i, j]
