"""minigrad: a small reverse-mode autograd engine over NumPy (and CuPy)."""
from . import backend
from .backend import cuda_available, get_array_module, manual_seed
from .tensor import (Function, Tensor, as_tensor, enable_grad, get_default_dtype, is_grad_enabled,
                     no_grad, set_default_dtype, tensor)
from . import ops
from .ops import (abs, add, broadcast_to, cat, concatenate, div, exp, expand_dims, flatten, getitem,
                  linear, log, matmul, max, maximum, mean, min, minimum, mul, neg, permute, pow, relu,
                  reshape, split, sqrt, squeeze, stack, sub, sum, swapaxes, sum_to, tanh, transpose,
                  var, where)
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

from . import checkpoint, gradcheck, io, memory, nn, optim  # noqa: E402  (they import the core above)
