"""Fine-tuning a trained model: ``train.init_from``, LoRA / QLoRA adapters, adapter folders, merging.

``lm.train`` calls three functions here and is otherwise unchanged:

- ``load_base(cfg)`` when ``train.init_from`` names a model folder: the model (through the one
  loader, ``lm.loader``), its tokenizer and a reference to it (absolute and relative path, and
  the SHA-256 of its weight files). The run's ``model`` and ``data.tokenizer`` settings become
  the base's; text with characters the base's tokenizer has no id for is a ``CorpusError``
  that names them.
- ``prepare_model(base, cfg)``: the base as it is (full fine-tuning) or, with ``lora.r`` set,
  the base frozen (quantized first with ``lora.quantize_base``: QLoRA) with adapters on
  ``lora.targets``; only the adapters train.
- ``save_adapter_dir(model_dir, ...)``: what ``output_dir/model`` holds for an adapter run:
  ``adapter.safetensors`` (the adapter only), ``config.json`` (the base's model config, the
  ``lora`` settings and ``base: {path, relpath, sha256}``), ``tokenizer.json``. With
  ``lora.merge`` (``lm.train --merge``) it holds a stand-alone merged model instead.

``load_adapter_dir`` is the loader's ``lora`` kind: it opens the base, checks its hash (a changed
base is a ``ModelDirError``: the adapter was trained on other weights), quantizes it as the
run did and applies the adapter. ``merged_model`` merges an adapter into the *float* base it
was trained on (a quantized base is never merged into: see ``minigrad.nn.lora``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from minigrad.io import atomic_write_text
from minigrad.nn.lora import (LoRAError, apply_lora, has_lora, load_lora, load_lora_state_dict, lora_config,
                              lora_state_dict, mark_only_lora_as_trainable, merge_and_unload_, save_lora,
                              trainable_report)

from .config import ConfigError
from .data import CorpusError, load_corpus
from .loader import ModelDirError, load_model

ADAPTER = "adapter.safetensors"
QUANT_FORMATS = ("nf4", "q4_0")


@dataclass
class Base:
    model: object
    tokenizer: object
    ref: dict     # {"path": absolute, "sha256": hash of the weight files}


def weights_sha256(model_dir: str) -> str:
    """SHA-256 over the bytes of every ``.safetensors`` file of a folder, in name order."""
    h = hashlib.sha256()
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ModelDirError(f"{model_dir} has no .safetensors weights to fine-tune from")
    for name in files:
        h.update(name.encode())
        with open(os.path.join(model_dir, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_text_fits(text: str, tokenizer, source: str, init_from: str) -> None:
    """A char tokenizer has no id for an unseen character: name them and say what to do."""
    chars = getattr(tokenizer, "stoi", None)
    if chars is None:   # byte-level BPE reads any text
        return
    unknown = sorted(set(text) - chars.keys())
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:12]) + (f" and {len(unknown) - 12} more" if len(unknown) > 12 else "")
        raise CorpusError(
            f"{source} has {len(unknown)} character(s) that the tokenizer of {init_from} has no token for: "
            f"{shown}. A fine-tuned model keeps its base's vocabulary: remove them from the text "
            f"(e.g. tr -d for each), or pretrain the base on text that contains them")


def load_base(cfg, log=print) -> Base:
    """The model of ``train.init_from`` and its tokenizer; ``cfg.model`` / ``cfg.data.tokenizer`` follow it."""
    src = cfg.train.init_from
    try:
        model, tok = load_model(src)
        sha = weights_sha256(src)
    except (ModelDirError, OSError) as e:
        raise ConfigError(f"train.init_from={src}: {e}") from None
    if has_lora(model):
        raise ConfigError(f"train.init_from={src} is a LoRA adapter folder; merge it into its base first "
                          f"(lm.train --merge, or python -m lm.compress --merge_lora) and start from that")
    base_cfg = model.config
    for k, v in asdict(base_cfg).items():
        if k != "dropout" and getattr(cfg.model, k) != v and not (k == "vocab_size" and cfg.model.vocab_size == 0):
            log(f"note: model.{k} comes from the base model ({v}), not {getattr(cfg.model, k)}")
        if k != "dropout":
            setattr(cfg.model, k, v)
    model.config.dropout = cfg.model.dropout
    cfg.data.tokenizer = getattr(tok, "kind", cfg.data.tokenizer)
    check_text_fits(load_corpus(cfg.data.corpus, text_field=cfg.data.text_field), tok, cfg.data.corpus, src)
    return Base(model, tok, {"path": os.path.abspath(src), "sha256": sha})


def _set_dropout(model, p: float) -> None:
    from minigrad.nn import Dropout
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = p
        if hasattr(m, "attn_dropout"):
            m.attn_dropout = p


def quantize_base_(model, fmt: str):
    """Pack every Linear of the base (``nf4`` / ``q4_0``, ``minigrad.quant.quantize_``) for QLoRA.

    The tied ``lm_head`` / ``wte`` pair is packed too (one set of codes for both). Rounding to
    nearest is deterministic, so the loader rebuilds exactly the codes the adapter was trained on.
    """
    from minigrad import quant
    try:
        return quant.quantize_(model, fmt)
    except quant.QuantError as e:
        raise ConfigError(f"lora.quantize_base={fmt}: {e}") from None


def prepare_model(base: Base, cfg, log=print):
    """Full fine-tuning (every weight trains) or, with ``lora.r``, a frozen base with adapters."""
    model, lc = base.model, cfg.lora
    _set_dropout(model, cfg.model.dropout)
    model.train()
    object.__setattr__(model, "init_from", dict(base.ref))   # read by save_model_dir / checkpoints
    if lc.r is None:
        model.requires_grad_(True)
        return model
    if lc.quantize_base:
        quantize_base_(model, lc.quantize_base)
    try:
        apply_lora(model, lc.r, lc.alpha, targets=lc.targets, dropout=lc.dropout, use_rslora=lc.use_rslora)
    except LoRAError as e:
        raise ConfigError(f"lora.targets: {e}") from None
    mark_only_lora_as_trainable(model)
    log(trainable_report(model))
    return model


# --------------------------------------------------------------------------- folders
def _lora_section(cfg) -> dict:
    lc = cfg.lora
    return {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "targets": list(lc.targets),
            "use_rslora": lc.use_rslora, "quantize_base": lc.quantize_base}


def save_adapter_dir(model_dir: str, model, tokenizer, cfg, extra: dict | None = None) -> None:
    """The adapter, its config and a reference to its base (or, with ``lora.merge``, a merged model)."""
    ref = model.init_from
    if cfg.lora.merge:
        from .train import save_model_dir
        check_base(model_dir, ref["path"], ref["sha256"])
        merged = merged_model(ref["path"], conf=lora_config(model), state=lora_state_dict(model),
                              quantize_base=cfg.lora.quantize_base)
        save_model_dir(model_dir, merged, tokenizer, cfg, {**(extra or {}), "merged_from": ref})
        return
    os.makedirs(model_dir, exist_ok=True)
    base = {**ref, "relpath": os.path.relpath(ref["path"], os.path.abspath(model_dir))}
    # the adapter goes in first: a folder whose config.json names an adapter always has one
    save_lora(model, os.path.join(model_dir, ADAPTER),
              {"base_sha256": ref["sha256"], **{k: json.dumps(v) for k, v in (extra or {}).items()}})
    atomic_write_text(os.path.join(model_dir, "config.json"), json.dumps(
        {"model": asdict(cfg.model), "data": asdict(cfg.data), "lora": _lora_section(cfg), "base": base},
        indent=2))
    tokenizer.save(os.path.join(model_dir, "tokenizer.json"))
    # a stale model.safetensors (a full run into the same folder) would be a second model here
    stale = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(stale):
        os.remove(stale)


def resolve_base(model_dir: str, base: dict) -> str:
    """The base folder an adapter names: its absolute path, else the same place relative to the adapter."""
    cands = [base.get("path")]
    if base.get("relpath"):
        cands.append(os.path.normpath(os.path.join(os.path.abspath(model_dir), base["relpath"])))
    for c in cands:
        if c and os.path.isdir(c):
            return c
    raise ModelDirError(f"{model_dir} is a LoRA adapter on the base model {base.get('path')}, which is not "
                        f"there any more: put the base back there (or beside the adapter, at {base.get('relpath')}), "
                        f"or edit 'base.path' in {os.path.join(model_dir, 'config.json')}")


def check_base(model_dir: str, base_dir: str, sha: str) -> None:
    now = weights_sha256(base_dir)
    if now != sha:
        raise ModelDirError(
            f"{model_dir}: the base model {base_dir} has changed since the adapter was trained (weights "
            f"SHA-256 {now[:12]}..., the adapter was trained on {sha[:12]}...); an adapter only fits the "
            f"exact weights it was trained on: restore that base, or fine-tune again")


def load_adapter_dir(model_dir: str, conf: dict, device: str = "cpu"):
    """The loader's ``lora`` kind: base (hash-checked, quantized as in training) + adapter."""
    adapter = os.path.join(model_dir, ADAPTER)
    if not os.path.isfile(adapter):
        raise ModelDirError(f"{model_dir} has a LoRA config.json but no {ADAPTER}")
    base_dir = resolve_base(model_dir, conf["base"])
    check_base(model_dir, base_dir, conf["base"]["sha256"])
    model, tok = load_model(base_dir, "cpu")
    fmt = conf["lora"].get("quantize_base") or ""
    if fmt:
        quantize_base_(model, fmt)
    try:
        load_lora(model, adapter)
    except LoRAError as e:
        raise ModelDirError(str(e)) from None
    model.eval().to(device)
    return model, tok


