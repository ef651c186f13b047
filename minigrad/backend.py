"""Array backends: NumPy always, CuPy when it is installed and a GPU answers.

This is the only module that imports ``cupy``. Everything else asks
``get_array_module(*arrays)`` for ``xp`` and writes code that works on both.
"""
from __future__ import annotations

import numpy as np

_cupy = None          # the cupy module once imported, else None
_cupy_tried = False
_cuda_ok: bool | None = None

DEVICES = ("cpu", "cuda")


def _import_cupy():
    global _cupy, _cupy_tried
    if not _cupy_tried:
        _cupy_tried = True
        try:
            import cupy  # noqa: F401  (the one import of cupy in the project)
            _cupy = cupy
        except Exception:  # not installed, or broken install: NumPy only
            _cupy = None
    return _cupy


def cuda_available() -> bool:
    """True when CuPy is installed and a tiny kernel runs. Never raises.

    CuPy imports fine on machines without a GPU, so importing is not enough:
    we launch one elementwise kernel and synchronise.
    """
    global _cuda_ok
    if _cuda_ok is None:
        cp = _import_cupy()
        try:
            x = cp.arange(4, dtype=cp.float32)
            ok = float((x * 2).sum().get()) == 12.0
            cp.cuda.Stream.null.synchronize()
            _cuda_ok = bool(ok)
        except Exception:
            _cuda_ok = False
    return _cuda_ok


def is_cupy_array(a) -> bool:
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def get_array_module(*xs):
    """``cupy`` if any argument is a CuPy array (or a Tensor on one), else ``numpy``."""
    if _cupy is not None:
        for x in xs:
            x = getattr(x, "data", x)
            if isinstance(x, _cupy.ndarray):
                return _cupy
    return np


def device_of(a) -> str:
    return "cuda" if is_cupy_array(a) else "cpu"


def check_device(device: str) -> str:
    device = str(device).lower()
    if device.startswith("cuda"):
        device = "cuda"
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    if device == "cuda" and not cuda_available():
        raise RuntimeError(
            "device 'cuda' was asked for but CUDA is not usable here: install CuPy for "
            "your CUDA version (pip install 'minigrad-lm[gpu]' or cupy-cuda12x) and check "
            "that `nvidia-smi` sees a GPU"
        )
    return device


def to_device(a, device: str):
    """Move an array to ``device`` ("cpu" or "cuda"); a no-op when already there."""
    device = check_device(device)
    if device == "cuda":
        return _cupy.asarray(a)
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def to_numpy(a) -> np.ndarray:
    return a.get() if is_cupy_array(a) else np.asarray(a)


def xp_for_device(device: str):
    return _cupy if check_device(device) == "cuda" else np


# --------------------------------------------------------------------------- random
# One generator per backend, so `manual_seed` makes a run repeatable on each.
# NumPy uses the PCG64 Generator; CuPy has its own Generator API (cupy.random.default_rng),
# whose streams differ from NumPy's: the same seed gives repeatable but different numbers.
_rngs: dict = {}
_seed: int | None = None


def manual_seed(seed: int) -> None:
    """Seed every backend's generator (and reset them), making runs repeatable."""
    global _seed
    _seed = int(seed)
    _rngs.clear()


def get_rng(xp=np):
    """The generator of the backend ``xp``; created lazily from the last seed."""
    key = "cuda" if (xp is not np) else "cpu"
    rng = _rngs.get(key)
    if rng is None:
        rng = xp.random.default_rng(_seed) if key == "cuda" else np.random.default_rng(_seed)
        _rngs[key] = rng
    return rng


def get_rng_state(xp=np):
    """A snapshot of a backend's generator, to replay random ops exactly (checkpointing)."""
    rng = get_rng(xp)
    if xp is np:
        return rng.bit_generator.state
    # cupy's Generator keeps its state on the device; copying the generator object
    # is the documented-free but reliable way to snapshot it.
    import copy
    return copy.deepcopy(rng)


def set_rng_state(state, xp=np) -> None:
    key = "cpu" if xp is np else "cuda"
    if xp is np:
        get_rng(np).bit_generator.state = state
    else:
        import copy
        _rngs[key] = copy.deepcopy(state)


