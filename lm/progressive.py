"""Progressive training: short sequences first, and a shallow model grown into a deep one.

Both are switched on from the config's ``progressive:`` section (``lm.config.ProgressiveConfig``)
and used by ``lm.train``; ``benchmarks/progressive.py`` measures them.

**Sequence-length warmup** (DeepSpeed's curriculum learning on ``seqlen``). Step ``s`` trains on
``seqlen_at(s)`` tokens per row, a multiple of ``seqlen_step``, clamped to
``[seqlen_start, block_size]``, and ``block_size`` at and after ``total_steps``:

- ``linear``: ``start + (block_size - start) * s / total_steps``, rounded down to a multiple of the step;
- ``root``: the same with ``(s / total_steps) ** (1 / root_degree)``: longer sequences sooner;
- ``discrete``: doubling stages. The lengths ``start, 2 start, 4 start, ...`` (below block_size)
  each get an equal share of ``total_steps``; full length from ``total_steps`` on.

The batch is drawn at full length with the same random generator as without warmup, then cut
(``x[:, :L], y[:, :L]``): the run sees the same windows as its baseline, only their first L
tokens, and nothing is padded. Evaluation is always at full length.

The learning-rate schedule is step-based and unchanged: step ``s`` has the learning rate it
would have without warmup. DeepSpeed's tutorial pairs the seqlen warmup with a token-based LR
decay (early steps carry fewer tokens); we keep steps, so the LR warmup (``train.warmup_iters``)
and the seqlen warmup overlap, and short, easy batches are what make a larger learning rate or a
shorter LR warmup stable (the benchmark's 3x run).

**Growth by stacking** (``grow: [{at: 500, n_layer: 4}, ...]``). Before step ``at`` runs, the model
is rebuilt with ``n_layer`` blocks: block ``i`` of the new model is a copy of block ``i % n_old``
of the trained one (G_stack of Du et al. 2024: repeat the whole stack; Gong et al. 2019 stacked
BERT the same way). We copy rather than interpolate because Du et al. found whole-stack copying
the best of their growth operators for GPT pre-training, and copying needs no extra choices.
It is not function-preserving: after growth the stack runs the trained blocks twice, so the
loss jumps up for a few steps and then falls below the shallow model's. ``grow_init: identity``
makes it function-preserving: the copies' output projections (attention's and the MLP's
``c_proj``) start at zero, so each new block first adds nothing to the residual stream and the
loss goes on from where the shallow model was; their other weights are still the trained copies,
and the zeroed projections get gradients at once (their input, the block's hidden activations,
is not zero). Embeddings, the final
LayerNorm and the head are kept. The optimizer's state (AdamW's ``exp_avg``, ``exp_avg_sq``
and per-parameter step) is copied from the source block too, so a new block continues where
its source was instead of starting Adam over with a bias-corrected first step; the learning
rate schedule simply continues (``grow_stack`` changes neither the step nor the schedule).

**Batch-size warmup** is not implemented: DeepSpeed's paper found the seqlen warmup more stable
than batch-size warmup and advises against using both (both shrink the tokens per step).
"""
from __future__ import annotations

import dataclasses
import re

from .model import GPT, rebuilt

SCHEDULES = ("linear", "root", "discrete")
_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def seqlen_at(step: int, start: int, block_size: int, total_steps: int, seqlen_step: int = 8,
              schedule: str = "linear", root_degree: float = 2.0) -> int:
    """The training sequence length of step ``step`` (see the module docstring)."""
    if step >= total_steps or start >= block_size:
        return block_size
    frac = max(step, 0) / total_steps
    if schedule == "linear":
        raw = start + (block_size - start) * frac
    elif schedule == "root":
        raw = start + (block_size - start) * frac ** (1.0 / root_degree)
    elif schedule == "discrete":
        lengths = discrete_lengths(start, block_size)
        raw = lengths[min(int(frac * len(lengths)), len(lengths) - 1)]
    else:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    length = int(raw) // seqlen_step * seqlen_step
    return min(max(length, start), block_size)


def discrete_lengths(start: int, block_size: int) -> list:
    """The stages of the ``discrete`` schedule: start, 2 start, 4 start, ... below block_size."""
    out = [start]
    while out[-1] * 2 < block_size:
        out.append(out[-1] * 2)
    return out


class SeqlenSchedule:
    """``schedule(step)``: the sequence length of a step, from a ``ProgressiveConfig``; off
    (always ``block_size``) when ``seqlen_start`` is 0."""

    def __init__(self, p_cfg, block_size: int):
        self.p, self.block_size = p_cfg, block_size

    @property
    def enabled(self) -> bool:
        return self.p.seqlen_start > 0

    def __call__(self, step: int) -> int:
        if not self.enabled:
            return self.block_size
        return seqlen_at(step, self.p.seqlen_start, self.block_size, self.p.total_steps, self.p.seqlen_step,
                         self.p.schedule, self.p.root_degree)


def cut_batch(x, y, length: int):
    """The first ``length`` tokens of each row of a full-length batch (no padding)."""
    if length >= x.shape[1]:
        return x, y
    return x[:, :length], y[:, :length]


def layers_at(step: int, n_layer: int, grow: list) -> int:
    """The layer count a run has while it trains step ``step`` (growth ``at`` <= step has happened)."""
    for g in grow:
        if g["at"] <= step:
            n_layer = g["n_layer"]
    return n_layer


