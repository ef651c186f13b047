"""Plots for looking at training: loss curves, gradient flow per layer, memory over time.

Every ``plot_*`` function draws into ``ax`` when one is given (so it can be one panel of a
bigger figure) or into a new figure, returns the ``Figure``, and also writes a PNG when
``path`` is given. New figures are plain ``matplotlib.figure.Figure`` objects, not pyplot
ones: a training loop that plots every few hundred steps keeps no global figure list
alive. In a notebook a returned figure shows as the cell's output (after
``import matplotlib.pyplot``); in a script, save it with ``path`` or pass an ``ax`` from
a pyplot figure you manage.

matplotlib is imported inside the functions, so ``import minigrad`` never pays for it.
"""
from __future__ import annotations

import math
import numbers
import os
import sys

import numpy as np

from . import backend

_MiB = 1024.0 ** 2
_RESERVED = ("t", "label")


def _matplotlib():
    """Import matplotlib; on a machine with no display pick the file-only Agg backend.

    Only when nobody chose a backend yet (no MPLBACKEND, pyplot not imported): a notebook's
    inline backend or a user's choice is left alone.
    """
    import matplotlib

    headless = (sys.platform.startswith("linux")
                and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"))
    if headless and not os.environ.get("MPLBACKEND") and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return matplotlib


def _figure_and_ax(ax, figsize):
    _matplotlib()
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _finish(fig, path, dpi: int = 110):
    if path is not None:
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return fig


def _as_float_array(name: str, values) -> np.ndarray:
    if values is None:
        raise ValueError(f"{name}: got None")
    try:
        arr = np.asarray([float(backend.to_numpy(getattr(v, "data", v))) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of numbers") from None
    if arr.size == 0:
        raise ValueError(f"{name}: empty, nothing to plot")
    return arr


def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    out = np.empty_like(values)
    acc = values[0]
    for i, v in enumerate(values):
        acc = weight * acc + (1.0 - weight) * v
        out[i] = acc
    return out


def _ema_with_gaps(values: np.ndarray, weight: float) -> np.ndarray:
    """EMA over the finite values; non-finite entries stay as they are (gaps, blow-ups)."""
    out = values.copy()
    ok = np.isfinite(values)
    if ok.any():
        out[ok] = _ema(values[ok], weight)
    return out


# --------------------------------------------------------------------------- loss curves
def plot_loss(steps, losses, val=None, val_steps=None, *, ax=None, path=None, title: str = "Loss",
              logy: bool = False, smooth: float = 0.0, xlabel: str = "step", ylabel: str = "loss",
              figsize=(6.4, 4.0)):
    """Training loss over steps, with an optional validation curve.

    ``steps``: x values (``None`` for 0, 1, 2, ...). ``val``: validation losses, either one
    per step or, with ``val_steps``, at their own steps (validation usually runs less
    often). ``logy`` uses a log y axis. ``smooth`` in [0, 1) draws an exponential moving
    average of the training loss over the faint raw curve (0: no smoothing).
    """
    y = _as_float_array("plot_loss: losses", losses)
    x = np.arange(len(y), dtype=np.float64) if steps is None else _as_float_array("plot_loss: steps", steps)
    if len(x) != len(y):
        raise ValueError(f"plot_loss: {len(x)} steps but {len(y)} losses")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"plot_loss: smooth must be in [0, 1), got {smooth}")
    vx = vy = None
    if val is not None:
        vy = _as_float_array("plot_loss: val", val)
        vx = x if val_steps is None else _as_float_array("plot_loss: val_steps", val_steps)
        if len(vx) != len(vy):
            raise ValueError(f"plot_loss: {len(vx)} validation steps but {len(vy)} validation losses"
                             + ("" if val_steps is not None else " (pass val_steps when validation "
                                "runs at other steps than training)"))
    elif val_steps is not None:
        raise ValueError("plot_loss: val_steps given without val")
    if logy:
        for name, arr in (("losses", y), ("val", vy)):
            if arr is not None and np.any(arr[np.isfinite(arr)] <= 0):
                raise ValueError(f"plot_loss: logy needs positive values, but {name} has some <= 0")

    fig, ax = _figure_and_ax(ax, figsize)
    if smooth > 0:
        ax.plot(x, y, color="C0", alpha=0.3, linewidth=1)
        ax.plot(x, _ema(y, smooth), color="C0", label=f"train (EMA {smooth:g})")
    else:
        ax.plot(x, y, color="C0", label="train")
    if vy is not None:
        ax.plot(vx, vy, color="C1", marker="o" if len(vy) <= 30 else None, markersize=3, label="val")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _finish(fig, path)


# --------------------------------------------------------------------------- gradient flow
def grad_norms(module) -> dict:
    """L2 norm of ``.grad`` of each parameter, by dotted name, in ``named_parameters`` order.

    ``module``: a ``Module`` or an iterable of ``(name, tensor)`` pairs. Parameters without
    a gradient (frozen, or unused in the last forward) are left out. Norms are summed in
    float64, so float16 gradients do not overflow.
    """
    pairs = module.named_parameters() if hasattr(module, "named_parameters") else module
    out, seen = {}, 0
    for name, p in pairs:
        seen += 1
        if p.grad is None:
            continue
        g = p.grad.data
        xp = backend.get_array_module(g)
        out[name] = float(xp.sqrt((g.astype(xp.float64) ** 2).sum()))
    if not out:
        what = type(module).__name__
        raise ValueError(f"grad_norms: none of the {seen} parameters of {what} has a .grad; "
                         "call loss.backward() first" if seen else f"grad_norms: {what} has no parameters")
    return out


def _check_norms(where: str, norms: dict) -> None:
    if not isinstance(norms, dict):
        raise TypeError(f"plot_grad_norms: {where} is a {type(norms).__name__}, expected a dict name -> norm")
    for k, v in norms.items():
        if not isinstance(v, numbers.Real):
            raise TypeError(f"plot_grad_norms: {where}[{k!r}] is a {type(v).__name__}, not a number")
        if v < 0:
            raise ValueError(f"plot_grad_norms: {where}[{k!r}] = {v} is negative; a norm cannot be")


def plot_grad_norms(named_norms, steps=None, *, ax=None, path=None, title: str = "Gradient norm per parameter",
                    logy: bool = True, smooth: float = 0.0, max_legend: int = 12, figsize=None):
    """Gradient flow: one bar per parameter for one step, or one line per parameter over steps.

    ``named_norms``: a dict name -> norm (as from ``grad_norms``) gives a horizontal bar
    chart, first parameter on top, so vanishing or exploding layers stand out; a list of
    such dicts (one per recorded step, ``steps`` their x values) gives lines. On the bar
    chart non-finite norms (nan, inf: a blown-up step) are written in red, and zero norms
    in grey when the axis is logarithmic. ``logy`` asks for log axes (lines: only when all
    finite norms are positive). ``smooth`` in [0, 1) draws the lines
    as exponential moving averages (per-step norms are noisy); it does not apply to bars.
    Past ``max_legend`` names the legend is left out: for a deep model pass a subset (one
    weight per block, say) to get readable lines.
    """
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"plot_grad_norms: smooth must be in [0, 1), got {smooth}")
    if isinstance(named_norms, dict):
        if not named_norms:
            raise ValueError("plot_grad_norms: empty dict, nothing to plot")
        _check_norms("named_norms", named_norms)
        names = list(named_norms)
        vals = np.array([float(named_norms[n]) for n in names])
        finite = np.isfinite(vals)
        use_log = logy and bool(np.any(finite & (vals > 0)))
        # a log axis has no 0: zero norms (a layer that got no signal) get a label, like nan/inf
        drawn = finite & (vals > 0) if use_log else finite
        fig, ax = _figure_and_ax(ax, figsize or (6.4, max(2.5, 0.28 * len(names) + 1.2)))
        pos = np.arange(len(names))
        ax.barh(pos[drawn], vals[drawn], color="C0")
        for i in np.flatnonzero(~drawn):
            ax.text(0.01, i, f" {vals[i]:g}", transform=ax.get_yaxis_transform(), va="center",
                    color="C3" if not finite[i] else "dimgray")
        ax.set_yticks(pos, names, fontsize=8 if len(names) > 15 else None)
        ax.set_ylim(len(names) - 0.5, -0.5)  # first parameter on top
        if use_log:
            # bars grow from the left edge: put it at a power of ten below the smallest norm
            ax.set_xscale("log")
            lo = float(vals[drawn].min())
            left = 10.0 ** math.floor(math.log10(lo))
            ax.set_xlim(left=left / 10 if lo < 2 * left else left)  # the shortest bar stays visible
            from matplotlib.ticker import NullFormatter
            ax.xaxis.set_minor_formatter(NullFormatter())  # labels at 2x, 3x ... would overlap
        ax.set_xlabel("L2 norm of .grad")
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title(title)
        return _finish(fig, path)

    if isinstance(named_norms, (str, bytes)) or not hasattr(named_norms, "__iter__"):
        raise TypeError("plot_grad_norms: expected a dict name -> norm, or a list of such dicts (one per step), "
                        f"got {type(named_norms).__name__}")
    records = list(named_norms)
    if not records:
        raise ValueError("plot_grad_norms: empty list, nothing to plot")
    for i, r in enumerate(records):
        _check_norms(f"named_norms[{i}]", r)
    x = np.arange(len(records), dtype=np.float64) if steps is None else _as_float_array("plot_grad_norms: steps", steps)
    if len(x) != len(records):
        raise ValueError(f"plot_grad_norms: {len(x)} steps but {len(records)} records")
    names = list(dict.fromkeys(k for r in records for k in r))
    if not names:
        raise ValueError("plot_grad_norms: every record is empty, nothing to plot")
    fig, ax = _figure_and_ax(ax, figsize or (7.5, 4.2))
    allv = []
    for n in names:
        ys = np.array([float(r.get(n, np.nan)) for r in records])  # missing on a step: a gap
        if smooth > 0:
            ys = _ema_with_gaps(ys, smooth)
        allv.append(ys)
        ax.plot(x, ys, label=n, linewidth=1.2)
    allv = np.concatenate(allv)
    allv = allv[np.isfinite(allv)]
    if logy and allv.size and np.all(allv > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("L2 norm of .grad")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(names) <= max_legend:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _finish(fig, path)


# --------------------------------------------------------------------------- memory
def plot_memory_timeline(timeline, *, ax=None, path=None, title: str = "Memory", categories=None,
                         step: str | None = "post", annotate_labels: int = 12, figsize=(7.5, 4.2)):
    """Stacked area chart of memory by category (in MiB) over time.

    ``timeline``: a list of dicts ``{"t": number, "label": str, "<category>": bytes, ...}``,
    e.g. ``{"t": 3, "label": "backward", "params": 4096, "grads": 4096, "activations": 0}``.
    Every other key is a category; a category missing from an entry counts 0 there.
    ``categories`` fixes which are drawn and in what order (bottom first); by default all, in
    first-seen order. ``step="post"`` holds each value until the next event (memory does not
    change between allocations); ``None`` interpolates linearly. The peak of the total is
    marked, and where the label changes a faint line is drawn (named along the top edge when
    there are at most ``annotate_labels`` changes).
    """
    if isinstance(timeline, dict) or not hasattr(timeline, "__iter__"):
        raise TypeError(f"plot_memory_timeline: expected a list of dicts, got {type(timeline).__name__}")
    events = list(timeline)
    if not events:
        raise ValueError("plot_memory_timeline: empty timeline, nothing to plot")
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            raise TypeError(f"plot_memory_timeline: entry {i} is a {type(e).__name__}, expected a dict")
        if "t" not in e:
            raise ValueError(f"plot_memory_timeline: entry {i} has no 't' key: {e}")
        if not isinstance(e["t"], numbers.Real):
            raise TypeError(f"plot_memory_timeline: entry {i} has t={e['t']!r}, expected a number")
    if categories is None:
        categories = [k for k in dict.fromkeys(k for e in events for k in e) if k not in _RESERVED]
    else:
        categories = list(categories)
        bad = [c for c in categories if c in _RESERVED]
        if bad:
            raise ValueError(f"plot_memory_timeline: {bad} are reserved keys, not categories")
    if not categories:
        raise ValueError("plot_memory_timeline: the entries have no category keys besides 't' and 'label' "
                         "(expected e.g. {'t': 0, 'label': 'forward', 'params': 1024})")
    data = np.zeros((len(categories), len(events)))
    for i, e in enumerate(events):
        for j, c in enumerate(categories):
            v = e.get(c, 0)
            if not isinstance(v, numbers.Real):
                raise TypeError(f"plot_memory_timeline: entry {i} has {c}={v!r}, expected a byte count")
            if v < 0:
                raise ValueError(f"plot_memory_timeline: entry {i} has {c}={v} bytes, which is negative")
            data[j, i] = v
    t = np.array([float(e["t"]) for e in events])
    if np.any(np.diff(t) < 0):
        raise ValueError("plot_memory_timeline: 't' must not decrease along the timeline")
    mib = data / _MiB
    top = np.cumsum(mib, axis=0)
    bottom = np.vstack([np.zeros(len(events)), top[:-1]])

    fig, ax = _figure_and_ax(ax, figsize)
    for j, c in enumerate(categories):
        ax.fill_between(t, bottom[j], top[j], step=step, label=c, color=f"C{j % 10}", alpha=0.85, linewidth=0)
    total = top[-1]
    k = int(np.argmax(total))
    peak_label = events[k].get("label")
    ax.plot([t[k]], [total[k]], marker="v", color="black")
    ax.annotate(f"peak {total[k]:.2f} MiB" + (f"\n({peak_label})" if peak_label else ""),
                (t[k], total[k]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    labels = [e.get("label") for e in events]
    changes = [i for i in range(len(events)) if labels[i] and (i == 0 or labels[i] != labels[i - 1])]
    for i in changes:
        ax.axvline(t[i], color="gray", linewidth=0.6, alpha=0.5)
    if changes and len(changes) <= annotate_labels:  # phase names along the top edge
        top_axis = ax.secondary_xaxis("top")
        rot = 0 if len(changes) <= 4 else 35
        top_axis.set_xticks([t[i] for i in changes], [str(labels[i]) for i in changes], fontsize=7,
                            color="dimgray", rotation=rot, ha="center" if rot == 0 else "left")
    ax.set_ylim(0, max(float(total.max()) * 1.18, 1e-9))
    ax.set_xlabel("t")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _finish(fig, path)