# --------------------------------------------------------------------------- memory
def memory_pool_bytes() -> tuple:
    """(used, held) bytes of CuPy's default device memory pool; (0, 0) without a usable GPU.

    ``used`` is what live arrays occupy (rounded up to the pool's block size); ``held`` adds
    the freed blocks the pool keeps for reuse, i.e. what the GPU sees as taken.
    """
    if not cuda_available():
        return 0, 0
    pool = _cupy.get_default_memory_pool()
    return int(pool.used_bytes()), int(pool.total_bytes())


# --------------------------------------------------------------------------- kernels
# Where NumPy and CuPy differ, the branch is written here once.

def scatter_add(target, index, values) -> None:
    """``target[index] += values`` with repeated indices accumulated (unbuffered)."""
    if is_cupy_array(target):
        import cupyx  # part of the cupy package
        cupyx.scatter_add(target, index, values)
    elif _rows_kernel_fits(target, index, values):
        # embedding gradients: whole rows picked by one integer array, one compiled loop
        from .kernels import cpu
        C = target.shape[1]
        cpu.scatter_add_rows(target, np.ascontiguousarray(index.reshape(-1)),
                             np.ascontiguousarray(values.reshape(-1, C), dtype=target.dtype))
    else:
        np.add.at(target, index, values)


def add_bias(y2, b) -> None:
    """``y2 += b`` for a 2-D y2 (a Linear layer's output) and a 1-D b, in place."""
    if _bias_kernel_fits(y2, b):
        from .kernels import pooled
        pooled.add_bias(y2, b)
    else:
        y2 += b


def bias_grad(g2):
    """``g2.sum(axis=0)`` for a 2-D g2, in g2's dtype (the compiled loop sums in float64)."""
    if _bias_kernel_fits(g2):
        from .kernels import pooled
        return pooled.sum_rows(g2).astype(g2.dtype)
    return g2.sum(axis=0)


def _bias_kernel_fits(y2, b=None) -> bool:
    """The compiled loops take these shapes (``pooled`` checks dtypes and layout itself)."""
    from .kernels import cpu
    arrays = (y2,) if b is None else (y2, b)
    return cpu.accepts(*arrays) and y2.ndim == 2 and (b is None or b.shape == y2.shape[1:])


def _rows_kernel_fits(target, index, values) -> bool:
    from .kernels import cpu
    return (cpu.accepts(target, values) and isinstance(index, np.ndarray) and index.dtype.kind in "iu"
            and target.ndim == 2 and target.flags.c_contiguous and values.dtype == target.dtype
            and values.shape == index.shape + target.shape[1:])


_np_erf = None


def erf(x):
    """Elementwise error function (exact GELU needs it; NumPy has none)."""
    global _np_erf
    if is_cupy_array(x):
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    if _np_erf is None:
        _np_erf = _build_np_erf()
    return _np_erf(x)


def _build_np_erf():
    import math
    try:
        from .kernels._numba import vectorize_erf
        return vectorize_erf()
    except Exception:  # Numba missing or failing: exact but slow fallback
        f = np.frompyfunc(math.erf, 1, 1)
        return lambda x: f(x).astype(x.dtype)


# --------------------------------------------------------------------------- allocator
def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    By default glibc serves each array of a few hundred KB or more with a fresh mmap and
    unmaps it on free, so every temporary of a training step page-faults its memory in
    again (the kernel zeroes each page). Serving arrays below ``mmap_threshold`` from the
    heap, and trimming the heap only past ``trim_threshold`` free bytes, made a small
    GPT's training step about 25% faster on our machine. The price: the process keeps
    its peak memory until it exits. Linux with glibc only; returns False where it does
    nothing. ``lm.train`` calls it; a library import never does.
    """
    try:
        import ctypes
        import ctypes.util
        import sys
        if not sys.platform.startswith("linux"):
            return False
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))
        ok = libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) and ok
        return bool(ok)
    except Exception:  # no glibc (musl, macOS, Windows): leave the allocator alone
        return False
