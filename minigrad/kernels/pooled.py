"""Compiled loops split over the BLAS pool with no Python on the pool's threads.

``threads.parallel_for`` runs a Python function on OpenBLAS's worker thread; the Python
start-up there (a thread state, the GIL) costs ~20 microseconds, more than a GELU over
64k floats takes. Here each kernel gets a C entry point instead (a Numba ``cfunc``) that
takes the address of one *record*: a row of int64 numbers holding the addresses of its
chunk of each array, its sizes, and floats stored bit for bit. ``threads.run_c`` hands
record i to pool thread i. Python builds the records (a few microseconds), then nothing
but compiled code runs until every chunk is done.

This is raw-pointer code: the wrappers below check dtype and contiguity first and fall
back to calling the kernel in this thread, on the whole arrays, whenever anything does not
fit (no pool, small arrays, strided arrays). Tests hold the chunked and whole results
equal.
"""
from __future__ import annotations

import numpy as np

from . import cpu, threads
from ._numba import HAVE_NUMBA, numba

# Split from this many elements per chunk: ~20 microseconds of GELU work, where the
# hand-over and the records cost ~5-10 (measured: a GELU over 65k floats, 38 us in one
# thread, 34 us in two).
MIN_ITEMS = 1 << 15

_jobs = None

if HAVE_NUMBA:
    from numba.core import types as _t
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def _record(typingctx, p):
        """void* -> int64*: the record a pool thread was handed."""
        if not isinstance(p, _t.RawPointer):
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], context.get_value_type(sig.return_type))
        return _t.CPointer(_t.int64)(p), codegen

    def _typed_pointer(nbtype):
        @_intrinsic
        def ptr(typingctx, addr):
            """int64 address -> typed pointer, for numba.carray."""
            if addr != _t.int64:
                return None

            def codegen(context, builder, sig, args):
                return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
            return _t.CPointer(nbtype)(addr), codegen
        return ptr

    _f32p, _f64p = _typed_pointer(_t.float32), _typed_pointer(_t.float64)

    _f64 = cpu.bitcast(_t.int64, _t.float64)                      # a float stored as its bits

    _carray = numba.carray

    # The C entry points, as plain functions here and compiled by _build() on first use
    # (module-level functions, so Numba's disk cache finds them again next time). A record
    # is a row of int64: addresses, sizes, floats as their bits; itemsize 4 or 8 picks the
    # float32 or float64 kernel.
    def _gelu_fwd(p):
        r = _carray(_record(p), 3)                                 # x, y, n
        n = r[2]
        cpu.gelu_tanh_fwd(_carray(_f32p(r[0]), n), _carray(_f32p(r[1]), n))

    def _gelu_bwd(p):
        r = _carray(_record(p), 4)                                 # x, gy, gx, n
        n = r[3]
        cpu.gelu_tanh_bwd(_carray(_f32p(r[0]), n), _carray(_f32p(r[1]), n), _carray(_f32p(r[2]), n))

    def _gelu_erf_fwd(p):
        r = _carray(_record(p), 3)                                 # x, y, n
        n = r[2]
        cpu.gelu_erf_fwd(_carray(_f32p(r[0]), n), _carray(_f32p(r[1]), n))

    def _gelu_erf_bwd(p):
        r = _carray(_record(p), 4)                                 # x, gy, gx, n
        n = r[3]
        cpu.gelu_erf_bwd(_carray(_f32p(r[0]), n), _carray(_f32p(r[1]), n), _carray(_f32p(r[2]), n))

    def _ln_fwd(p):
        r = _carray(_record(p), 10)           # x, w, b, y, mean, rstd, n, C, eps bits, itemsize
        n, C = r[6], r[7]
        mean, rstd, eps = _carray(_f64p(r[4]), n), _carray(_f64p(r[5]), n), _f64(r[8])
        if r[9] == 4:
            cpu.layer_norm_fwd(_carray(_f32p(r[0]), (n, C)), _carray(_f32p(r[1]), C),
                               _carray(_f32p(r[2]), C), eps, _carray(_f32p(r[3]), (n, C)), mean, rstd)
        else:
            cpu.layer_norm_fwd(_carray(_f64p(r[0]), (n, C)), _carray(_f64p(r[1]), C),
                               _carray(_f64p(r[2]), C), eps, _carray(_f64p(r[3]), (n, C)), mean, rstd)

    def _ln_bwd(p):
        r = _carray(_record(p), 11)           # x, w, mean, rstd, gy, gx, gw, gb, n, C, itemsize
        n, C = r[8], r[9]
        mean, rstd = _carray(_f64p(r[2]), n), _carray(_f64p(r[3]), n)
        gw, gb = _carray(_f64p(r[6]), C), _carray(_f64p(r[7]), C)
        if r[10] == 4:
            cpu.layer_norm_bwd(_carray(_f32p(r[0]), (n, C)), _carray(_f32p(r[1]), C), mean, rstd,
                               _carray(_f32p(r[4]), (n, C)), _carray(_f32p(r[5]), (n, C)), gw, gb)
        else:
            cpu.layer_norm_bwd(_carray(_f64p(r[0]), (n, C)), _carray(_f64p(r[1]), C), mean, rstd,
                               _carray(_f64p(r[4]), (n, C)), _carray(_f64p(r[5]), (n, C)), gw, gb)

    def _adam(p):
        r = _carray(_record(p), 13)           # p, g, m, v, n, lr b1 b2 eps bc1 bc2_sqrt decay, itemsize
        n = r[4]
        f = (_f64(r[5]), _f64(r[6]), _f64(r[7]), _f64(r[8]), _f64(r[9]), _f64(r[10]), _f64(r[11]))
        if r[12] == 4:
            cpu.adam_step(_carray(_f32p(r[0]), n), _carray(_f32p(r[1]), n), _carray(_f32p(r[2]), n),
                         _carray(_f32p(r[3]), n), f[0], f[1], f[2], f[3], f[4], f[5], f[6])
        else:
            cpu.adam_step(_carray(_f64p(r[0]), n), _carray(_f64p(r[1]), n), _carray(_f64p(r[2]), n),
                         _carray(_f64p(r[3]), n), f[0], f[1], f[2], f[3], f[4], f[5], f[6])



    def _bias_add(p):
        r = _carray(_record(p), 5)                                 # y, b, n, C, itemsize
        n, C = r[2], r[3]
        if r[4] == 4:
            cpu.add_bias_rows(_carray(_f32p(r[0]), (n, C)), _carray(_f32p(r[1]), C))
        else:
            cpu.add_bias_rows(_carray(_f64p(r[0]), (n, C)), _carray(_f64p(r[1]), C))

    def _sum_rows(p):
        r = _carray(_record(p), 5)                                 # g, out (float64), n, C, itemsize
        n, C = r[2], r[3]
        if r[4] == 4:
            cpu.sum_rows(_carray(_f32p(r[0]), (n, C)), _carray(_f64p(r[1]), C))
        else:
            cpu.sum_rows(_carray(_f64p(r[0]), (n, C)), _carray(_f64p(r[1]), C))


