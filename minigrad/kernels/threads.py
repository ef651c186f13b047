"""Run our own CPU work on the threads of NumPy's BLAS library (OpenBLAS).

Why: on a CPU, two thread pools on the same cores fight. After every multi-threaded
matrix product, OpenBLAS keeps its worker threads spinning (for ~0.1 s) in case another
product comes. Work we hand to threads of our own - Python threads, or Numba's parallel
loops - then shares each core with a spinning worker, and gets slower, not faster (the
README's speed section has the numbers). PyTorch avoids the fight with one pool for
everything.

OpenBLAS built with its own pthreads server exports ``gotoblas_pthread(n, fn, args,
stride)``: run ``fn`` once on each of n of its threads (the caller's thread is one of them)
and return when all are done. So the spinning worker is the one that picks our work up.
``parallel_for(fn, chunks)`` uses it: ``fn(chunk)`` runs on the pool, one call per chunk,
and while it runs OpenBLAS is told to use one thread per product, so the matrix products
inside each chunk run side by side instead of each asking for the whole pool.

Where that C entry point is missing (an OpenMP build of OpenBLAS, MKL, Accelerate, a
NumPy not built on OpenBLAS), or ``MINIGRAD_THREADS=1`` is set, or the call comes from
inside a chunk already, ``parallel_for`` runs the chunks one after the other: same
results, one core.

Rules for ``fn``: it gets one item of ``chunks``, writes its results into arrays the
caller owns (distinct parts per chunk), and returns nothing. Its exceptions are raised
again in the caller after all chunks finish.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

import numpy as np

__all__ = ["parallel_for", "run_c", "row_chunks", "split", "num_workers", "enable", "blas_info",
           "set_blas_threads", "get_blas_threads"]

_SET = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
        "openblas_set_num_threads64_", "openblas_set_num_threads")
_GET = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
        "openblas_get_num_threads64_", "openblas_get_num_threads")
_PARALLEL = ("scipy_openblas_get_parallel64_", "scipy_openblas_get_parallel",
             "openblas_get_parallel64_", "openblas_get_parallel")


def _candidate_paths() -> list[str]:
    """NumPy's own OpenBLAS: the copy its wheel ships (numpy.libs, numpy/.dylibs); else the
    one OpenBLAS this process has loaded, if there is exactly one. Other libraries bring
    their own copy (SciPy does, and Numba imports SciPy): driving the wrong copy would
    start a second pool of spinning threads, so with several and none of NumPy's, none."""
    root = os.path.dirname(np.__file__)
    shipped = []
    for pattern in ("../numpy.libs/*openblas*", ".dylibs/*openblas*"):
        shipped += sorted(os.path.realpath(p) for p in glob.glob(os.path.join(root, pattern)))
    if shipped:
        return shipped
    if "openblas" not in _numpy_blas_name():       # MKL, Accelerate, ...: not ours to drive
        return []
    loaded = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1]
                if "openblas" in os.path.basename(p).lower():
                    loaded.add(os.path.realpath(p))
    except OSError:
        pass
    return sorted(loaded) if len(loaded) == 1 else []


def _numpy_blas_name() -> str:
    """The BLAS NumPy was built against, lower case ('' if NumPy does not say)."""
    try:
        return str(np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]).lower()
    except Exception:
        return ""


def _first(lib, names):
    for n in names:
        f = getattr(lib, n, None)
        if f is not None:
            return f
    return None


class _OpenBLAS:
    """The C entry points found in NumPy's OpenBLAS, or ``ok = False`` and ``why`` not."""

    def __init__(self):
        self.ok, self.path = False, None
        self.why = "NumPy's OpenBLAS not found (another BLAS, or several OpenBLAS copies loaded)"
        self.set_threads = self.get_threads = self.pthread = None
        try:
            self._find()
        except Exception as e:        # never fail because of this: run serially
            self.ok, self.pthread, self.why = False, None, f"OpenBLAS lookup failed: {e!r}"

    def _find(self):
        for path in _candidate_paths():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            set_, get_ = _first(lib, _SET), _first(lib, _GET)
            if set_ is None or get_ is None:
                continue
            set_.argtypes, set_.restype = [ctypes.c_int], None
            get_.argtypes, get_.restype = [], ctypes.c_int
            self.set_threads, self.get_threads, self.path = set_, get_, path
            par = _first(lib, _PARALLEL)
            mode = par() if par is not None else -1       # 0 serial, 1 pthreads, 2 OpenMP
            pthread = getattr(lib, "gotoblas_pthread", None)
            if mode != 1 or pthread is None:
                self.why = (f"{os.path.basename(path)} has no pthreads server "
                            f"(get_parallel = {mode}): chunks run one after the other")
                return
            pthread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            pthread.restype = ctypes.c_int
            self.pthread, self.ok, self.why = pthread, True, ""
            return


