"""The AdamW step as one compiled pass over each parameter (array in, array out).

The fused autograd nodes (GELU, LayerNorm, softmax + cross-entropy) that used to live here
are in ``minigrad/fused.py``: nothing in ``kernels/`` imports the engine.
"""
from __future__ import annotations

import math

import numpy as np

from . import pooled
from ._numba import HAVE_NUMBA


def adam_step_inplace(p, g, m, v, lr, b1, b2, eps, step, decay) -> bool:
    """Update p, m, v in place with one compiled loop; False when the arrays don't qualify
    (CuPy arrays, no Numba, mixed dtypes, non-contiguous), so the caller uses array code."""
    if not HAVE_NUMBA or not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in (p, g, m, v)):
        return False
    if not (p.dtype == g.dtype == m.dtype == v.dtype):
        return False
    bc1 = 1.0 - b1 ** step
    bc2_sqrt = math.sqrt(1.0 - b2 ** step)
    pooled.adam_step(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), lr, b1, b2, eps,
                     bc1, bc2_sqrt, decay)
    return True
