"""The rest of the Tensor API a PyTorch or NumPy user reaches for.

Same shape as ``ops.py``: each primitive is a ``Function`` with a hand-written backward on
raw arrays, plus a lowercase wrapper bound as a ``Tensor`` method at the bottom. Composites
(``square``, ``std``, ``norm`` for p != 2) are built from primitives. Ops that have no
gradient (``argmax``, ``argmin``, ``any``, ``all``, the indices of ``sort``/``topk``) return
tensors that need none. Each one is checked against numerical gradients and PyTorch in
``tests/test_ops.py``.
"""
from __future__ import annotations

import builtins

import numpy as np

from . import backend, ops
from .backend import get_array_module
from .ops import ShapeError, _norm_axis, _t
from .tensor import Function, Tensor


# --------------------------------------------------------------------------- elementwise
class Sin(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return get_array_module(x).sin(x)

    def backward(self, gy):
        (x,) = self.saved
        return gy * get_array_module(x).cos(x)


class Cos(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return get_array_module(x).cos(x)

    def backward(self, gy):
        (x,) = self.saved
        return -gy * get_array_module(x).sin(x)


class Log1p(Function):
    """log(1 + x), accurate for tiny x."""

    def forward(self, x):
        self.save_for_backward(x)
        return get_array_module(x).log1p(x)

    def backward(self, gy):
        (x,) = self.saved
        return gy / (1 + x)


class Expm1(Function):
    """exp(x) - 1, accurate for tiny x."""

    def forward(self, x):
        y = get_array_module(x).expm1(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy * (y + 1)


class Sign(Function):
    """-1, 0 or 1; its gradient is zero everywhere (PyTorch's convention)."""

    def forward(self, x):
        return get_array_module(x).sign(x)

    def backward(self, gy):
        return get_array_module(gy).zeros_like(gy)


class Clip(Function):
    """x limited to [lo, hi]; the gradient passes where lo <= x <= hi (bounds included, as PyTorch)."""

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def forward(self, x):
        xp = get_array_module(x)
        inside = xp.ones(x.shape, dtype=bool)
        if self.lo is not None:
            inside &= x >= self.lo
        if self.hi is not None:
            inside &= x <= self.hi
        self.save_for_backward(inside)
        return xp.clip(x, self.lo, self.hi).astype(x.dtype, copy=False)

    def backward(self, gy):
        (inside,) = self.saved
        return gy * inside


class Clone(Function):
    """A copy with its own memory; gradients pass unchanged."""

    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        return gy


# --------------------------------------------------------------------------- scans and reductions
class CumSum(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        if self.axis is None:
            self.in_shape, x = x.shape, x.reshape(-1)
            self.axis = 0
        else:
            self.in_shape = None
            self.axis = self.axis % builtins.max(x.ndim, 1)
        return get_array_module(x).cumsum(x, axis=self.axis)

    def backward(self, gy):
        xp = get_array_module(gy)
        # each input adds into every later output: the gradient is a reversed cumulative sum
        g = xp.flip(xp.cumsum(xp.flip(gy, self.axis), axis=self.axis), self.axis)
        return g if self.in_shape is None else g.reshape(self.in_shape)


class Prod(Function):
    """Product over axes. The gradient of each factor is the product of the others, computed
    from prefix and suffix products, so a zero factor gives exact gradients (no division)."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.in_shape = x.shape
        self.axis = _norm_axis(self.axis, x.ndim)
        self.save_for_backward(x)
        return x.prod(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        (x,) = self.saved
        xp = get_array_module(x)
        if self.axis is None:
            axes = tuple(range(x.ndim))
        else:
            axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        rest = [a for a in range(x.ndim) if a not in axes]
        perm = rest + list(axes)                                       # reduced axes last
        xt = x.transpose(perm)
        flat = xt.reshape(xt.shape[:len(rest)] + (-1,))                # (..., n)
        ones = xp.ones(flat.shape[:-1] + (1,), dtype=x.dtype)
        before = xp.cumprod(xp.concatenate([ones, flat[..., :-1]], axis=-1), axis=-1)
        after = xp.flip(xp.cumprod(xp.concatenate([ones, xp.flip(flat, -1)[..., :-1]], axis=-1), axis=-1), -1)
        others = (before * after).reshape(xt.shape).transpose(tuple(int(i) for i in np.argsort(perm)))
        kept = tuple(1 if i in axes else s for i, s in enumerate(x.shape))
        return others * gy.reshape(kept)


class Norm2(Function):
    """Euclidean norm over axes; at a zero vector the gradient is 0 (PyTorch's subgradient)."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axis = _norm_axis(self.axis, x.ndim)
        y = get_array_module(x).sqrt((x * x).sum(axis=self.axis, keepdims=True))
        self.save_for_backward(x, y)
        if self.keepdims:
            return y
        return y.reshape(()) if self.axis is None else y.squeeze(self.axis)

    def backward(self, gy):
        x, y = self.saved
        xp = get_array_module(x)
        gy = gy.reshape(y.shape)
        safe = xp.where(y > 0, y, 1)
        return xp.where(y > 0, gy * x / safe, 0).astype(x.dtype, copy=False)


# --------------------------------------------------------------------------- reordering
class Flip(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        return get_array_module(x).flip(x, self.axis)

    def backward(self, gy):
        return get_array_module(gy).flip(gy, self.axis)


class TakeAlong(Function):
    """x's values at ``index`` along ``axis`` (take_along_axis); index holds each position at most
    once per slice (a sort order, the top k), so backward puts the gradient back in place."""

    def __init__(self, index, axis):
        self.index, self.axis = index, axis

    def forward(self, x):
        self.in_shape = x.shape
        return get_array_module(x).take_along_axis(x, self.index, axis=self.axis)

    def backward(self, gy):
        xp = get_array_module(gy)
        gx = xp.zeros(self.in_shape, dtype=gy.dtype)
        xp.put_along_axis(gx, self.index, gy, axis=self.axis)
        return gx


class Gather(Function):
    """PyTorch's ``gather``: out[i][j] = x[index[i][j]][j] along ``axis``. An index may repeat,
    so backward scatter-adds."""

    def __init__(self, index, axis):
        self.index, self.axis = index, axis

    def forward(self, x):
        self.in_shape = x.shape
        idx, ax = self.index, self.axis
        if idx.ndim != x.ndim:
            raise ShapeError(f"gather: index has {idx.ndim} dimensions, the tensor {x.ndim}")
        if builtins.any(i != ax and s > t for i, (s, t) in enumerate(zip(idx.shape, x.shape))):
            raise ShapeError(f"gather: index shape {idx.shape} is larger than tensor shape {x.shape} "
                             f"outside axis {ax}")
        if idx.size and (int(idx.min()) < -x.shape[ax] or int(idx.max()) >= x.shape[ax]):
            raise IndexError(f"gather: index out of range for axis {ax} of size {x.shape[ax]}")
        self.full = self._full_index(get_array_module(x))
        return x[self.full]

    def _full_index(self, xp):
        """The advanced index that picks every element of the result: ``index`` along the axis,
        the position itself along the others."""
        grids = list(xp.meshgrid(*[xp.arange(s) for s in self.index.shape], indexing="ij", sparse=True))
        grids[self.axis] = self.index
        return tuple(grids)

    def backward(self, gy):
        xp = get_array_module(gy)
        gx = xp.zeros(self.in_shape, dtype=gy.dtype)
        backend.scatter_add(gx, self.full, gy)
        return gx


# --------------------------------------------------------------------------- wrappers
def sin(x): return Sin()(x)
def cos(x): return Cos()(x)
def log1p(x): return Log1p()(x)
def expm1(x): return Expm1()(x)
def sign(x): return Sign()(x)
def clone(x): return Clone()(x)


def square(x):
    x = _t(x)
    return ops.mul(x, x)


def clamp(x, min=None, max=None):  # noqa: A002 - PyTorch's names
    """Limit values to [min, max] (either may be None)."""
    if min is None and max is None:
        raise ValueError("clamp: give min, max or both")
    return Clip(min, max)(x)


def clip(x, a_min=None, a_max=None):
    """NumPy's name and argument order for ``clamp``."""
    return clamp(x, a_min, a_max)


def cumsum(x, axis=None):
    """Cumulative sum along ``axis`` (None: over the flattened tensor, as NumPy)."""
    return CumSum(axis)(x)


def prod(x, axis=None, keepdims=False):
    return Prod(axis, keepdims)(x)


def std(x, axis=None, keepdims=False, ddof=0):
    """Standard deviation with NumPy's default ``ddof=0`` (PyTorch's ``std`` uses 1)."""
    return ops.sqrt(ops.var(x, axis, keepdims, ddof))


def norm(x, p=2, axis=None, keepdims=False):
    """Vector p-norm over ``axis`` (all elements by default): p = 2, 1, inf or any p > 0."""
    x = _t(x)
    if p == 2:
        return Norm2(axis, keepdims)(x)
    if p == 1:
        return ops.sum(ops.abs(x), axis, keepdims)
    if p == np.inf:
        return ops.max(ops.abs(x), axis, keepdims)
    if not p > 0:
        raise ValueError(f"norm: p must be > 0 or inf, got {p}")
    return ops.pow(ops.sum(ops.pow(ops.abs(x), float(p)), axis, keepdims), 1.0 / p)


def unsqueeze(x, axis):
    """PyTorch's name for ``expand_dims``."""
    return ops.expand_dims(x, axis)


def flip(x, axis=None):
    """Reverse the order along ``axis`` (an int, a tuple, or None for every axis)."""
    if isinstance(axis, list):
        axis = tuple(axis)
    return Flip(axis)(x)


def _index_array(index, xp):
    raw = index.data if isinstance(index, Tensor) else index
    raw = xp.asarray(raw)
    if raw.dtype.kind not in "iu":
        raise TypeError(f"index must hold integers, got dtype {raw.dtype}")
    return raw


def gather(x, axis, index):
    """``out[..., i, ...] = x[..., index[..., i, ...], ...]`` along ``axis`` (PyTorch's gather)."""
    x = _t(x)
    return Gather(_index_array(index, get_array_module(x.data)), axis % x.ndim)(x)


def sort(x, axis=-1, descending=False):
    """(values, indices) sorted along ``axis``; stable, so ties keep their order. Values are
    differentiable, indices are an integer tensor."""
    x = _t(x)
    xp = get_array_module(x.data)
    d = x.data
    order = xp.argsort(-d if descending else d, axis=axis, kind="stable")
    return TakeAlong(order, axis)(x), Tensor(order)


def topk(x, k, axis=-1, largest=True, sorted=True):  # noqa: A002 - PyTorch's names
    """(values, indices) of the k largest (or smallest) entries along ``axis``, largest first."""
    x = _t(x)
    n = x.shape[axis]
    if not 0 <= k <= n:
        raise ValueError(f"topk: k={k} is out of range for an axis of size {n}")
    xp = get_array_module(x.data)
    order = xp.argsort(-x.data if largest else x.data, axis=axis, kind="stable")
    order = xp.take(order, xp.arange(k), axis=axis)
    return TakeAlong(order, axis)(x), Tensor(order)


def argmax(x, axis=None, keepdims=False):
    d = x.data if isinstance(x, Tensor) else x
    return Tensor(get_array_module(d).argmax(d, axis=axis, keepdims=keepdims))


def argmin(x, axis=None, keepdims=False):
    d = x.data if isinstance(x, Tensor) else x
    return Tensor(get_array_module(d).argmin(d, axis=axis, keepdims=keepdims))


def any(x, axis=None, keepdims=False):  # noqa: A001
    d = x.data if isinstance(x, Tensor) else x
    return Tensor(get_array_module(d).any(d, axis=axis, keepdims=keepdims))


def all(x, axis=None, keepdims=False):  # noqa: A001
    d = x.data if isinstance(x, Tensor) else x
    return Tensor(get_array_module(d).all(d, axis=axis, keepdims=keepdims))


# --------------------------------------------------------------------------- Tensor methods
for _f in (sin, cos, log1p, expm1, sign, clone, square, clamp, clip, cumsum, prod, std, norm, unsqueeze,
           flip, sort, topk, argmax, argmin, any, all):
    setattr(Tensor, _f.__name__, _f)
Tensor.gather = gather
