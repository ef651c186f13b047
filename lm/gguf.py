"""GGUF export: a model folder as a GPT-2-architecture GGUF file (llama.cpp's format).

    from lm.gguf import export_gguf
    export_gguf("output/model", "model-q8_0.gguf", outtype="q8_0")      # f32, f16, q8_0, q4_0

``python -m lm.export --format gguf`` calls this (lm/export.py). The ``gguf`` package (an
optional extra: ``pip install minigrad-lm[gguf]``) writes the file.

What is written, as llama.cpp's GPT-2 loader reads it:

- keys ``general.architecture = gpt2``, ``gpt2.context_length``, ``gpt2.embedding_length``,
  ``gpt2.feed_forward_length``, ``gpt2.block_count``, ``gpt2.attention.head_count``,
  ``gpt2.attention.layer_norm_epsilon``, ``general.file_type``; the tokenizer as a byte-level
  ``gpt2`` vocabulary (``tokenizer.ggml.tokens``/``token_type``/``merges``): a char tokenizer
  becomes one token per character and no merges, a BPE one its 256 bytes and its merges;
- tensors ``token_embd``, ``position_embd``, ``blk.N.attn_norm``, ``blk.N.attn_qkv``,
  ``blk.N.attn_output``, ``blk.N.ffn_norm``, ``blk.N.ffn_up``, ``blk.N.ffn_down``,
  ``output_norm`` (weights and biases) and ``output.weight`` (the tied head, written out).
  Matrices in ``outtype``; vectors (norms, biases) in F32, as llama.cpp's converter does; a
  matrix whose row length is not a multiple of 32 falls back to F16 (GGUF blocks cannot pad).

Q8_0/Q4_0 bytes are ``minigrad.quant``'s q8_0/q4_0 blocks, which equal ``gguf.quants.quantize``
byte for byte (tested). A folder quantized with the same layout (q8_0 -> q8_0; q4_0 or gptq ->
q4_0) is written code for code, without re-quantizing; any other is dequantized first.
"""
from __future__ import annotations

import os

import numpy as np

from minigrad.io import atomic_write_path

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")


def _token_strings(tok) -> tuple[list[str], list[str]]:
    """(tokens, merges) of our tokenizer in the byte-level form llama.cpp's gpt2 vocab uses."""
    from .hf import bytes_to_unicode   # GPT-2's byte -> printable character table, written once
    b2u = bytes_to_unicode()
    enc = lambda bs: "".join(b2u[b] for b in bs)          # noqa: E731
    if tok.kind == "char":
        return [enc(c.encode("utf-8")) for c in tok.chars], []
    if tok.kind == "bpe":
        tokens = [enc(v) for v in tok.vocab]
        return tokens, [f"{tokens[a]} {tokens[b]}" for a, b in tok.merges]
    raise ValueError(f"GGUF export: a {tok.kind!r} tokenizer has no GPT-2 GGUF form (char and bpe do)")


def check_exportable(config) -> None:
    """Raise ValueError naming what GPT-2's GGUF graph cannot run."""
    problems = []
    if not config.bias:
        problems.append("bias=false (llama.cpp's GPT-2 graph has biases in every linear and norm)")
    if config.gelu != "tanh":
        problems.append(f"gelu={config.gelu!r} (GPT-2 and ggml_gelu use the tanh approximation)")
    if config.reversible:
        problems.append("reversible=true (two-stream blocks are not GPT-2's residual stack)")
    defaults = {"n_head_kv": None, "n_kv_head": 0, "window": 0, "attn_window": 0, "rope": False,
                "position": "learned", "share_layers": 0, "low_rank": 0}
    for k, ok in defaults.items():          # switches of other issues, when present, must be off
        v = getattr(config, k, ok)
        if v not in (ok, None, 0, False, "learned", config.n_head if k in ("n_head_kv", "n_kv_head") else ok):
            problems.append(f"{k}={v!r} (not part of GPT-2)")
    if problems:
        raise ValueError("this model cannot be exported as a GPT-2 GGUF: " + "; ".join(problems))


