"""A GPT-2 style language model written on minigrad.

Token and learned position embeddings, pre-LayerNorm blocks of causal multi-head
self-attention and a GELU MLP, a final LayerNorm and a language-model head whose
weight is tied to the token embedding. Parameter names follow GPT-2
(``transformer.h.0.attn.c_attn.weight``) so weights map one to one onto other
implementations.

Architecture switches of ``ModelConfig`` (all off by default, any combination):
``n_kv_head`` (grouped-query / multi-query attention: c_attn makes n_head query heads and
n_kv_head key/value heads), ``attn_window`` (sliding-window attention), ``position="rope"``
(rotary positions on q and k instead of the ``wpe`` table), ``share_layers`` (the n_layer
blocks cycle through k blocks: ALBERT-style sharing) and ``low_rank`` (LowRankLinear MLP
and, with ``low_rank_attn``, attention projections).
"""
from __future__ import annotations

import math

import numpy as np

import minigrad as mg
from minigrad import backend, functional as F, nn, ops
from minigrad.attention import attention as fused_attention, attention_composite, attention_qkv, rope
from minigrad.kernels.attention import decode_attention, rope_apply, rope_tables
from minigrad.nn.lowrank import LowRankLinear
from minigrad.checkpoint import checkpoint
from minigrad.nn.reversible import reversible_sequence
from minigrad.tensor import Tensor, is_grad_enabled, no_grad

from .config import ModelConfig, validate_architecture


class KVCache:
    """Keys and values of past positions, per layer, for incremental decoding.

    Each layer's keys and values live in a buffer of shape (B, n_kv_head, capacity, hs) that
    is written in place (no copy of the past at each step); ``k[i]``/``v[i]`` are views of
    the filled part, (B, n_kv_head, S, hs). ``pos`` is the number of positions seen. Without
    a capacity the buffers double as needed.

    ``window = w`` (sliding-window attention): a rolling buffer of w positions, position p in
    slot p % w, so memory stays w positions however long the text grows. A single new token
    sees the whole buffer (in slot order: attention does not care about key order once the
    positions are in the keys or the residual stream); a chunk of new tokens gets the past in
    position order followed by the chunk, for the band-masked kernel.
    """

    def __init__(self, n_layer: int, capacity: int | None = None, window: int = 0):
        self.capacity, self.window = capacity, window
        self._kbuf = [None] * n_layer
        self._vbuf = [None] * n_layer
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.pos = 0

    def append(self, layer: int, k, v):
        """Store k, v (B, nkv, T, hs) of the next T positions; returns the keys and values
        the new positions attend over."""
        if self.window:
            return self._append_rolling(layer, k, v)
        xp = backend.get_array_module(k)
        n0 = 0 if self.k[layer] is None else self.k[layer].shape[2]
        n1 = n0 + k.shape[2]
        buf = self._kbuf[layer]
        if buf is None or buf.shape[2] < n1:
            cap = max(n1, self.capacity or 0, 2 * (buf.shape[2] if buf is not None else 0))
            kb = xp.empty(k.shape[:2] + (cap,) + k.shape[3:], dtype=k.dtype)
            vb = xp.empty_like(kb)
            kb[:, :, :n0] = self.k[layer] if n0 else 0
            vb[:, :, :n0] = self.v[layer] if n0 else 0
            self._kbuf[layer], self._vbuf[layer] = kb, vb
        kb, vb = self._kbuf[layer], self._vbuf[layer]
        kb[:, :, n0:n1] = k
        vb[:, :, n0:n1] = v
        self.k[layer], self.v[layer] = kb[:, :, :n1], vb[:, :, :n1]
        return self.k[layer], self.v[layer]

    def _append_rolling(self, layer: int, k, v):
        xp = backend.get_array_module(k)
        w, p, T = self.window, self.pos, k.shape[2]
        if self._kbuf[layer] is None:
            self._kbuf[layer] = xp.empty(k.shape[:2] + (w,) + k.shape[3:], dtype=k.dtype)
            self._vbuf[layer] = xp.empty_like(self._kbuf[layer])
        kb, vb = self._kbuf[layer], self._vbuf[layer]
        if T == 1:
            kb[:, :, p % w], vb[:, :, p % w] = k[:, :, 0], v[:, :, 0]
            n = min(p + 1, w)
            self.k[layer], self.v[layer] = kb[:, :, :n], vb[:, :, :n]
            return self.k[layer], self.v[layer]
        order = np.arange(p - min(p, w), p) % w                  # slots of the past, oldest first
        keys = xp.concatenate([kb[:, :, order], k], axis=2)       # (B, nkv, past + T, hs)
        vals = xp.concatenate([vb[:, :, order], v], axis=2)
        tail = min(T, w)
        slots = np.arange(p + T - tail, p + T) % w
        kb[:, :, slots], vb[:, :, slots] = k[:, :, T - tail:], v[:, :, T - tail:]
        n = min(p + T, w)
        self.k[layer], self.v[layer] = kb[:, :, :n], vb[:, :, :n]
        return keys, vals

    def nbytes(self) -> int:
        """Bytes the key and value buffers hold (all layers)."""
        return int(sum(b.nbytes for b in self._kbuf + self._vbuf if b is not None))

    def reorder(self, index) -> None:
        """Keep batch rows ``index`` (beam search moves caches with their beams)."""
        for i, (kb, vb) in enumerate(zip(self._kbuf, self._vbuf)):
            if kb is None:
                continue
            n = self.k[i].shape[2]
            self._kbuf[i], self._vbuf[i] = kb[index], vb[index]
            self.k[i], self.v[i] = self._kbuf[i][:, :, :n], self._vbuf[i][:, :, :n]


