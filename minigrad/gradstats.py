"""Gradient inspection: per-layer gradient norms and update/weight ratios, and their plot.

    gs = GradStats(model)
    loss.backward()
    gs.capture()                 # gradient norms, and a copy of the weights (before the step)
    optimizer.step()
    rec = gs.record(step)        # {"step", "grad_norm": {layer: v}, "update_ratio": {layer: v}}
    plot_grad_flow(rec)          # bars per layer; or plot_grad_flow(gs.history) for lines

A *layer* groups the parameters under one module path up to the first block index
(``transformer.h.3.attn.c_attn.weight`` -> ``transformer.h.3``; ``transformer.wte.weight``
-> ``transformer.wte``); ``by_layer=False`` keeps one entry per parameter. A layer's norm is
the L2 norm of all its parameters' gradients together.

The update/weight ratio ``||w_after - w_before|| / ||w_before||`` says how fast a layer
moves; around 1e-3 per step is the usual healthy range for Adam-trained transformers.
Gradient norms are taken where ``capture`` is called (in the trainer: right after backward,
before clipping).
"""
from __future__ import annotations

import math
import os
import re

import numpy as np

from . import backend

__all__ = ["layer_of", "GradStats", "plot_grad_flow"]

_INDEX = re.compile(r"^\d+$")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its path up to the first numeric part, else its module."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if _INDEX.match(p):
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1]) or name


def _sumsq(a) -> float:
    xp = backend.get_array_module(a)
    return float((a.astype(xp.float64) ** 2).sum())


def _group(values: dict, by_layer: bool) -> dict:
    """name -> sum of squares  =>  group -> norm."""
    out: dict = {}
    for name, v in values.items():
        key = layer_of(name) if by_layer else name
        out[key] = out.get(key, 0.0) + v
    return {k: math.sqrt(v) for k, v in out.items()}


class GradStats:
    """Collects gradient norms and update/weight ratios per layer; ``history`` holds the records."""

    def __init__(self, model, by_layer: bool = True):
        self.model, self.by_layer = model, by_layer
        self.history: list = []
        self._before = None
        self._grad_sq = None

    def capture(self) -> dict:
        """Gradient norms now, and a copy of the weights that have a gradient (the update's start)."""
        self._grad_sq, self._before = {}, {}
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            self._grad_sq[name] = _sumsq(p.grad.data)
            self._before[name] = p.data.copy()
        return _group(self._grad_sq, self.by_layer)

    def record(self, step=None) -> dict:
        """After the optimizer step: a record with the gradient norms and update/weight ratios."""
        if self._before is None:
            raise RuntimeError("GradStats.record: call capture() after backward and before the optimizer step")
        params = dict(self.model.named_parameters())
        upd, w = {}, {}
        for name, before in self._before.items():
            upd[name] = _sumsq(params[name].data - before)
            w[name] = _sumsq(before)
        u, n = _group(upd, self.by_layer), _group(w, self.by_layer)
        rec = {"step": step, "grad_norm": _group(self._grad_sq, self.by_layer),
               "update_ratio": {k: (u[k] / n[k] if n[k] > 0 else float("nan")) for k in u}}
        self._before = self._grad_sq = None
        self.history.append(rec)
        return rec


def plot_grad_flow(records, *, path=None, title: str = "Gradient flow", figsize=None):
    """Gradient norm and update/weight ratio per layer: bars for one record, lines over a list.

    The left panel is ``minigrad.viz.plot_grad_norms``; the right one draws the update/weight
    ratios with the 1e-3 guide line. Returns the Figure (and writes a PNG when ``path`` is given).
    """
    from matplotlib.figure import Figure  # a plain Figure: no pyplot state, saves without a display

    from . import viz

    single = isinstance(records, dict)
    recs = [records] if single else list(records)
    if not recs:
        raise ValueError("plot_grad_flow: no records")
    n_layers = len(recs[-1]["grad_norm"])
    fig = Figure(figsize=figsize or ((12, max(3.0, 0.3 * n_layers + 1.5)) if single else (13, 4.2)),
                 layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    if single:
        viz.plot_grad_norms(recs[0]["grad_norm"], ax=a1, title="gradient norm per layer")
        names = list(recs[0]["update_ratio"])
        vals = np.array([recs[0]["update_ratio"][k] for k in names], dtype=np.float64)
        pos = np.arange(len(names))
        a2.barh(pos, np.where(np.isfinite(vals) & (vals > 0), vals, np.nan), color="C2")
        a2.set_yticks(pos, names, fontsize=8 if len(names) > 15 else None)
        a2.invert_yaxis()
        a2.set_xscale("log")
        ok = vals[np.isfinite(vals) & (vals > 0)]
        if ok.size:   # bars grow from the left edge: keep it left of both the bars and the guide
            a2.set_xlim(left=min(1e-4, float(ok.min()) / 3))
        a2.axvline(1e-3, color="gray", ls="--", lw=1)
        a2.set_xlabel("||update|| / ||weight||")
        a2.grid(True, axis="x", alpha=0.3)
    else:
        steps = [r["step"] if r["step"] is not None else i for i, r in enumerate(recs)]
        viz.plot_grad_norms([r["grad_norm"] for r in recs], steps=steps, ax=a1, title="gradient norm per layer")
        names = list(dict.fromkeys(k for r in recs for k in r["update_ratio"]))
        for k in names:
            a2.plot(steps, [r["update_ratio"].get(k, np.nan) for r in recs], label=k, lw=1.2)
        a2.set_yscale("log")
        a2.axhline(1e-3, color="gray", ls="--", lw=1)
        a2.set_xlabel("step")
        a2.set_ylabel("||update|| / ||weight||")
        a2.grid(True, alpha=0.3)
        if len(names) <= 12:
            a2.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    a2.set_title("update / weight ratio per layer")
    fig.suptitle(title)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110, format="png")
    return fig
