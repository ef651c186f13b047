"""Writing pruned, structured and low-rank models into a model folder that ``lm.loader`` opens.

- Structured pruning changes only shapes: the folder is an ordinary ``minigrad`` one whose
  model config carries ``layer_heads``/``layer_mlp``.
- Low-rank layers: ``config.json`` gains ``"low_rank": {module name: rank}`` and the weights
  file holds each factor under its own name (``...c_fc.U``, ``...c_fc.V``).
- Unstructured or N:M sparsity: ``config.json`` gains ``"sparse": {"pattern": ..., "layout":
  {weight name: format}}`` and ``model.safetensors`` holds those weights packed
  (``minigrad.sparse``): a bitmask plus the kept values, or N:M values plus their 2-bit (2:4)
  or 3-bit (4:8) positions. The loader unpacks them to dense weights: the bytes on disk shrink,
  the model in memory and its speed do not.
"""
from __future__ import annotations

import dataclasses
import json
import os

from minigrad.io import atomic_write_text, save_file
from minigrad.sparse import layout_for, save_sparse

FORMAT = "minigrad-gpt"


def save_model_dir(model_dir: str, model, tokenizer, data_conf: dict | None = None,
                   pattern: str | None = None, extra_conf: dict | None = None) -> dict:
    """Write ``model`` (with whatever pruning/low-rank it carries) to ``model_dir``; returns the
    config dict written. ``pattern``: the sparsity pattern to pack (None: no packing)."""
    os.makedirs(model_dir, exist_ok=True)
    conf = {"model": dataclasses.asdict(model.config), "data": dict(data_conf or {})}
    ranks = getattr(model, "low_rank_ranks", None)
    if ranks:
        conf["low_rank"] = dict(ranks)
    state = model.state_dict()
    path = os.path.join(model_dir, "model.safetensors")
    layout = layout_for(model, pattern) if pattern else {}
    if layout:
        conf["sparse"] = {"pattern": pattern, "layout": layout}
        save_sparse(state, path, layout, {"format": FORMAT + "-sparse"})
    else:
        save_file(state, path, {"format": FORMAT})
    conf.update(extra_conf or {})
    atomic_write_text(os.path.join(model_dir, "config.json"), json.dumps(conf, indent=2))
    tokenizer.save(os.path.join(model_dir, "tokenizer.json"))
    return conf
