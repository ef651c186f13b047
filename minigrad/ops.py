"""Primitive operations, each a ``Function`` with a hand-written backward.

Every op has the same shape: ``forward`` maps input arrays to output arrays and saves
what backward needs; ``backward`` maps output gradients to input gradients. A
lowercase wrapper (``exp(x)``) is the public entry point. Composites (softmax,
layer_norm, cross_entropy, ...) live in ``functional.py``.
"""
from __future__ import annotations

import builtins  # this module defines sum/max/min/abs/pow ops; builtins stay reachable

import numpy as np

from . import backend
from .backend import get_array_module
from .tensor import Function, Tensor, get_default_dtype


# --------------------------------------------------------------------------- helpers
def sum_to(g, shape: tuple):
    """Undo broadcasting: sum ``g`` down to ``shape``. Every binary backward calls this."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


class ShapeError(ValueError):
    """Shapes that do not fit an op; the message names the op and the shapes."""


def _dtype_of(x):
    """dtype of a tensor or array; None for Python numbers (they adapt to what they meet)."""
    if isinstance(x, Tensor):
        return x.data.dtype
    if isinstance(x, (bool, int, float)):
        return None
    return getattr(x, "dtype", None)


def _check_pair(op: str, a, b) -> None:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.device != b.device:
            raise RuntimeError(f"{op}: tensors on different devices ({a.device} and {b.device}); "
                               "move one with .to(device)")
    da, db = _dtype_of(a), _dtype_of(b)
    if da is not None and db is not None and da != db and da.kind == "f" and db.kind == "f":
        raise TypeError(f"{op}: dtype mismatch {da} and {db}; "
                        "convert one with .to(dtype) (no silent upcast)")


# The dtype rules, in one place (README, "dtype rules"):
#  1. two floating dtypes must be equal: float32 with float64 (a tensor or a NumPy array) raises;
#  2. a Python float or int takes the dtype of the tensor it meets (x * 2.0 stays float32);
#  3. an integer (or bool) tensor meeting a float tensor or array takes that float dtype;
#  4. an integer tensor meeting a Python float, or divided (true division), gives the default
#     float dtype (float32 unless set_default_dtype says otherwise), never NumPy's float64;
#  5. integers with integers follow NumPy (int64 + int64 is int64).
def _promote(op: str, a, b, true_div: bool = False):
    """(a, b) with integer operands cast to the float dtype the rules above give."""
    da, db = _dtype_of(a), _dtype_of(b)
    fa = da is not None and da.kind == "f"
    fb = db is not None and db.kind == "f"
    if fa and fb:
        return a, b
    if fa or fb:                                            # rule 3: one side is float
        target = da if fa else db
        return (a if fa else _cast_int(a, target)), (b if fb else _cast_int(b, target))
    pyf = isinstance(a, float) or isinstance(b, float)
    if pyf or true_div:                                     # rule 4
        target = np.dtype(get_default_dtype())
        return _cast_int(a, target), _cast_int(b, target)
    return a, b


def _cast_int(x, dtype):
    """An integer/bool tensor or array as ``dtype`` (no gradient is lost: integers carry none)."""
    if isinstance(x, Tensor):
        return Tensor(x.data.astype(dtype)) if x.dtype.kind in "iub" else x
    if hasattr(x, "dtype") and x.dtype.kind in "iub":
        return x.astype(dtype)
    return x


def _binary(cls, op: str, a, b, true_div: bool = False):
    if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.data.dtype == b.data.dtype
            and a.data.dtype.kind == "f"):
        _check_pair(op, a, b)
        a, b = _promote(op, a, b, true_div)
    elif a.device != b.device:
        _check_pair(op, a, b)
    try:
        return cls()(a, b)
    except ValueError as e:
        if isinstance(e, ShapeError):
            raise
        sa, sb = getattr(a, "shape", ()), getattr(b, "shape", ())
        raise ShapeError(f"{op}: shapes {tuple(sa)} and {tuple(sb)} do not broadcast") from None


def _norm_axis(axis, ndim):
    if axis is None:
        return None
    if isinstance(axis, (list, tuple)):
        return tuple(a % ndim if ndim else a for a in axis)
    return axis % ndim if ndim else axis


# --------------------------------------------------------------------------- elementwise binary
class Add(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, gy):
        sa, sb = self.shapes
        return (sum_to(gy, sa) if self.needs_input_grad[0] else None,
                sum_to(gy, sb) if self.needs_input_grad[1] else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, gy):
        sa, sb = self.shapes
        return (sum_to(gy, sa) if self.needs_input_grad[0] else None,
                sum_to(-gy, sb) if self.needs_input_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        self.save_for_backward(a if self.needs_input_grad[1] else None,
                               b if self.needs_input_grad[0] else None)
        self.shapes = (a.shape, b.shape)
        return a * b

    def backward(self, gy):
        a, b = self.saved
        sa, sb = self.shapes
        return (sum_to(gy * b, sa) if self.needs_input_grad[0] else None,
                sum_to(gy * a, sb) if self.needs_input_grad[1] else None)


class Div(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, gy):
        a, b = self.saved
        ga = sum_to(gy / b, a.shape) if self.needs_input_grad[0] else None
        # -(a/b)/b, not -a/(b*b): b*b underflows to 0 (and the gradient to inf) for tiny b
        gb = sum_to(-(gy * (a / b)) / b, b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Pow(Function):
    """a ** b; the gradient for b is a**b * log(a), defined for a > 0."""

    def forward(self, a, b):
        y = a ** b
        self.save_for_backward(a, b, y if self.needs_input_grad[1] else None)
        return y

    def backward(self, gy):
        a, b, y = self.saved
        xp = get_array_module(a)
        ga = None
        if self.needs_input_grad[0]:
            # b * a**(b-1) is 0 * inf = nan at a = 0, b = 0; x**0 is constant, its gradient 0
            with np.errstate(divide="ignore", invalid="ignore"):
                ga = sum_to(xp.where(b == 0, 0, gy * b * a ** (b - 1)).astype(gy.dtype, copy=False), a.shape)
        gb = None
        if self.needs_input_grad[1]:
            with np.errstate(divide="ignore", invalid="ignore"):
                loga = xp.where(a > 0, xp.log(xp.where(a > 0, a, 1)), 0)
            gb = sum_to(gy * y * loga, b.shape)
        return ga, gb


class Maximum(Function):
    """Elementwise max; on ties each side gets half the gradient (as PyTorch does)."""

    def forward(self, a, b):
        self.save_for_backward(a, b)
        return get_array_module(a).maximum(a, b)

    def backward(self, gy):
        a, b = self.saved
        xp = get_array_module(a)
        wa = (a > b) + 0.5 * (a == b)
        wa = wa.astype(gy.dtype)
        return (sum_to(gy * wa, a.shape) if self.needs_input_grad[0] else None,
                sum_to(gy * (1 - wa), b.shape) if self.needs_input_grad[1] else None)


class Minimum(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return get_array_module(a).minimum(a, b)

    def backward(self, gy):
        a, b = self.saved
        wa = ((a < b) + 0.5 * (a == b)).astype(gy.dtype)
        return (sum_to(gy * wa, a.shape) if self.needs_input_grad[0] else None,
                sum_to(gy * (1 - wa), b.shape) if self.needs_input_grad[1] else None)


# --------------------------------------------------------------------------- elementwise unary
class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy


class Exp(Function):
    def forward(self, x):
        y = get_array_module(x).exp(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy * y


class Log(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return get_array_module(x).log(x)

    def backward(self, gy):
        (x,) = self.saved
        return gy / x


class Sqrt(Function):
    def forward(self, x):
        y = get_array_module(x).sqrt(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy / (2 * y)


class Tanh(Function):
    def forward(self, x):
        y = get_array_module(x).tanh(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy * (1 - y * y)


class ReLU(Function):
    def forward(self, x):
        y = get_array_module(x).maximum(x, 0)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy * (y > 0)


class Abs(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return get_array_module(x).abs(x)

    def backward(self, gy):
        (x,) = self.saved
        return gy * get_array_module(x).sign(x)


class Erf(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return backend.erf(x)

    def backward(self, gy):
        (x,) = self.saved
        xp = get_array_module(x)
        return gy * (2 / np.sqrt(np.pi)) * xp.exp(-x * x)


class Cast(Function):
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)

    def forward(self, x):
        self.src = x.dtype
        return x.astype(self.dtype)

    def backward(self, gy):
        return gy.astype(self.src)


class ToDevice(Function):
    def __init__(self, device):
        self.device = device

    def forward(self, x):
        self.src = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, gy):
        return backend.to_device(gy, self.src)


# --------------------------------------------------------------------------- reductions
class Sum(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.in_shape = x.shape
        self.axis = _norm_axis(self.axis, x.ndim)
        return x.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        xp = get_array_module(gy)
        if not self.keepdims and self.axis is not None:
            gy = xp.expand_dims(gy, self.axis)
        return xp.broadcast_to(gy, self.in_shape)


class Max(Function):
    """max over axes (NumPy's amax); ties share the gradient equally."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axis = _norm_axis(self.axis, x.ndim)
        y = x.max(axis=self.axis, keepdims=True)
        self.save_for_backward(x, y)
        return y if self.keepdims else (y.reshape(()) if self.axis is None else y.squeeze(self.axis))

    def backward(self, gy):
        x, y = self.saved
        xp = get_array_module(x)
        if not self.keepdims:
            gy = gy.reshape(y.shape)
        mask = (x == y)
        count = mask.sum(axis=self.axis, keepdims=True)
        return gy * mask / count.astype(gy.dtype)


# --------------------------------------------------------------------------- shapes
class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise ShapeError(f"reshape: cannot reshape {x.shape} (size {x.size}) into {tuple(self.shape)}") from None

    def backward(self, gy):
        return gy.reshape(self.in_shape)


class Transpose(Function):
    def __init__(self, axes=None):
        self.axes = axes

    def forward(self, x):
        if self.axes is None:
            self.axes = tuple(reversed(range(x.ndim)))
        if sorted(a % builtins.max(x.ndim, 1) for a in self.axes) != list(range(x.ndim)):
            raise ShapeError(f"transpose: axes {self.axes} are not a permutation of {x.ndim} axes")
        return x.transpose(self.axes)

    def backward(self, gy):
        inv = np.argsort([a % gy.ndim for a in self.axes])
        return gy.transpose(tuple(int(i) for i in inv))


class BroadcastTo(Function):
    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.in_shape = x.shape
        try:
            return get_array_module(x).broadcast_to(x, self.shape)
        except ValueError:
            raise ShapeError(f"broadcast_to: cannot broadcast {x.shape} to {self.shape}") from None

    def backward(self, gy):
        return sum_to(gy, self.in_shape)


def _is_advanced(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(not isinstance(i, (int, np.integer, slice, type(None), type(Ellipsis))) for i in items)


class GetItem(Function):
    """x[index]: ints, slices, None, Ellipsis, integer arrays and boolean masks.

    With integer arrays an element may be picked twice, so backward scatter-adds.
    """

    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.in_shape, self.in_dtype = x.shape, x.dtype
        try:
            return x[self.index]
        except IndexError as e:
            raise IndexError(f"getitem: {e} (tensor shape {x.shape})") from None

    def backward(self, gy):
        xp = get_array_module(gy)
        gx = xp.zeros(self.in_shape, dtype=gy.dtype)
        if _is_advanced(self.index):
            backend.scatter_add(gx, self.index, gy)
        else:
            gx[self.index] = gy
        return gx


class Concatenate(Function):
    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        self.axis = self.axis % xs[0].ndim
        self.sizes = [x.shape[self.axis] for x in xs]
        try:
            return get_array_module(*xs).concatenate(xs, axis=self.axis)
        except ValueError:
            raise ShapeError(f"concatenate: shapes {[x.shape for x in xs]} do not fit along axis {self.axis}") from None

    def backward(self, gy):
        bounds = np.cumsum(self.sizes)[:-1]
        return tuple(get_array_module(gy).split(gy, bounds, axis=self.axis))


class Stack(Function):
    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        self.axis = self.axis % (xs[0].ndim + 1)
        try:
            return get_array_module(*xs).stack(xs, axis=self.axis)
        except ValueError:
            raise ShapeError(f"stack: shapes {[x.shape for x in xs]} differ") from None

    def backward(self, gy):
        n = gy.shape[self.axis]
        return tuple(gy.take(i, axis=self.axis) for i in range(n))


class Split(Function):
    """Split along an axis into pieces (NumPy's ``indices_or_sections``); several outputs."""

    def __init__(self, indices_or_sections, axis=0):
        self.ios, self.axis = indices_or_sections, axis

    def forward(self, x):
        self.axis = self.axis % x.ndim
        try:
            return tuple(get_array_module(x).split(x, self.ios, axis=self.axis))
        except ValueError:
            raise ShapeError(f"split: axis {self.axis} of size {x.shape[self.axis]} cannot be split "
                             f"into {self.ios} equal parts") from None

    def backward(self, *gys):
        return get_array_module(gys[0]).concatenate(gys, axis=self.axis)


class Where(Function):
    """where(cond, a, b); cond is a boolean array without gradient."""

    def __init__(self, cond):
        self.cond = cond

    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return get_array_module(a, b).where(self.cond, a, b)

    def backward(self, gy):
        zero = gy.dtype.type(0)
        xp = get_array_module(gy)
        ga = sum_to(xp.where(self.cond, gy, zero), self.shapes[0]) if self.needs_input_grad[0] else None
        gb = sum_to(xp.where(self.cond, zero, gy), self.shapes[1]) if self.needs_input_grad[1] else None
        return ga, gb


# --------------------------------------------------------------------------- linear algebra
class MatMul(Function):
    """a @ b with NumPy semantics: 1-D operands promoted, batch dimensions broadcast."""

    def forward(self, a, b):
        self.save_for_backward(a if self.needs_input_grad[1] else None,
                               b if self.needs_input_grad[0] else None)
        self.shapes = (a.shape, b.shape)
        try:
            return a @ b
        except ValueError:
            raise ShapeError(f"matmul: shapes {a.shape} and {b.shape} are not aligned") from None

    def backward(self, gy):
        a, b = self.saved
        sa, sb = self.shapes
        if len(sa) == 1 and len(sb) == 1:
            return (gy * b if self.needs_input_grad[0] else None,
                    gy * a if self.needs_input_grad[1] else None)
        # promote 1-D operands to matrices, and put the dropped axis back into gy
        sa2 = (1, sa[0]) if len(sa) == 1 else sa
        sb2 = (sb[0], 1) if len(sb) == 1 else sb
        if len(sa) == 1:
            a = None if a is None else a.reshape(sa2)
            gy = gy[..., None, :]
        if len(sb) == 1:
            b = None if b is None else b.reshape(sb2)
            gy = gy[..., None]
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = sum_to(gy @ b.swapaxes(-1, -2), sa2).reshape(sa)
        if self.needs_input_grad[1]:
            if len(sb2) == 2 and gy.ndim > 2:
                # batch axes come from `a` alone: one (K, M*B) @ (M*B, N) matmul, not B then a sum
                gb = a.reshape(-1, a.shape[-1]).T @ gy.reshape(-1, gy.shape[-1])
            else:
                gb = sum_to(a.swapaxes(-1, -2) @ gy, sb2)
            gb = gb.reshape(sb)
        return ga, gb


class Linear(Function):
    """y = x @ W.T + b for x of shape (..., in) and W of shape (out, in), as one node."""

    def forward(self, x, w, b=None):
        self.save_for_backward(x if self.needs_input_grad[1] else None,
                               w if self.needs_input_grad[0] else None)
        self.x_shape = x.shape
        if x.shape[-1] != w.shape[-1]:
            raise ShapeError(f"linear: input of shape {x.shape} does not fit weight of shape {w.shape} "
                             f"(last dimensions {x.shape[-1]} != {w.shape[-1]})")
        # one (N, in) @ (in, out) product: a 3-D @ 2-D matmul runs one BLAS call per batch row
        y2 = x.reshape(-1, x.shape[-1]) @ w.T
        if b is not None:
            backend.add_bias(y2, b)
        return y2.reshape(x.shape[:-1] + (w.shape[0],))

    def backward(self, gy):
        x, w = self.saved
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = (g2 @ w).reshape(self.x_shape) if self.needs_input_grad[0] else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if self.needs_input_grad[1] else None
        if len(self.needs_input_grad) == 3:
            gb = backend.bias_grad(g2) if self.needs_input_grad[2] else None
            return gx, gw, gb
        return gx, gw


# --------------------------------------------------------------------------- wrappers
def add(a, b): return _binary(Add, "add", a, b)
def sub(a, b): return _binary(Sub, "sub", a, b)
def mul(a, b): return _binary(Mul, "mul", a, b)
def div(a, b): return _binary(Div, "div", a, b, true_div=True)
def pow(a, b): return _binary(Pow, "pow", a, b)  # noqa: A001 - mirrors the operator
def maximum(a, b): return _binary(Maximum, "maximum", a, b)
def minimum(a, b): return _binary(Minimum, "minimum", a, b)
def neg(x): return Neg()(x)
def exp(x): return Exp()(x)
def log(x): return Log()(x)
def sqrt(x): return Sqrt()(x)
def tanh(x): return Tanh()(x)
def relu(x): return ReLU()(x)
def abs(x): return Abs()(x)  # noqa: A001
def erf(x): return Erf()(x)
def cast(x, dtype): return Cast(dtype)(x)
def to_device(x, device): return ToDevice(backend.check_device(device))(x)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return Sum(axis, keepdims)(x)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return Max(axis, keepdims)(x)


def min(x, axis=None, keepdims=False):  # noqa: A001
    return neg(max(neg(x), axis, keepdims))


def mean(x, axis=None, keepdims=False):
    x = _t(x)
    n = _count(x.shape, axis)
    return mul(sum(x, axis, keepdims), 1.0 / n)


def var(x, axis=None, keepdims=False, ddof=0):
    """Variance with NumPy's default ``ddof=0`` (PyTorch's ``var`` uses 1)."""
    x = _t(x)
    d = sub(x, mean(x, axis, keepdims=True))
    n = _count(x.shape, axis)
    return mul(sum(mul(d, d), axis, keepdims), 1.0 / (n - ddof))


def _count(shape, axis) -> int:
    if axis is None:
        return int(np.prod(shape)) if shape else 1
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return int(np.prod([shape[a] for a in axes]))


def _t(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape(shape)(x)


def transpose(x, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return Transpose(axes or None)(x)


def permute(x, *axes):
    return transpose(x, *axes)


def swapaxes(x, a, b):
    axes = list(range(x.ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return Transpose(tuple(axes))(x)


def broadcast_to(x, shape):
    return BroadcastTo(shape)(x)


def _raw_index(index, xp=np):
    """Index arrays as arrays of ``xp`` (CuPy does not take NumPy index arrays implicitly)."""
    if isinstance(index, tuple):
        return tuple(_raw_index(i, xp) for i in index)
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, list) or (xp is not np and isinstance(index, np.ndarray)):
        return xp.asarray(index)
    return index


def getitem(x, index):
    return GetItem(_raw_index(index, get_array_module(x)))(x)


def concatenate(xs, axis=0):
    return Concatenate(axis)(*xs)


cat = concatenate


def stack(xs, axis=0):
    return Stack(axis)(*xs)


def split(x, indices_or_sections, axis=0):
    out = Split(indices_or_sections, axis)(x)
    return list(out) if isinstance(out, tuple) else [out]


def where(cond, a, b):
    cond = cond.data if isinstance(cond, Tensor) else cond
    _check_pair("where", a, b)
    xp = get_array_module(a, b)
    if xp is not np:  # a NumPy mask meeting tensors on the GPU
        cond = xp.asarray(cond)
    return Where(cond)(a, b)


def matmul(a, b):
    _check_pair("matmul", a, b)
    return MatMul()(a, b)


def linear(x, weight, bias=None):
    _check_pair("linear", x, weight)
    return Linear()(x, weight) if bias is None else Linear()(x, weight, bias)


def expand_dims(x, axis):
    shape = list(x.shape)
    axis = axis % (len(shape) + 1)
    shape.insert(axis, 1)
    return reshape(x, tuple(shape))


def squeeze(x, axis=None):
    if axis is None:
        shape = tuple(s for s in x.shape if s != 1)
    else:
        axes = {a % x.ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,))}
        for a in axes:
            if x.shape[a] != 1:
                raise ShapeError(f"squeeze: axis {a} has size {x.shape[a]}, not 1")
        shape = tuple(s for i, s in enumerate(x.shape) if i not in axes)
    return reshape(x, shape)


def flatten(x, start_axis=0):
    return reshape(x, x.shape[:start_axis] + (-1,))


# --------------------------------------------------------------------------- Tensor methods
def _rev(f):
    return lambda self, other: f(other, self)


def _cmp(name):
    def f(self, other):
        o = other.data if isinstance(other, Tensor) else other
        return Tensor(getattr(self.data, name)(o))
    return f


Tensor.__add__ = add
Tensor.__radd__ = _rev(add)
Tensor.__sub__ = sub
Tensor.__rsub__ = _rev(sub)
Tensor.__mul__ = mul
Tensor.__rmul__ = _rev(mul)
Tensor.__truediv__ = div
Tensor.__rtruediv__ = _rev(div)
Tensor.__pow__ = pow
Tensor.__rpow__ = _rev(pow)
Tensor.__matmul__ = matmul
Tensor.__rmatmul__ = _rev(matmul)
Tensor.__neg__ = neg
Tensor.__abs__ = abs
Tensor.__getitem__ = getitem
for _name in ("__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"):
    setattr(Tensor, _name, _cmp(_name))
Tensor.__hash__ = object.__hash__  # __eq__ is elementwise, identity stays the hash

def _to(self, device=None, dtype=None) -> Tensor:
    """A copy on ``device`` and/or of ``dtype`` (differentiable)."""
    if isinstance(device, (type, np.dtype)) and dtype is None:
        device, dtype = None, device
    out = self
    if dtype is not None and np.dtype(dtype) != self.dtype:
        out = cast(out, dtype)
    if device is not None and backend.check_device(device) != self.device:
        out = to_device(out, device)
    return out


Tensor.to = _to
Tensor.astype = lambda self, dtype: _to(self, dtype=dtype)
Tensor.float = lambda self: _to(self, dtype=np.float32)
Tensor.double = lambda self: _to(self, dtype=np.float64)
Tensor.exp = exp
Tensor.log = log
Tensor.sqrt = sqrt
Tensor.tanh = tanh
Tensor.relu = relu
Tensor.abs = abs
Tensor.sum = sum
Tensor.max = max
Tensor.min = min
Tensor.mean = mean
Tensor.var = var
Tensor.reshape = reshape
Tensor.view = reshape
Tensor.transpose = transpose
Tensor.permute = permute
Tensor.swapaxes = swapaxes
Tensor.broadcast_to = broadcast_to
Tensor.expand_dims = expand_dims
Tensor.squeeze = squeeze
Tensor.flatten = flatten
Tensor.matmul = matmul
