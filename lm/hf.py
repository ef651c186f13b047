"""Hugging Face GPT-2 folders: our GPT out to one, one into our GPT.

A GPT-2 folder (what ``GPT2LMHeadModel.save_pretrained`` writes) holds

- ``config.json``: ``model_type: gpt2`` and GPT-2's names for the shapes (``n_positions`` is our
  ``block_size``, ``n_embd``, ``n_layer``, ``n_head``, ``vocab_size``), ``activation_function``
  (``gelu_new`` is the tanh form, ``gelu`` the exact one) and ``layer_norm_epsilon``;
- ``model.safetensors`` with ``metadata={"format": "pt"}`` (transformers 4 refuses any other);
- ``vocab.json`` + ``merges.txt``: GPT-2's byte-level BPE.

The weights have our parameter names, with one trap: GPT-2's ``c_attn``, ``c_proj`` and
``c_fc`` are ``Conv1D`` layers, whose weight is stored (in, out), where a Linear stores
(out, in). Every one of them is transposed on the way out and on the way back; the square
``attn.c_proj`` would load the wrong way round with no shape error, so the tests round-trip
a model to identical logits instead of trusting shapes.

Nothing here imports torch or transformers: a user with GPT-2 weights on disk generates
with our engine on the CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import unicodedata
import warnings

import numpy as np

from minigrad.io import atomic_write_text, save_file

from . import tokenizer as _tok
from .config import ModelConfig
from .tokenizer import BPETokenizer, CharTokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT-2's activation names -> our ModelConfig.gelu. gelu_fast is the tanh form written differently.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "exact"}
# ModelConfig fields that GPT-2 expresses (or that change only how training runs)
GPT2_FIELDS = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "gelu",
               "attention", "checkpoint_every"}
WEIGHT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # BF16: widened by hand
CHAR_VOCAB_FILE = "minigrad_tokenizer.json"


class HFError(ValueError):
    """A folder or model that does not map onto GPT-2; the message says which file or switch."""


# --------------------------------------------------------------------------- export
def check_exportable(cfg: ModelConfig) -> None:
    """Raise HFError naming the first switch of ``cfg`` that GPT-2 has no equivalent for."""
    if cfg.reversible:
        raise HFError("model.reversible=true: GPT-2 has no reversible blocks (their two residual "
                      "streams compute a different function); export a model trained without it")
    for f in dataclasses.fields(cfg):
        if f.name in GPT2_FIELDS:
            continue
        value = getattr(cfg, f.name)
        default = f.default if f.default is not dataclasses.MISSING else \
            (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if value != default:
            raise HFError(f"model.{f.name}={value!r}: GPT-2 cannot express this switch (shared layers, "
                          f"grouped-query attention, rotary positions, windows, low rank and per-layer "
                          f"widths have no GPT-2 form); export a model trained with model.{f.name}="
                          f"{default!r}")
    if cfg.gelu not in ("tanh", "exact"):
        raise HFError(f"model.gelu={cfg.gelu!r}: GPT-2 knows gelu_new (tanh) and gelu (exact)")
    if cfg.n_embd % cfg.n_head:
        raise HFError(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")


def hf_config(cfg: ModelConfig, layer_norm_epsilon: float = 1e-5) -> dict:
    """config.json of the GPT-2 folder for ``cfg`` (transformers 5 reads every shape from it)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,                                   # 4 * n_embd, as ours
        "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu",
        "layer_norm_epsilon": layer_norm_epsilon,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,                        # lm_head reuses wte, as ours
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # our vocabularies have none
        "dtype": "float32",
        "use_cache": True,
    }


