"""Pruning masks that persist through training: magnitude, Wanda, unstructured and N:M.

    prune_(model, "wanda", sparsity=0.5, calib=batches)                 # 50% unstructured
    prune_(model, "magnitude", pattern="2:4")                           # 2 of every 4 inputs kept
    prune_(model, "magnitude", sparsity=0.8, scope="global")            # one threshold for all layers
    make_permanent(model)                                               # drop the masks, keep the zeros

**Scores.** ``magnitude``: ``|W_ij|``. ``wanda`` (Sun et al., 2023): ``|W_ij| * ||X_j||_2``,
where ``||X_j||_2`` is the norm of input channel j over the calibration tokens, collected by
``minigrad.calib.collect`` (the one collector GPTQ also uses). A weight that meets large
activations matters more than its size alone says.

**What is compared.** ``scope="layer"``: each layer reaches the sparsity on its own; magnitude
ranks the whole matrix, Wanda ranks within each output row (the paper's comparison group: every
output keeps the same share of its inputs). ``scope="global"``: one ranking over all chosen
layers. ``pattern="N:M"`` keeps the N highest-scoring weights of every M consecutive inputs of a
row (``2:4`` is the pattern sparse tensor cores run), so it fixes the sparsity to 1 - N/M.
Exactly ``round(sparsity * count)`` weights go in each comparison group (ties broken by position).

**How the mask persists.** Pruned weights are set to zero and the boolean mask is kept on the
parameter (``param.mask``, True = kept), not in the state dict: the state dict keeps the model's
ordinary names (no ``weight_orig``/``weight_mask``), so a pruned model's weights load into an
unpruned model and the other way round. A gradient hook zeroes the gradient of pruned weights
(so gradient clipping sees the real norm), and every optimizer re-applies the mask after its
update: Adam moments from before pruning, or weight decay, cannot revive a pruned weight.
``make_permanent`` (alias ``remove``, as ``torch.nn.utils.prune.remove``) drops masks and hooks
and leaves plain weights with zeros in them; ``restore_masks_`` puts masks back on the zeros of a
loaded model so that fine-tuning it keeps them.

No speed is claimed for unstructured or N:M sparsity: the weights stay dense in memory and the
matmuls do the same work. ``minigrad.sparse`` stores them compactly on disk; structured pruning
(``lm.structured``) is what makes a model faster.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .calib import InputStats, collect, match

METHODS = ("magnitude", "wanda")
SCOPES = ("layer", "global")


def parse_pattern(pattern: str):
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(s) for s in str(pattern).split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise ValueError(f"unknown pattern {pattern!r}; valid: 'unstructured' or N:M with 0 < N < M "
                         f"(e.g. '2:4', '4:8')")
    return n, m


def prunable(model, targets=None) -> list:
    """``(name, module)`` of the Linear-like modules to prune: those matching ``targets`` (see
    ``calib.match``), or by default every one whose weight is not shared with another module
    (a tied language-model head would prune the token embedding too)."""
    owners: dict[int, int] = {}
    for _, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    out = []
    for name, m in model.named_modules():
        w = m._parameters.get("weight") if name else None
        if w is None or w.ndim != 2 or not hasattr(m, "in_features"):
            continue
        if targets is None and owners[id(w)] > 1:
            continue
        if match(name, targets):
            out.append((name, m))
    if not out:
        raise ValueError(f"no Linear module matches targets {targets!r}")
    return out


def _lowest_false(score: np.ndarray, k: int) -> np.ndarray:
    """A mask of ``score``'s shape, False at the ``k`` lowest entries of each row."""
    order = np.argsort(score, axis=-1, kind="stable")[..., :k]
    mask = np.ones(score.shape, dtype=bool)
    np.put_along_axis(mask, order, False, axis=-1)
    return mask