def merged_model(base_dir: str, adapter_path: str | None = None, *, conf: dict | None = None,
                 state: dict | None = None, quantize_base: str = ""):
    """A plain float GPT: the base with an adapter merged in (``merge_and_unload_``).

    The adapter is a file (``adapter_path``) or a ``lora_config`` dict and its arrays. For a
    QLoRA adapter (``quantize_base``), the base is quantized as in training and dequantized
    again, so the merged weights are ``dequant(codes) + scale * B A``: the very function the
    adapter was trained in, in float (re-quantize it with ``lm.compress --quantize`` if wanted).
    A base folder that is itself quantized (``lm.compress`` output) is dequantized the same way.
    """
    from minigrad import quant
    from minigrad.nn.quantized import QuantLinear
    model, _ = load_model(base_dir, "cpu")
    if quantize_base:
        quantize_base_(model, quantize_base)
    if any(isinstance(m, QuantLinear) for m in model.modules()):   # also a base that was quantized on disk
        quant.dequantize_(model)
    if adapter_path is not None:
        load_lora(model, adapter_path)
    else:
        apply_lora(model, conf["r"], conf["alpha"], targets=conf["modules"], use_rslora=conf["use_rslora"])
        load_lora_state_dict(model, state)
    return merge_and_unload_(model)


def merge_adapter_dir(model_dir: str):
    """(merged float model, tokenizer) from an adapter folder: what ``--merge_lora`` writes."""
    from .loader import read_config
    conf = read_config(model_dir)
    if not ("lora" in conf and "base" in conf):
        raise ModelDirError(f"{model_dir} is not a LoRA adapter folder (its config.json has no 'lora' and 'base')")
    base_dir = resolve_base(model_dir, conf["base"])
    check_base(model_dir, base_dir, conf["base"]["sha256"])
    model = merged_model(base_dir, os.path.join(model_dir, ADAPTER),
                         quantize_base=conf["lora"].get("quantize_base") or "")
    _, tok = load_model(base_dir, "cpu")
    return model, tok, conf
