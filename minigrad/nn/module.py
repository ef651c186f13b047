"""Module and Parameter: the containers a model is built from.

A ``Module`` registers every ``Parameter``, sub-``Module`` and buffer assigned to it as
an attribute, in assignment order, so ``named_parameters`` gives stable dotted names
(``h.0.attn.c_attn.weight``) that ``state_dict``, the optimizer and checkpoints share.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import backend
from ..tensor import Tensor


class Parameter(Tensor):
    """A tensor that is a learnable weight of a module (requires grad by default)."""

    def __init__(self, data, requires_grad: bool = True, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)

    def __repr__(self) -> str:
        return "Parameter(" + super().__repr__() + ")"


class StateDictError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class _Handle:
    def __init__(self, store: dict, key):
        self.store, self.key = store, key

    def remove(self) -> None:
        self.store.pop(self.key, None)


class Module:
    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_forward_hooks", OrderedDict())
        object.__setattr__(self, "_forward_pre_hooks", OrderedDict())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before assigning attributes")
        if name in self._buffers and not isinstance(value, (Parameter, Module)):
            self._buffers[name] = value  # `self.buf = new_array` keeps it a buffer (as in PyTorch)
            object.__setattr__(self, name, value)
            return
        for store in (self._parameters, self._modules, self._buffers):
            store.pop(name, None)
        self._non_persistent.discard(name)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        for store in (self._parameters, self._modules, self._buffers):
            store.pop(name, None)
        self._non_persistent.discard(name)
        object.__delattr__(self, name)

    def register_buffer(self, name: str, array, persistent: bool = True) -> None:
        """A non-learnable array that moves with the module (and is saved if persistent)."""
        object.__setattr__(self, name, array)
        self._buffers[name] = array
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)

    def add_module(self, name: str, module: "Module") -> None:
        setattr(self, name, module)

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = ""):
        """Depth-first, in assignment order (PyTorch's order); a shared module is listed once."""
        stack = [(prefix, self)]
        seen = set()
        while stack:
            name, m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            yield name, m
            for n, child in reversed(m._modules.items()):
                stack.append((f"{name}.{n}" if name else n, child))

    def get_submodule(self, target: str) -> "Module":
        """The sub-module at a dotted name (``"transformer.h.0.mlp"``); ``""`` is the module itself."""
        m = self
        for part in target.split(".") if target else []:
            if part not in m._modules:
                raise AttributeError(f"{type(m).__name__} has no sub-module {part!r} (looking up {target!r})")
            m = m._modules[part]
        return m

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self, prefix: str = ""):
        """(dotted name, Parameter) for every parameter; a shared one is listed once."""
        seen = set()
        for mname, m in self.named_modules(prefix):
            for n, p in m._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mname}.{n}" if mname else n), p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self):
        for mname, m in self.named_modules():
            for n, b in m._buffers.items():
                yield (f"{mname}.{n}" if mname else n), m, n, b

    def num_parameters(self, trainable_only: bool = False) -> int:
        return int(sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only))

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad = flag
        return self

    # ------------------------------------------------------------------ device / dtype
    def to(self, device=None, dtype=None) -> "Module":
        """Move parameters and buffers in place (optimizer references stay valid)."""
        if isinstance(device, (type, np.dtype)) and dtype is None:
            device, dtype = None, device
        if device is not None:
            device = backend.check_device(device)
        for p in self.parameters():
            if dtype is not None and p.dtype.kind == "f":
                p.data = p.data.astype(dtype)
            if device is not None:
                p.data = backend.to_device(p.data, device)
                if getattr(p, "mask", None) is not None:  # a pruning mask moves with its weight
                    p.mask = backend.to_device(p.mask, device)
            if p.grad is not None:
                p.grad = None
        for _, m, n, b in list(self.named_buffers()):
            if not hasattr(b, "shape"):
                continue
            # integer buffers (ids, masks) keep their dtype, and so do packed weights (QuantLinear)
            if dtype is not None and b.dtype.kind == "f" and not getattr(m, "_keep_buffer_dtypes", False):
                b = b.astype(dtype)
            if device is not None:
                b = backend.to_device(b, device)
            m.register_buffer(n, b, persistent=n not in m._non_persistent)
        return self

    @property
    def device(self) -> str:
        for p in self.parameters():
            return p.device
        return "cpu"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> "OrderedDict[str, object]":
        """Name -> array for every parameter and persistent buffer (arrays, not copies)."""
        out = OrderedDict((n, p.data) for n, p in self.named_parameters())
        for full, m, n, b in self.named_buffers():
            if n not in m._non_persistent:
                out[full] = b
        return out

    def load_state_dict(self, state: dict, strict: bool = True):
        """Copy arrays into parameters and buffers; report missing/unexpected keys and bad shapes."""
        params = dict(self.named_parameters())
        buffers = {full: (m, n, b) for full, m, n, b in self.named_buffers() if n not in m._non_persistent}
        expected = set(params) | set(buffers)
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        errors = []
        for k in sorted(set(state) & expected):
            target = params[k].data if k in params else buffers[k][2]
            src = state[k]
            src = src.data if isinstance(src, Tensor) else src
            if tuple(src.shape) != tuple(target.shape):
                errors.append(f"  {k}: checkpoint has shape {tuple(src.shape)}, model has {tuple(target.shape)}")
        if strict and (missing or unexpected):
            errors.insert(0, "  missing keys: " + (", ".join(missing) or "none") +
                          "\n  unexpected keys: " + (", ".join(unexpected) or "none"))
        if errors:
            raise StateDictError(f"load_state_dict for {type(self).__name__} failed:\n" + "\n".join(errors))
        for k in set(state) & expected:
            src = state[k]
            src = src.data if isinstance(src, Tensor) else src
            if k in params:
                p = params[k]
                p.data = backend.to_device(src, p.device).astype(p.dtype, copy=True)
            else:
                m, n, b = buffers[k]
                m.register_buffer(n, backend.to_device(src, backend.device_of(b)).astype(b.dtype, copy=True))
        return missing, unexpected

    # ------------------------------------------------------------------ calling
    def register_forward_hook(self, hook):
        """``hook(module, inputs, output)`` after each forward; may return a new output."""
        key = object()
        self._forward_hooks[key] = hook
        return _Handle(self._forward_hooks, key)

    def register_forward_pre_hook(self, hook):
        """``hook(module, inputs)`` before each forward; may return new inputs (a tuple)."""
        key = object()
        self._forward_pre_hooks[key] = hook
        return _Handle(self._forward_pre_hooks, key)

    def __call__(self, *args, **kwargs):
        if not self._forward_pre_hooks and not self._forward_hooks:
            return self.forward(*args, **kwargs)
        for hook in list(self._forward_pre_hooks.values()):
            r = hook(self, args)
            if r is not None:
                args = r if isinstance(r, tuple) else (r,)
        out = self.forward(*args, **kwargs)
        for hook in list(self._forward_hooks.values()):
            r = hook(self, args, out)
            if r is not None:
                out = r
        return out

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for n, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({n}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"
