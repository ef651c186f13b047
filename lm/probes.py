"""What the trainer measures inside a step when the config asks for it.

``train.log_memory``: a ``minigrad.memory.MemoryTracker`` follows every step; the metrics
line gets ``peak_mb`` and the bytes of each category at that peak (``mem_parameters``,
``mem_gradients``, ``mem_optimizer``, ``mem_activations``, ``mem_other``) and parameters, gradients and optimizer
state split into trainable and frozen (``mem_parameters_trainable``, ``mem_parameters_frozen``, ...);
``memory.png`` shows the last step's timeline (frozen weights drawn apart).

``train.log_grad_stats``: every ``log_interval`` steps (and the first), per-layer gradient
norms (after backward, before clipping) and update/weight ratios
(``minigrad.gradstats``) go into the metrics line (``layer_grad_norm``, ``update_ratio``);
``grad_flow.png`` plots them over the run.

With both off every method is a no-op.
"""
from __future__ import annotations

import os

from minigrad.gradstats import GradStats, plot_grad_flow
from minigrad.memory import CATEGORIES, MemoryTracker


class StepProbe:
    def __init__(self, model, optimizer, train_cfg):
        # started now, stopped by `with probe:` (or finish) however training ends
        self.mem = MemoryTracker(model, optimizer).start() if train_cfg.log_memory else None
        self.grads = GradStats(model) if train_cfg.log_grad_stats else None
        self.every = max(1, train_cfg.log_interval)
        self._due = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):   # however training ends, the engine stops being watched
        if self.mem is not None:
            self.mem.stop()
        return False

    def begin_step(self) -> None:
        if self.mem is not None:
            self.mem.reset()
            self.mem.mark("forward")

    def mark(self, label: str) -> None:
        if self.mem is not None:
            self.mem.mark(label)

    def after_backward(self, step: int) -> None:
        """``step``: steps done before this one."""
        self.mark("optimizer")
        self._due = self.grads is not None and (step == 0 or (step + 1) % self.every == 0)
        if self._due:
            self.grads.capture()

    def end_step(self, step: int) -> dict:
        """Extra keys for the metrics line of step ``step`` (counted after the update)."""
        out = {}
        if self.mem is not None:
            self.mem.mark("end")
            s = self.mem.summary()
            out["peak_mb"] = round(s["peak_mb"], 3)
            out.update({f"mem_{c}": s["at_peak"][c] for c in CATEGORIES})
            # parameters, gradients and optimizer state split by requires_grad (what LoRA saves)
            out.update({f"mem_{c}_{side}": v for c, d in s["split"].items() for side, v in d.items()})
        if self._due:
            rec = self.grads.record(step)
            out["layer_grad_norm"] = rec["grad_norm"]
            out["update_ratio"] = rec["update_ratio"]
            self._due = False
        return out

    def finish(self, output_dir: str, log=print) -> None:
        """Stop tracking; draw memory.png and grad_flow.png (a failed plot only warns)."""
        if self.mem is not None:
            self.mem.stop()
            try:
                self.mem.plot(path=os.path.join(output_dir, "memory.png"), title="Memory over the last step")
            except Exception as e:
                log(f"warning: could not draw memory.png: {e}")
        if self.grads is not None and self.grads.history:
            h = self.grads.history
            try:
                plot_grad_flow(h if len(h) > 1 else h[0], path=os.path.join(output_dir, "grad_flow.png"))
            except Exception as e:
                log(f"warning: could not draw grad_flow.png: {e}")
