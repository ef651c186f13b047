"""Gradient checkpointing: trade compute for memory.

``checkpoint(fn, *args)`` runs ``fn`` without recording a graph and keeps only its inputs
(and the state of the random generators). The result is one graph node; its backward
runs ``fn`` again, with gradients on, from detached copies of the inputs and with the
random state replayed (so dropout draws the same masks), then backpropagates through
that fresh graph. Activation memory inside ``fn`` lives only during its own backward.

Weights that ``fn`` reads from its closure (a module's parameters) are found while the
first run happens (an ``Observer`` notes every tensor that needs a gradient and is read
by an op), and become inputs of the node. So:

- their gradients reach ``.grad`` exactly as plain backprop's do: the node returns them
  to the outer backward pass, which sums them with the other contributions and applies
  hooks once;
- the node is recorded even when no argument needs a gradient (frozen embeddings feeding
  trainable blocks).

Under ``no_grad`` (evaluation, generation) ``checkpoint`` just calls ``fn``.

The same machinery (find the closure's weights; recompute inside backward with a graph;
hand their gradients back) serves ``minigrad.nn.reversible``.
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import backend
from .tensor import Function, Observer, Tensor, enable_grad, is_grad_enabled, no_grad, observe, run_backward

__all__ = ["checkpoint", "checkpoint_sequential", "RngState"]


# --------------------------------------------------------------------------- shared machinery
class RngState:
    """A snapshot of minigrad's generators (NumPy's, and the GPU's when ``arrays`` live there)."""

    def __init__(self, *arrays):
        xp = backend.get_array_module(*arrays)
        self.modules = (np,) if xp is np else (np, xp)
        self.states = [(m, backend.get_rng_state(m)) for m in self.modules]

    def restore(self) -> None:
        for m, s in self.states:
            backend.set_rng_state(s, m)

    @contextlib.contextmanager
    def replayed(self):
        """Run the block with the generators as they were at the snapshot; put them back after,
        so a recompute inside backward does not shift the random stream of what follows."""
        now = RngState.__new__(RngState)
        now.modules = self.modules
        now.states = [(m, backend.get_rng_state(m)) for m in self.modules]
        self.restore()
        try:
            yield
        finally:
            now.restore()


class ExternalInputs(Observer):
    """Tensors needing a gradient that ops read while grad mode is off: the weights a function
    closes over (everything computed under ``no_grad`` needs none)."""

    def __init__(self):
        self.found: dict = {}

    def on_call(self, fn, inputs, outputs):
        for t in inputs:
            if t.requires_grad and id(t) not in self.found:
                self.found[id(t)] = t


