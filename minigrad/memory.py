"""Where training memory goes: bytes by category, live, with peaks and a timeline.

    with MemoryTracker(model, optimizer) as mt:
        mt.mark("forward")
        logits, loss = model(x, y)
        mt.mark("backward")
        loss.backward()
        mt.mark("optimizer")
        optimizer.step()
        mt.mark("end")
    print(mt.summary())          # peak bytes, and each category at the peak
    mt.plot()                    # stacked timeline (minigrad.viz.plot_memory_timeline)

``mark(label)`` starts a phase: every event after it carries ``label`` until the next mark.

Categories (each buffer counted once, in the first category that holds it):

- ``parameters``: the arrays of the model's parameters (and its persistent buffers: packed
  quantized weights are weights);
- ``gradients``: their ``.grad`` arrays, and the parameter gradients a backward pass is
  still accumulating;
- ``optimizer``: the arrays in ``optimizer.state`` (AdamW: two per parameter);
- ``activations``: the arrays that recorded graph nodes keep for backward
  (``Function.saved``); counted when saved, uncounted when backward frees them or when
  the graph is garbage collected;
- ``other``: the rest of what the graph keeps alive: the data of its tensors that no
  backward needs (intermediate results that ``Function.inputs`` still references until
  backward passes them, the logits and loss the caller holds), the constants and inputs
  it holds, and the gradients in flight during backward.

On NumPy the bytes are exact sums over the buffers the engine holds: views share their
``.base``, so a buffer is counted once however many views of it are held. Arrays that a
Function keeps as plain attributes rather than through ``save_for_backward`` (the mask of
``where``, the index of ``getitem``) are not seen; they are small. Temporaries inside an op
are not seen either: they live for one op and are never held by the engine.

On CuPy the total comes from the device memory pool (``backend.memory_pool_bytes``): the
four array categories are counted as on NumPy and ``other`` is what the pool has in use
beyond them (temporaries and the pool's rounding included).

The tracker follows the engine through ``minigrad.tensor.observe``, so it sees graphs
built after it starts (start it before the forward pass), including the graphs that
checkpointing and reversible layers build inside backward.
"""
from __future__ import annotations

import weakref

from . import backend
from .tensor import Observer, _observers, observe

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "other")
_MiB = 1024.0 ** 2

_ACT, _OTHER = 2, 3   # slots of a buffer entry [root, nbytes, n_activation_refs, n_other_refs]


def array_root(a):
    """The array that owns ``a``'s memory (``a`` itself unless it is a view)."""
    while True:
        b = getattr(a, "base", None)
        if b is None or not hasattr(b, "nbytes") or not hasattr(b, "base"):
            return a
        a = b


def unique_nbytes(arrays) -> int:
    """Bytes of the distinct buffers behind ``arrays`` (None and non-arrays skipped)."""
    seen = {}
    for a in arrays:
        if a is None or not hasattr(a, "nbytes"):
            continue
        r = array_root(a)
        seen[id(r)] = int(r.nbytes)
    return sum(seen.values())


def _roots(arrays) -> dict:
    out = {}
    for a in arrays:
        if a is not None and hasattr(a, "nbytes"):
            r = array_root(a)
            out[id(r)] = r
    return out


SPLIT = ("parameters", "gradients", "optimizer")   # the categories that split into trainable / frozen


def weight_buffers(model) -> list:
    """The persistent buffers of a model (packed quantized weights): weights that are not Parameters."""
    return [b for _, m, n, b in model.named_buffers() if n not in m._non_persistent and hasattr(b, "nbytes")]


def static_memory(model=None, optimizer=None, *, params=None) -> dict:
    """Bytes of parameters, gradients and optimizer state, each split by ``requires_grad``.

    ``{"parameters": {"trainable": b, "frozen": b}, "gradients": {...}, "optimizer": {...}}``:
    the saving of LoRA (or of any freezing) in numbers. A buffer is counted once; optimizer
    state belongs to the side of the parameter it was kept for. A model's persistent buffers
    (a QuantLinear's packed codes and scales: QLoRA's base) are frozen weights.
    """
    if params is None:
        params = model.parameters() if model is not None else \
            (p for _, _, p in optimizer.named_params()) if optimizer is not None else ()
    params = list({id(p): p for p in params}.values())
    out = {c: {"trainable": 0, "frozen": 0} for c in SPLIT}
    for side, flag in (("trainable", True), ("frozen", False)):
        ps = [p for p in params if bool(p.requires_grad) == flag]
        extra = weight_buffers(model) if (model is not None and not flag) else []
        out["parameters"][side] = unique_nbytes([p.data for p in ps] + extra)
        out["gradients"][side] = unique_nbytes(p.grad.data for p in ps if p.grad is not None)
    if optimizer is not None:
        by_name = {n: p for _, n, p in optimizer.named_params()}
        for side, flag in (("trainable", True), ("frozen", False)):
            arrays = [v for n, st in optimizer.state.items()
                      if n in by_name and bool(by_name[n].requires_grad) == flag
                      for v in st.values() if hasattr(v, "nbytes") and getattr(v, "ndim", 0) > 0]
            out["optimizer"][side] = unique_nbytes(arrays)
    return out