def hf_state_dict(model) -> dict:
    """Our GPT's weights under GPT-2's names and layouts (Conv1D transposed, zero biases if bias-free)."""
    cfg = model.config
    sd = {k: np.asarray(_numpy(v), dtype=np.float32) for k, v in model.state_dict().items()}
    out = {}
    C = cfg.n_embd
    widths = {"ln_1": C, "ln_2": C, "attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": 4 * C,
              "mlp.c_proj": C}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for mod, width in widths.items():
            w = sd.pop(p + mod + ".weight")
            out[p + mod + ".weight"] = np.ascontiguousarray(w.T) if mod + ".weight" in CONV1D else w
            b = sd.pop(p + mod + ".bias", None)
            out[p + mod + ".bias"] = b if b is not None else np.zeros(width, np.float32)
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"):
        out[name] = sd.pop(name)
    b = sd.pop("transformer.ln_f.bias", None)
    out["transformer.ln_f.bias"] = b if b is not None else np.zeros(C, np.float32)
    sd.pop("lm_head.weight", None)   # tied to wte
    if sd:
        raise HFError(f"weights GPT-2 has no place for: {', '.join(sorted(sd)[:6])} (is the model "
                      f"quantized, low-rank or adapted? export the float model)")
    return out


def _numpy(a):
    from minigrad import backend
    return backend.to_numpy(a)


def export_hf(model_dir: str, out_dir: str, force: bool = False) -> dict:
    """Write the GPT-2 folder for the lm.train model folder ``model_dir`` into ``out_dir``.

    Everything is checked before ``out_dir`` is created. Returns a summary dict.
    """
    from .loader import detect_kind, load_model, model_config_from, read_config
    kind = detect_kind(model_dir)
    if kind not in ("minigrad", "hf-gpt2"):
        raise HFError(f"{model_dir} is a {kind!r} folder: GPT-2 holds float weights only; export the "
                      f"float model it was made from (or merge the adapter first)")
    conf = read_config(model_dir)
    if kind == "minigrad":
        check_exportable(model_config_from(conf, os.path.join(model_dir, "config.json")))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or (os.listdir(out_dir) and not force)):
        raise HFError(f"{out_dir} exists and is not an empty folder: choose another --out, or pass "
                      f"--force to overwrite its files")
    model, tok = load_model(model_dir, "cpu")
    check_exportable(model.config)
    eps = {m.eps for m in model.modules() if hasattr(m, "eps")} or {1e-5}
    if len(eps) > 1:
        raise HFError(f"the LayerNorms use different eps {sorted(eps)}: GPT-2 has one layer_norm_epsilon")
    weights = hf_state_dict(model)
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), {"format": "pt"})
    atomic_write_text(os.path.join(out_dir, "config.json"),
                      json.dumps(hf_config(model.config, float(eps.pop())), indent=2))
    files = ["config.json", "model.safetensors"] + save_tokenizer_files(tok, out_dir, model.config.block_size)
    return {"out": out_dir, "files": files, "n_params": int(sum(w.size for w in weights.values())),
            "tokenizer": getattr(tok, "kind", None)}


def save_tokenizer_files(tok, out_dir: str, max_length: int) -> list:
    """The tokenizer in GPT-2's files (BPE) or in our JSON under ``minigrad_tokenizer.json`` (char)."""
    if tok is None:
        return []
    # our own file too: a char vocabulary has no GPT-2 form (ids are positions in its "chars"
    # list, see the README), and for BPE it keeps our split pattern, so re-importing is exact
    tok.save(os.path.join(out_dir, CHAR_VOCAB_FILE))
    if isinstance(tok, CharTokenizer):
        return [CHAR_VOCAB_FILE]
    if isinstance(tok, GPT2BPETokenizer):
        vocab, merges = tok.hf_vocab, tok.hf_merges
    elif isinstance(tok, BPETokenizer):
        vocab, merges = bpe_to_gpt2(tok)
    else:
        raise HFError(f"no GPT-2 form for a {type(tok).__name__}")
    write_gpt2_vocab(out_dir, vocab, merges)
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False,
         "errors": "replace"}, indent=2))
    return [CHAR_VOCAB_FILE, "vocab.json", "merges.txt", "tokenizer_config.json"]


# --------------------------------------------------------------------------- byte-level BPE files
@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table: printable bytes stand for themselves, the
    others (controls, space) for characters from U+0100 on, so every token is visible text."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _unicode_to_bytes() -> dict:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_str(bs: bytes) -> str:
    t = bytes_to_unicode()
    return "".join(t[b] for b in bs)