def _linear(config: ModelConfig, low_rank: bool):
    """The layer constructor: nn.Linear, or LowRankLinear of rank config.low_rank. A layer
    whose min(in, out) is not above the rank (a structurally pruned layer can be that narrow)
    is a plain Linear: rank r would not be low rank there (lm.structured follows this rule)."""
    if low_rank and config.low_rank:
        r = config.low_rank
        return lambda i, o: (LowRankLinear(i, o, r, bias=config.bias) if r < min(i, o)
                             else nn.Linear(i, o, bias=config.bias))
    return lambda i, o: nn.Linear(i, o, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # a structurally pruned layer keeps fewer heads of the same size (config.layer_heads);
        # structured pruning needs n_kv_head in (0, n_head) (config.validate_architecture), so
        # such a layer has one key/value head per query head it kept
        nh, hs = config.heads_of(layer), config.n_embd // config.n_head
        self.n_kv_head = nh if config.n_kv_head in (0, config.n_head) else config.n_kv_head
        lin = _linear(config, config.low_rank_attn)
        # query (nh) and key, value (n_kv_head each) projections, in one matmul
        self.c_attn = lin(config.n_embd, (nh + 2 * self.n_kv_head) * hs)
        self.c_proj = lin(nh * hs, config.n_embd)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.head_size, self.n_embd = nh, hs, config.n_embd
        self.attention = config.attention
        self.window, self.rope = config.attn_window, config.position == "rope"

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        C = nh * hs                                                      # n_embd unless heads were pruned
        qkv = self.c_attn(x)                                             # (B, T, (nh + 2 nkv) hs)
        if cache is not None and T == 1 and not mg.is_grad_enabled():
            # one new token against the cache: the steps below on raw arrays (same numbers),
            # without their eight graph nodes a layer, which cost more than the attention itself
            return self.resid_dropout(self.c_proj(Tensor(self._decode_one(qkv.data, cache, layer))))
        if cache is None and self.attention != "naive" and not (self.training and self.attn_dropout > 0):
            # the steps below (split, heads forward, rotate, attention, heads back) as one
            # node that reads q, k, v in place: same numbers, no copies (minigrad.attention)
            return self.resid_dropout(self.c_proj(attention_qkv(
                qkv, nh, impl=self.attention, n_kv_head=nkv, window=self.window, rope=self.rope)))
        q, k, v = ops.split(qkv, [C, C + nkv * hs], axis=2)              # (B, T, C), 2 x (B, T, nkv hs)
        q = q.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)                # (B, nh, T, hs)
        k = k.reshape(B, T, nkv, hs).transpose(0, 2, 1, 3)               # (B, nkv, T, hs)
        v = v.reshape(B, T, nkv, hs).transpose(0, 2, 1, 3)               # (B, nkv, T, hs)
        if self.rope:
            pos0 = cache.pos if cache is not None else 0
            q, k = rope(q, pos0), rope(k, pos0)                          # keys cached rotated
        if cache is not None:
            # decoding runs under no_grad: the cache holds raw arrays of the past positions
            kd, vd = cache.append(layer, k.data, v.data)                  # (B, nkv, S, hs)
            k, v = Tensor(kd), Tensor(vd)
        y = attention(q, k, v, self.attn_dropout if self.training else 0.0, self.attention,
                      self.window)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)                     # re-assemble heads
        return self.resid_dropout(self.c_proj(y))

    def _decode_one(self, qkv, cache: KVCache, layer: int):
        """The decode step of ``forward`` for T = 1 on arrays: qkv (B, 1, (nh + 2 nkv) hs) ->
        y (B, 1, nh hs). Split, heads, rotation, cache and ``decode_attention`` as the Tensor
        path runs them; for one position the head transposes are reshapes."""
        B = qkv.shape[0]
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        C, Ckv = nh * hs, nkv * hs
        q = qkv[:, 0, :C].reshape(B, nh, 1, hs)
        k = qkv[:, 0, C:C + Ckv].reshape(B, nkv, 1, hs)
        v = qkv[:, 0, C + Ckv:].reshape(B, nkv, 1, hs)
        if self.rope:
            cos, sin = rope_tables(cache.pos, 1, hs, qkv.dtype, backend.get_array_module(qkv))
            q, k = rope_apply(q, cos, sin), rope_apply(k, cos, sin)
        kd, vd = cache.append(layer, k, v)                               # (B, nkv, S, hs)
        y = decode_attention(q.reshape(B * nh, 1, hs), kd.reshape(B * nkv, -1, hs),
                             vd.reshape(B * nkv, -1, hs), 1.0 / math.sqrt(hs))
        return y.reshape(B, 1, C)


