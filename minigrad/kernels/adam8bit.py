"""The 8-bit AdamW step (``minigrad/optim8bit.py``) as one compiled pass per tensor.

Per block of 256 values: dequantize both moments (a table look-up times the block's
absmax), run the float32 AdamW update, keep the new moments in a 256-value buffer with
their largest magnitude, then requantize the buffer to the nearest code entry.

Finding the nearest of 256 sorted entries by binary search costs 8 dependent loads and
branches per value (the array code's ``searchsorted``); here a value's float32 bits find a
bucket instead: the bits, turned into an unsigned key that orders like the floats, shifted
right by 16 (sign, exponent and 7 mantissa bits), index a 65,536-entry table holding the
answer for the bucket's smallest value. The exact answer ("how many midpoints lie below the
value", the same rule as ``searchsorted(mids, y, "left")``) is that or one more: no bucket
of either code holds two midpoints, so one comparison settles it, without a branch.
Only the buckets of values near 1e-7..1 are ever read, a few KiB that stay in cache.

A tensor of at least 2 x ``MIN_POOL_BLOCKS`` blocks is split by blocks over the BLAS pool
(``threads.run_c``, one record of addresses per thread, no Python there): the blocks are
independent, so the bits do not depend on the split.
"""
from __future__ import annotations

import numpy as np

from ._numba import HAVE_NUMBA, numba
from .cpu import FASTMATH

SHIFT = 16


def bucket_table(mids) -> np.ndarray:
    """uint8 (65,536,): for each bucket, the number of ``mids`` below its smallest float."""
    lo_keys = np.arange(2 ** 16, dtype=np.uint64).astype(np.uint32) << np.uint32(SHIFT)
    bits = np.where(lo_keys >> 31 == 1, lo_keys & np.uint32(0x7FFFFFFF), ~lo_keys).astype(np.uint32)
    lo = bits.view(np.float32)
    return np.searchsorted(mids.astype(np.float32), lo, side="left").astype(np.uint8)


