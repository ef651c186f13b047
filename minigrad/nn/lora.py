"""LoRA: a frozen weight plus a trainable low-rank update, y = x W^T + b + s * (x A^T) B^T.

``LoRALinear(base, r, alpha)`` wraps a ``Linear`` (or a quantized linear, for QLoRA) with
A of shape (r, in) and B of shape (out, r). B starts at zero and A from a Kaiming-uniform
draw (PEFT's initialisation), so a fresh adapter changes nothing: the logits are bit-identical
to the base model's. The scale ``s`` is ``alpha / r`` (``use_rslora``: ``alpha / sqrt(r)``,
rank-stabilised LoRA). Dropout, when asked, applies to the adapter's input only.

    apply_lora(model, r=8, alpha=16, targets=["c_attn", "c_proj", "c_fc"])
    mark_only_lora_as_trainable(model)
    print(trainable_report(model))  # trainable params: 131,072 || all params: 3,349,760 || trainable%: 3.9129

``targets`` follow PEFT's ``target_modules`` rule (``minigrad.calib.match``): a pattern names a
module by its full dotted name or by its last components (``"c_proj"`` matches both
``attn.c_proj`` and ``mlp.c_proj``; ``"attn.c_proj"`` only the first).

Merging: ``merge()`` adds ``s * B A`` into the base weight (one product per forward again),
``unmerge()`` subtracts it. Unmerge restores the weight within float32 rounding, not bitwise:
``(W + D) - D`` rounds twice (each step is done in float64 and rounded once, so the difference
is at most one ulp of ``|W| + |D|`` per element).
A quantized base is not merged in place: its codes hold 16 levels per block, and the update
of a fine-tuning run is mostly smaller than one level step, so ``dequantize + merge +
requantize`` would silently lose most of what was learnt. ``merge()`` refuses with a message;
the tools (``lm.train --merge``, ``lm.compress --merge_lora``) merge the adapter into the
*float* base it was trained on top of, and the merged model can then be quantized again.

``lora_state_dict(model)`` holds the adapter only (``<module>.lora_A``, ``<module>.lora_B``);
``save_lora`` / ``load_lora`` write and read it as safetensors with the LoRA config in the
metadata; loading onto a base of other shapes is a ``LoRAError`` that names the module.
"""
from __future__ import annotations

import json
import math

import numpy as np

from .. import backend, functional as F, ops
from ..calib import match
from .layers import Linear, uniform
from .module import Module, Parameter

FORMAT = "minigrad-lora"


class LoRAError(ValueError):
    """A LoRA call that cannot be done: the message says which module and what to do."""


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
        raise LoRAError(f"LoRA rank r must be a positive integer, got {r!r}")
    return int(r)


class LoRALinear(Module):
    """``base(x) + scaling * dropout(x) A^T B^T``; ``base`` stays as it is (frozen by the caller)."""

    def __init__(self, base: Module, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        r = _check_rank(r)
        if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
            raise LoRAError(f"LoRALinear wraps a Linear or a quantized linear, got {type(base).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = float(dropout)
        dtype = _float_dtype(base)
        # PEFT: kaiming_uniform_(A, a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0
        self.lora_A = Parameter(uniform((r, self.in_features), 1.0 / math.sqrt(self.in_features), dtype))
        self.lora_B = Parameter(np.zeros((self.out_features, r), dtype=dtype))
        self.merged = False

    @property
    def quantized(self) -> bool:
        """A packed base (QuantLinear: QLoRA): frozen codes, gradients go through to the input only."""
        return not isinstance(self.base_layer, Linear)

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout > 0 else x
        # the scale goes on the (..., r) intermediate: the cheapest place for it
        return y + ops.linear(ops.linear(h, self.lora_A) * self.scaling, self.lora_B)

    def delta_weight(self, dtype=None) -> np.ndarray:
        """The update ``scaling * B A`` of shape (out, in), as an array (in ``dtype``, default the adapter's)."""
        dt = np.dtype(dtype or self.lora_B.data.dtype)
        return (self.lora_B.data.astype(dt) @ self.lora_A.data.astype(dt)) * dt.type(self.scaling)

    def _add_delta(self, sign: float) -> None:
        # W +/- D in float64, rounded once to the weight's dtype: one rounding instead of three
        w = self.base_layer.weight
        xp = backend.get_array_module(w.data)
        d = self.delta_weight(np.dtype(np.float64))
        w.data = (w.data.astype(xp.float64) + sign * d).astype(w.data.dtype)

    def merge(self) -> "LoRALinear":
        """Add the update into the base weight; forward then runs the base alone."""
        if self.merged:
            return self
        if self.quantized:
            raise LoRAError(
                f"cannot merge a LoRA adapter into a quantized base ({type(self.base_layer).__name__}): "
                "re-quantizing would round most of the update away. Merge into the float base the adapter "
                "was trained on (lm.train --merge or python -m lm.compress --merge_lora do this), then "
                "quantize the merged model if you want it small")
        self._add_delta(1.0)
        self.merged = True
        return self

    def unmerge(self) -> "LoRALinear":
        """Take the update out of the base weight again (within float rounding)."""
        if self.merged:
            self._add_delta(-1.0)
            self.merged = False
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.lora_dropout:g}"
                + (", merged" if self.merged else ""))