def attention(q, k, v, dropout_p: float = 0.0, impl: str = "auto", window: int = 0):
    """Causal attention of (B, nh, T, hs) queries over (B, nkv, S, hs) keys and values.

    ``impl``: "naive" materialises the (T, S) scores with composite ops (the reference,
    and the only one with attention dropout); "auto"/"blocked"/"flash" use the kernels of
    ``minigrad.kernels.attention`` that keep only the output and the row log-sum-exp.
    ``window``: each query sees the last ``window`` positions only.
    """
    if impl == "naive" or dropout_p > 0:
        return attention_composite(q, k, v, causal=True, window=window, dropout_p=dropout_p,
                                   training=dropout_p > 0)
    if not mg.is_grad_enabled() and q.shape[-2] == 1:
        # decoding one token against the cache: every cached position is visible (a windowed
        # cache holds just the last `window`), no mask
        B, nh, _, hs = q.shape
        nkv = k.shape[1]
        # the cache's views merge (B, nkv) without a copy: matmul reads the strided batch
        y = decode_attention(q.data.reshape(B * nh, 1, hs), k.data.reshape(B * nkv, -1, hs),
                             v.data.reshape(B * nkv, -1, hs), 1.0 / math.sqrt(hs))
        return Tensor(y.reshape(B, nh, 1, hs))
    return fused_attention(q, k, v, causal=True, impl=impl, window=window)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        hidden = config.mlp_of(layer)                                   # pruned: narrower
        lin = _linear(config, True)
        self.c_fc = lin(config.n_embd, hidden)
        self.c_proj = lin(hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.gelu = "none" if config.gelu == "exact" else "tanh"

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), self.gelu)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, layer)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


def _run_group(blocks, x):
    for block in blocks:
        x = block(x)
    return x