_blas: _OpenBLAS | None = None
_lock = threading.Lock()          # one parallel_for at a time (its job lives in _job)
_inside = threading.local()       # set while a chunk runs: nested calls go serial
_job: list = [None]


def _get() -> _OpenBLAS:
    global _blas
    if _blas is None:
        _blas = _OpenBLAS()
    return _blas


_ENABLED = os.environ.get("MINIGRAD_THREADS", "") not in ("0", "1")


def enable(on: bool = True) -> bool:
    """Turn the pool on or off for this process (``MINIGRAD_THREADS=1`` starts it off);
    returns the previous setting."""
    global _ENABLED
    old, _ENABLED = _ENABLED, bool(on)
    return old


def get_blas_threads() -> int:
    """Threads NumPy's OpenBLAS uses per product (1 if it is not OpenBLAS)."""
    b = _get()
    return int(b.get_threads()) if b.get_threads is not None else 1


def set_blas_threads(n: int) -> bool:
    """Set NumPy's OpenBLAS thread count; False when no OpenBLAS was found."""
    b = _get()
    if b.set_threads is None:
        return False
    b.set_threads(int(n))
    return True


def num_workers() -> int:
    """How many chunks ``parallel_for`` runs at once: OpenBLAS's thread count, or 1."""
    if not _ENABLED or getattr(_inside, "on", False):
        return 1
    b = _get()
    return max(1, int(b.get_threads())) if b.ok else 1


def blas_info() -> dict:
    """What was found, for reports: library path, threads, and why chunks run serially."""
    b = _get()
    return {"library": b.path, "pool": b.ok and _ENABLED, "threads": get_blas_threads(),
            "note": b.why if b.ok is False else ("" if _ENABLED else "MINIGRAD_THREADS disables it")}


def _trampoline(i):
    fn, chunks, errors = _job[0]
    _inside.on = True
    try:
        fn(chunks[i or 0])        # ctypes passes the NULL pointer of chunk 0 as None
    except BaseException as e:    # noqa: BLE001 - re-raised in the caller
        errors.append(e)
    finally:
        _inside.on = False


_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_trampoline)


def parallel_for(fn, chunks) -> None:
    """``fn(c)`` for every c in ``chunks``, on OpenBLAS's threads when it can (see above).

    At most ``num_workers()`` chunks are taken at once; pass that many. More are run in
    rounds; fewer than two, or no pool, run in this thread.
    """
    chunks = list(chunks)
    n = num_workers()
    if n < 2 or len(chunks) < 2 or not _lock.acquire(blocking=False):
        for c in chunks:
            fn(c)
        return
    b = _get()
    try:
        threads = int(b.get_threads())
        errors: list = []
        b.set_threads(1)          # each product inside a chunk runs on the chunk's thread
        try:
            for k in range(0, len(chunks), n):
                part = chunks[k:k + n]
                _job[0] = (fn, part, errors)
                # args = NULL, stride = 1: thread i receives the pointer value i
                b.pthread(len(part), ctypes.cast(_CALLBACK, ctypes.c_void_p), None, 1)
                if errors:
                    break
        finally:
            b.set_threads(threads)
            _job[0] = None
    finally:
        _lock.release()
    if errors:
        raise errors[0]


def row_chunks(n: int, min_rows: int) -> list[slice]:
    """``range(n)`` cut into one slice per pool thread, but none under ``min_rows`` long
    (below that the hand-over costs more than the second thread saves): [slice(0, n)]
    when it should not be split."""
    parts = min(num_workers(), n // max(1, min_rows))
    return split(n, parts) if parts >= 2 else [slice(0, n)]


def run_c(address: int, records: np.ndarray) -> bool:
    """Call the C function at ``address`` (``void f(void *record)``, a Numba ``cfunc``) once
    per row of ``records`` (a C-contiguous 2-D array), all at once on the pool: no Python
    runs on the pool's threads, so the hand-over costs ~1 microsecond, not ~20.

    Returns False, having run nothing, when there is no pool (the caller then runs its
    kernel in this thread) or more rows than pool threads.
    """
    n = len(records)
    if n < 2 or n > num_workers() or not records.flags.c_contiguous:
        return False
    b = _get()
    # thread i receives records' address + i * row stride: its own record
    b.pthread(n, address, records.ctypes.data, records.strides[0])
    return True


def split(n: int, parts: int) -> list[slice]:
    """``range(n)`` cut into ``parts`` contiguous slices of near-equal length (no empty ones)."""
    parts = max(1, min(parts, n))
    edges = [n * i // parts for i in range(parts + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(parts)]


if sys.platform == "win32":      # pragma: no cover - untested there: stay serial
    _ENABLED = False