def _float_dtype(base) -> np.dtype:
    w = base._parameters.get("weight")          # a QuantLinear has packed codes instead: adapters in float32
    return np.dtype(w.dtype) if w is not None and np.dtype(w.dtype).kind == "f" else np.dtype(np.float32)


def _is_linear_like(m) -> bool:
    from .quantized import QuantLinear
    return isinstance(m, (Linear, QuantLinear))


def _parent(model: Module, name: str):
    parts = name.split(".")
    m = model
    for p in parts[:-1]:
        m = m._modules[p]
    return m, parts[-1]


def _replace(model: Module, name: str, new: Module) -> None:
    """Put ``new`` where module ``name`` is, keeping its place in the parent's order (and names)."""
    parent, attr = _parent(model, name)
    parent._modules[attr] = new
    object.__setattr__(parent, attr, new)


def lora_modules(model: Module):
    """(name, LoRALinear) for every adapter in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model: Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def apply_lora(model: Module, r: int = 8, alpha: float | None = None,
               targets=("c_attn", "c_proj", "c_fc"), dropout: float = 0.0, use_rslora: bool = False) -> Module:
    """Wrap every Linear (or QuantLinear) whose name matches ``targets`` in a ``LoRALinear``; return ``model``.

    Errors (``LoRAError``): r <= 0; a pattern that matches no module; a pattern that names a
    module that is not a linear layer; a target whose weight is shared with another module
    (a tied ``lm_head``: merging would change the embedding too); adapters already applied.
    """
    _check_rank(r)
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise LoRAError("apply_lora: targets is empty; name the modules to adapt, e.g. ['c_attn']")
    if has_lora(model):
        raise LoRAError("apply_lora: this model already has LoRA adapters")
    named = [(n, m) for n, m in model.named_modules() if n]
    owners: dict = {}
    for n, m in named:
        for pn, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{n}.{pn}")
    chosen = []
    for pat in targets:
        hits = [(n, m) for n, m in named if match(n, [pat])]
        if not hits:
            examples = sorted({n.rsplit(".", 1)[-1] for n, m in named if _is_linear_like(m)})
            raise LoRAError(f"apply_lora: target {pat!r} matches no module; linear layers here are named "
                            f"{', '.join(examples)}")
        bad = [(n, m) for n, m in hits if not _is_linear_like(m)]
        if bad:
            raise LoRAError(f"apply_lora: target {pat!r} matches {bad[0][0]}, a {type(bad[0][1]).__name__}; "
                            "LoRA adapts linear layers only")
        chosen.extend(hits)
    done = set()
    for n, m in chosen:
        if n in done:
            continue
        w = m._parameters.get("weight")
        if w is not None and len(owners.get(id(w), ())) > 1:
            others = [o for o in owners[id(w)] if o != f"{n}.weight"]
            raise LoRAError(f"apply_lora: {n}.weight is shared with {', '.join(others)} (tied weights); "
                            "an adapter there could not be merged without changing both: leave it out of targets")
        _replace(model, n, LoRALinear(m, r, alpha, dropout, use_rslora))
        done.add(n)
    return model


def mark_only_lora_as_trainable(model: Module) -> Module:
    """Freeze everything but the adapters' A and B (loralib's name); return ``model``."""
    for n, p in model.named_parameters():
        p.requires_grad = ".lora_" in "." + n or n.startswith("lora_")
    return model


def count_parameters(model: Module) -> tuple[int, int]:
    """(trainable, all): a quantized weight counts as its in x out logical weights."""
    trainable = total = 0
    for _, p in model.named_parameters():
        total += p.size
        trainable += p.size if p.requires_grad else 0
    from .quantized import QuantLinear
    for _, m in model.named_modules():
        if isinstance(m, QuantLinear):
            total += m.in_features * m.out_features
    return trainable, total


def trainable_report(model: Module) -> str:
    """PEFT's ``print_trainable_parameters`` line: ``trainable params: 8,192 || all params: ...``."""
    t, a = count_parameters(model)
    return f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100.0 * t / max(a, 1):.4f}"