class _Transformer(nn.Module):
    """Holds the GPT-2 named submodules (wte, wpe, drop, h, ln_f)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":                 # RoPE needs no table
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        # share_layers = k: layer i runs block i % k, so h lists each shared block several
        # times; parameters, state dicts and the optimizer see each once (named_parameters
        # skips repeats), and backprop sums the gradients of all its uses. Per-layer widths
        # (layer_heads / layer_mlp) repeat with period k (validate_architecture)
        k = config.share_layers or config.n_layer
        blocks = [Block(config, i) for i in range(k)]
        self.h = nn.ModuleList([blocks[i % k] for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("GPT: config.vocab_size must be set (it comes from the tokenizer)")
        validate_architecture(config)
        self.config = config
        self.transformer = _Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output projection reuses the token embedding matrix
        self.lm_head.weight = self.transformer.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        rng = backend.get_rng(np)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.data[...] = 0
            elif "ln_" in name:          # LayerNorm gains start at one
                p.data[...] = 1
            else:                        # GPT-2: N(0, 0.02) for matrices and embeddings
                std = 0.02
                if name.endswith(("c_proj.weight", "c_proj.U", "c_proj.V")):
                    # residual projections scaled by 1/sqrt(2 * n_layer): two per block add
                    # into the residual stream, so its variance stays flat with depth
                    std = 0.02 / math.sqrt(2 * self.config.n_layer)
                if name.endswith((".U", ".V")):
                    # a low-rank pair: entries of U V are sums of r products, so each factor
                    # gets std sqrt(std / sqrt(r)) and the product has the dense layer's std
                    r = p.shape[1] if name.endswith(".U") else p.shape[0]
                    std = math.sqrt(std / math.sqrt(r))
                p.data[...] = rng.standard_normal(p.shape) * std

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (as nanoGPT reports it)."""
        n = self.num_parameters()
        if non_embedding and self.config.position == "learned":
            n -= self.transformer.wpe.weight.size
        return n

    @property
    def unbounded(self) -> bool:
        """RoPE with a window: no position table and a bounded cache, so sequences (and
        generation with a rolling KV cache) may run past block_size."""
        return self.config.position == "rope" and self.config.attn_window > 0

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        """idx: (B, T) token ids. Returns (logits, loss); loss is None without targets.

        Without targets only the last position's logits are computed (generation).
        """
        idx = idx.data if isinstance(idx, Tensor) else idx
        B, T = idx.shape
        pos0 = cache.pos if cache is not None else 0
        if pos0 + T > self.config.block_size and not self.unbounded:
            raise ValueError(f"GPT: sequence of {pos0 + T} positions exceeds block_size "
                             f"{self.config.block_size}")
        xp = backend.get_array_module(self.transformer.wte.weight.data)
        idx = xp.asarray(idx)
        x = self.transformer.wte(idx)                                    # (B, T, C)
        if self.config.position == "learned":
            x = x + self.transformer.wpe(xp.arange(pos0, pos0 + T))      # + (T, C)
        x = self.transformer.drop(x)
        x = self._run_blocks(x, cache)                                   # (B, T, C)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += T
        if targets is not None:
            logits = self.lm_head(x)                                     # (B, T, V)
            loss = F.cross_entropy(logits, targets)
            return logits, loss
        logits = self.lm_head(x[:, -1:, :])                             # (B, 1, V)
        return logits, None

    def _run_blocks(self, x, cache: KVCache | None = None):
        """The residual stack, plain or with the memory switches of the config.

        ``checkpoint_every=k``: blocks run in groups of k, each group checkpointed (only its
        input is kept; it is recomputed in backward). ``reversible``: Reformer-style two
        streams, F = attention sublayer (ln_1 + attn), G = MLP sublayer (ln_2 + mlp); the input
        is duplicated into (x, x) and the output is the mean of the streams. Both together: the
        reversible stack is cut every k blocks; each cut keeps its two streams (a checkpoint of
        the stack), so inputs are rebuilt over at most k blocks, which bounds the rounding
        drift of the reconstruction, for 2*B*T*C values per cut. The parameters are the same
        with every switch, so weights trained one way load into the other.
        """
        blocks, k = list(self.transformer.h), self.config.checkpoint_every
        if self.config.reversible:
            couplings = [(lambda h, b=b, i=i: b.attn(b.ln_1(h), cache, i),   # F
                          lambda h, b=b: b.mlp(b.ln_2(h)))                    # G
                         for i, b in enumerate(blocks)]
            k = k or len(blocks)
            x1 = x2 = x
            for s in range(0, len(blocks), k):
                x1, x2 = reversible_sequence(couplings[s:s + k], x1, x2)
            return (x1 + x2) * 0.5
        if k and cache is None and is_grad_enabled():
            for s in range(0, len(blocks), k):
                x = checkpoint(_run_group, blocks[s:s + k], x)
            return x
        for i, block in enumerate(blocks):
            x = block(x, cache, i)
        return x

    def configure_optimizer(self, lr: float, weight_decay: float, betas, eps: float = 1e-8,
                            optimizer: str = "adamw"):
        """AdamW with decay on matrices only: biases and LayerNorm gains are not decayed.
        ``optimizer="adamw8bit"``: the same with block-wise 8-bit moments (minigrad.optim8bit)."""
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 else no_decay).append((n, p))
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        kinds = {"adamw": mg.optim.AdamW, "adamw8bit": mg.optim.AdamW8bit}
        if optimizer not in kinds:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(kinds)}")
        return kinds[optimizer]([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)

    @no_grad()
    def logits_last(self, idx, cache: KVCache | None = None):
        logits, _ = self.forward(idx, cache=cache)
        return logits.data[:, -1, :]                                    # (B, V)


def rebuilt(model: GPT, config: ModelConfig, state) -> GPT:
    """A new GPT of ``config`` whose every state-dict entry ``name`` is ``state(name)``, in
    ``model``'s dtype, on its device, in its train/eval mode; ``model`` is left as it is. Draws no random numbers: the new
    model's initial weights are overwritten, so the caller's random stream goes on unchanged.
    (Growth by stacking and key/value head pooling build their new models this way.)"""
    rng = backend.get_rng_state(np)
    new = GPT(config)
    backend.set_rng_state(rng, np)
    new.to(dtype=model.transformer.wte.weight.dtype)
    new.to(model.transformer.wte.weight.device)
    new.load_state_dict({k: state(k) for k in new.state_dict()})
    new.train(model.training)
    return new
