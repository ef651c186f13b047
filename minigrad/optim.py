"""Optimizers, gradient clipping and learning-rate schedules.

Optimizer state is keyed by parameter *name*, not by ``id(param)``, so it can be
saved to a file and loaded into a freshly built model. Pass ``model.named_parameters()``
(or groups of ``(name, param)`` pairs); plain parameters get their position as name.
Updates run in place on the arrays, under no graph.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .kernels.fused import adam_step_inplace
from .tensor import Tensor


def _normalise_groups(params, defaults: dict) -> list:
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(params[0], dict):
        params = [{"params": params}]
    groups, names = [], set()
    counter = 0
    for g in params:
        if "params" not in g:
            raise ValueError("each parameter group needs a 'params' entry")
        unknown = set(g) - set(defaults) - {"params"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} in a parameter group; valid: {sorted(defaults)}")
        named = []
        for item in g["params"]:
            if isinstance(item, tuple):
                name, p = item
            else:
                name, p = str(counter), item
            counter += 1
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer parameter {name!r} is a {type(p).__name__}, not a Tensor")
            if name in names:
                raise ValueError(f"parameter name {name!r} appears twice in the optimizer")
            names.add(name)
            named.append((name, p))
        group = dict(defaults)
        group.update({k: v for k, v in g.items() if k != "params"})
        group["params"] = named
        groups.append(group)
    return groups


class Optimizer:
    defaults: dict = {}

    def __init__(self, params, **defaults):
        self.defaults = defaults
        self.param_groups = _normalise_groups(params, defaults)
        self.state: dict[str, dict] = {}
        self.step_count = 0

    def zero_grad(self) -> None:
        for g in self.param_groups:
            for _, p in g["params"]:
                p.grad = None

    def named_params(self):
        for g in self.param_groups:
            for name, p in g["params"]:
                yield g, name, p

    def step(self) -> None:
        self.step_count += 1
        for group, name, p in self.named_params():
            if p.grad is None or not p.requires_grad:
                continue
            g = p.grad.data
            if g.dtype != p.data.dtype:
                g = g.astype(p.data.dtype)
            mask = getattr(p, "mask", None)  # a pruning mask (minigrad.prune): True = kept
            if mask is not None:
                g = g * mask
            self._update(group, name, p, g, self.state.setdefault(name, {}))
            if mask is not None:
                # moments from before pruning, or weight decay, must not revive a pruned weight
                p.data *= mask

    def _update(self, group, name, p, g, state) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``{"state": {name: {key: array | number}}, "param_groups": [...], "step_count": n}``."""
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [n for n, _ in g["params"]]}
                  for g in self.param_groups]
        return {"state": {n: dict(s) for n, s in self.state.items()}, "param_groups": groups,
                "step_count": self.step_count}

    def load_state_dict(self, sd: dict) -> None:
        mine = {n: p for _, n, p in self.named_params()}
        unknown = sorted(set(sd["state"]) - set(mine))
        if unknown:
            raise KeyError(f"optimizer state for unknown parameters: {unknown[:5]}"
                           f"{' ...' if len(unknown) > 5 else ''}")
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(sd['param_groups'])} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for g, saved in zip(self.param_groups, sd["param_groups"]):
            if [n for n, _ in g["params"]] != list(saved["params"]):
                raise ValueError("optimizer state groups hold different parameters than this optimizer")
        # build and check the new state before touching this optimizer, so a failed load changes nothing
        new_state = {}
        for n, s in sd["state"].items():
            p = mine[n]
            st = {}
            for k, v in s.items():
                if hasattr(v, "shape"):
                    if tuple(v.shape) == tuple(p.shape):  # 0-d state of a 0-d parameter included
                        v = backend.to_device(v, p.device).astype(p.dtype, copy=True)
                    elif v.ndim == 0:  # a counter that was stored as an array
                        v = v.item()
                    else:
                        raise ValueError(f"optimizer state {n}.{k} has shape {tuple(v.shape)}, "
                                         f"parameter has {tuple(p.shape)}")
                st[k] = v
            new_state[n] = st
        for g, saved in zip(self.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self.state = new_state
        self.step_count = int(sd.get("step_count", 0))

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for g in self.param_groups:
            g["lr"] = lr


class SGD(Optimizer):
    """SGD with optional momentum (PyTorch's form: buf = m*buf + g) and L2 weight decay."""

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)

    def _update(self, group, name, p, g, state):
        if group["weight_decay"]:
            g = g + group["weight_decay"] * p.data
        m = group["momentum"]
        if m:
            buf = state.get("momentum_buffer")
            if buf is None:
                # asarray: for a 0-d parameter `g` may be a NumPy scalar, which `buf *= m` would not update
                buf = state["momentum_buffer"] = backend.get_array_module(p.data).asarray(g).copy()
            else:
                buf *= m
                buf += g
            g = g + m * buf if group["nesterov"] else buf
        p.data -= group["lr"] * g


