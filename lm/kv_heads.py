"""Multi-head attention turned into grouped- or multi-query attention, from a trained model.

    python -m lm.compress --model_dir output/model --kv_heads 1 --finetune_iters 200 --data text.txt \
        --output_dir out/mqa

``pool_kv_heads(model, n_kv_head)`` returns a new GPT whose layers have ``n_kv_head`` key/value
heads: the key and value projections of the query heads of a group (``n_head / n_kv_head``
heads each) are replaced by their mean, rows for rows, biases too. This is the conversion of
Ainslie et al. (2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints"), who found mean pooling better than keeping one head of the group or a random
start, followed by "uptraining" for a few percent of the original pre-training steps (they used
5%): here ``lm.compress --finetune_iters`` (the recovery fine-tune, distilled from the model as
loaded) or ``lm.train`` with ``train.init_from``.

The query projections, the output projection and everything else are kept as they are; the KV
cache then holds ``n_kv_head`` heads instead of ``n_head`` (MQA: 1/n_head of the cache). A
model that already has fewer key/value heads is pooled further when its count is a multiple of
the new one. A low-rank attention projection (``low_rank_attn``) pools the rows of its output
factor U, which is the same linear map. Per-layer head counts (structured pruning) and shared
layers are refused, as ``lm.structured`` refuses GQA: a layer's groups would not line up.
"""
from __future__ import annotations

import dataclasses

from minigrad import backend

from .model import GPT, rebuilt


def check_poolable(config, n_kv_head: int) -> None:
    """ValueError saying why ``config`` cannot get ``n_kv_head`` key/value heads."""
    nh = config.n_head
    now = config.n_kv_head or nh
    if not isinstance(n_kv_head, int) or isinstance(n_kv_head, bool) or n_kv_head < 1:
        raise ValueError(f"the number of key/value heads must be a positive integer, got {n_kv_head!r}")
    if config.layer_heads is not None:
        raise ValueError("this model's layers have their own head counts (structured pruning); pool the "
                         "key/value heads of the unpruned model, then prune")
    if config.share_layers:
        raise ValueError("this model shares blocks between layers (share_layers); pooling is not supported there")
    if n_kv_head >= now:
        raise ValueError(f"the model has {now} key/value heads per layer; give fewer (1 for multi-query)")
    if now % n_kv_head:
        raise ValueError(f"{n_kv_head} key/value heads do not divide the model's {now} (n_head {nh}): "
                         f"each new head must pool a whole group")


def _pool_rows(w, nh: int, nkv0: int, nkv1: int, hs: int):
    """Rows of a fused qkv projection (or its bias), ((nh + 2 nkv0) hs, ...) -> ((nh + 2 nkv1) hs, ...):
    the query rows kept, each new key (value) head the mean of the ``nkv0 / nkv1`` old ones."""
    xp = backend.get_array_module(w)
    q = w[:nh * hs]
    k = w[nh * hs:(nh + nkv0) * hs]
    v = w[(nh + nkv0) * hs:]
    g = nkv0 // nkv1
    tail = w.shape[1:]
    pool = lambda a: a.reshape((nkv1, g, hs) + tail).mean(axis=1).reshape((nkv1 * hs,) + tail)  # noqa: E731
    return xp.ascontiguousarray(xp.concatenate([q, pool(k), pool(v)], axis=0))


def pool_kv_heads(model: GPT, n_kv_head: int) -> GPT:
    """A new GPT (``model`` is left as it is) with ``n_kv_head`` key/value heads per layer, its
    key and value projections mean-pooled over each group of heads; in the same dtype, on the same
    device, in the same train/eval mode. Draws no random numbers."""
    cfg = model.config
    check_poolable(cfg, n_kv_head)
    nh, hs = cfg.n_head, cfg.n_embd // cfg.n_head
    nkv0 = cfg.n_kv_head or nh
    sd = model.state_dict()
    new_sd = {}
    for k, v in sd.items():
        part = k.split(".attn.c_attn.")
        if len(part) == 2 and part[1] in ("weight", "bias", "U"):
            v = _pool_rows(v, nh, nkv0, n_kv_head, hs)
        new_sd[k] = v
    return rebuilt(model, dataclasses.replace(cfg, n_kv_head=n_kv_head), new_sd.__getitem__)
