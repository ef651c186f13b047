"""Products with packed weights, computed from the codes: y = x W^T and g W.

Decoding one token is a matrix-vector product per layer, and it is memory-bound: the time
goes into reading W. So the small-batch path (N <= ``SMALL_N`` rows of x) is a compiled
loop that reads each block of codes once, turns it into floats in registers and multiplies
it with every row of x; it never writes a float W anywhere. Fewer bytes of codes per weight
is the whole speed-up: 1 byte (int8, q8_0) or about half a byte (q4_0) instead of 4.
The output rows are split over the BLAS pool (``threads.run_c``: one record per pool
thread, no Python on the pool) when a matrix is large enough to pay for the hand-over.

Prompts and training batches (N > ``SMALL_N``) are compute-bound instead, and there no
loop of ours beats BLAS: W is decoded one tile of ``TILE_ELEMS`` weights at a time into a
scratch buffer (by the same compiled code) and multiplied by BLAS, so the float W is never
whole in memory and each code is decoded once per call, not once per row of x.

Layouts are the ones ``minigrad.quant`` documents; each compiled loop is tested against
that module's ``unpack``. Arrays that are not NumPy float32 (CuPy, float64 in gradient
checks), or a run without Numba, take the array-code path: the same tiles decoded with
``unpack`` and multiplied with ``xp.matmul``.
"""
from __future__ import annotations

import numpy as np

from . import threads
from ._numba import HAVE_NUMBA, numba

SMALL_N = 8                  # up to this many rows of x: the code-reading loop
TILE_ELEMS = 1 << 18         # weights per decoded tile on the BLAS path (1 MiB of float32)
MIN_POOL_BYTES = 1 << 17     # split a matrix-vector product over the pool from this many bytes of codes

_NF4 = None

