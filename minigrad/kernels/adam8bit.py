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
    def _step(p, g, qm, am, qv, av, vals_m, mids_m, tab_m, vals_v, mids_v, tab_v,
              lr, b1, b2, eps, bc1, bc2_sqrt, decay, block):
        n = p.size
        bm = np.empty(block, np.float32)
        bv = np.empty(block, np.float32)
        keysm = bm.view(np.uint32)
        keysv = bv.view(np.uint32)
        one = np.float32(1.0)
        f1, f2 = np.float32(b1), np.float32(b2)
        c1, c2 = np.float32(1.0 - b1), np.float32(1.0 - b2)
        step = np.float32(lr / bc1)
        inv_bc2 = np.float32(1.0 / bc2_sqrt)
        fe = np.float32(eps)
        keep = np.float32(1.0 - decay)
        for blk in range((n + block - 1) // block):
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

def step_inplace(p, g, qm, am, qv, av, code_m, code_v, lr, b1, b2, eps, bc1, bc2_sqrt, decay, block) -> bool:
    """One 8-bit AdamW update in place; False when the arrays don't qualify (CuPy, no Numba,
    not float32, not contiguous), so the caller runs the array code."""
    if not HAVE_NUMBA or not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in (p, g)):
        return False
    if not (p.dtype == g.dtype == np.float32):
        return False
    _step(p.reshape(-1), g.reshape(-1), qm, am, qv, av, code_m.values, code_m.mids_padded, code_m.buckets,
          code_v.values, code_v.mids_padded, code_v.buckets, float(lr), float(b1), float(b2), float(eps),
          float(bc1), float(bc2_sqrt), float(decay), int(block))
    return True