class MemoryTracker(Observer):
    """Live memory accounting by category over a training step; see the module docstring.

    ``model``: a Module whose parameters (and their gradients) are counted; ``optimizer``:
    one whose ``state`` is counted (its parameters are used when no model is given);
    ``params``: an explicit iterable of parameters instead. ``timeline=False`` keeps only
    the peaks (cheaper over a long run).
    """

    def __init__(self, model=None, optimizer=None, *, params=None, timeline: bool = True):
        if params is None:
            if model is not None:
                params = model.parameters()
            elif optimizer is not None:
                params = (p for _, _, p in optimizer.named_params())
            else:
                params = ()
        self._params = list({id(p): p for p in params}.values())
        self._model = model   # its buffers (packed weights) count as parameters
        self.optimizer = optimizer
        self.record_timeline = timeline
        self._bufs: dict = {}        # id(root) -> [root, nbytes, n_act, n_other]
        self._saved: dict = {}       # id(Function) -> ids of the buffers it saved
        self._held: set = set()      # ids of the tensors whose data is counted (until they die)
        self._live = {"activations": 0, "other": 0}
        self._inflight: dict = {}    # id(pending) of a running backward -> (grad bytes, other bytes)
        self._leaf_cache: dict = {}  # id(leaves) -> (len, bytes)
        self._static = {"parameters": 0, "gradients": 0, "optimizer": 0}
        self._split = {c: {"trainable": 0, "frozen": 0} for c in SPLIT}
        self._param_roots: set = set()
        self._grad_roots: set = set()
        self._version = 0            # bumped when the static categories are re-counted
        self._ctx = None
        self._gpu = any(backend.is_cupy_array(p.data) for p in self._params)
        self.label = "start"
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "MemoryTracker":
        """Begin watching the engine (``with`` does this); graphs built from now on are counted."""
        if self._ctx is None:
            self._ctx = observe(self)
            self._ctx.__enter__()
            self._refresh_static()
        return self

    def stop(self) -> None:
        if self._ctx is not None:
            self._sample()
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    @property
    def active(self) -> bool:
        return self in _observers

    def reset(self) -> None:
        """Forget the timeline and the peaks (live accounting goes on): call at each step's start."""
        self.timeline: list = []
        self.peak_bytes = 0
        self.peak: dict = {c: 0 for c in CATEGORIES}       # each category at the moment of the peak
        self.peak_label = None
        self.max_bytes: dict = {c: 0 for c in CATEGORIES}  # each category's own maximum
        self._t = 0

    def mark(self, label: str) -> dict:
        """Start phase ``label``: re-count parameters, gradients and optimizer state; return a sample."""
        self.label = label
        self._refresh_static()
        return self._sample()

    # ------------------------------------------------------------------ reading
    def current(self) -> dict:
        """Bytes by category now (re-counting parameters, gradients and optimizer state)."""
        self._refresh_static()
        return self._row()

    def summary(self) -> dict:
        """``peak_bytes``, ``peak_mb``, the phase of the peak, each category at the peak and its maximum."""
        out = {"peak_bytes": self.peak_bytes, "peak_mb": self.peak_bytes / _MiB, "peak_label": self.peak_label,
               "at_peak": dict(self.peak), "max": dict(self.max_bytes),
               "split": {c: dict(v) for c, v in self._split.items()}}
        if self._gpu:
            used, held = backend.memory_pool_bytes()
            out["pool_used_bytes"], out["pool_held_bytes"] = used, held
        return out

    def plot(self, *, ax=None, path=None, title: str = "Memory over one step", **kw):
        """The timeline as a stacked area chart (``minigrad.viz.plot_memory_timeline``)."""
        from . import viz
        if not self.timeline:
            raise ValueError("MemoryTracker.plot: the timeline is empty (was the tracker started, "
                             "with timeline=True?)")
        rows, cats = self.timeline, CATEGORIES
        frozen = self._split["parameters"]["frozen"]
        if frozen:   # LoRA, a teacher: draw the frozen weights apart from the trained ones
            cats = ("frozen parameters", "trainable parameters") + CATEGORIES[1:]
            rows = [dict(r, **{"frozen parameters": min(frozen, r["parameters"]),
                               "trainable parameters": max(0, r["parameters"] - frozen)}) for r in rows]
        return viz.plot_memory_timeline(rows, categories=cats, ax=ax, path=path, title=title, **kw)

    # ------------------------------------------------------------------ counting
    def _refresh_static(self) -> None:
        params = [p.data for p in self._params] + (weight_buffers(self._model) if self._model is not None else [])
        self._param_roots = set(_roots(params))
        grads = [p.grad.data for p in self._params if p.grad is not None]
        self._grad_roots = set(_roots(grads))
        self._version += 1
        opt = []
        if self.optimizer is not None:
            for st in self.optimizer.state.values():
                opt.extend(v for v in st.values() if hasattr(v, "nbytes") and getattr(v, "ndim", 0) > 0)
        self._static = {"parameters": unique_nbytes(params), "gradients": unique_nbytes(grads),
                        "optimizer": unique_nbytes(opt)}
        self._split = static_memory(self._model, self.optimizer, params=self._params)

    def _row(self) -> dict:
        g_fly = sum(v[0] for v in self._inflight.values())
        o_fly = sum(v[1] for v in self._inflight.values())
        row = {"t": self._t, "label": self.label,
               "parameters": self._static["parameters"],
               "gradients": self._static["gradients"] + g_fly,
               "optimizer": self._static["optimizer"],
               "activations": self._live["activations"],
               "other": self._live["other"] + o_fly}
        if self._gpu:  # the pool is the authority on the GPU: `other` is what it holds beyond the arrays we know
            used, _ = backend.memory_pool_bytes()
            known = sum(row[c] for c in CATEGORIES if c != "other")
            row["other"] = max(0, used - known)
        return row

    def _sample(self) -> dict:
        row = self._row()
        self._t += 1
        total = sum(row[c] for c in CATEGORIES)
        if total > self.peak_bytes or self.peak_label is None:
            self.peak_bytes = total
            self.peak = {c: row[c] for c in CATEGORIES}
            self.peak_label = row["label"]
        for c in CATEGORIES:
            if row[c] > self.max_bytes[c]:
                self.max_bytes[c] = row[c]
        if self.record_timeline:
            self.timeline.append(row)
        return row

    @staticmethod
    def _category(e):
        return "activations" if e[_ACT] else ("other" if e[_OTHER] else None)

    def _acquire(self, arrays, slot) -> list:
        """Add one reference of kind ``slot`` to each distinct buffer; return the buffers' ids."""
        ids = []
        for rid, r in _roots(arrays).items():
            if rid in self._param_roots:   # a view of a weight is the weight's memory
                continue
            e = self._bufs.get(rid)
            if e is None:
                e = self._bufs[rid] = [r, int(r.nbytes), 0, 0]
            before = self._category(e)
            e[slot] += 1
            self._moved(e, before)
            ids.append(rid)
        return ids

    def _release(self, ids, slot) -> None:
        for rid in ids:
            e = self._bufs.get(rid)
            if e is None:
                continue
            before = self._category(e)
            e[slot] -= 1
            self._moved(e, before)
            if not e[_ACT] and not e[_OTHER]:
                del self._bufs[rid]

    def _moved(self, e, before) -> None:
        after = self._category(e)
        if before != after:
            if before is not None:
                self._live[before] -= e[1]
            if after is not None:
                self._live[after] += e[1]

    def _unsave(self, key) -> None:
        self._release(self._saved.pop(key, ()), _ACT)

    def _hold(self, t) -> None:
        """Count ``t.data`` as `other` for as long as the tensor lives (once per tensor)."""
        key = id(t)
        if key in self._held:
            return
        ids = self._acquire([t.data], _OTHER)
        if ids:
            self._held.add(key)
            weakref.finalize(t, self._drop, key, ids)

    def _drop(self, key, ids) -> None:
        self._held.discard(key)
        self._release(ids, _OTHER)

    # ------------------------------------------------------------------ engine callbacks
    def on_save(self, fn, arrays):
        key = id(fn)
        if key in self._saved:            # saved twice: the new arrays replace the old ones
            self._unsave(key)
        else:                             # the graph may be dropped before its backward runs
            weakref.finalize(fn, self._unsave, key)
        self._saved[key] = self._acquire(arrays, _ACT)

    def on_call(self, fn, inputs, outputs):
        if not getattr(fn, "_record", False):
            return                        # no graph, nothing kept
        for t in inputs:                  # leaves the graph holds: inputs, constants
            if t.creator is None:
                self._hold(t)
        for t in outputs:
            self._hold(t)
        self._sample()

    def on_backward_step(self, fn, pending, leaves):
        if fn.saved is None:
            self._unsave(id(fn))
        key = id(leaves)
        n, lb = self._leaf_cache.get(key, (None, 0))
        if n != (len(leaves), self._version):   # a gradient appeared (sizes do not change after)
            # a gradient handed back by a recompute (checkpoint, reversible) may still be counted
            # in `.grad`, where the inner backward left it: count it once
            lb = sum(int(r.nbytes) for k, r in _roots(v[1] for v in leaves.values()).items()
                     if k not in self._grad_roots)
            self._leaf_cache[key] = ((len(leaves), self._version), lb)
        self._inflight[id(pending)] = (lb, unique_nbytes(pending.values()))
        self._sample()

    def on_backward_end(self, pending, leaves):
        self._inflight.pop(id(pending), None)
        self._leaf_cache.pop(id(leaves), None)
        self._refresh_static()
        self._sample()


def summary_table(rows: dict) -> str:
    """A Markdown table: one row per name, a column per category (MiB) and the total."""
    lines = ["| | " + " | ".join(CATEGORIES) + " | total |", "|---" * (len(CATEGORIES) + 2) + "|"]
    for name, d in rows.items():
        vals = [d.get(c, 0) / _MiB for c in CATEGORIES]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals):.2f} |")
    return "\n".join(lines)