if HAVE_NUMBA:
    _JIT = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")

    @numba.njit(**_JIT)
    def _blocks(p, g, qm, am, qv, av, vals_m, mids_m, tab_m, vals_v, mids_v, tab_v,
                lr, b1, b2, eps, bc1, bc2_sqrt, decay, block, blk0, blk1, bm, bv):
        """Blocks blk0 .. blk1 - 1 of the flat arrays; bm, bv: scratch of ``block`` float32 each.
        Every value and every block's absmax depends on its own block only, so any split of
        the blocks gives the same bits."""
        n = p.size
        keysm = bm.view(np.uint32)
        keysv = bv.view(np.uint32)
        one = np.float32(1.0)
        f1, f2 = np.float32(b1), np.float32(b2)
        c1, c2 = np.float32(1.0 - b1), np.float32(1.0 - b2)
        step = np.float32(lr / bc1)
        inv_bc2 = np.float32(1.0 / bc2_sqrt)
        fe = np.float32(eps)
        keep = np.float32(1.0 - decay)
        for blk in range(blk0, blk1):
            s = blk * block
            e = min(s + block, n)
            sm, sv = am[blk], av[blk]
            mx_m = np.float32(0.0)
            mx_v = np.float32(0.0)
            for i in range(s, e):
                gi = g[i]
                mi = f1 * (vals_m[qm[i]] * sm) + c1 * gi
                vi = f2 * (vals_v[qv[i]] * sv) + c2 * (gi * gi)
                if decay != 0.0:
                    p[i] *= keep
                p[i] -= step * (mi / (np.sqrt(vi) * inv_bc2 + fe))
                bm[i - s] = mi
                bv[i - s] = vi
                mx_m = max(mx_m, abs(mi))
                mx_v = max(mx_v, vi)
            am[blk] = mx_m
            av[blk] = mx_v
            rm = mx_m if mx_m > 0 else one
            rv = mx_v if mx_v > 0 else one
            for j in range(e - s):
                bm[j] = bm[j] / rm
                bv[j] = bv[j] / rv
            for j in range(e - s):
                km, kv = keysm[j], keysv[j]
                km = (~km) if (km >> np.uint32(31)) == 1 else (km | np.uint32(0x80000000))
                kv = (~kv) if (kv >> np.uint32(31)) == 1 else (kv | np.uint32(0x80000000))
                a = tab_m[km >> np.uint32(SHIFT)]
                c = tab_v[kv >> np.uint32(SHIFT)]
                # no bucket holds two midpoints (tests/test_adamw8bit.py checks): one step at most
                qm[s + j] = a + np.uint8(mids_m[a] < bm[j])
                qv[s + j] = c + np.uint8(mids_v[c] < bv[j])

    @numba.njit(**_JIT)
    def _step(p, g, qm, am, qv, av, vals_m, mids_m, tab_m, vals_v, mids_v, tab_v,
              lr, b1, b2, eps, bc1, bc2_sqrt, decay, block):
        bm = np.empty(block, np.float32)
        bv = np.empty(block, np.float32)
        _blocks(p, g, qm, am, qv, av, vals_m, mids_m, tab_m, vals_v, mids_v, tab_v,
                lr, b1, b2, eps, bc1, bc2_sqrt, decay, block, 0, (p.size + block - 1) // block, bm, bv)

    # The pool's entry point: one record per thread, [n, block, first block, end block, len(mids),
    # p, g, qm, am, qv, av, vals_m, mids_m, tab_m, vals_v, mids_v, tab_v, scratch (addresses),
    # lr, b1, b2, eps, bc1, bc2_sqrt, decay (float64 bits)]
    from .cpu import bitcast as _bitcast
    from .pooled import _record, _typed_pointer
    from numba.core import types as _t

    _f32p, _u8p = _typed_pointer(_t.float32), _typed_pointer(_t.uint8)
    _f64 = _bitcast(_t.int64, _t.float64)
    _ca = numba.carray
    RECORD = 25

    def _c_blocks(ptr):
        r = _ca(_record(ptr), RECORD)
        n, block, nmid = r[0], r[1], r[4]
        nb = (n + block - 1) // block
        sc = _ca(_f32p(r[17]), 2 * block)
        _blocks(_ca(_f32p(r[5]), n), _ca(_f32p(r[6]), n), _ca(_u8p(r[7]), n), _ca(_f32p(r[8]), nb),
                _ca(_u8p(r[9]), n), _ca(_f32p(r[10]), nb),
                _ca(_f32p(r[11]), 256), _ca(_f32p(r[12]), nmid), _ca(_u8p(r[13]), 65536),
                _ca(_f32p(r[14]), 256), _ca(_f32p(r[15]), nmid), _ca(_u8p(r[16]), 65536),
                _f64(r[18]), _f64(r[19]), _f64(r[20]), _f64(r[21]), _f64(r[22]), _f64(r[23]), _f64(r[24]),
                block, r[2], r[3], sc[:block], sc[block:])

_ENTRY = None
MIN_POOL_BLOCKS = 32      # blocks of 256 per pool part (8,192 values, ~25 us of work): below, one thread


def _entry() -> int:
    global _ENTRY
    if _ENTRY is None:
        from numba.core import types as t
        _ENTRY = numba.cfunc(t.void(t.voidptr), cache=True, nogil=True)(_c_blocks)
    return _ENTRY.address


def _pooled(p, g, qm, am, qv, av, code_m, code_v, floats, block) -> bool:
    """The step split by blocks over the BLAS pool (``threads.run_c``); False when it is too
    small to split or there is no pool."""
    from . import threads
    nb = (p.size + block - 1) // block
    if nb < 2 * MIN_POOL_BLOCKS or threads.num_workers() < 2:
        return False
    # the records carry bare addresses: every array must be what _c_blocks reads
    if not all(a.flags.c_contiguous for a in (qm, am, qv, av)) or qm.dtype != np.uint8 or qv.dtype != np.uint8 \
            or am.dtype != np.float32 or av.dtype != np.float32:
        return False
    for c in (code_m, code_v):
        if c.values.dtype != np.float32 or c.mids_padded.dtype != np.float32 or c.buckets.dtype != np.uint8:
            return False
    parts = threads.row_chunks(nb, MIN_POOL_BLOCKS)
    if len(parts) < 2:
        return False
    scratch = np.empty((len(parts), 2 * block), np.float32)
    bits = np.array(floats, np.float64).view(np.int64)
    common = [p.ctypes.data, g.ctypes.data, qm.ctypes.data, am.ctypes.data, qv.ctypes.data, av.ctypes.data,
              code_m.values.ctypes.data, code_m.mids_padded.ctypes.data, code_m.buckets.ctypes.data,
              code_v.values.ctypes.data, code_v.mids_padded.ctypes.data, code_v.buckets.ctypes.data]
    rec = np.empty((len(parts), RECORD), np.int64)
    for i, sl in enumerate(parts):
        rec[i, :5] = (p.size, block, sl.start, sl.stop, code_m.mids_padded.size)
        rec[i, 5:17] = common
        rec[i, 17] = scratch[i].ctypes.data
        rec[i, 18:] = bits
    return threads.run_c(_entry(), rec)


def step_inplace(p, g, qm, am, qv, av, code_m, code_v, lr, b1, b2, eps, bc1, bc2_sqrt, decay, block) -> bool:
    """One 8-bit AdamW update in place; False when the arrays don't qualify (CuPy, no Numba,
    not float32, not contiguous), so the caller runs the array code."""
    if not HAVE_NUMBA or not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in (p, g)):
        return False
    if not (p.dtype == g.dtype == np.float32):
        return False
    p, g = p.reshape(-1), g.reshape(-1)
    floats = (float(lr), float(b1), float(b2), float(eps), float(bc1), float(bc2_sqrt), float(decay))
    if not _pooled(p, g, qm, am, qv, av, code_m, code_v, floats, int(block)):
        _step(p, g, qm, am, qv, av, code_m.values, code_m.mids_padded, code_m.buckets,
              code_v.values, code_v.mids_padded, code_v.buckets, *floats, int(block))
    return True