def run_collecting(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under ``no_grad``; returns (result, external tensors needing grad)."""
    with no_grad(), observe(ExternalInputs()) as ext:
        out = fn(*args, **kwargs)
    return out, list(ext.found.values())


@contextlib.contextmanager
def as_leaves(tensors):
    """Make ``tensors`` gradient-collecting leaves for a backward pass inside a backward.

    Each starts with no ``.grad``, no hooks and no creator (a non-leaf is cut from the outer
    graph, whose backward is running). On exit everything is put back; read the gradients
    (``t.grad``) inside the block.
    """
    kept = [(t, t.grad, t.creator, t._hooks, t._retain_grad) for t in tensors]
    for t in tensors:
        t.grad, t.creator, t._hooks, t._retain_grad = None, None, None, False
    try:
        yield
    finally:
        for t, grad, creator, hooks, retain in kept:
            t.grad, t.creator, t._hooks, t._retain_grad = grad, creator, hooks, retain


class _Join(Function):
    """Ties several outputs into one root so one backward pass seeds them all (no arithmetic)."""

    def __init__(self, grads):
        self.grads = grads

    def forward(self, *xs):
        return backend.get_array_module(*xs).zeros((), dtype=xs[0].dtype)

    def backward(self, gy):
        return tuple(self.grads)


def backward_from(outputs, grads) -> None:
    """Backpropagate ``grads`` (arrays, None to skip) from ``outputs`` (Tensors) in one pass.

    The seeds are copied: the graph may hand a seed to a leaf as its ``.grad``, which later
    accumulates in place, and the caller still needs its arrays.
    """
    pairs = [(o, g.copy()) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    if not pairs:
        return
    if len(pairs) == 1:
        run_backward(pairs[0][0], pairs[0][1])
        return
    xp = backend.get_array_module(pairs[0][1])
    root = _Join([g for _, g in pairs])(*[o for o, _ in pairs])
    run_backward(root, xp.ones((), dtype=root.dtype))


def _grad_of(t):
    return None if t.grad is None else t.grad.data


# --------------------------------------------------------------------------- checkpoint
class Checkpoint(Function):
    """One graph node standing for ``fn``: inputs are its tensor arguments, then the external
    tensors it reads. Keeps only the arguments' arrays; recomputes ``fn`` in backward."""

    def __init__(self, fn, args, kwargs, rng: RngState, out_arrays, n_tensor_args: int):
        self.fn, self.args, self.kwargs, self.rng = fn, args, kwargs, rng
        self._out, self.n_args = out_arrays, n_tensor_args

    def forward(self, *arrays):
        # fn already ran (under no_grad, to find its weights); hand its result over
        self.save_for_backward(*arrays[:self.n_args])
        out, self._out = self._out, None
        return out[0] if len(out) == 1 else tuple(out)

    def backward(self, *gys):
        n = self.n_args
        xs = [Tensor(a, requires_grad=need) for a, need in zip(self.saved, self.needs_input_grad[:n])]
        extras = [t for t, need in zip(self.inputs[n:], self.needs_input_grad[n:]) if need]
        it = iter(xs)
        args = [next(it) if isinstance(a, Tensor) else a for a in self.args]
        with as_leaves(extras):
            with self.rng.replayed(), enable_grad():
                out = self.fn(*args, **self.kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            backward_from(outs, gys)
            grads = [_grad_of(x) if need else None for x, need in zip(xs, self.needs_input_grad[:n])]
            ext = {id(t): _grad_of(t) for t in extras}
        grads += [ext.get(id(t)) for t in self.inputs[n:]]
        return tuple(grads)


def checkpoint(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, recomputed during backward instead of keeping its activations.

    ``fn`` returns a Tensor or a tuple of Tensors. Tensor arguments are kept (by reference,
    not copied); other arguments are passed again as they are. Gradients equal those of
    plain backprop, dropout included: the random state is saved and replayed. ``fn`` must
    be deterministic given its inputs and the random state, and must not change its inputs.
    """
    if not is_grad_enabled():
        return fn(*args, **kwargs)
    tensors = [a for a in args if isinstance(a, Tensor)]
    rng = RngState(*[t.data for t in tensors])
    out, found = run_collecting(fn, *args, **kwargs)
    ids = {id(t) for t in tensors}
    extras = [t for t in found if id(t) not in ids]
    if not extras and not any(t.requires_grad for t in tensors):
        return out   # nothing upstream needs a gradient: no node, nothing kept
    outs = out if isinstance(out, tuple) else (out,)
    if not all(isinstance(o, Tensor) for o in outs):
        raise TypeError("checkpoint: fn must return a Tensor or a tuple of Tensors, got "
                        f"{type(out).__name__}")
    node = Checkpoint(fn, args, kwargs, rng, [o.data for o in outs], len(tensors))
    res = node(*tensors, *extras)
    if isinstance(out, tuple):
        return res if isinstance(res, tuple) else (res,)
    return res


def checkpoint_sequential(functions, segments: int, x):
    """Run ``functions`` (callables or a Sequential) one after another on ``x``, in ``segments``
    contiguous groups, each group but the last checkpointed.

    As in PyTorch, the last group runs plainly: backward needs its activations first, so
    recomputing them would cost time and save nothing at the peak.
    """
    functions = list(functions)
    if segments < 1:
        raise ValueError(f"checkpoint_sequential: segments must be >= 1, got {segments}")
    size = -(-len(functions) // segments) if functions else 1
    groups = [functions[i:i + size] for i in range(0, len(functions), size)]

    def run(group, h):
        for f in group:
            h = f(h)
        return h

    for i, group in enumerate(groups):
        if i < len(groups) - 1:
            x = checkpoint(run, group, x)
        else:
            x = run(group, x)
    return x
