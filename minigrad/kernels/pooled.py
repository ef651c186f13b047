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


def _build():
    """Compile the C entry points on first use (cached on disk like every kernel)."""
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def _record(typingctx, p):
        """void* -> int64*: the record a pool thread was handed."""
        if not isinstance(p, types.RawPointer):
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(64).as_pointer())
        return types.CPointer(types.int64)(p), codegen

    def _ptr_of(nbtype):
        @intrinsic
        def _ptr(typingctx, addr):
            """int64 address -> typed pointer, for numba.carray."""
            if addr != types.int64:
                return None

            def codegen(context, builder, sig, args):
                return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
            return types.CPointer(nbtype)(addr), codegen
        return _ptr

    @intrinsic
    def _f64(typingctx, bits):
        """int64 bits -> float64 (a bitcast)."""
        if bits != types.int64:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.DoubleType())
        return types.float64(types.int64), codegen

    f32p, f64p = _ptr_of(types.float32), _ptr_of(types.float64)
    carray = numba.carray
    sig = types.void(types.voidptr)
    jobs = {}

    @numba.cfunc(sig, cache=True, nogil=True)
    def gelu_fwd(p):
        r = carray(_record(p), 3)                       # x, y, n
        n = r[2]
        cpu.gelu_tanh_fwd(carray(f32p(r[0]), n), carray(f32p(r[1]), n))
    jobs["gelu_fwd"] = gelu_fwd

    @numba.cfunc(sig, cache=True, nogil=True)
    def gelu_bwd(p):
        r = carray(_record(p), 4)                       # x, gy, gx, n
        n = r[3]
        cpu.gelu_tanh_bwd(carray(f32p(r[0]), n), carray(f32p(r[1]), n), carray(f32p(r[2]), n))
    jobs["gelu_bwd"] = gelu_bwd

    for name, fp in (("float32", f32p), ("float64", f64p)):
        def make(fp):
            @numba.cfunc(sig, cache=True, nogil=True)
            def ln_fwd(p):
                r = carray(_record(p), 9)               # x, w, b, y, mean, rstd, n, C, eps bits
                n, C = r[6], r[7]
                cpu.layer_norm_fwd(carray(fp(r[0]), (n, C)), carray(fp(r[1]), C), carray(fp(r[2]), C),
                                   _f64(r[8]), carray(fp(r[3]), (n, C)), carray(f64p(r[4]), n),
                                   carray(f64p(r[5]), n))

            @numba.cfunc(sig, cache=True, nogil=True)
            def ln_bwd(p):
                r = carray(_record(p), 10)              # x, w, mean, rstd, gy, gx, gw, gb, n, C
                n, C = r[8], r[9]
                cpu.layer_norm_bwd(carray(fp(r[0]), (n, C)), carray(fp(r[1]), C), carray(f64p(r[2]), n),
                                   carray(f64p(r[3]), n), carray(fp(r[4]), (n, C)), carray(fp(r[5]), (n, C)),
                                   carray(f64p(r[6]), C), carray(f64p(r[7]), C))
            return ln_fwd, ln_bwd
        jobs["ln_fwd_" + name], jobs["ln_bwd_" + name] = make(fp)
    return {k: v.address for k, v in jobs.items()} | {"_keep": jobs}


def _addresses():
    global _jobs
    if _jobs is None:
        _jobs = _build()
    return _jobs


def _parts(n: int, min_items_per_row: int) -> list[slice]:
    if not HAVE_NUMBA:
        return [slice(0, n)]
    return threads.row_chunks(n, max(1, MIN_ITEMS // max(1, min_items_per_row)))


def _addr(a: np.ndarray, start: int) -> int:
    """Address of row ``start`` of a C-contiguous array."""
    return a.ctypes.data + start * (a.strides[0] if a.ndim else 0)


def _contig(*arrays) -> bool:
    return all(a.flags.c_contiguous for a in arrays)


def _run(job: str, parts, fields) -> bool:
    """One record per part: fields(s) -> list of int64 numbers for slice s."""
    records = np.array([fields(s) for s in parts], dtype=np.int64)
    return threads.run_c(_addresses()[job], records)


def _bits(x: float) -> int:
    return int(np.float64(x).view(np.int64))


# --------------------------------------------------------------------------- wrappers
def gelu_tanh_fwd(x, y):
    """cpu.gelu_tanh_fwd over flat float32 arrays, split over the pool when large."""
    parts = _parts(x.size, 1)
    if len(parts) < 2 or not _contig(x, y) or not _run(
            "gelu_fwd", parts, lambda s: [_addr(x, s.start), _addr(y, s.start), s.stop - s.start]):
        cpu.gelu_tanh_fwd(x, y)


def gelu_tanh_bwd(x, gy, gx):
    parts = _parts(x.size, 1)
    if len(parts) < 2 or not _contig(x, gy, gx) or not _run(
            "gelu_bwd", parts,
            lambda s: [_addr(x, s.start), _addr(gy, s.start), _addr(gx, s.start), s.stop - s.start]):
        cpu.gelu_tanh_bwd(x, gy, gx)


def layer_norm_fwd(x, w, b, eps, y, mean, rstd):
    """cpu.layer_norm_fwd on rows of x (N, C), split over the pool by rows."""
    N, C = x.shape
    parts = _parts(N, C)
    if len(parts) < 2 or not _contig(x, w, b, y, mean, rstd) or not _run(
            "ln_fwd_" + x.dtype.name, parts,
            lambda s: [_addr(x, s.start), w.ctypes.data, b.ctypes.data, _addr(y, s.start),
                       _addr(mean, s.start), _addr(rstd, s.start), s.stop - s.start, C, _bits(eps)]):
        cpu.layer_norm_fwd(x, w, b, eps, y, mean, rstd)


def layer_norm_bwd(x, w, mean, rstd, gy, gx):
    """cpu.layer_norm_bwd by row chunks; returns gw, gb (C,) float64 (per-chunk sums added)."""
    N, C = x.shape
    parts = _parts(N, C)
    gwb = np.zeros((len(parts), 2, C), np.float64)
    if len(parts) < 2 or not _contig(x, w, mean, rstd, gy, gx) or not _run(
            "ln_bwd_" + x.dtype.name, parts,
            lambda s: [_addr(x, s.start), w.ctypes.data, _addr(mean, s.start), _addr(rstd, s.start),
                       _addr(gy, s.start), _addr(gx, s.start), gwb[parts.index(s), 0].ctypes.data,
                       gwb[parts.index(s), 1].ctypes.data, s.stop - s.start, C]):
        gwb[:] = 0
        cpu.layer_norm_bwd(x, w, mean, rstd, gy, gx, gwb[0, 0], gwb[0, 1])
        return gwb[0, 0], gwb[0, 1]
    gw, gb = gwb.sum(axis=0)
    return gw, gb
