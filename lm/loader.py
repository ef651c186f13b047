"""One loader for every model folder.

``load_model(model_dir, device)`` returns ``(model, tokenizer)`` for whatever a folder holds.
``lm.generate``, ``lm.compress``, ``lm.export``, ``lm.train``'s ``init_from`` and the benchmarks
all call it, so a new kind of folder is taught here once.

A folder is recognised by its files and its ``config.json``:

| kind            | how it is recognised                                           |
|-----------------|----------------------------------------------------------------|
| ``lora``        | ``config.json`` with ``"lora"`` and ``"base"`` sections, ``adapter.safetensors`` (an adapter run of lm.train; see lm.finetune) |
| ``hf-gpt2``     | ``config.json`` with ``model_type: gpt2`` (``save_pretrained``, lm.export) |
| ``quantized``   | ``config.json`` with a ``"quantization"`` section (lm.compress) |
| ``pruned``      | ``config.json`` with a ``"sparse"`` or ``"low_rank"`` section (lm.compress --prune/--rank/--energy) |
| ``minigrad``    | ``config.json`` with a ``"model"`` section (written by lm.train) |

A structurally pruned model (fewer heads, narrower MLPs) is an ordinary ``minigrad`` folder:
its model section carries ``layer_heads``/``layer_mlp``. A ``pruned`` folder holds packed
weights (``minigrad.sparse``: bitmask or N:M, unpacked to dense on load; no sparse kernel
runs) and/or low-rank layers (``{"low_rank": {module: rank}}``, built as ``LowRankLinear``).

Each kind is a pair of functions in ``KINDS``: ``detect(model_dir, conf) -> bool`` and
``load(model_dir, conf, device) -> (model, tokenizer)``; the first that detects wins, in order.
Techniques that change what the weights are (quantized codes, pruned masks, a LoRA adapter on
a named base, a Hugging Face GPT-2 folder) add their kind here, before ``minigrad``.
"""
from __future__ import annotations

import json
import os

from minigrad.io import load_file, load_metadata

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


def _is_lora(model_dir: str, conf: dict) -> bool:
    return "lora" in conf and "base" in conf


def _load_lora(model_dir: str, conf: dict, device: str):
    from .finetune import load_adapter_dir   # it loads the base through this module
    return load_adapter_dir(model_dir, conf, device)


QUANTIZED_FORMAT = "minigrad-gpt-quantized"


def _is_quantized(model_dir: str, conf: dict) -> bool:
    return "quantization" in conf


class _Skeleton(GPT):
    def _init_weights(self) -> None:     # the weights come from the file
        pass


def _load_quantized(model_dir: str, conf: dict, device: str):
    """Packed codes and scales as they are: the float32 weights are never built (the layers
    are made under ``skip_init`` with placeholders that hold no memory, the quantized ones are
    swapped for empty QuantLinears, then the file fills them)."""
    from minigrad import quant
    from minigrad.nn.layers import skip_init
    from minigrad.nn.quantized import QuantLinear

    for name in ("model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise ModelDirError(f"{model_dir} has no {name}: is it a folder written by lm.compress?")
    path = os.path.join(model_dir, "model.safetensors")
    plan = conf["quantization"].get("modules") if isinstance(conf["quantization"], dict) else None
    if not isinstance(plan, dict) or not plan:
        raise ModelDirError(f"{model_dir}/config.json: 'quantization' has no 'modules' map of layer -> scheme")
    for n, scheme in plan.items():
        if scheme not in quant.SCHEMES:
            raise ModelDirError(f"{model_dir}/config.json: layer {n} has unknown quantization scheme "
                                f"{scheme!r}; valid: {', '.join(quant.SCHEMES)}")
    try:
        meta = load_metadata(path)
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path} is not a readable safetensors file (truncated?): {e}") from None
    if meta.get("format") != QUANTIZED_FORMAT:
        raise ModelDirError(f"{path} says format {meta.get('format')!r}, not {QUANTIZED_FORMAT!r}: the "
                            f"config.json and the weights do not belong together")
    cfg = model_config_from(conf, os.path.join(model_dir, "config.json"))
    with skip_init():
        model = _Skeleton(cfg)
    model.__class__ = GPT
    if conf.get("low_rank"):      # factorized layers stay float (quantize_ packs plain Linears only)
        from minigrad.nn.lowrank import low_rank_structure_
        low_rank_structure_(model, conf["low_rank"])
    modules = dict(model.named_modules())
    missing = sorted(set(plan) - set(modules))
    if missing:
        raise ModelDirError(f"{model_dir}/config.json names layers the model does not have: {', '.join(missing)}")
    try:
        packed = {n: quant.QuantizedTensor.empty(s, modules[n].weight.shape) for n, s in plan.items()}
    except quant.QuantError as e:
        raise ModelDirError(f"{model_dir}: {e}") from None
    quant.replace_linears_(model, packed)
    try:
        state = load_file(path)
    except ValueError as e:
        raise ModelDirError(f"{e} (a truncated or corrupt file: quantize the model again)") from None
    # a packed array must arrive in its own dtype: load_state_dict would cast it silently
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for k, a in m.weight.arrays.items():
                key = f"{n}.weight_{k}"
                if key in state and state[key].dtype != a.dtype:
                    raise ModelDirError(f"{path}: {key} is {state[key].dtype}, the {m.scheme} layout "
                                        f"needs {a.dtype} (a mismatched file)")
    try:
        model.load_state_dict(state)
    except KeyError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())
        raise ModelDirError(f"{path} does not match its config.json: {detail}") from None
    model.eval().to(device)
    return model, load_tokenizer(os.path.join(model_dir, "tokenizer.json"))


def _is_pruned(model_dir: str, conf: dict) -> bool:
    return "model" in conf and ("sparse" in conf or "low_rank" in conf)


def _load_pruned(model_dir: str, conf: dict, device: str):
    from minigrad.nn.lowrank import low_rank_structure_
    from minigrad.sparse import load_sparse
    for name in ("model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise ModelDirError(f"{model_dir} has no {name}: is it a folder written by lm.compress?")
    model = GPT(model_config_from(conf, os.path.join(model_dir, "config.json")))
    if conf.get("low_rank"):
        low_rank_structure_(model, conf["low_rank"])
    path = os.path.join(model_dir, "model.safetensors")
    try:
        model.load_state_dict(load_sparse(path))
    except (KeyError, ValueError) as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ModelDirError(f"{path} does not match its config.json (a truncated or mismatched file?): "
                            f"{detail}") from None
    model.eval().to(device)
    return model, load_tokenizer(os.path.join(model_dir, "tokenizer.json"))


KINDS: list[tuple[str, object, object]] = [
    ("lora", _is_lora, _load_lora),
    ("hf-gpt2", hf.is_hf_gpt2, hf.load_hf_gpt2),
    ("quantized", _is_quantized, _load_quantized),
    ("pruned", _is_pruned, _load_pruned),
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
