"""minigrad: a small reverse-mode autograd engine over NumPy (and CuPy)."""
from . import backend
from .backend import cuda_available, get_array_module, manual_seed
from .tensor import (Function, Tensor, as_tensor, enable_grad, get_default_dtype, is_grad_enabled,
                     no_grad, set_default_dtype, tensor)
from . import ops
from . import inplace  # noqa: F401  (binds add_, +=, zero_, ... onto Tensor)
from .ops import (abs, add, broadcast_to, cat, concatenate, div, exp, expand_dims, flatten, getitem,
                  linear, log, matmul, max, maximum, mean, min, minimum, mul, neg, permute, pow, relu,
                  reshape, split, sqrt, squeeze, stack, sub, sum, swapaxes, sum_to, tanh, transpose,
                  var, where)
from . import ops_extra
from .ops_extra import (all, any, argmax, argmin, clamp, clip, clone, cos, cumsum, expm1, flip, gather,
                        log1p, norm, prod, sign, sin, sort, square, std, topk, unsqueeze)
from . import functional
from . import functional as F

__version__ = "0.1.0"


def zeros(*shape, dtype=None, requires_grad=False, device="cpu"):
    import numpy as np
    xp = backend.xp_for_device(device)
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Tensor(xp.zeros(shape, dtype=dtype or get_default_dtype()), requires_grad=requires_grad)


def ones(*shape, dtype=None, requires_grad=False, device="cpu"):
    xp = backend.xp_for_device(device)
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Tensor(xp.ones(shape, dtype=dtype or get_default_dtype()), requires_grad=requires_grad)


def randn(*shape, dtype=None, requires_grad=False, device="cpu"):
    """Standard normal samples from the seeded generator of the device's backend."""
    xp = backend.xp_for_device(device)
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    dtype = dtype or get_default_dtype()
    data = backend.get_rng(xp).standard_normal(shape).astype(dtype)
    return Tensor(data, requires_grad=requires_grad)


def arange(*args, dtype=None, device="cpu"):
    xp = backend.xp_for_device(device)
    return Tensor(xp.arange(*args, dtype=dtype))


def _like(t, fill, dtype, requires_grad):
    xp = get_array_module(t.data if isinstance(t, Tensor) else t)
    shape = t.shape
    dt = dtype or (t.dtype if hasattr(t, "dtype") else get_default_dtype())
    return Tensor(xp.full(shape, fill, dtype=dt), requires_grad=requires_grad)


def zeros_like(t, dtype=None, requires_grad=False):
    """Zeros of ``t``'s shape, dtype and device."""
    return _like(t, 0, dtype, requires_grad)


def ones_like(t, dtype=None, requires_grad=False):
    return _like(t, 1, dtype, requires_grad)


def full(shape, fill_value, dtype=None, requires_grad=False, device="cpu"):
    """``fill_value`` everywhere; a Python float gets the default dtype, an int int64 (as PyTorch)."""
    import numpy as np
    if dtype is None:
        dtype = np.bool_ if isinstance(fill_value, bool) else np.int64 if isinstance(fill_value, int) \
            else get_default_dtype()
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return Tensor(backend.xp_for_device(device).full(shape, fill_value, dtype=dtype), requires_grad=requires_grad)


def eye(n, m=None, dtype=None, requires_grad=False, device="cpu"):
    xp = backend.xp_for_device(device)
    return Tensor(xp.eye(n, m, dtype=dtype or get_default_dtype()), requires_grad=requires_grad)


def linspace(start, stop, num, dtype=None, requires_grad=False, device="cpu"):
    """``num`` evenly spaced values from ``start`` to ``stop``, both included."""
    xp = backend.xp_for_device(device)
    return Tensor(xp.linspace(start, stop, num, dtype=dtype or get_default_dtype()), requires_grad=requires_grad)

from . import checkpoint, gradcheck, io, memory, nn, optim  # noqa: E402  (they import the core above)
