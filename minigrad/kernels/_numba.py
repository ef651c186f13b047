"""Numba set-up: a writable cache location, decided before the first compile.

Compiling a kernel costs seconds; ``cache=True`` stores the machine code on disk.
The cache must be writable: when the package folder is not (site-packages owned by
root, a read-only clone), we point Numba at ``NUMBA_CACHE_DIR`` or a user cache dir.
Nothing here may fail at import: a missing or broken Numba only disables the kernels.
"""
from __future__ import annotations

import os
import tempfile
import warnings


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".minigrad-probe-", delete=True)
        probe.close()
        return True
    except OSError:
        return False


def _fallbacks() -> list:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(base, "minigrad", "numba"), os.path.join(tempfile.gettempdir(), "minigrad-numba")]


def _pick_cache_dir() -> str | None:
    """The folder for Numba's cache; None: beside the sources. A user's unwritable
    NUMBA_CACHE_DIR is replaced by a writable one, with one warning: a cache is a shortcut."""
    asked = os.environ.get("NUMBA_CACHE_DIR")
    if asked:
        if _writable(asked):
            return asked
        for cand in _fallbacks():
            if _writable(cand):
                warnings.warn(f"NUMBA_CACHE_DIR={asked} is not writable; caching compiled kernels in "
                              f"{cand} instead", RuntimeWarning, stacklevel=2)
                return cand
        warnings.warn(f"NUMBA_CACHE_DIR={asked} is not writable, nor any fallback: kernels are compiled "
                      f"in every process", RuntimeWarning, stacklevel=2)
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    if os.access(here, os.W_OK):
        return None  # Numba writes __pycache__ beside the source: fine
    for cand in _fallbacks():
        if _writable(cand):
            return cand
    return None


try:
    _asked = os.environ.get("NUMBA_CACHE_DIR")
    _dir = _pick_cache_dir()
    if _dir is not None:
        os.environ["NUMBA_CACHE_DIR"] = _dir
    elif _asked:   # nowhere to write: no cache rather than a failing import
        del os.environ["NUMBA_CACHE_DIR"]
    import numba  # noqa: E402
    if _dir is not None and _dir != _asked and getattr(numba.config, "CACHE_DIR", _dir) != _dir:
        numba.config.CACHE_DIR = _dir   # numba was imported before us and read the old value
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
