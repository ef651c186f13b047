"""Tensor, Function and the backward pass.

Names and semantics follow PyTorch where they fit (``requires_grad``, ``.grad``,
``backward``, ``no_grad``, ``register_hook``, ``detach``); array behaviour follows
NumPy (``transpose(*axes)``, ``var`` with ``ddof=0``, ``axis=`` keyword, dtype promotion
of arrays). Python scalars take the dtype of the tensor they meet, so ``x * 2.0`` stays
float32.

A ``Function`` computes on raw arrays. Calling one wraps its outputs in tensors and,
when a gradient is needed, records itself as their ``creator``. ``Tensor.backward``
walks the recorded functions in reverse topological order, without recursion.

Python's protocols follow PyTorch: ``bool``, ``float``, ``int`` and ``__index__`` need one
element, ``np.asarray(t)`` gives the data. In-place ops (``add_``, ``+=``, ...) are refused
while a gradient is recorded and bump a version counter that backward checks.

This module imports nothing from ``ops.py``: the operators and differentiable methods
(``+``, ``exp``, ``to``, ...) are bound onto ``Tensor`` there.
"""
from __future__ import annotations

import contextlib
import weakref

import numpy as np

from . import backend

_grad_enabled = True
_default_dtype = np.float32


@contextlib.contextmanager
def no_grad():
    """Run without recording a graph (evaluation, generation, optimizer updates)."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = prev


@contextlib.contextmanager
def enable_grad():
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, True
    try:
        yield
    finally:
        _grad_enabled = prev


def is_grad_enabled() -> bool:
    return _grad_enabled


# --------------------------------------------------------------------------- observers
# Tools that watch the engine (memory accounting, checkpointing's search for the weights a
# function reads) subclass Observer and install it with `observe`. While none is installed
# the engine pays one truth test of this empty list per op.
_observers: list = []


class Observer:
    """Callbacks from the engine; every one is optional."""

    def on_call(self, fn, inputs, outputs):            # after any Function call (recorded or not)
        pass

    def on_save(self, fn, arrays):                     # a recorded Function kept arrays for backward
        pass

    def on_backward_step(self, fn, pending, leaves):   # fn's backward ran; its saved arrays may be freed
        pass

    def on_backward_end(self, pending, leaves):        # a backward pass finished
        pass


@contextlib.contextmanager
def observe(observer: Observer):
    _observers.append(observer)
    try:
        yield observer
    finally:
        _observers.remove(observer)


def _notify(event: str, *args) -> None:
    for o in list(_observers):
        getattr(o, event)(*args)


def set_default_dtype(dtype) -> None:
    """dtype given to tensors made from Python floats (float32 unless changed)."""
    global _default_dtype
    _default_dtype = np.dtype(dtype).type


def get_default_dtype():
    return _default_dtype


def _to_array(data, dtype=None, like=None):
    """Raw array from Python data, an array or a Tensor. Python floats get the default dtype."""
    if isinstance(data, Tensor):
        data = data.data
    xp = backend.get_array_module(like) if like is not None else backend.get_array_module(data)
    if isinstance(data, (np.ndarray, np.generic)) or backend.is_cupy_array(data):
        arr = data
    else:
        arr = np.asarray(data)
        if arr.dtype == np.float64 and dtype is None:  # an explicit dtype must not round via float32
            arr = arr.astype(_default_dtype)
        if xp is not np:
            arr = xp.asarray(arr)
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    if isinstance(arr, np.generic):
        arr = np.asarray(arr)
    return arr


class Tensor:
    """An array with an optional gradient and a link to the function that made it."""

    __array_priority__ = 100  # so `ndarray * Tensor` calls Tensor.__rmul__
    _vc = (0,)                # version counter, a one-item list shared with detach(); see add_

    def __init__(self, data, requires_grad: bool = False, dtype=None, device: str | None = None):
        arr = _to_array(data, dtype)
        if device is not None:
            arr = backend.to_device(arr, device)
        if requires_grad and arr.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {arr.dtype}")
        self.data = arr
        self.requires_grad = bool(requires_grad)
        self.grad: Tensor | None = None
        self.creator: Function | None = None
        self._out_index = 0
        self._hooks: list | None = None
        self._retain_grad = False
        self.name: str | None = None
        self._vc = [0]

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self.creator is None

    @property
    def T(self) -> "Tensor":
        return self.transpose()

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        extra = ", requires_grad=True" if self.requires_grad else ""
        if self.device != "cpu":
            extra += f", device='{self.device}'"
        body = np.array2string(backend.to_numpy(self.data), precision=4, threshold=20, prefix="tensor(")
        return f"tensor({body}, dtype={self.dtype}{extra})"

    # ------------------------------------------------------------------ conversion
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU when needed)."""
        return backend.to_numpy(self.data)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph (an in-place change of one changes the other)."""
        t = Tensor(self.data)
        t._vc = self._vc
        return t

    @property
    def _version(self) -> int:
        return self._vc[0]

    # ``to``, ``astype``, ``float`` and ``double`` are differentiable (Cast, ToDevice): they are
    # bound in ops.py with the other ops, so this module imports nothing from ops.

    # ------------------------------------------------------------------ Python and NumPy protocols
    def _one(self, what: str):
        if self.data.size != 1:
            raise RuntimeError(f"{what} of a tensor with {self.data.size} elements (shape {self.shape}) is "
                               "ambiguous; use .any() or .all() for a truth value, .item() for one element")
        return self.data.reshape(()).item()

    def __bool__(self) -> bool:
        """True/False of a one-element tensor; more (or no) elements raise, as in PyTorch and NumPy."""
        return bool(self._one("the truth value"))

    def __float__(self) -> float:
        return float(self._one("float()"))

    def __int__(self) -> int:
        return int(self._one("int()"))

    def __index__(self) -> int:
        if self.dtype.kind not in "iub":
            raise TypeError(f"only integer tensors of one element can be used as an index, got dtype {self.dtype}")
        return int(self._one("an index"))

    def __array__(self, dtype=None, copy=None):
        """``np.asarray(t)``: the data as a NumPy array (copied from the GPU when needed)."""
        a = backend.to_numpy(self.data)
        if dtype is not None and a.dtype != dtype:
            return a.astype(dtype)
        return a.copy() if copy else a

    # in-place ops (add_, +=, zero_, copy_, ...) and their checks: minigrad/inplace.py

    # ------------------------------------------------------------------ autograd
    def register_hook(self, hook):
        """Call ``hook(grad)`` with this tensor's gradient (a Tensor) during backward.

        A hook may return a replacement gradient. Returns a handle with ``remove()``.
        """
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that does not require grad")
        if self._hooks is None:
            self._hooks = []
        self._hooks.append(hook)
        return _RemovableHandle(self._hooks, hook)

    def retain_grad(self) -> None:
        """Keep ``.grad`` on a non-leaf tensor after backward (for inspection)."""
        self._retain_grad = True

    def zero_grad(self) -> None:
        self.grad = None

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Compute gradients of this tensor with respect to every leaf that requires them."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(was it computed under no_grad, or from inputs without requires_grad?)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar; this tensor has shape {self.shape}")
            g = self.data.dtype.type(1) * backend.get_array_module(self.data).ones_like(self.data)
        else:
            g = _to_array(grad, self.dtype, like=self.data)
            if g.shape != self.shape:
                raise ValueError(f"backward(): gradient shape {g.shape} does not match tensor shape {self.shape}")
            if g is getattr(grad, "data", grad):
                g = g.copy()  # the caller keeps `grad`: no .grad may alias it
        run_backward(self, g, retain_graph)

    # ------------------------------------------------------------------ operators
    # (bound to the functions of ops.py at the bottom of that module)


class _RemovableHandle:
    def __init__(self, container, item):
        self._container, self._item = container, item

    def remove(self):
        if self._item in self._container:
            self._container.remove(self._item)


def _result(y, i: int, creator: "Function | None" = None) -> "Tensor":
    """Output ``i`` of a Function, without Tensor.__init__'s conversions: recorded (it requires
    grad, ``creator`` made it) when a creator is given, else a new leaf of no gradient."""
    t = Tensor.__new__(Tensor)
    t.data = y
    t.requires_grad = creator is not None
    t.grad = None
    t.creator = creator
    t._out_index = i
    t._hooks = None
    t._retain_grad = False
    t.name = None
    t._vc = [0]
    return t


class Function:
    """One differentiable operation on raw arrays.

    Subclasses implement ``forward(*arrays) -> array | tuple`` and
    ``backward(*grad_outputs) -> grad | tuple`` (one gradient per input, ``None`` where
    the input needs none; ``self.needs_input_grad`` tells which). Arrays needed by
    backward are kept with ``save_for_backward`` so they can be counted and freed.
    """

    inputs: tuple = ()
    saved: tuple = ()

    def __call__(self, *inputs):
        if not _grad_enabled and not _observers:
            # nothing is recorded (no_grad: decoding, evaluation): the same outputs with less
            # bookkeeping; Python scalars and arrays among the inputs take the general path
            for x in inputs:
                if not isinstance(x, Tensor):
                    break
            else:
                self.needs_input_grad = tuple([x.requires_grad for x in inputs])
                self._record = False
                self.saved = ()
                ys = self.forward(*[x.data for x in inputs])
                if isinstance(ys, tuple):
                    return tuple([_result(y, i) for i, y in enumerate(ys)])
                return _result(ys, 0)
        xs = [x if isinstance(x, Tensor) else None for x in inputs]
        like = next((x.data for x in xs if x is not None), None)
        ref_dtype = next((x.dtype for x in xs if x is not None and x.dtype.kind == "f"), None)
        tensors = []
        for x, raw in zip(xs, inputs):
            if x is None:  # Python scalar or array: a constant of the neighbours' dtype
                dt = ref_dtype if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
                x = Tensor(_to_array(raw, dt, like=like))
            tensors.append(x)
        self.needs_input_grad = tuple(t.requires_grad for t in tensors)
        record = _grad_enabled and any(self.needs_input_grad)
        self._record = record
        ys = self.forward(*[t.data for t in tensors])
        single = not isinstance(ys, tuple)
        if single:
            ys = (ys,)
        outputs = [_result(y, i, self if record else None) for i, y in enumerate(ys)]
        if record:
            self.inputs = tuple(tensors)
            self._versions = [t._vc[0] for t in tensors]
            self.outputs = tuple(weakref.ref(t) for t in outputs)
            self.n_outputs = len(outputs)
            if len(outputs) > 1:  # to make zero gradients for outputs nobody used
                self._out_meta = [(y.shape, y.dtype) for y in ys]
        else:
            self.saved = ()
        if _observers:
            _notify("on_call", self, tensors, outputs)
        return outputs[0] if single else tuple(outputs)

    def save_for_backward(self, *arrays) -> None:
        if self._record:
            self.saved = arrays
            if _observers:
                _notify("on_save", self, arrays)

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _topo_order(root: Function) -> list:
    """Functions reachable from ``root``, each after every function that consumes its outputs."""
    # A function is marked when it is expanded, not when it is pushed: marking on push
    # can finish a producer before a consumer that was pushed after it (b + 3*b).
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        fn, expanded = stack.pop()
        if expanded:
            order.append(fn)
            continue
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        stack.append((fn, True))
        for x in fn.inputs:
            c = x.creator
            if c is not None and id(c) not in seen:
                stack.append((c, False))
    order.reverse()  # post-order reversed = consumers before producers
    return order


def _apply_hooks(t: Tensor, g):
    if t._hooks:
        for hook in list(t._hooks):
            r = hook(Tensor(g))
            if r is not None:
                g = _to_array(r, g.dtype, like=g)
    return g


def _accumulate(store: dict, key, g):
    prev = store.get(key)
    if prev is None:
        store[key] = g
    else:
        # a fresh buffer: `g` or `prev` may alias an array the graph still holds
        store[key] = prev + g


def _check_versions(fn: Function) -> None:
    """Refuse a node whose input or output was changed in place after it ran (a wrong gradient)."""
    for x, v in zip(fn.inputs, getattr(fn, "_versions", ())):
        if x._version != v:
            raise RuntimeError(
                f"{fn.name}: one of its inputs (shape {x.shape}) was changed in place (version {v} -> "
                f"{x._version}) after the forward pass that backward now needs; compute the forward "
                "again after the change, or change a copy (x.clone())")
    for ref in getattr(fn, "outputs", ()):
        out = ref()
        if out is not None and out._version:
            raise RuntimeError(f"{fn.name}: its output (shape {out.shape}) was changed in place after the "
                               "forward pass; backward would use the changed value. Change a copy (y.clone())")


def run_backward(root: Tensor, grad, retain_graph: bool = False) -> None:
    if root.creator is None:  # a leaf: its gradient is the seed itself
        g = _apply_hooks(root, grad)
        root.grad = Tensor(g) if root.grad is None else Tensor(root.grad.data + g)
        return
    pending = {}   # (id(fn), output index) -> gradient array
    leaves = {}    # id(leaf) -> [leaf, gradient]
    exposed = set()  # ids of gradient arrays that user code may hold (hooks, retained .grad)
    pending[(id(root.creator), root._out_index)] = grad
    for fn in _topo_order(root.creator):
        if fn.saved is None:
            raise RuntimeError(
                f"backward through {fn.name} a second time: its saved arrays were freed after the "
                "first backward. Pass retain_graph=True to the first backward() to keep them.")
        _check_versions(fn)
        gys = []
        for i in range(fn.n_outputs):
            g = pending.pop((id(fn), i), None)
            out = fn.outputs[i]()
            if out is not None and g is not None:
                if out._hooks:
                    g = _apply_hooks(out, g)
                    exposed.add(id(g))
                if out._retain_grad:
                    out.grad = Tensor(g) if out.grad is None else Tensor(out.grad.data + g)
                    exposed.add(id(g))
            gys.append(g)
        if all(g is None for g in gys):
            continue
        if any(g is None for g in gys):  # multi-output function with some outputs unused
            xp = backend.get_array_module(*[x.data for x in fn.inputs])
            gys = [g if g is not None else xp.zeros(shape, dtype)
                   for g, (shape, dtype) in zip(gys, fn._out_meta)]
        gxs = fn.backward(*gys)
        if not isinstance(gxs, tuple):
            gxs = (gxs,)
        if len(gxs) != len(fn.inputs):
            raise RuntimeError(f"{fn.name}.backward returned {len(gxs)} gradients for {len(fn.inputs)} inputs")
        if not retain_graph:
            fn.saved = None
        for x, gx in zip(fn.inputs, gxs):
            if gx is None or not x.requires_grad:
                continue
            if gx.shape != x.shape:
                raise RuntimeError(f"{fn.name}.backward gave a gradient of shape {gx.shape} "
                                   f"for an input of shape {x.shape}")
            if x.creator is None:
                entry = leaves.get(id(x))
                if entry is None:
                    leaves[id(x)] = [x, gx]
                else:
                    entry[1] = entry[1] + gx
            else:
                _accumulate(pending, (id(x.creator), x._out_index), gx)
        if not retain_graph:
            # Drop the node's inputs too: the graph's intermediate tensors (and their data) are
            # then freed as backward moves past their consumers, not when the loss is dropped.
            fn.inputs = ()
        if _observers:
            _notify("on_backward_step", fn, pending, leaves)
    for x, g in leaves.values():
        if x._hooks:
            g = _apply_hooks(x, g)
            exposed.add(id(g))
        if g.dtype != x.dtype:
            g = g.astype(x.dtype)
        if x.grad is None:
            # A gradient may be a view (broadcast, reshape), the very array given to another
            # leaf (z = a + b), or one a hook or a retained .grad holds; own a private copy so
            # in-place updates of .grad are safe.
            if g.base is not None or id(g) in exposed or not getattr(g.flags, "writeable", True):
                g = g.copy()
            exposed.add(id(g))
            x.grad = Tensor(g)
        else:
            x.grad.data += g  # accumulate in place: no new buffer per backward
    if _observers:
        _notify("on_backward_end", pending, leaves)


def tensor(data, requires_grad: bool = False, dtype=None, device: str | None = None) -> Tensor:
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


def as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)
