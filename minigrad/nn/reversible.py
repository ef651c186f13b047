"""Reversible residual layers (RevNet, Reformer): activation memory that does not grow with depth.

A reversible block splits the activations into two streams and couples them:

    y1 = x1 + F(x2)          x2 = y2 - G(y1)
    y2 = x2 + G(y1)          x1 = y1 - F(x2)

The right column recovers a block's inputs from its outputs, so a stack of such blocks
needs to keep nothing but its final output. ``reversible_sequence`` is one graph node for
the whole stack: its forward runs every block without a graph; its backward walks the
blocks in reverse, rebuilding each block's inputs and, with a small graph for one F or G at
a time, the gradients for the inputs and for every weight F and G use. The random state
before each F and G is kept, so dropout draws the same masks when they are recomputed.

Cost: each F and G runs twice (forward, then again in backward), like checkpointing every
block, but no block boundary is stored. The inputs are rebuilt by subtraction, so they
carry rounding error of a few ulps per block (float64: ~1e-15 relative; float32: ~1e-7).
"""
from __future__ import annotations

from ..checkpoint import RngState, as_leaves, backward_from, run_collecting
from ..tensor import Function, Tensor, as_tensor, enable_grad, is_grad_enabled, no_grad
from .layers import ModuleList
from .module import Module

__all__ = ["ReversibleBlock", "ReversibleSequence", "reversible_sequence", "invert_sequence"]


class _Reversible(Function):
    """The stack as one node: inputs (x1, x2, *weights); keeps only (y1, y2)."""

    def __init__(self, couplings, states, out_arrays):
        self.couplings, self.states, self._out = couplings, states, out_arrays

    def forward(self, x1, x2, *weights):
        y1, y2 = self._out          # computed already (under no_grad, to find the weights)
        self._out = None
        self.save_for_backward(y1, y2)
        return y1, y2

    def backward(self, dy1, dy2):
        y1, y2 = self.saved
        need = self.needs_input_grad
        weights = [t for t, n in zip(self.inputs[2:], need[2:]) if n]
        now = RngState(y1)
        try:
            with as_leaves(weights):
                for (f, g), (s_f, s_g) in zip(reversed(self.couplings), reversed(self.states)):
                    # G: y2 = x2 + G(y1). Rebuild x2; send dy2 through G into y1 and G's weights.
                    y1_t = Tensor(y1, requires_grad=True)
                    s_g.restore()
                    with enable_grad():
                        gy = g(y1_t)
                    x2 = y2 - gy.data
                    backward_from([gy], [dy2])
                    if y1_t.grad is not None:
                        dy1 = dy1 + y1_t.grad.data            # total gradient reaching y1
                    del gy, y1_t                              # free G's graph before F's is built
                    # F: y1 = x1 + F(x2). Rebuild x1; send dy1 through F into x2 and F's weights.
                    x2_t = Tensor(x2, requires_grad=True)
                    s_f.restore()
                    with enable_grad():
                        fx = f(x2_t)
                    x1 = y1 - fx.data
                    backward_from([fx], [dy1])
                    if x2_t.grad is not None:
                        dy2 = dy2 + x2_t.grad.data            # dx2 = dy2 + F'(x2)^T dy1; dx1 = dy1
                    del fx, x2_t
                    y1, y2 = x1, x2
                found = {id(t): (None if t.grad is None else t.grad.data) for t in weights}
        finally:
            now.restore()   # the recompute must not shift the random stream of what follows
        return (dy1 if need[0] else None, dy2 if need[1] else None,
                *[found.get(id(t)) for t in self.inputs[2:]])


def _plain(couplings, x1, x2):
    for f, g in couplings:
        x1 = x1 + f(x2)
        x2 = x2 + g(x1)
    return x1, x2


def reversible_sequence(couplings, x1, x2, reconstruct: bool = True):
    """Run the coupled blocks ``couplings`` (a list of ``(F, G)`` callables) on two streams.

    Returns ``(y1, y2)``. With ``reconstruct`` (the default) and gradients on, the stack is one
    graph node that keeps only ``(y1, y2)``; weights F and G read (module parameters in their
    closures) get their gradients as with plain backprop. ``reconstruct=False`` runs the same
    coupling with ordinary autograd, keeping every block's activations: the reference.
    Under ``no_grad`` both are a plain loop.
    """
    x1, x2 = as_tensor(x1), as_tensor(x2)
    couplings = [tuple(c) for c in couplings]
    if not reconstruct or not is_grad_enabled():
        return _plain(couplings, x1, x2)
    states = []

    def run(a, b):
        for f, g in couplings:
            s_f = RngState(a.data)
            a = a + f(b)
            s_g = RngState(a.data)
            b = b + g(a)
            states.append((s_f, s_g))
        return a, b

    (y1, y2), found = run_collecting(run, x1, x2)
    weights = [t for t in found if t is not x1 and t is not x2]
    if not weights and not (x1.requires_grad or x2.requires_grad):
        return y1, y2
    return _Reversible(couplings, states, (y1.data, y2.data))(x1, x2, *weights)


def invert_sequence(couplings, y1, y2):
    """The inputs ``(x1, x2)`` that give ``(y1, y2)``, computed backwards without a graph.

    Random layers (dropout) must be off, or the masks would differ from the forward's.
    """
    y1, y2 = as_tensor(y1), as_tensor(y2)
    with no_grad():
        for f, g in reversed([tuple(c) for c in couplings]):
            x2 = y2 - g(y1)
            x1 = y1 - f(x2)
            y1, y2 = x1, x2
    return y1, y2


class ReversibleBlock(Module):
    """One coupling: ``F`` and ``G`` are modules (or callables) mapping a stream to its shape."""

    def __init__(self, f, g):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x1, x2):
        y1 = x1 + self.f(x2)
        return y1, x2 + self.g(y1)

    def inverse(self, y1, y2):
        return invert_sequence([(self.f, self.g)], y1, y2)


class ReversibleSequence(Module):
    """A stack of ``ReversibleBlock``s run as one memory-saving node (see the module docstring)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = ModuleList(blocks)

    def couplings(self):
        return [(b.f, b.g) for b in self.blocks]

    def forward(self, x1, x2, reconstruct: bool = True):
        return reversible_sequence(self.couplings(), x1, x2, reconstruct)

    def inverse(self, y1, y2):
        return invert_sequence(self.couplings(), y1, y2)