class Adam(Optimizer):
    """Adam; ``weight_decay`` here is L2 added to the gradient (use AdamW for decoupled decay)."""

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        # name only what is wrong: a default the caller never set (weight_decay, with per-group
        # values) must not appear in the message as if it had been configured
        bad = [f"{k}={v}" for k, v, ok in (("lr", lr, lr >= 0), ("eps", eps, eps >= 0),
                                           ("weight_decay", weight_decay, weight_decay >= 0),
                                           ("betas", tuple(betas), all(0 <= b < 1 for b in betas))) if not ok]
        if bad:
            raise ValueError(f"{type(self).__name__}: invalid {', '.join(bad)} (lr, eps, weight_decay >= 0; "
                             f"betas in [0, 1))")
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def _update(self, group, name, p, g, state):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        decay = lr * wd if (wd and self.decoupled) else 0.0
        if wd and not self.decoupled:
            g = g + wd * p.data
        if "exp_avg" not in state:
            xp = backend.get_array_module(p.data)
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if adam_step_inplace(p.data, g, m, v, lr, b1, b2, eps, t, decay):
            return  # one compiled pass (kernels/fused.py); the array code below is its reference
        if decay:
            p.data *= 1 - decay
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        bc1 = 1 - b1 ** t
        xp = backend.get_array_module(p.data)
        denom = xp.sqrt(v) / math.sqrt(1 - b2 ** t)
        denom += eps
        p.data -= (lr / bc1) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay: p <- p * (1 - lr * wd) before the Adam step."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def clip_grad_norm_(parameters, max_norm: float, eps: float = 1e-6) -> float:
    """Scale all gradients so their global L2 norm is at most ``max_norm``; return the norm before."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    total = math.sqrt(sum(float((p.grad.data.astype(np.float64) ** 2).sum()) for p in params))
    coef = max_norm / (total + eps)
    if coef < 1.0:
        for p in params:
            p.grad.data *= p.grad.data.dtype.type(coef)
    return total


def cosine_lr(step: int, base_lr: float, warmup: int, max_steps: int, min_lr: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < warmup:
        return base_lr * (step + 1) / (warmup + 1)
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (base_lr - min_lr)


class WarmupCosine:
    """Schedule object: ``sched.step()`` sets the optimizer's lr for the next step."""

    def __init__(self, optimizer: Optimizer, warmup: int, max_steps: int, min_lr: float,
                 base_lr: float | None = None):
        self.opt, self.warmup, self.max_steps, self.min_lr = optimizer, warmup, max_steps, min_lr
        self.base_lr = base_lr if base_lr is not None else optimizer.lr
        self.last_step = -1
        self.step()

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.base_lr, self.warmup, self.max_steps, self.min_lr)

    def step(self) -> float:
        self.last_step += 1
        lr = self.lr_at(self.last_step)
        self.opt.set_lr(lr)
        return lr

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lr": self.base_lr}

    def load_state_dict(self, sd: dict) -> None:
        self.last_step = int(sd["last_step"]) - 1
        self.base_lr = float(sd["base_lr"])
        self.step()


from .optim8bit import AdamW8bit  # noqa: E402,F401  (it builds on AdamW above)