def _token_bytes(s: str) -> bytes:
    u = _unicode_to_bytes()
    try:
        return bytes(u[c] for c in s)
    except KeyError as e:
        raise HFError(f"token {s!r} has a character {e} outside GPT-2's byte alphabet") from None


def bpe_to_gpt2(tok: BPETokenizer):
    """Our BPE as GPT-2's (vocab: token string -> id, merges: list of 'a b' lines); ids unchanged."""
    vocab = {}
    for i, bs in enumerate(tok.vocab):
        s = _token_str(bs)
        if s in vocab:
            warnings.warn(f"tokens {vocab[s]} and {i} are the same bytes {bs!r}: vocab.json keeps {vocab[s]}",
                          stacklevel=2)
            continue
        vocab[s] = i
    merges = [f"{_token_str(tok.vocab[a])} {_token_str(tok.vocab[b])}" for a, b in tok.merges]
    return vocab, merges


def write_gpt2_vocab(out_dir: str, vocab: dict, merges: list) -> None:
    atomic_write_text(os.path.join(out_dir, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(os.path.join(out_dir, "merges.txt"), "#version: 0.2\n" + "".join(m + "\n" for m in merges))


def read_gpt2_vocab(folder: str):
    vpath, mpath = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    try:
        with open(vpath, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(mpath, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"cannot read GPT-2 tokenizer files in {folder}: {e}") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise HFError(f"{vpath} must map token strings to integer ids")
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    for ln in merges:
        if len(ln.split(" ")) != 2:
            raise HFError(f"{mpath}: a merge line must be two tokens separated by one space, got {ln!r}")
    return vocab, merges


@functools.lru_cache(maxsize=1)
def gpt2_pattern() -> str:
    """GPT-2's pre-tokenizer regex, exactly, for the standard library's ``re``.

    GPT-2 splits with ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``.
    ``re`` has no ``\\p{..}``, so the letter and number classes are spelled out as ranges of code
    points from ``unicodedata`` (built once, about a quarter of a second), and ``\\s`` as Unicode's
    White_Space list (``re``'s ``\\s`` also takes U+001C..U+001F). ``lm.tokenizer``'s own pattern is an
    approximation that differs on digits like "²" and on upper-case contractions.
    """
    def ranges(pred):
        out, start, prev = [], None, None
        for cp in range(sys.maxunicode + 1):
            if pred(unicodedata.category(chr(cp))):
                if start is None:
                    start = cp
                prev = cp
            elif start is not None:
                out.append((start, prev))
                start = None
        if start is not None:
            out.append((start, prev))
        return "".join(_esc(a) if a == b else f"{_esc(a)}-{_esc(b)}" for a, b in out)

    L = ranges(lambda c: c[0] == "L")
    N = ranges(lambda c: c[0] == "N")
    S = r"\t\n\x0b\x0c\r\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    return (rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


def _esc(cp: int) -> str:
    return f"\\U{cp:08x}"


class GPT2BPETokenizer(BPETokenizer):
    """GPT-2's byte-level BPE (``vocab.json`` + ``merges.txt``), encoding to the files' own ids.

    Merging runs in our ``BPETokenizer`` (byte ids 0..255, merge i makes id 256 + i, the earliest
    merge first, as GPT-2's ranks); a table then maps each of those ids to the id ``vocab.json``
    gives the token. Tokens that no merge makes (``<|endoftext|>``) decode but never come out of
    ``encode``, as with Hugging Face's tokenizer built from the same two files.
    """

    kind = "gpt2-bpe"

    def __init__(self, vocab: dict, merges: list):
        ids = {_token_bytes(s): i for s, i in vocab.items()}
        internal = {bytes([b]): b for b in range(256)}
        pairs = []
        for ln in merges:
            a, b = ln.split(" ")
            ba, bb = _token_bytes(a), _token_bytes(b)
            if ba not in internal or bb not in internal:
                raise HFError(f"merges.txt: merge {ln!r} uses a token no earlier merge made")
            pairs.append((internal[ba], internal[bb]))
            internal.setdefault(ba + bb, 255 + len(pairs))
        super().__init__(pairs, gpt2_pattern())
        self.hf_vocab, self.hf_merges = dict(vocab), list(merges)
        n = max(vocab.values(), default=-1) + 1
        self._to_hf = np.array([ids.get(bs, -1) for bs in self.vocab], dtype=np.int64)
        self._hf_bytes = [None] * n
        for bs, i in ids.items():
            self._hf_bytes[i] = bs
        self._n = n

    @classmethod
    def from_folder(cls, folder: str) -> "GPT2BPETokenizer":
        return cls(*read_gpt2_vocab(folder))

    @property
    def vocab_size(self) -> int:
        return self._n

    def encode(self, text: str) -> list[int]:
        ids = self._to_hf[super().encode(text)] if text else np.zeros(0, np.int64)
        if (ids < 0).any():
            raise ValueError("text needs a token that vocab.json does not list (a byte or merge result "
                             "missing from the vocabulary)")
        return ids.tolist()

    def decode(self, ids) -> str:
        try:
            parts = [self._hf_bytes[int(i)] for i in ids]
        except IndexError:
            raise IndexError(f"token id out of range for a vocabulary of {self._n}") from None
        if any(p is None for p in parts):
            raise IndexError("token id that vocab.json does not list")
        return b"".join(parts).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._hf_bytes[token_id]

    def to_dict(self) -> dict:
        return {"type": self.kind, "version": _tok.FORMAT_VERSION, "vocab": self.hf_vocab,
                "merges": self.hf_merges}

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2BPETokenizer":
        if not isinstance(d.get("vocab"), dict) or not isinstance(d.get("merges"), list):
            raise ValueError("'vocab' must be an object and 'merges' a list of 'a b' strings")
        return cls(d["vocab"], d["merges"])

    def __repr__(self) -> str:
        return f"GPT2BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"


_tok._CLASSES.setdefault(GPT2BPETokenizer.kind, GPT2BPETokenizer)


# --------------------------------------------------------------------------- import
def is_hf_gpt2(model_dir: str, conf: dict) -> bool:
    return conf.get("model_type") == "gpt2" or "GPT2LMHeadModel" in (conf.get("architectures") or [])


def config_from_hf(conf: dict, path: str = "config.json") -> tuple[ModelConfig, float]:
    """Our ModelConfig (and the LayerNorm eps) for a GPT-2 config.json; HFError for what we lack."""
    act = conf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise HFError(f"{path}: activation_function {act!r} is not supported; our GPT has "
                      f"{', '.join(ACTIVATIONS)} (GELU, tanh or exact)")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if key in conf and bool(conf[key]) != ok:
            raise HFError(f"{path}: {key}={conf[key]!r} is not supported (our attention has {key}={ok})")
    try:
        C, nh = int(conf.get("n_embd", 768)), int(conf.get("n_head", 12))
        cfg = ModelConfig(vocab_size=int(conf.get("vocab_size", 50257)),
                          block_size=int(conf.get("n_positions", conf.get("n_ctx", 1024))),
                          n_layer=int(conf.get("n_layer", 12)), n_head=nh, n_embd=C, dropout=0.0,
                          bias=True, gelu=ACTIVATIONS[act])
        eps = float(conf.get("layer_norm_epsilon", 1e-5))
    except (TypeError, ValueError) as e:
        raise HFError(f"{path}: {e}") from None
    if conf.get("n_inner") not in (None, 4 * C):
        raise HFError(f"{path}: n_inner={conf['n_inner']} is not supported (our MLP is 4 * n_embd = {4 * C})")
    if C % nh:
        raise HFError(f"{path}: n_embd {C} is not a multiple of n_head {nh}")
    return cfg, eps


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(name -> float32 array, metadata) from a safetensors file of F32, F16 or BF16 tensors.

    Read by hand, not by ``safetensors.numpy`` (NumPy has no bfloat16): bfloat16 is the top half
    of a float32, so it is widened by a 16-bit shift. Any other dtype is an HFError.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
    except (OSError, ValueError) as e:
        raise HFError(f"{path} is not a valid safetensors file: {e}") from None
    meta = dict(header.pop("__metadata__", None) or {})
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        dt, shape, (a, b) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dt not in WEIGHT_DTYPES:
            raise HFError(f"{path}: tensor {name!r} has dtype {dt}; weights must be float32, float16 or "
                          f"bfloat16 (F32, F16, BF16)")
        if dt == "BF16":
            arr = (np.frombuffer(data[a:b], dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(data[a:b], dtype=np.dtype(WEIGHT_DTYPES[dt]).newbyteorder("<"))
        out[name] = arr.astype(np.float32).reshape(shape)
    return out, meta


def read_hf_weights(model_dir: str) -> dict:
    """All tensors of a GPT-2 folder: ``model.safetensors`` or the shards its index names."""
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_safetensors(single)[0]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for s in shards:
            out.update(read_safetensors(os.path.join(model_dir, s))[0])
        return out
    if os.path.isfile(os.path.join(model_dir, "pytorch_model.bin")):
        raise HFError(f"{model_dir} holds pytorch_model.bin (a pickle, which we never load): save it as "
                      f"safetensors (model.save_pretrained(dir) does by default)")
    raise HFError(f"{model_dir} has config.json of a GPT-2 but no model.safetensors")


def gpt_state_from_hf(weights: dict, cfg: ModelConfig, path: str = "model.safetensors") -> dict:
    """GPT-2 tensors -> our state dict: prefix normalised, Conv1D transposed, buffers dropped."""
    sd = {}
    lm_head = None
    for k, v in weights.items():
        if k == "lm_head.weight":
            lm_head = v
            continue
        name = k if k.startswith("transformer.") else "transformer." + k
        if name.endswith((".attn.bias", ".attn.masked_bias")):   # causal-mask buffers of old files
            continue
        sd[name] = np.ascontiguousarray(v.T) if name.endswith(CONV1D) else v
    if lm_head is not None and "transformer.wte.weight" in sd \
            and not np.array_equal(lm_head, sd["transformer.wte.weight"]):
        raise HFError(f"{path}: lm_head.weight differs from wte.weight (untied embeddings); our GPT ties them")
    return sd


def load_hf_gpt2(model_dir: str, conf: dict, device: str = "cpu"):
    """(GPT, tokenizer or None) from a Hugging Face GPT-2 folder."""
    from .model import GPT
    path = os.path.join(model_dir, "config.json")
    cfg, eps = config_from_hf(conf, path)
    sd = gpt_state_from_hf(read_hf_weights(model_dir), cfg, os.path.join(model_dir, "model.safetensors"))
    model = GPT(cfg)
    for m in model.modules():
        if hasattr(m, "eps"):
            m.eps = eps
    try:
        model.load_state_dict(sd)
    except KeyError as e:   # StateDictError: missing, unexpected or misshapen weights, all listed
        raise HFError(f"{model_dir}: the weights do not fit config.json: {e.args[0]}") from None
    model.eval().to(device)
    return model, load_hf_tokenizer(model_dir)


def load_hf_tokenizer(model_dir: str):
    """Our tokenizer file if the folder was exported by us, else GPT-2's vocab.json + merges.txt, else None."""
    ours = os.path.join(model_dir, CHAR_VOCAB_FILE)
    if os.path.isfile(ours):
        return _tok.load_tokenizer(ours)
    if os.path.isfile(os.path.join(model_dir, "vocab.json")) and os.path.isfile(os.path.join(model_dir, "merges.txt")):
        return GPT2BPETokenizer.from_folder(model_dir)
    return None


__all__ = ["HFError", "export_hf", "load_hf_gpt2", "GPT2BPETokenizer", "gpt2_pattern", "bytes_to_unicode",
           "hf_state_dict", "hf_config", "check_exportable", "config_from_hf", "read_safetensors"]