def _build():
    """Compile the C entry points (or load them from Numba's disk cache)."""
    sig = _t.void(_t.voidptr)
    fns = {"gelu_fwd": _gelu_fwd, "gelu_bwd": _gelu_bwd, "gelu_erf_fwd": _gelu_erf_fwd,
           "gelu_erf_bwd": _gelu_erf_bwd, "ln_fwd": _ln_fwd, "ln_bwd": _ln_bwd,
           "adam": _adam, "bias_add": _bias_add, "sum_rows": _sum_rows}
    compiled = {k: numba.cfunc(sig, cache=True, nogil=True)(f) for k, f in fns.items()}
    return {k: v.address for k, v in compiled.items()} | {"_keep": compiled}


def _addresses():
    global _jobs
    if _jobs is None:
        _jobs = _build()
    return _jobs


def _parts(n: int, items_per_row: int) -> list[slice]:
    """Row chunks of at least MIN_ITEMS elements each, one per pool thread at most."""
    min_rows = max(1, MIN_ITEMS // max(1, items_per_row))
    if n < 2 * min_rows or not HAVE_NUMBA:        # early out: too small to split
        return [slice(0, n)]
    return threads.row_chunks(n, min_rows)


def _addr(a: np.ndarray, start: int) -> int:
    """Address of row ``start`` of a C-contiguous array."""
    return a.ctypes.data + start * (a.strides[0] if a.ndim else 0)


def _fit(dtypes, *arrays) -> bool:
    """Every array C-contiguous, of one of ``dtypes`` and all of the first one's dtype: the
    records carry bare addresses, so nothing may differ from what the C entry point reads."""
    dt = arrays[0].dtype
    return dt in dtypes and all(a.flags.c_contiguous and a.dtype == dt for a in arrays)


_F32, _FLOATS = (np.float32,), (np.float32, np.float64)


def _run(job: str, parts, fields) -> bool:
    """One record per chunk, ``fields(i, s)`` -> its int64 numbers for chunk i = slice s."""
    records = np.array([fields(i, s) for i, s in enumerate(parts)], dtype=np.int64)
    return threads.run_c(_addresses()[job], records)


def _bits(*values: float) -> list[int]:
    """Floats as the int64 bit patterns that ``_f64`` reads back."""
    return np.array(values, np.float64).view(np.int64).tolist()


# --------------------------------------------------------------------------- wrappers
# Each: split when large and everything fits, else the serial loop on the whole arrays.
def _elementwise(job: str, serial, *arrays) -> None:
    """``serial(*arrays)`` over flat float32 arrays of one size, cut into parts on the pool
    (entry point ``job``: the arrays' addresses at the part's start, then its length)."""
    parts = _parts(arrays[0].size, 1)
    if len(parts) < 2 or not _fit(_F32, *arrays) or not _run(
            job, parts, lambda i, s: [*(_addr(a, s.start) for a in arrays), s.stop - s.start]):
        serial(*arrays)


def gelu_tanh_fwd(x, y):
    """cpu.gelu_tanh_fwd over flat float32 arrays."""
    _elementwise("gelu_fwd", cpu.gelu_tanh_fwd, x, y)


def gelu_tanh_bwd(x, gy, gx):
    """cpu.gelu_tanh_bwd over flat float32 arrays."""
    _elementwise("gelu_bwd", cpu.gelu_tanh_bwd, x, gy, gx)


def gelu_erf_fwd(x, y):
    """cpu.gelu_erf_fwd over flat float32 arrays."""
    _elementwise("gelu_erf_fwd", cpu.gelu_erf_fwd, x, y)


def gelu_erf_bwd(x, gy, gx):
    """cpu.gelu_erf_bwd over flat float32 arrays."""
    _elementwise("gelu_erf_bwd", cpu.gelu_erf_bwd, x, gy, gx)


def layer_norm_fwd(x, w, b, eps, y, mean, rstd):
    """cpu.layer_norm_fwd on rows of x (N, C); mean and rstd float64."""
    N, C = x.shape
    parts = _parts(N, C)
    if len(parts) < 2 or not (_fit(_FLOATS, x, w, b, y) and _fit((np.float64,), mean, rstd)) or not _run(
            "ln_fwd", parts,
            lambda i, s: [_addr(x, s.start), w.ctypes.data, b.ctypes.data, _addr(y, s.start),
                          _addr(mean, s.start), _addr(rstd, s.start), s.stop - s.start, C,
                          *_bits(eps), x.itemsize]):
        cpu.layer_norm_fwd(x, w, b, eps, y, mean, rstd)


def layer_norm_bwd(x, w, mean, rstd, gy, gx):
    """cpu.layer_norm_bwd by row chunks -> gw, gb (C,) float64 (the chunks' sums added)."""
    N, C = x.shape
    parts = _parts(N, C)
    gwb = np.zeros((len(parts), 2, C), np.float64)
    if len(parts) < 2 or not (_fit(_FLOATS, x, w, gy, gx) and _fit((np.float64,), mean, rstd)) or not _run(
            "ln_bwd", parts,
            lambda i, s: [_addr(x, s.start), w.ctypes.data, _addr(mean, s.start), _addr(rstd, s.start),
                          _addr(gy, s.start), _addr(gx, s.start), gwb[i, 0].ctypes.data,
                          gwb[i, 1].ctypes.data, s.stop - s.start, C, x.itemsize]):
        gwb[:] = 0
        cpu.layer_norm_bwd(x, w, mean, rstd, gy, gx, gwb[0, 0], gwb[0, 1])
        return gwb[0, 0], gwb[0, 1]
    gw, gb = gwb.sum(axis=0)
    return gw, gb


def adam_step(p, g, m, v, lr, b1, b2, eps, bc1, bc2_sqrt, decay) -> None:
    """cpu.adam_step over flat arrays of one dtype, p, m, v updated in place."""
    parts = _parts(p.size, 1)
    if len(parts) >= 2:
        floats = _bits(lr, b1, b2, eps, bc1, bc2_sqrt, decay)
    if len(parts) < 2 or not _fit(_FLOATS, p, g, m, v) or not _run(
            "adam", parts,
            lambda i, s: [_addr(p, s.start), _addr(g, s.start), _addr(m, s.start), _addr(v, s.start),
                          s.stop - s.start] + floats + [p.itemsize]):
        cpu.adam_step(p, g, m, v, lr, b1, b2, eps, bc1, bc2_sqrt, decay)


def add_bias(y, b) -> None:
    """y (N, C) += b (C,) in place."""
    N, C = y.shape
    parts = _parts(N, C)
    if len(parts) < 2 or not _fit(_FLOATS, y, b) or not _run(
            "bias_add", parts, lambda i, s: [_addr(y, s.start), b.ctypes.data, s.stop - s.start, C,
                                             y.itemsize]):
        cpu.add_bias_rows(y, b)


def sum_rows(g):
    """The sum of g's rows (N, C) as a float64 (C,) array; one partial sum per chunk."""
    N, C = g.shape
    parts = _parts(N, C)
    out = np.zeros((len(parts), C), np.float64)
    if len(parts) < 2 or not _fit(_FLOATS, g) or not _run(
            "sum_rows", parts, lambda i, s: [_addr(g, s.start), out[i].ctypes.data, s.stop - s.start, C,
                                             g.itemsize]):
        out[:] = 0
        cpu.sum_rows(g, out[0])
        return out[0]
    return out.sum(axis=0)
