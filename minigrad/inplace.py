"""In-place ops on tensors: ``add_``, ``sub_``, ``mul_``, ``div_``, ``zero_``, ``fill_``,
``copy_``, ``clamp_`` and the ``+=``-style operators, bound onto ``Tensor`` below.

They change ``data`` in place, so a graph that recorded the tensor would compute a wrong
gradient. As PyTorch does, they are refused while a gradient is being recorded for the
tensor, and allowed under ``no_grad`` (optimizer updates, initialisation) or on tensors
that need no gradient. Each one bumps the tensor's version counter (``_vc``, shared with
``detach()``); backward compares it with the version each node saw when it ran
(``tensor._check_versions``), so a graph whose inputs or outputs changed under ``no_grad``
refuses to run instead of giving a wrong gradient. The result keeps the tensor's dtype;
what cannot (a float into an integer tensor, float64 into float32) is an error.
"""
from __future__ import annotations

from . import backend
from .tensor import Tensor, is_grad_enabled


def _inplace(self, op: str):
    if self.requires_grad and is_grad_enabled():
        kind = "a leaf tensor that requires grad" if self.creator is None else \
            "a tensor that is part of a graph being recorded"
        raise RuntimeError(f"{op}: in-place change of {kind}; its old value may be needed to "
                           "compute gradients. Run it under minigrad.no_grad() (e.g. an optimizer "
                           "update) or use the out-of-place form (x = x + y)")
    if self._vc is Tensor._vc:
        self._vc = [0]
    self._vc[0] += 1
    return self.data


def _operand(self, op: str, other):
    o = other.data if isinstance(other, Tensor) else other
    dt = getattr(o, "dtype", None)
    if dt is not None and dt.kind == "f" and self.dtype.kind == "f" and dt != self.dtype:
        raise TypeError(f"{op}: dtype mismatch {self.dtype} and {dt}; convert one with .to(dtype) "
                        "(no silent upcast)")
    if isinstance(o, float) and self.dtype.kind != "f" or (dt is not None and dt.kind == "f"
                                                            and self.dtype.kind != "f"):
        raise TypeError(f"{op}: a float result cannot be stored in place in a {self.dtype} tensor")
    if dt is not None and backend.device_of(o) != self.device:
        raise RuntimeError(f"{op}: tensors on different devices ({self.device} and {backend.device_of(o)})")
    return o


def _ufunc_(self, op: str, ufunc: str, other):
    o = self._operand(op, other)
    d = self._inplace(op)
    xp = backend.get_array_module(d)
    try:
        getattr(xp, ufunc)(d, o, out=d, casting="same_kind")
    except ValueError:
        raise ValueError(f"{op}: shape {tuple(getattr(o, 'shape', ()))} does not broadcast to the "
                         f"tensor's shape {self.shape}") from None
    return self


def add_(self, other):
    return self._ufunc_("add_", "add", other)


def sub_(self, other):
    return self._ufunc_("sub_", "subtract", other)


def mul_(self, other):
    return self._ufunc_("mul_", "multiply", other)


def div_(self, other):
    if self.dtype.kind != "f":
        raise TypeError(f"div_: true division of a {self.dtype} tensor in place cannot keep its dtype")
    return self._ufunc_("div_", "true_divide", other)


def zero_(self):
    self._inplace("zero_")[...] = 0
    return self


def fill_(self, value):
    o = self._operand("fill_", value)
    self._inplace("fill_")[...] = o
    return self


def copy_(self, src):
    """Copy ``src``'s values into this tensor (broadcast; same float dtype; any device)."""
    o = src.data if isinstance(src, Tensor) else src
    if hasattr(o, "dtype") and o.dtype.kind == "f" and self.dtype.kind == "f" and o.dtype != self.dtype:
        raise TypeError(f"copy_: dtype mismatch {self.dtype} and {o.dtype}; convert with .to(dtype) first")
    d = self._inplace("copy_")
    o = backend.to_device(o, self.device) if hasattr(o, "shape") else o
    try:
        d[...] = o
    except ValueError:
        raise ValueError(f"copy_: shape {tuple(getattr(o, 'shape', ()))} does not broadcast to {self.shape}") from None
    return self


def clamp_(self, min=None, max=None):  # noqa: A002 - PyTorch's names
    if min is None and max is None:
        raise ValueError("clamp_: give min, max or both")
    d = self._inplace("clamp_")
    backend.get_array_module(d).clip(d, min, max, out=d)
    return self


for _f in (_inplace, _operand, _ufunc_, add_, sub_, mul_, div_, zero_, fill_, copy_, clamp_):
    setattr(Tensor, _f.__name__, _f)
Tensor.__iadd__, Tensor.__isub__, Tensor.__imul__, Tensor.__itruediv__ = add_, sub_, mul_, div_
Tensor.clip_ = clamp_