def nm_mask(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` highest of every ``m`` consecutive entries along the last axis."""
    out, inp = score.shape
    if inp % m:
        raise ValueError(f"pattern {n}:{m} needs the input size to be a multiple of {m}, got {inp}")
    g = score.reshape(out, inp // m, m)
    return _lowest_false(g, m - n).reshape(out, inp)


def wanda_score(weight, norm) -> np.ndarray:
    """``|W_ij| * ||X_j||_2`` (float64, on the host); ``norm`` is per input channel."""
    w = np.abs(backend.to_numpy(weight).astype(np.float64))
    return w * np.asarray(norm, dtype=np.float64)[None, :]


def scores(model, modules, method: str, calib=None, run=None) -> dict:
    """``{name: score array (out, in)}`` for each of ``modules``."""
    if method == "magnitude":
        return {n: np.abs(backend.to_numpy(m.weight.data).astype(np.float64)) for n, m in modules}
    if calib is None:
        raise ValueError("Wanda needs calibration data: pass calib= a few batches of inputs "
                         "(or the statistics of minigrad.calib.collect)")
    if isinstance(calib, dict) and all(isinstance(v, InputStats) for v in calib.values()):
        stats = calib
    else:
        stats = collect(model, calib, run=run, modules=[n for n, _ in modules], want=("sqnorm",))
    missing = [n for n, _ in modules if n not in stats or stats[n].sqnorm is None]
    if missing:
        raise ValueError(f"the calibration statistics have no input norms for {missing[:3]}")
    return {n: wanda_score(m.weight.data, stats[n].norm()) for n, m in modules}


def _mask_hook(p):
    def hook(g):
        return g.data * p.mask
    return hook


def set_mask(param, mask) -> None:
    """Zero ``param`` where ``mask`` is False and keep the mask (see the module docstring)."""
    mask = backend.to_device(np.asarray(backend.to_numpy(mask), dtype=bool), param.device)
    old = getattr(param, "mask", None)
    if old is not None:
        mask = mask & old
    param.mask = mask
    param.data *= mask.astype(param.data.dtype)
    if getattr(param, "_mask_handle", None) is None and param.requires_grad:
        param._mask_handle = param.register_hook(_mask_hook(param))


def prune_(model, method: str = "magnitude", sparsity: float | None = None, pattern: str = "unstructured",
           scope: str = "layer", calib=None, targets=None, run=None):
    """Prune the chosen Linear weights of ``model`` in place; returns ``model``.

    ``calib``: for Wanda, batches to run (``run(model, batch)``, default ``model(batch)``) or
    the ``{name: InputStats}`` of ``minigrad.calib.collect``. ``targets``: module name
    patterns (default: every untied Linear). N:M patterns fix the sparsity to 1 - N/M.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid: {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(f"pattern {pattern} means sparsity {implied:g}, got sparsity={sparsity}")
        if scope == "global":
            raise ValueError(f"scope 'global' does not apply to the {pattern} pattern (N:M is per group)")
        sparsity = implied
    if sparsity is None:
        raise ValueError("give sparsity= (a fraction in [0, 1)) for unstructured pruning")
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    modules = prunable(model, targets)
    if nm is not None:
        for name, m in modules:
            if m.weight.shape[1] % nm[1]:
                raise ValueError(f"pattern {pattern} needs the input size of {name} "
                                 f"({m.weight.shape[1]}) to be a multiple of {nm[1]}")
    sc = scores(model, modules, method, calib, run)
    for name, m in modules:  # already-pruned weights score lowest, so they stay pruned
        old = getattr(m.weight, "mask", None)
        if old is not None:
            sc[name][~backend.to_numpy(old)] = -1.0
    masks = {}
    if nm is not None:
        masks = {n: nm_mask(sc[n], *nm) for n, _ in modules}
    elif scope == "global":
        flat = np.concatenate([sc[n].ravel() for n, _ in modules])
        keep = _lowest_false(flat, int(round(sparsity * flat.size)))
        at = 0
        for n, _ in modules:
            masks[n] = keep[at:at + sc[n].size].reshape(sc[n].shape)
            at += sc[n].size
    else:
        for n, _ in modules:
            s = sc[n]
            if method == "wanda":   # compared within each output row
                masks[n] = _lowest_false(s, int(round(sparsity * s.shape[1])))
            else:                   # compared over the whole layer
                masks[n] = _lowest_false(s.ravel(), int(round(sparsity * s.size))).reshape(s.shape)
    for n, m in modules:
        set_mask(m.weight, masks[n])
    return model


def masked_parameters(model) -> dict:
    """``{parameter name: mask}`` of every parameter that carries a pruning mask."""
    return {n: p.mask for n, p in model.named_parameters() if getattr(p, "mask", None) is not None}


def make_permanent(model):
    """Drop the masks and gradient hooks; the weights keep their zeros and train freely afterwards."""
    for _, p in model.named_parameters():
        if getattr(p, "mask", None) is None:
            continue
        p.data *= p.mask.astype(p.data.dtype)
        handle = getattr(p, "_mask_handle", None)
        if handle is not None:
            handle.remove()
        p.mask = None
        p._mask_handle = None
    return model


remove = make_permanent


def restore_masks_(model, targets=None):
    """Put masks back on the exact zeros of the chosen weights (a pruned model loaded from disk)."""
    for _, m in prunable(model, targets):
        w = m.weight
        zeros = w.data == 0
        if bool(zeros.any()):
            set_mask(w, ~backend.to_numpy(zeros))
    return model


def sparsity_of(model, targets=None) -> dict:
    """``{module name: fraction of exact zeros in its weight}`` plus ``"total"`` over them all."""
    out, z, n = {}, 0, 0
    for name, m in prunable(model, targets):
        w = backend.to_numpy(m.weight.data)
        out[name] = float((w == 0).mean())
        z += int((w == 0).sum())
        n += w.size
    out["total"] = z / max(n, 1)
    return out


def check_nm(weight, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of a row holds at most ``n`` non-zeros."""
    w = backend.to_numpy(getattr(weight, "data", weight))
    if w.shape[-1] % m:
        return False
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(axis=-1) <= n).all())