if HAVE_NUMBA:
    from numba.core import types as _t

    from .cpu import FASTMATH, bitcast

    _JIT = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
    _u32_to_f32 = bitcast(_t.uint32, _t.float32)
    _P112 = np.float32(2.0 ** 112)

    @numba.njit(inline="always", **_JIT)
    def _half(h):
        """float16 bits (an integer 0..65535) -> float32: the exponent is re-biased by a
        multiplication (2^112), which also gets subnormal halves right; no inf/nan (weights
        and scales are finite)."""
        bits = np.uint32(((h & 0x8000) << 16) | ((h & 0x7FFF) << 13))
        return _u32_to_f32(bits) * _P112

    @numba.njit(inline="always", **_JIT)
    def _bf16(h):
        return _u32_to_f32(np.uint32(np.uint32(h) << 16))

    # ----------------------------------------------------------------- matrix x few vectors
    # Each: y[n, o] for o in [o0, o1), all n; x (N, K) float32 C-contiguous.
    @numba.njit(**_JIT)
    def mv_fp16(x, w, y, o0, o1):                  # w uint16 (out, K): float16 bits
        N, K = x.shape
        for o in range(o0, o1):
            row = w[o]
            for n in range(N):
                xn = x[n]
                s = np.float32(0)
                for k in range(K):
                    s += _half(np.int64(row[k])) * xn[k]
                y[n, o] = s

    @numba.njit(**_JIT)
    def mv_bf16(x, w, y, o0, o1):                  # w uint16 (out, K)
        N, K = x.shape
        for o in range(o0, o1):
            row = w[o]
            for n in range(N):
                xn = x[n]
                s = np.float32(0)
                for k in range(K):
                    s += _bf16(row[k]) * xn[k]
                y[n, o] = s

    @numba.njit(**_JIT)
    def mv_int8(x, codes, scale, y, o0, o1):       # codes int8 (out, K), scale (out,)
        N, K = x.shape
        for o in range(o0, o1):
            row = codes[o]
            for n in range(N):
                xn = x[n]
                s = np.float32(0)
                for k in range(K):
                    s += np.float32(row[k]) * xn[k]
                y[n, o] = s * scale[o]

    @numba.njit(**_JIT)
    def mv_q8_0(x, blocks, y, o0, o1):             # blocks int8 view (out, K/32*34)
        N, K = x.shape
        nb = K // 32
        acc = np.zeros(N, np.float32)
        for o in range(o0, o1):
            row = blocks[o]
            acc[:] = 0
            for b in range(nb):
                p = b * 34
                d = _half(np.int64(row[p] & 0xFF) | (np.int64(row[p + 1] & 0xFF) << 8))
                for n in range(N):
                    xb = b * 32
                    s = np.float32(0)
                    for k in range(32):
                        s += np.float32(row[p + 2 + k]) * x[n, xb + k]
                    acc[n] += d * s
            for n in range(N):
                y[n, o] = acc[n]

    @numba.njit(**_JIT)
    def mv_q4_0(x, blocks, y, o0, o1):             # blocks uint8 (out, K/32*18)
        N, K = x.shape
        nb = K // 32
        acc = np.zeros(N, np.float32)
        for o in range(o0, o1):
            row = blocks[o]
            acc[:] = 0
            for b in range(nb):
                p = b * 18
                d = _half(np.int64(row[p]) | (np.int64(row[p + 1]) << 8))
                for n in range(N):
                    xb = b * 32
                    s = np.float32(0)
                    for j in range(16):
                        q = np.int32(row[p + 2 + j])
                        s += np.float32((q & 15) - 8) * x[n, xb + j] + np.float32((q >> 4) - 8) * x[n, xb + 16 + j]
                    acc[n] += d * s
            for n in range(N):
                y[n, o] = acc[n]

    @numba.njit(**_JIT)
    def mv_nf4(x, codes, absmax_q, absmax_scale, offset, levels, y, o0, o1):   # codes uint8 (out, K/2)
        N, K = x.shape
        nb = K // 64
        acc = np.zeros(N, np.float32)
        for o in range(o0, o1):
            row = codes[o]
            acc[:] = 0
            for b in range(nb):
                g = o * nb + b
                am = np.float32(absmax_q[g]) * absmax_scale[g // 256] + offset
                for n in range(N):
                    s = np.float32(0)
                    for j in range(32):
                        q = np.int32(row[b * 32 + j])
                        s += levels[q & 15] * x[n, b * 64 + 2 * j] + levels[q >> 4] * x[n, b * 64 + 2 * j + 1]
                    acc[n] += am * s
            for n in range(N):
                y[n, o] = acc[n]

    # ----------------------------------------------------------------- tiles of float W
    # Each: out[i, :] = row r0 + i of W, for i < out.shape[0].
    @numba.njit(**_JIT)
    def dq_fp16(w, r0, out):
        for i in range(out.shape[0]):
            row = w[r0 + i]
            for k in range(out.shape[1]):
                out[i, k] = _half(np.int64(row[k]))

    @numba.njit(**_JIT)
    def dq_bf16(w, r0, out):
        for i in range(out.shape[0]):
            row = w[r0 + i]
            for k in range(out.shape[1]):
                out[i, k] = _bf16(row[k])

    @numba.njit(**_JIT)
    def dq_int8(codes, scale, r0, out):
        for i in range(out.shape[0]):
            row, s = codes[r0 + i], scale[r0 + i]
            for k in range(out.shape[1]):
                out[i, k] = np.float32(row[k]) * s

    @numba.njit(**_JIT)
    def dq_q8_0(blocks, r0, out):
        nb = out.shape[1] // 32
        for i in range(out.shape[0]):
            row = blocks[r0 + i]
            for b in range(nb):
                p = b * 34
                d = _half(np.int64(row[p] & 0xFF) | (np.int64(row[p + 1] & 0xFF) << 8))
                for k in range(32):
                    out[i, b * 32 + k] = np.float32(row[p + 2 + k]) * d

    @numba.njit(**_JIT)
    def dq_q4_0(blocks, r0, out):
        nb = out.shape[1] // 32
        for i in range(out.shape[0]):
            row = blocks[r0 + i]
            for b in range(nb):
                p = b * 18
                d = _half(np.int64(row[p]) | (np.int64(row[p + 1]) << 8))
                for j in range(16):
                    q = np.int32(row[p + 2 + j])
                    out[i, b * 32 + j] = np.float32((q & 15) - 8) * d
                    out[i, b * 32 + 16 + j] = np.float32((q >> 4) - 8) * d

    @numba.njit(**_JIT)
    def dq_nf4(codes, absmax_q, absmax_scale, offset, levels, r0, out):
        nb = out.shape[1] // 64
        for i in range(out.shape[0]):
            row = codes[r0 + i]
            for b in range(nb):
                g = (r0 + i) * nb + b
                am = np.float32(absmax_q[g]) * absmax_scale[g // 256] + offset
                for j in range(32):
                    q = np.int32(row[b * 32 + j])
                    out[i, b * 64 + 2 * j] = levels[q & 15] * am
                    out[i, b * 64 + 2 * j + 1] = levels[q >> 4] * am


def _levels():
    global _NF4
    if _NF4 is None:
        from ..quant import NF4_LEVELS
        _NF4 = np.ascontiguousarray(NF4_LEVELS, dtype=np.float32)
    return _NF4


def _args(fmt: str, a: dict) -> tuple:
    """The compiled loops' array arguments for one format (views, no copies)."""
    if fmt in ("fp16", "bf16"):
        return (a["data"].view(np.uint16),)
    if fmt == "int8":
        return a["codes"], a["scale"]
    if fmt == "q8_0":
        return (a["blocks"].view(np.int8),)
    if fmt == "q4_0":
        return (a["blocks"],)
    if fmt == "nf4":
        return a["codes"], a["absmax_q"], a["absmax_scale"], np.float32(a["absmax_offset"][0]), _levels()
    raise ValueError(f"no kernel for format {fmt!r}")


def compiled(x, arrays: dict) -> bool:
    """True when the compiled loops take these arrays (Numba, NumPy, float32 x, contiguous)."""
    return (HAVE_NUMBA and isinstance(x, np.ndarray) and x.dtype == np.float32
            and all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays.values()))


def _mv(fmt):
    return globals()["mv_" + fmt]


def _dq(fmt):
    return globals()["dq_" + fmt]


def _parts(out: int, nbytes: int) -> list[slice]:
    if nbytes < MIN_POOL_BYTES:
        return [slice(0, out)]
    return threads.row_chunks(out, 16)


def matvec(x, fmt: str, arrays: dict, out_features: int):
    """y (N, out) = x (N, K) W^T for few rows N, from the codes (compiled, on the pool)."""
    x = np.ascontiguousarray(x)
    y = np.empty((x.shape[0], out_features), np.float32)
    args = _args(fmt, arrays)
    nbytes = sum(a.nbytes for a in arrays.values())
    parts = _parts(out_features, nbytes)
    kern = _mv(fmt)
    if len(parts) < 2:
        kern(x, *args, y, 0, out_features)
    else:
        threads.parallel_for(lambda s: kern(x, *args, y, s.start, s.stop), parts)
    return y


def tile_rows(K: int) -> int:
    return max(16, TILE_ELEMS // max(K, 1))


def dequantize_tile(fmt: str, arrays: dict, r0: int, out):
    """out (rows, K) float32 = rows r0.. of W (compiled)."""
    _dq(fmt)(*_args(fmt, arrays), r0, out)
    return out


def matmul(x, fmt: str, arrays: dict, shape, unpack=None):
    """y (N, out) = x (N, K) @ W^T. ``unpack(rows_slice)`` gives float tiles on the array path."""
    out_f, K = shape
    N = x.shape[0]
    if compiled(x, arrays):
        if N <= SMALL_N:
            return matvec(x, fmt, arrays, out_f)
        yT = np.empty((out_f, N), np.float32)
        R = tile_rows(K)
        buf = np.empty((min(R, out_f), K), np.float32)
        for r0 in range(0, out_f, R):
            r1 = min(out_f, r0 + R)
            t = dequantize_tile(fmt, arrays, r0, buf[:r1 - r0])
            np.matmul(t, x.T, out=yT[r0:r1])
        return np.ascontiguousarray(yT.T)
    from ..backend import get_array_module
    xp = get_array_module(x)
    R = tile_rows(K)
    yT = xp.empty((out_f, N), x.dtype)
    for r0 in range(0, out_f, R):
        r1 = min(out_f, r0 + R)
        yT[r0:r1] = unpack(slice(r0, r1), x.dtype) @ x.T
    return xp.ascontiguousarray(yT.T)


def matmul_t(g, fmt: str, arrays: dict, shape, unpack=None):
    """gx (N, K) = g (N, out) @ W, tile by tile (the input gradient of y = x W^T)."""
    out_f, K = shape
    R = tile_rows(K)
    if compiled(g, arrays):
        g = np.ascontiguousarray(g)
        gx = np.zeros((g.shape[0], K), np.float32)
        buf = np.empty((min(R, out_f), K), np.float32)
        for r0 in range(0, out_f, R):
            r1 = min(out_f, r0 + R)
            t = dequantize_tile(fmt, arrays, r0, buf[:r1 - r0])
            gx += g[:, r0:r1] @ t
        return gx
    from ..backend import get_array_module
    xp = get_array_module(g)
    gx = xp.zeros((g.shape[0], K), g.dtype)
    for r0 in range(0, out_f, R):
        r1 = min(out_f, r0 + R)
        gx += g[:, r0:r1] @ unpack(slice(r0, r1), g.dtype)
    return gx
