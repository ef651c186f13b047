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
MIN_POOL_BYTES = 1 << 20     # split a matrix-vector product over the pool from this many bytes of codes

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

    # q8_0, q4_0, nf4: one flat loop over a row, the block's scale read per element from a
    # small per-row buffer (sc[k >> 5]): LLVM vectorizes that; a loop nest over 32-element
    # blocks it did not (5-10x slower). The 4-bit loops walk the packed bytes j: low and
    # high nibble multiply two copies of x permuted so that both are contiguous in j.
    @numba.njit(**_JIT)
    def mv_q8_0(x, codes, scales, y, o0, o1):      # codes int8 (out, K), scales uint16 (out, K/32)
        N, K = x.shape
        sc = np.empty(K // 32, np.float32)
        for o in range(o0, o1):
            row, srow = codes[o], scales[o]
            for b in range(K // 32):
                sc[b] = _half(np.int64(srow[b]))
            for n in range(N):
                xn = x[n]
                s = np.float32(0)
                for k in range(K):
                    s += np.float32(row[k]) * xn[k] * sc[k >> 5]
                y[n, o] = s

    @numba.njit(**_JIT)
    def mv_q4_0(xlo, xhi, codes, scales, y, o0, o1):   # codes uint8 (out, K/2), GGML nibble order
        N, H = xlo.shape
        sc = np.empty(H // 16, np.float32)
        for o in range(o0, o1):
            row, srow = codes[o], scales[o]
            for b in range(H // 16):
                sc[b] = _half(np.int64(srow[b]))
            for n in range(N):
                xl, xh = xlo[n], xhi[n]
                s = np.float32(0)
                for j in range(H):
                    # the nibbles stay bytes (np.uint8): Numba's integer arithmetic is int64,
                    # and an int64 -> float32 conversion vectorizes 8 lanes wide, not 16 (2x slower)
                    c = row[j]
                    s += ((np.float32(np.uint8(c & 15)) - np.float32(8)) * xl[j]
                          + (np.float32(np.uint8(c >> 4)) - np.float32(8)) * xh[j]) * sc[j >> 4]
                y[n, o] = s

    @numba.njit(**_JIT)
    def mv_nf4(xe, xo, codes, absmax_q, absmax_scale, offset, levels, y, o0, o1):  # codes uint8 (out, K/2)
        N, H = xe.shape
        nb = H // 32
        am = np.empty(nb, np.float32)
        for o in range(o0, o1):
            row = codes[o]
            for b in range(nb):
                g = o * nb + b
                am[b] = np.float32(absmax_q[g]) * absmax_scale[g // 256] + offset
            for n in range(N):
                a, c2 = xe[n], xo[n]
                s = np.float32(0)
                for j in range(H):
                    c = np.int32(row[j])
                    s += (levels[c & 15] * a[j] + levels[c >> 4] * c2[j]) * am[j >> 5]
                y[n, o] = s

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
    def dq_q8_0(codes, scales, r0, out):
        K = out.shape[1]
        sc = np.empty(K // 32, np.float32)
        for i in range(out.shape[0]):
            row, srow = codes[r0 + i], scales[r0 + i]
            for b in range(K // 32):
                sc[b] = _half(np.int64(srow[b]))
            for k in range(K):
                out[i, k] = np.float32(row[k]) * sc[k >> 5]

    @numba.njit(**_JIT)
    def dq_q4_0(codes, scales, r0, out):
        K = out.shape[1]
        for i in range(out.shape[0]):
            row, srow = codes[r0 + i], scales[r0 + i]
            for b in range(K // 32):
                d = _half(np.int64(srow[b]))
                for j in range(16):
                    c = row[b * 16 + j]
                    out[i, b * 32 + j] = (np.float32(np.uint8(c & 15)) - np.float32(8)) * d
                    out[i, b * 32 + 16 + j] = (np.float32(np.uint8(c >> 4)) - np.float32(8)) * d

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


    # ----------------------------------------------------------------- C entry points
    # Every matrix-vector product runs through a C entry point (a Numba ``cfunc``) that takes
    # one *record*, a row of int64: [x, x2, y, N, inner size, out, o0, o1, weight arrays...]
    # (addresses, sizes; x2 is the second copy of x the 4-bit loops read, else x again). It
    # rebuilds the arrays and runs the loop above on rows [o0, o1). The pool (``threads.run_c``)
    # hands one record to each of its threads; one thread calls it through ``_go``. Either way
    # every row is computed by the same machine code, so the bits do not depend on the split
    # (the same loop compiled a second time, inlined elsewhere, may sum in another order under
    # fastmath). Compiled by _entry_point() on first use.
    import llvmlite.ir as _ir
    from numba.extending import intrinsic as _intrinsic

    from .pooled import _record, _typed_pointer

    _i8p, _u8p, _u16p = _typed_pointer(_t.int8), _typed_pointer(_t.uint8), _typed_pointer(_t.uint16)
    _f32p_ = _typed_pointer(_t.float32)
    _f32bits = bitcast(_t.int64, _t.float64)
    _ca = numba.carray
    HEAD = 8                                       # record fields before the weight arrays'

    @_intrinsic
    def _call_c(typingctx, address, record):
        """Call ``void f(void *)`` at ``address`` with the address ``record`` (integers)."""
        if not (isinstance(address, _t.Integer) and isinstance(record, _t.Integer)):
            return None

        def codegen(context, builder, sig, args):
            vp = _ir.IntType(8).as_pointer()
            fn = builder.inttoptr(args[0], _ir.FunctionType(_ir.VoidType(), [vp]).as_pointer())
            builder.call(fn, [builder.inttoptr(args[1], vp)])
            return context.get_dummy_value()
        return _t.void(address, record), codegen

    @numba.njit(**_JIT)
    def _go(address, template, xa, xb, y, o0, o1):
        """One thread: fill the record's x, y, sizes and rows and call the entry point."""
        r = template.copy()
        r[0], r[1], r[2] = xa.ctypes.data, xb.ctypes.data, y.ctypes.data
        r[3], r[4], r[6], r[7] = xa.shape[0], xa.shape[1], o0, o1
        _call_c(address, r.ctypes.data)

    @numba.njit(**_JIT)
    def _pool_records(template, xa, xb, y, edges):
        """One record per pool thread: rows edges[i]..edges[i + 1]."""
        n = len(edges) - 1
        r = np.empty((n, len(template)), np.int64)
        for i in range(n):
            r[i] = template
            r[i, 0], r[i, 1], r[i, 2] = xa.ctypes.data, xb.ctypes.data, y.ctypes.data
            r[i, 3], r[i, 4], r[i, 6], r[i, 7] = xa.shape[0], xa.shape[1], edges[i], edges[i + 1]
        return r

    @numba.njit(**_JIT)
    def _xsplit(x, kind):
        """x as the 4-bit loops read it, two contiguous copies: kind 1 (q4_0) elements b*32 + j
        and b*32 + 16 + j for byte b*16 + j; kind 2 (nf4) elements 2j and 2j + 1 for byte j."""
        N, K = x.shape
        H = K // 2
        a = np.empty((N, H), np.float32)
        b = np.empty((N, H), np.float32)
        for n in range(N):
            if kind == 1:
                for j in range(H):
                    k = (j >> 4) * 32 + (j & 15)
                    a[n, j] = x[n, k]
                    b[n, j] = x[n, k + 16]
            else:
                for j in range(H):
                    a[n, j] = x[n, 2 * j]
                    b[n, j] = x[n, 2 * j + 1]
        return a, b

    def _c_int8(p):
        r = _ca(_record(p), HEAD + 2)              # + codes, scale
        N, K, M = r[3], r[4], r[5]
        mv_int8(_ca(_f32p_(r[0]), (N, K)), _ca(_i8p(r[8]), (M, K)), _ca(_f32p_(r[9]), M),
                _ca(_f32p_(r[2]), (N, M)), r[6], r[7])

    def _c_q8_0(p):
        r = _ca(_record(p), HEAD + 2)              # + codes, scales
        N, K, M = r[3], r[4], r[5]
        mv_q8_0(_ca(_f32p_(r[0]), (N, K)), _ca(_i8p(r[8]), (M, K)), _ca(_u16p(r[9]), (M, K // 32)),
                _ca(_f32p_(r[2]), (N, M)), r[6], r[7])

    def _c_q4_0(p):
        r = _ca(_record(p), HEAD + 2)              # + codes, scales; x, x2 = the low and high halves
        N, H, M = r[3], r[4], r[5]
        mv_q4_0(_ca(_f32p_(r[0]), (N, H)), _ca(_f32p_(r[1]), (N, H)), _ca(_u8p(r[8]), (M, H)),
                _ca(_u16p(r[9]), (M, H // 16)), _ca(_f32p_(r[2]), (N, M)), r[6], r[7])

    def _c_fp16(p):
        r = _ca(_record(p), HEAD + 1)              # + w
        N, K, M = r[3], r[4], r[5]
        mv_fp16(_ca(_f32p_(r[0]), (N, K)), _ca(_u16p(r[8]), (M, K)), _ca(_f32p_(r[2]), (N, M)), r[6], r[7])

    def _c_bf16(p):
        r = _ca(_record(p), HEAD + 1)
        N, K, M = r[3], r[4], r[5]
        mv_bf16(_ca(_f32p_(r[0]), (N, K)), _ca(_u16p(r[8]), (M, K)), _ca(_f32p_(r[2]), (N, M)), r[6], r[7])

    def _c_nf4(p):
        r = _ca(_record(p), HEAD + 6)   # + codes, absmax_q, absmax_scale, its length, offset bits, levels
        N, H, M = r[3], r[4], r[5]
        mv_nf4(_ca(_f32p_(r[0]), (N, H)), _ca(_f32p_(r[1]), (N, H)), _ca(_u8p(r[8]), (M, H)),
               _ca(_i8p(r[9]), M * H // 32), _ca(_f32p_(r[10]), r[11]), np.float32(_f32bits(r[12])),
               _ca(_f32p_(r[13]), 16), _ca(_f32p_(r[2]), (N, M)), r[6], r[7])


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
    if fmt in ("q8_0", "q4_0"):
        return a["codes"], a["scales"].view(np.uint16)
    if fmt == "nf4":
        return a["codes"], a["absmax_q"], a["absmax_scale"], np.float32(a["absmax_offset"][0]), _levels()
    raise ValueError(f"no kernel for format {fmt!r}")


_SPLIT = {"q4_0": 1, "nf4": 2}


def _x_args(fmt: str, x) -> tuple:
    """x as the matrix-vector loop of ``fmt`` reads it: the 4-bit ones take two permuted copies."""
    if fmt in _SPLIT and HAVE_NUMBA and x.dtype == np.float32 and x.flags.c_contiguous:
        return _xsplit(x, _SPLIT[fmt])
    if fmt == "q4_0":              # element b*32 + j (low nibble) and b*32 + 16 + j (high) of byte b*16 + j
        N, K = x.shape
        x4 = x.reshape(N, K // 32, 2, 16)
        return np.ascontiguousarray(x4[:, :, 0]).reshape(N, -1), np.ascontiguousarray(x4[:, :, 1]).reshape(N, -1)
    if fmt == "nf4":               # elements 2j (low nibble) and 2j + 1 (high) of byte j
        return np.ascontiguousarray(x[:, 0::2]), np.ascontiguousarray(x[:, 1::2])
    return (x,)


def compiled(x, arrays: dict) -> bool:
    """True when the compiled loops take these arrays (Numba, NumPy, float32 x, contiguous)."""
    return (HAVE_NUMBA and isinstance(x, np.ndarray) and x.dtype == np.float32
            and all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays.values()))


def _mv(fmt):
    return globals()["mv_" + fmt]


def _dq(fmt):
    return globals()["dq_" + fmt]


_ENTRIES: dict = {}


def _entry_point(fmt: str) -> int:
    """The C entry point's address for ``fmt`` (compiled on first use, or loaded from Numba's
    disk cache; one format at a time, so a model compiles only what it uses)."""
    e = _ENTRIES.get(fmt)
    if e is None:
        fn = {"int8": _c_int8, "q8_0": _c_q8_0, "q4_0": _c_q4_0, "fp16": _c_fp16, "bf16": _c_bf16,
              "nf4": _c_nf4}[fmt]
        e = _ENTRIES[fmt] = numba.cfunc(_t.void(_t.voidptr), cache=True, nogil=True)(fn)
    return e.address


def _parts(out: int, nbytes: int) -> list[slice]:
    if nbytes < MIN_POOL_BYTES:
        return [slice(0, out)]
    return threads.row_chunks(out, 16)


def matvec(x, fmt: str, arrays: dict, out_features: int, plan=None):
    """y (N, out) = x (N, K) W^T for few rows N, from the codes (compiled, on the pool).

    Through the format's C entry point, on one thread or split by output rows over the pool:
    the same bits either way (see the entry points above). ``plan``: ``matvec_plan(fmt,
    arrays)``, computed once per weight by a caller that calls this for every token
    (QuantLinear)."""
    x = np.ascontiguousarray(x)
    y = np.empty((x.shape[0], out_features), np.float32)
    address, template, nbytes, _ = plan or matvec_plan(fmt, arrays)
    xs = _x_args(fmt, x)
    xa, xb = xs[0], xs[-1]
    if nbytes >= MIN_POOL_BYTES:
        parts = _parts(out_features, nbytes)
        if len(parts) >= 2:
            edges = np.array([p.start for p in parts] + [parts[-1].stop], np.int64)
            if threads.run_c(address, _pool_records(template, xa, xb, y, edges)):
                return y
    _go(address, template, xa, xb, y, 0, out_features)
    return y


def matvec_plan(fmt: str, arrays: dict) -> tuple:
    """What ``matvec`` needs of a weight, computed once: the entry point's address, the record
    template (the weight arrays' addresses after the HEAD fields), the bytes of codes (whether
    to split), and the arrays it points into (held with it)."""
    wargs = _args(fmt, arrays)
    meta = []
    for a in wargs:
        if isinstance(a, np.ndarray):
            meta.append(a.ctypes.data)
            if fmt == "nf4" and a is wargs[2]:      # absmax_scale: its length follows
                meta.append(a.size)
        else:                                       # nf4's offset, a float32 scalar: its bits
            meta.append(int(np.array([float(a)], np.float64).view(np.int64)[0]))
    template = np.zeros(HEAD + len(meta), np.int64)
    template[5] = wargs[0].shape[0]                 # out: the rows of the codes (or of fp16's w)
    template[HEAD:] = meta
    return _entry_point(fmt), template, sum(a.nbytes for a in arrays.values()), wargs


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
