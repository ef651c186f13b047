"""Numba set-up: a writable cache location, decided before the first compile.

Compiling a kernel costs seconds; ``cache=True`` stores the machine code on disk.
The cache must be writable: when the package folder is not (site-packages owned by
root, a read-only clone), we point Numba at ``NUMBA_CACHE_DIR`` or a user cache dir.
Nothing here may fail at import: a missing or broken Numba only disables the kernels.
"""
from __future__ import annotations

import os
import tempfile


def _pick_cache_dir() -> str | None:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    here = os.path.dirname(os.path.abspath(__file__))
    if os.access(here, os.W_OK):
        return None  # Numba writes __pycache__ beside the source: fine
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for cand in (os.path.join(base, "minigrad", "numba"),
                 os.path.join(tempfile.gettempdir(), "minigrad-numba")):
        try:
            os.makedirs(cand, exist_ok=True)
            if os.access(cand, os.W_OK):
                return cand
        except OSError:
            continue
    return None


try:
    _dir = _pick_cache_dir()
    if _dir is not None:
        os.environ.setdefault("NUMBA_CACHE_DIR", _dir)
    import numba  # noqa: E402
    HAVE_NUMBA = True
except Exception:  # pragma: no cover - depends on the install
    numba = None
    HAVE_NUMBA = False


def vectorize_erf():
    """A float32/float64 ufunc for math.erf, compiled once and cached on disk."""
    import math
    if not HAVE_NUMBA:
        raise ImportError("numba is not available")

    @numba.vectorize(["float32(float32)", "float64(float64)"], cache=True)
    def _erf(x):
        return math.erf(x)

    return _erf
