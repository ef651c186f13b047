"""One calibration collector: input statistics of chosen modules over a few batches.

GPTQ needs each Linear's input Hessian ``H = sum_x x x^T``; Wanda needs each input
channel's norm ``||X_j||_2``; structured pruning needs per-channel activation norms; the
kNN datastore needs hidden states. They all come from forward hooks over calibration
batches, so the hooks are written once here::

    stats = collect(model, batches, run=lambda m, x: m(x), modules=["c_attn", "c_fc"],
                    want=("sqnorm", "xtx"))
    stats["transformer.h.0.mlp.c_fc"].sqnorm   # (in_features,) sum over tokens of x_j^2
    stats["transformer.h.0.mlp.c_fc"].xtx      # (in_features, in_features) sum of x x^T

Statistics are accumulated in float64 on the host, one row per token (every leading axis
of the input is flattened), and nothing is kept of the activations themselves, so memory is
O(in_features^2) per module whatever the number of batches. The model runs under
``no_grad`` in eval mode, and the hooks are removed afterwards even when a batch fails.

Where the activations themselves are wanted (the kNN datastore keeps every position's final
hidden state), ``capture`` installs the same kind of hook and hands over each forward's
output instead of a sum::

    with capture(model, "transformer.ln_f") as seen:
        model(idx)
        h = seen["transformer.ln_f"]             # (B, T, C) output of the last forward
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .tensor import Tensor, no_grad

STATS = ("sqnorm", "xtx", "absmean", "output_sqnorm")


@dataclass
class InputStats:
    """What one module saw: ``n`` token rows, and the statistics that were asked for."""
    n: int = 0
    sqnorm: np.ndarray | None = None         # (in,) sum of x_j^2 over rows
    xtx: np.ndarray | None = None            # (in, in) sum of x x^T over rows
    absmean: np.ndarray | None = None        # (in,) sum of |x_j| over rows (divide by n)
    output_sqnorm: np.ndarray | None = None  # (out,) sum of y_j^2 over rows
    extra: dict = field(default_factory=dict)

    def norm(self) -> np.ndarray:
        """``||X_j||_2`` per input channel (Wanda's activation term)."""
        return np.sqrt(self.sqnorm)

    def hessian(self) -> np.ndarray:
        """The mean ``X^T X / n`` (GPTQ's layer Hessian, up to the factor 2)."""
        return self.xtx / max(self.n, 1)


def _rows(a) -> np.ndarray:
    a = backend.to_numpy(a.data if isinstance(a, Tensor) else a)
    return a.reshape(-1, a.shape[-1]).astype(np.float64)


def match(name: str, patterns) -> bool:
    """PEFT's ``target_modules`` rule: a pattern matches a full name or its last components."""
    if patterns is None:
        return True
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(name == p or name.endswith("." + p) for p in patterns)


def select(model, modules=None, eligible=None) -> list:
    """``[(name, module)]`` of the modules whose name matches ``modules`` (and ``eligible(module)``)."""
    chosen = [(n, m) for n, m in model.named_modules()
              if n and (eligible is None or eligible(m)) and match(n, modules)]
    if not chosen:
        raise ValueError(f"no module matches {modules!r}")
    return chosen


@contextmanager
def capture(model, modules, what: str = "output", to_host: bool = True):
    """Forward hooks that keep the latest ``what`` ("output" or "input") of each chosen module.

    Yields a dict ``{module name: array}`` that each forward overwrites (raw arrays, moved to
    the host unless ``to_host=False``); the hooks are removed on exit. Nothing accumulates, so
    the caller decides what to keep: the kNN datastore copies each batch's rows to disk.
    """
    if what not in ("output", "input"):
        raise ValueError(f"capture: what must be 'output' or 'input', got {what!r}")
    seen: dict = {}

    def hook_for(name):
        def hook(mod, inputs, output):
            a = output if what == "output" else inputs[0]
            a = a.data if isinstance(a, Tensor) else a
            seen[name] = backend.to_numpy(a) if to_host else a
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in select(model, modules)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def collect(model, batches, run=None, modules=None, want=("sqnorm",), types=None) -> dict[str, InputStats]:
    """Run ``model`` over ``batches`` and return ``{module name: InputStats}``.

    ``run(model, batch)`` does one forward (default ``model(batch)``); ``modules`` are name
    patterns (see ``match``; default: every module of ``types``); ``types`` defaults to
    Linear-like modules (anything with a 2-D ``weight`` or an ``in_features``).
    """
    bad = set(want) - set(STATS)
    if bad:
        raise ValueError(f"unknown statistic(s) {sorted(bad)}; valid: {', '.join(STATS)}")
    run = run or (lambda m, b: m(b))

    def eligible(mod) -> bool:
        if types is not None:
            return isinstance(mod, types)
        return hasattr(mod, "in_features") and hasattr(mod, "out_features")

    chosen = select(model, modules, eligible)
    stats = {n: InputStats() for n, _ in chosen}

    def hook_for(name):
        def hook(mod, inputs, output):
            x = _rows(inputs[0])
            s = stats[name]
            s.n += x.shape[0]
            if "sqnorm" in want:
                v = (x * x).sum(axis=0)
                s.sqnorm = v if s.sqnorm is None else s.sqnorm + v
            if "absmean" in want:
                v = np.abs(x).sum(axis=0)
                s.absmean = v if s.absmean is None else s.absmean + v
            if "xtx" in want:
                v = x.T @ x
                s.xtx = v if s.xtx is None else s.xtx + v
            if "output_sqnorm" in want:
                y = _rows(output)
                v = (y * y).sum(axis=0)
                s.output_sqnorm = v if s.output_sqnorm is None else s.output_sqnorm + v
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in chosen]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with no_grad():
            n_batches = 0
            for b in batches:
                run(model, b)
                n_batches += 1
        if n_batches == 0:
            raise ValueError("no calibration batches were given")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats
