"""One loader for every model folder.

``load_model(model_dir, device)`` returns ``(model, tokenizer)`` for whatever a folder holds.
``lm.generate``, ``lm.compress``, ``lm.export``, ``lm.train``'s ``init_from`` and the benchmarks
all call it, so a new kind of folder is taught here once.

A folder is recognised by its files and its ``config.json``:

| kind            | how it is recognised                                           |
|-----------------|----------------------------------------------------------------|
| ``hf-gpt2``     | ``config.json`` with ``model_type: gpt2`` (``save_pretrained``, lm.export) |
| ``minigrad``    | ``config.json`` with a ``"model"`` section (written by lm.train) |

Each kind is a pair of functions in ``KINDS``: ``detect(model_dir, conf) -> bool`` and
``load(model_dir, conf, device) -> (model, tokenizer)``; the first that detects wins, in order.
Techniques that change what the weights are (quantized codes, pruned masks, a LoRA adapter on
a named base, a Hugging Face GPT-2 folder) add their kind here, before ``minigrad``.
"""
from __future__ import annotations

import json
import os

from minigrad.io import load_file

from . import hf
from .config import Config, ConfigError, ModelConfig, _apply_section, validate
from .model import GPT
from .tokenizer import load_tokenizer


class ModelDirError(ValueError):
    """A model folder that cannot be opened: the message says which file and why."""


def read_config(model_dir: str) -> dict:
    """``config.json`` of a model folder as a dict (``{}`` when there is none)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            conf = json.load(f)
    except OSError as e:
        raise ModelDirError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path} is not valid JSON ({e}); it is the model folder's config, written "
                            f"by lm.train: restore it or train again") from None
    if not isinstance(conf, dict):
        raise ModelDirError(f"{path} does not hold a JSON object")
    return conf


def model_config_from(conf: dict, path: str = "config.json") -> ModelConfig:
    """The ``ModelConfig`` saved in a config dict; unknown keys are dropped (older/newer folders)."""
    known = set(ModelConfig.__dataclass_fields__)
    section = conf.get("model")
    if not isinstance(section, dict):
        raise ModelDirError(f"{path} has no 'model' section")
    cfg = Config()
    try:   # the values get the same type and range checks as a YAML config's
        _apply_section(cfg.model, "model", {k: v for k, v in section.items() if k in known}, path)
        validate(cfg)
    except ConfigError as e:
        raise ModelDirError(f"{path}: {e}" if path not in str(e) else str(e)) from None
    return cfg.model


# --------------------------------------------------------------------------- kinds
def _is_minigrad(model_dir: str, conf: dict) -> bool:
    return "model" in conf


def _load_minigrad(model_dir: str, conf: dict, device: str):
    for name in ("model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise ModelDirError(f"{model_dir} has no {name}: is it the 'model' folder written by lm.train?")
    config_path = os.path.join(model_dir, "config.json")
    weights_path = os.path.join(model_dir, "model.safetensors")
    model = GPT(model_config_from(conf, config_path))
    try:
        model.load_state_dict(load_file(weights_path))
    except KeyError as e:   # StateDictError: the weights are another architecture's
        detail = "; ".join(ln.strip() for ln in str(e).splitlines()[1:3])
        raise ModelDirError(f"{weights_path} does not match the model {config_path} describes ({detail})") from None
    model.eval().to(device)
    return model, load_tokenizer(os.path.join(model_dir, "tokenizer.json"))


KINDS: list[tuple[str, object, object]] = [
    ("hf-gpt2", hf.is_hf_gpt2, hf.load_hf_gpt2),
    ("minigrad", _is_minigrad, _load_minigrad),
]


def detect_kind(model_dir: str) -> str:
    """The name of the kind of folder ``model_dir`` is; a clear error when it is none."""
    if not os.path.isdir(model_dir):
        raise ModelDirError(f"{model_dir} is not a folder: pass the 'model' folder written by lm.train "
                            f"(it holds model.safetensors, config.json and tokenizer.json)")
    conf = read_config(model_dir)
    for name, detect, _ in KINDS:
        if detect(model_dir, conf):
            return name
    raise ModelDirError(f"{model_dir} is not a model folder: no config.json that lm.train (or a known "
                        f"format: {', '.join(k[0] for k in KINDS)}) writes; a Hugging Face GPT-2 folder "
                        f"needs config.json with model_type gpt2 and model.safetensors")


def load_model(model_dir: str, device: str = "cpu"):
    """(model, tokenizer) from any model folder this project knows, in eval mode on ``device``."""
    kind = detect_kind(model_dir)
    conf = read_config(model_dir)
    for name, _, load in KINDS:
        if name == kind:
            return load(model_dir, conf, device)
    raise AssertionError(kind)