def source_layer(i: int, n_old: int) -> int:
    """G_stack: new block ``i`` copies old block ``i % n_old`` (the whole stack repeated)."""
    return i % n_old


def _source_name(name: str, n_old: int) -> str:
    m = _BLOCK.match(name)
    return f"transformer.h.{source_layer(int(m.group(1)), n_old)}.{m.group(2)}" if m else name


GROW_INITS = ("copy", "identity")
_OUT_PROJ = re.compile(r"^transformer\.h\.(\d+)\.(attn|mlp)\.c_proj\.(weight|bias|U)$")


def identity_params(names, n_old: int) -> list:
    """The parameters ``grow_init: identity`` zeroes: the output projections (attention's and
    the MLP's c_proj: weight and bias, or the U factor of a low-rank one, whose V keeps its
    gradient) of every block ``i >= n_old``. Each such block then adds zero to the residual
    stream, so the grown model computes the shallow model's function."""
    out = []
    for n in names:
        m = _OUT_PROJ.match(n)
        if m and int(m.group(1)) >= n_old:
            out.append(n)
    return out


def grow_stack(model: GPT, opt, n_layer: int, make_optimizer, init: str = "copy"):
    """Grow ``model`` to ``n_layer`` blocks by stacking; returns ``(new_model, new_optimizer)``.

    ``make_optimizer(model)`` builds the optimizer of the new model (``lm.train`` passes
    ``configure_optimizer`` with the run's settings). The new optimizer gets the old one's
    learning rate, step count and, for every parameter, the state of the parameter it was
    copied from (arrays copied, so blocks that share a source do not share moments). A model
    cannot grow in place (its ModuleList and the optimizer's groups are fixed), hence the new
    objects (not a surgery function with a trailing underscore: ``model`` and ``opt`` are left as
    they were, and the caller carries on with the returned pair).

    ``init="identity"``: the copies are made the same way, then ``identity_params`` (the new
    blocks' output projections) are set to zero and their optimizer state is dropped (it starts
    anew, like a fresh parameter's): the loss does not jump at the growth step.
    """
    if init not in GROW_INITS:
        raise ValueError(f"grow_stack: init must be one of {', '.join(GROW_INITS)}, got {init!r}")
    n_old = model.config.n_layer
    if n_layer <= n_old:
        raise ValueError(f"grow_stack: n_layer must be larger than the model's {n_old}, got {n_layer}")
    new_cfg = dataclasses.replace(model.config, n_layer=n_layer)
    sd = model.state_dict()
    new = rebuilt(model, new_cfg, lambda k: sd[_source_name(k, n_old)])
    zeroed = set(identity_params([n for n, _ in new.named_parameters()], n_old)) if init == "identity" else set()
    for n, p in new.named_parameters():
        if n in zeroed:
            p.data[...] = 0
    new_opt = make_optimizer(new)
    old = opt.state_dict()
    state = {}
    for _, name, _p in new_opt.named_params():
        src = old["state"].get(_source_name(name, n_old))
        if src is not None and name not in zeroed:
            state[name] = {k: (v.copy() if hasattr(v, "copy") and getattr(v, "ndim", 0) > 0 else v)
                           for k, v in src.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [n for n, _ in g["params"]]}
              for g in new_opt.param_groups]
    for g, saved in zip(groups, old["param_groups"]):
        g.update({k: v for k, v in saved.items() if k != "params"})
    new_opt.load_state_dict({"state": state, "param_groups": groups, "step_count": old["step_count"]})
    return new, new_opt


def check_grow(grow, n_layer: int, where: str = "progressive.grow") -> list:
    """``grow`` as a list of ``{"at": int, "n_layer": int}``, or ConfigError naming what is wrong."""
    from .config import ConfigError
    if not isinstance(grow, list):
        raise ConfigError(f"{where} must be a list like [{{at: 500, n_layer: 4}}], got {grow!r}")
    out, last_at, last_n = [], 0, n_layer
    for i, g in enumerate(grow):
        if not isinstance(g, dict) or set(g) != {"at", "n_layer"}:
            raise ConfigError(f"{where}[{i}] must be a mapping with exactly the keys 'at' and 'n_layer' "
                              f"(e.g. {{at: 500, n_layer: 4}}), got {g!r}")
        at, n = g["at"], g["n_layer"]
        for key, v in (("at", at), ("n_layer", n)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{where}[{i}].{key} must be a positive integer, got {v!r}")
        if at <= last_at:
            raise ConfigError(f"{where}[{i}].at={at}: growth steps must be in increasing order "
                              f"(the previous one is at {last_at})" if i else
                              f"{where}[{i}].at={at} must be > 0 (to start deeper, set model.n_layer)")
        if n <= last_n:
            raise ConfigError(f"{where}[{i}].n_layer={n} does not add layers: the model has {last_n} "
                              f"before that growth step; each step must grow it")
        out.append({"at": at, "n_layer": n})
        last_at, last_n = at, n
    return out


def describe(p_cfg, block_size: int) -> str:
    """One line for the training log."""
    parts = []
    if p_cfg.seqlen_start:
        parts.append(f"sequence length {p_cfg.seqlen_start} -> {block_size} over {p_cfg.total_steps} steps "
                     f"({p_cfg.schedule}, multiples of {p_cfg.seqlen_step})")
    if p_cfg.grow:
        parts.append("growth " + ", ".join(f"to {g['n_layer']} layers at step {g['at']}" for g in p_cfg.grow))
    return "progressive: " + "; ".join(parts)