def merge_lora(model: Module) -> Module:
    """``merge()`` every adapter in place (forward runs the bases alone); return ``model``."""
    for _, m in lora_modules(model):
        m.merge()
    return model


def unmerge_lora(model: Module) -> Module:
    for _, m in lora_modules(model):
        m.unmerge()
    return model


def merge_and_unload_(model: Module) -> Module:
    """Merge every adapter and put the plain base layers back (PEFT's ``merge_and_unload``)."""
    for n, m in lora_modules(model):
        m.merge()
        _replace(model, n, m.base_layer)
    return model


# --------------------------------------------------------------------------- adapter files
def lora_state_dict(model: Module) -> dict:
    """``{"<module>.lora_A": array, "<module>.lora_B": array}`` for every adapter."""
    out = {}
    for n, m in lora_modules(model):
        out[f"{n}.lora_A"] = m.lora_A.data
        out[f"{n}.lora_B"] = m.lora_B.data
    return out


def lora_config(model: Module) -> dict:
    """r, alpha, dropout, use_rslora and the adapted module names (what ``apply_lora`` needs again)."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("the model has no LoRA adapters (call apply_lora first)")
    m = mods[0][1]
    return {"r": m.r, "alpha": m.alpha, "dropout": m.lora_dropout, "use_rslora": m.use_rslora,
            "modules": [n for n, _ in mods]}


def load_lora_state_dict(model: Module, state: dict, where: str = "adapter") -> Module:
    """Copy adapter arrays into ``model``'s adapters; every name and shape is checked first."""
    mods = dict(lora_modules(model))
    expected = {f"{n}.lora_{k}": (m, k) for n, m in mods.items() for k in ("A", "B")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LoRAError(f"{where} does not fit this model: missing {', '.join(missing[:4]) or 'none'}; "
                        f"unexpected {', '.join(unexpected[:4]) or 'none'}")
    for k, (m, which) in expected.items():
        p = m.lora_A if which == "A" else m.lora_B
        if tuple(state[k].shape) != tuple(p.shape):
            raise LoRAError(f"{where}: {k} has shape {tuple(state[k].shape)} but the base's "
                            f"{k.rsplit('.', 1)[0]} ({m.in_features} in, {m.out_features} out, r={m.r}) needs "
                            f"{tuple(p.shape)}: the adapter was trained on a different base model")
    for k, (m, which) in expected.items():
        p = m.lora_A if which == "A" else m.lora_B
        p.data = backend.to_device(np.asarray(state[k]), p.device).astype(p.dtype, copy=True)
    return model


def save_lora(model: Module, path: str, metadata: dict | None = None) -> None:
    """Adapter-only safetensors; the metadata holds ``format`` and ``lora_config`` (JSON)."""
    from ..io import save_file
    save_file(lora_state_dict(model), path,
              {"format": FORMAT, "lora_config": json.dumps(lora_config(model)), **(metadata or {})})


def read_lora_config(path: str) -> dict:
    from ..io import load_metadata
    meta = load_metadata(path)
    if meta.get("format") != FORMAT or "lora_config" not in meta:
        raise LoRAError(f"{path} is not a LoRA adapter file (its metadata has no format={FORMAT!r})")
    return json.loads(meta["lora_config"])


def load_lora(model: Module, path: str) -> Module:
    """Apply the adapters that ``path`` describes to ``model`` (if not there yet) and load them."""
    from ..io import load_file
    conf = read_lora_config(path)
    if not has_lora(model):
        names = {n for n, _ in model.named_modules()}
        absent = [n for n in conf["modules"] if n not in names]
        if absent:
            raise LoRAError(f"{path}: the adapter was made for modules this model does not have: "
                            f"{', '.join(absent[:4])}: the adapter was trained on a different base model")
        apply_lora(model, conf["r"], conf["alpha"], targets=conf["modules"], dropout=conf["dropout"],
                   use_rslora=conf.get("use_rslora", False))
    return load_lora_state_dict(model, load_file(path), where=path)