def _names(n_layer: int) -> dict[str, str]:
    m = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
         "transformer.ln_f": "output_norm", "lm_head": "output"}
    for i in range(n_layer):
        h, b = f"transformer.h.{i}.", f"blk.{i}."
        m.update({h + "ln_1": b + "attn_norm", h + "attn.c_attn": b + "attn_qkv",
                  h + "attn.c_proj": b + "attn_output", h + "ln_2": b + "ffn_norm",
                  h + "mlp.c_fc": b + "ffn_up", h + "mlp.c_proj": b + "ffn_down"})
    return m


def _matrix(module) -> tuple[np.ndarray | None, object]:
    """(float weight or None, QuantizedTensor or None) of a Linear/Embedding/Quant* module."""
    from minigrad import backend
    from minigrad.quant import QuantizedTensor
    w = module.weight
    if isinstance(w, QuantizedTensor):
        return None, w.to("cpu")
    return backend.to_numpy(w.data).astype(np.float32), None


def export_gguf(model_dir: str, out_path: str, outtype: str = "f32") -> dict:
    """Write ``model_dir`` (any folder lm.loader opens) as a GPT-2 GGUF file at ``out_path``.

    Returns {"path", "outtype", "tensors", "bytes", "types": {ggml type: count}, "fallback_f16": [...]}.
    Raises ValueError (bad outtype, a model GPT-2's GGUF cannot express) before writing anything.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF outtype {outtype!r}; valid: {', '.join(OUTTYPES)}")
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF export needs the gguf package: pip install gguf "
                         "(or pip install minigrad-lm[gguf])") from None
    from minigrad import backend
    from minigrad.quant import FORMATS, STORAGE

    from .loader import load_model

    model, tok = load_model(model_dir, "cpu")
    cfg = model.config
    check_exportable(cfg)
    tokens, merges = _token_strings(tok)
    if len(tokens) != cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokens)} tokens but the model {cfg.vocab_size}")
    T = gguf.GGMLQuantizationType
    gtype = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[outtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype]

    names = _names(cfg.n_layer)
    modules = dict(model.named_modules())
    tensors, types, fallback = [], {}, []
    for mod_name, gname in names.items():
        mod = modules[mod_name]
        w, qt = _matrix(mod)
        shape = qt.shape if qt is not None else w.shape
        t = gtype if len(shape) == 2 else T.F32             # norms: F32
        if t in (T.Q8_0, T.Q4_0) and shape[1] % 32:
            t = T.F16
            fallback.append(gname)
        if qt is not None and t in (T.Q8_0, T.Q4_0) and STORAGE[qt.scheme] == outtype:
            data = qt.format.ggml_blocks(qt.arrays)                 # the codes as they are
        else:
            if w is None:
                w = qt.dequantize()
            data = {T.F32: lambda a: a, T.F16: lambda a: a.astype(np.float16),
                    T.Q8_0: lambda a: FORMATS["q8_0"].ggml_blocks(FORMATS["q8_0"].pack(a)),
                    T.Q4_0: lambda a: FORMATS["q4_0"].ggml_blocks(FORMATS["q4_0"].pack(a))}[t](w)
        tensors.append((gname + ".weight", np.ascontiguousarray(data), t))
        b = getattr(mod, "bias", None)
        if b is not None:
            tensors.append((gname + ".bias", backend.to_numpy(b.data).astype(np.float32), T.F32))
    for name, _, t in tensors:
        types[t.name] = types.get(t.name, 0) + 1

    def write(tmp):
        wr = gguf.GGUFWriter(tmp, "gpt2")
        wr.add_name(os.path.basename(os.path.abspath(model_dir)))
        wr.add_context_length(cfg.block_size)
        wr.add_embedding_length(cfg.n_embd)
        wr.add_feed_forward_length(4 * cfg.n_embd)
        wr.add_block_count(cfg.n_layer)
        wr.add_head_count(cfg.n_head)
        wr.add_layer_norm_eps(1e-5)
        wr.add_file_type(ftype)
        wr.add_tokenizer_model("gpt2")
        wr.add_tokenizer_pre("gpt-2")
        wr.add_token_list(tokens)
        wr.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
        if merges:
            wr.add_token_merges(merges)
        wr.add_add_bos_token(False)
        for name, data, t in tensors:
            wr.add_tensor(name, data, raw_dtype=t)
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()

    atomic_write_path(out_path, write)
    return {"path": out_path, "outtype": outtype, "tensors": len(tensors), "bytes": os.path.getsize(out_path),
            "types": types, "fallback_f16": fallback}
