"""Configuration: dataclasses with commented defaults, loaded from YAML, overridable by key=value.

A YAML file has the sections ``model``, ``data``, ``train``, ``lora`` and ``distill``, whose
keys are the fields below. Overrides on the command line look like ``train.max_iters=200`` or,
when the key name is unique across sections, ``max_iters=200``. Every value is checked
against the field's type; an unknown key is an error that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    pass


ATTENTION_IMPLS = ("auto", "blocked", "flash", "naive")


@dataclass
class ModelConfig:
    vocab_size: int = 0         # 0: taken from the tokenizer when training starts
    block_size: int = 64        # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True           # biases in Linear layers and LayerNorms, as GPT-2
    gelu: str = "tanh"          # "tanh" (GPT-2's approximation) or "exact" (erf, as nn.GELU())
    attention: str = "auto"     # "auto" (fastest kernel), "blocked", "flash" (Numba), "naive" (T x T scores)
    checkpoint_every: int = 0   # 0: off; k: checkpoint the blocks in groups of k (recomputed in backward)
    reversible: bool = False    # reversible two-stream blocks: activation memory flat in depth
    # structured pruning (lm.structured) writes these: per layer, the heads kept (each
    # n_embd // n_head wide) and the MLP hidden width; None: n_head heads and 4 * n_embd everywhere
    layer_heads: typing.Optional[list] = None
    layer_mlp: typing.Optional[list] = None
    # architecture switches (README "Architecture switches")
    n_kv_head: int = 0          # key/value heads; 0: n_head (plain multi-head), 1: multi-query, else grouped-query
    attn_window: int = 0        # sliding-window attention over the last w positions; 0: full causal
    position: str = "learned"   # "learned" (GPT-2's table) or "rope" (rotary, applied to q and k)
    share_layers: int = 0       # 0: off; k: the n_layer blocks cycle through k shared blocks (1: ALBERT, one block)
    low_rank: int = 0           # 0: off; r: MLP weights (and attention's, see low_rank_attn) as rank-r U V
    low_rank_attn: bool = False  # with low_rank: c_attn and attn.c_proj low-rank too

    def heads_of(self, layer: int) -> int:
        """Query heads of layer ``layer``: n_head unless structured pruning kept fewer."""
        return self.layer_heads[layer] if self.layer_heads else self.n_head

    def mlp_of(self, layer: int) -> int:
        """MLP hidden width of layer ``layer``: 4 * n_embd unless structured pruning narrowed it."""
        return self.layer_mlp[layer] if self.layer_mlp else 4 * self.n_embd


@dataclass
class DataConfig:
    corpus: str = "python-docs"  # a .txt/.jsonl file, a folder, or a built-in name
    text_field: str = "text"     # the field holding the text in .jsonl records
    tokenizer: str = "char"      # "char" or "bpe"
    vocab_size: int = 512        # BPE only: vocabulary size to learn
    val_fraction: float = 0.1    # the last 10% of the tokens are the validation split
    cache_dir: typing.Optional[str] = None  # where token arrays are cached (default: a user cache dir)


@dataclass
class TrainConfig:
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4          # cosine decay ends here
    warmup_iters: int = 100
    lr_decay_iters: int = 0       # 0: decay over max_iters
    weight_decay: float = 0.1     # applied to matrices only, not to biases, norms or embeddings' ... see train.py
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0        # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20          # batches per split in each evaluation
    log_interval: int = 10
    device: str = "cpu"           # "cpu" or "cuda"
    dtype: str = "float32"
    seed: int = 42
    progress: bool = True         # tqdm progress bar
    sample_tokens: int = 200      # length of the sample printed at the end (0: none)
    log_memory: bool = False      # peak memory by category per step in metrics.jsonl, memory.png
    log_grad_stats: bool = False  # per-layer gradient norms and update/weight ratios, grad_flow.png
    init_from: str = ""           # a trained model folder to fine-tune (its weights, config, tokenizer)
    optimizer: str = "adamw"      # "adamw" (float32 moments) or "adamw8bit" (block-wise 8-bit moments)


@dataclass
class LoRAConfig:
    """Fine-tuning with adapters (needs train.init_from); see lm.finetune and minigrad.nn.lora."""
    r: typing.Optional[int] = None   # adapter rank; None: no adapters (every weight of the base trains)
    alpha: float = 16.0              # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0             # dropout on the adapters' input
    targets: typing.List[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])  # PEFT's target_modules
    use_rslora: bool = False
    quantize_base: str = ""          # "": float base (LoRA); "nf4" or "q4_0": 4-bit frozen base (QLoRA)
    merge: bool = False              # output_dir/model: a stand-alone merged model, not adapter + base reference


@dataclass
class ProgressiveConfig:
    """Sequence-length warmup and growth by stacking (lm.progressive has the semantics)."""
    seqlen_start: int = 0        # 0: off; else the first training length (a multiple of seqlen_step)
    seqlen_step: int = 8         # every length is a multiple of this (DeepSpeed's difficulty_step)
    total_steps: int = 0         # full block_size from this step on
    schedule: str = "linear"     # "linear", "root" (root_degree) or "discrete" (doubling stages)
    root_degree: float = 2.0     # "root": length grows as (step / total_steps) ** (1 / root_degree)
    grow: typing.List[dict] = field(default_factory=list)  # [{at: 500, n_layer: 4}, ...]: G_stack growth
    grow_init: str = "copy"      # "copy" (G_stack) or "identity" (copies with zeroed output projections)


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (lm.distill): the loss is
    alpha * CE + (1 - alpha) * T^2 * D(teacher || student), averaged over tokens."""
    teacher: str = ""            # a model folder (any kind lm.generate opens); "": no distillation
    kind: str = "forward_kl"     # "forward_kl", "reverse_kl" (MiniLLM) or "jsd"
    temperature: float = 1.0     # T: both softmaxes at T, the soft term scaled by T^2
    alpha: float = 0.5           # weight of the cross-entropy on the data (1 - alpha: the teacher's)
    teacher_device: str = ""     # where the teacher runs; "": the student's train.device


DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OPTIMIZERS = ("adamw", "adamw8bit")   # train.optimizer; lm.model.GPT.configure_optimizer builds them

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoRAConfig,
            "progressive": ProgressiveConfig,
            "distill": DistillConfig}


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_value(where: str, tp, value):
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(where, args[0], value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list and typing.get_args(tp) == (dict,):   # a YAML list of mappings, checked by validate
        if isinstance(value, list):
            return list(value)
        raise ConfigError(f"{where}: expected a list of mappings (e.g. [{{at: 500, n_layer: 4}}]), got {value!r}")
    elif origin is list:   # a YAML list, or "a,b" on the command line
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where}: expected a list of names, got {value!r}")
    else:
        return value
    raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def _apply_section(obj, section: str, values: dict, source: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got {type(values).__name__}")
    types = _field_types(type(obj))
    for k, v in values.items():
        if k not in types:
            raise ConfigError(f"{source}: unknown key '{section}.{k}'; valid keys in '{section}': "
                              f"{', '.join(sorted(types))}")
        setattr(obj, k, _check_value(f"{source}: {section}.{k}", types[k], v))


def config_from_dict(d: dict, source: str = "config") -> Config:
    cfg = Config()
    if d is None:
        return cfg
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with sections {sorted(SECTIONS)}")
    for section, values in d.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}'; valid sections: {', '.join(SECTIONS)}")
        _apply_section(getattr(cfg, section), section, values or {}, source)
    return cfg


def load_config(path: str | None) -> Config:
    """Read a YAML config (``yaml.safe_load``: no code runs); None gives the defaults."""
    if path is None:
        return Config()
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    return config_from_dict(d, source=path)


def apply_overrides(cfg: Config, overrides: list[str], seen: set | None = None) -> Config:
    """Apply ``section.key=value`` (or unique ``key=value``) strings; values parsed as YAML scalars.

    ``seen``, when given, collects the ``section.key`` names that were set.
    """
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_iters=100)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if "." in key:
            section, name = key.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"override {item!r}: unknown section '{section}'; valid: {', '.join(SECTIONS)}")
        else:
            owners = [s for s, cls in SECTIONS.items() if key in _field_types(cls)]
            if not owners:
                valid = sorted(f"{s}.{k}" for s, cls in SECTIONS.items() for k in _field_types(cls))
                raise ConfigError(f"override {item!r}: unknown key '{key}'; valid keys: {', '.join(valid)}")
            if len(owners) > 1:
                raise ConfigError(f"override {item!r}: '{key}' exists in sections {owners}; "
                                  f"write e.g. {owners[0]}.{key}={raw}")
            section, name = owners[0], key
        _apply_section(getattr(cfg, section), section, {name: value}, "override")
        if seen is not None:
            seen.add(f"{section}.{name}")
    return cfg


def keys_set_by(path: str | None, overrides: list[str]) -> set:
    """The ``section.key`` names a config file and overrides give values to (not the defaults)."""
    seen: set = set()
    if path is not None:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        seen |= {f"{sec}.{k}" for sec, vals in d.items() if isinstance(vals, dict) for k in vals}
    apply_overrides(Config(), overrides, seen)
    return seen


def validate_architecture(m: ModelConfig) -> None:
    """The architecture switches, alone and together (GPT() calls it too)."""
    nkv = m.n_kv_head or m.n_head
    if m.n_kv_head < 0 or m.n_head % nkv:
        raise ConfigError(f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head}): "
                          f"each key/value head serves the same number of query heads (0: n_head)")
    if m.attn_window < 0:
        raise ConfigError(f"model.attn_window must be >= 0 (0: full causal attention), got {m.attn_window}")
    if m.position not in ("learned", "rope"):
        raise ConfigError(f"model.position must be 'learned' or 'rope', got {m.position!r}")
    if m.position == "rope" and (m.n_embd // max(m.n_head, 1)) % 2:
        raise ConfigError(f"model.position=rope rotates pairs of features: the head size "
                          f"n_embd / n_head = {m.n_embd // max(m.n_head, 1)} must be even")
    if m.share_layers < 0 or (m.share_layers and m.n_layer % m.share_layers):
        raise ConfigError(f"model.share_layers ({m.share_layers}) must divide model.n_layer ({m.n_layer}): "
                          f"the layers cycle through that many shared blocks (0: no sharing)")
    if m.low_rank < 0 or m.low_rank >= m.n_embd:
        raise ConfigError(f"model.low_rank must be in [0, n_embd) = [0, {m.n_embd}), got {m.low_rank}: "
                          f"a rank of n_embd or more saves nothing (0: full-rank layers)")
    if m.low_rank_attn and not m.low_rank:
        raise ConfigError("model.low_rank_attn needs model.low_rank > 0 (the rank to use)")
    validate_layers(m)


def validate_layers(m: ModelConfig) -> None:
    """The per-layer widths structured pruning writes (layer_heads, layer_mlp), and how they
    combine with the architecture switches (validate_architecture runs this)."""
    for name, per, top in (("model.layer_heads", m.layer_heads, m.n_head), ("model.layer_mlp", m.layer_mlp, None)):
        if per is None:
            continue
        if not isinstance(per, list) or len(per) != m.n_layer or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in per):
            raise ConfigError(f"{name} must be a list of {m.n_layer} positive integers (one per layer), got {per!r}")
        if top is not None and max(per) > top:
            raise ConfigError(f"{name} cannot exceed model.n_head ({top}) in any layer, got {per!r}")
        k = m.share_layers
        if k and any(per[i] != per[i % k] for i in range(m.n_layer)):
            raise ConfigError(f"{name} with model.share_layers={k}: layer i runs shared block i % {k}, so "
                              f"the widths must repeat with period {k}, got {per!r}")
    # The rule for grouped-query / multi-query attention: structured pruning removes whole heads,
    # each with its own key/value head, so a pruned layer needs n_kv_head = n_head (or 0). Pruning
    # a GQA layer would have to remove kv heads together with their query groups; not supported.
    if m.layer_heads is not None and m.n_kv_head not in (0, m.n_head):
        raise ConfigError(f"{NO_GQA_PRUNING} (model.n_kv_head={m.n_kv_head}, model.n_head={m.n_head}, "
                          f"model.layer_heads={m.layer_heads!r})")


NO_GQA_PRUNING = ("structured head pruning needs model.n_kv_head = 0 or n_head (one key/value head per "
                  "query head); grouped-query / multi-query attention (n_kv_head < n_head) is not supported")


def validate(cfg: Config) -> None:
    """Check every value's range before any folder is made or any step runs (ConfigError names it)."""
    m, t, d = cfg.model, cfg.train, cfg.data

    def need(ok: bool, name: str, rule: str, value) -> None:
        if not ok:
            raise ConfigError(f"{name} must be {rule}, got {value!r}")

    for name, v in (("model.block_size", m.block_size), ("model.n_layer", m.n_layer),
                    ("model.n_head", m.n_head), ("model.n_embd", m.n_embd),
                    ("train.batch_size", t.batch_size), ("train.eval_interval", t.eval_interval),
                    ("train.eval_iters", t.eval_iters), ("train.log_interval", t.log_interval)):
        need(v > 0, name, "positive", v)
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    need(m.vocab_size >= 0, "model.vocab_size", ">= 0 (0: the tokenizer's size)", m.vocab_size)
    need(m.checkpoint_every >= 0, "model.checkpoint_every", ">= 0 (0: off)", m.checkpoint_every)
    need(0.0 <= m.dropout < 1.0, "model.dropout", "in [0, 1)", m.dropout)
    need(m.attention in ATTENTION_IMPLS, "model.attention", "one of " + ", ".join(ATTENTION_IMPLS), m.attention)
    need(m.gelu in ("tanh", "exact"), "model.gelu", "'tanh' or 'exact'", m.gelu)
    validate_architecture(m)
    need(d.tokenizer in ("char", "bpe"), "data.tokenizer", "'char' or 'bpe'", d.tokenizer)
    if d.tokenizer == "bpe":
        need(d.vocab_size >= 256, "data.vocab_size", ">= 256 for a BPE tokenizer (its 256 byte tokens "
             "come first)", d.vocab_size)
    need(0.0 < d.val_fraction < 1.0, "data.val_fraction", "in (0, 1)", d.val_fraction)
    need(t.max_iters >= 0, "train.max_iters", ">= 0", t.max_iters)
    for name, v in (("train.warmup_iters", t.warmup_iters), ("train.lr_decay_iters", t.lr_decay_iters),
                    ("train.sample_tokens", t.sample_tokens), ("train.seed", t.seed)):
        need(v >= 0, name, ">= 0", v)
    finite = lambda v: v == v and abs(v) != float("inf")  # noqa: E731
    need(finite(t.learning_rate) and t.learning_rate > 0, "train.learning_rate", "a positive number",
         t.learning_rate)
    need(finite(t.min_lr) and t.min_lr >= 0, "train.min_lr", "a number >= 0", t.min_lr)
    need(finite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    need(0.0 <= t.beta1 < 1.0, "train.beta1", "in [0, 1)", t.beta1)
    need(0.0 <= t.beta2 < 1.0, "train.beta2", "in [0, 1)", t.beta2)
    need(finite(t.grad_clip) and t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 turns clipping off)", t.grad_clip)
    need(t.dtype in ("float32", "float64"), "train.dtype", "'float32' or 'float64'", t.dtype)
    need(t.optimizer in OPTIMIZERS, "train.optimizer", " or ".join(repr(o) for o in OPTIMIZERS), t.optimizer)
    dev = str(t.device).lower()
    need(dev == "cpu" or dev == "cuda" or re.fullmatch(r"cuda:\d+", dev) is not None, "train.device",
         "'cpu' or 'cuda'", t.device)
    _validate_lora(cfg)
    _validate_progressive(cfg)
    _validate_distill(cfg)


def _validate_progressive(cfg: Config) -> None:
    p, m, t = cfg.progressive, cfg.model, cfg.train
    if p.seqlen_step <= 0:
        raise ConfigError(f"progressive.seqlen_step must be a positive integer, got {p.seqlen_step}")
    if p.schedule not in ("linear", "root", "discrete"):
        raise ConfigError(f"progressive.schedule must be 'linear', 'root' or 'discrete', got {p.schedule!r}")
    if not (p.root_degree == p.root_degree and p.root_degree >= 1):
        raise ConfigError(f"progressive.root_degree must be >= 1 (2: square root), got {p.root_degree}")
    if p.seqlen_start < 0:
        raise ConfigError(f"progressive.seqlen_start must be >= 0 (0: no sequence-length warmup), got {p.seqlen_start}")
    if p.seqlen_start:
        if p.seqlen_start > m.block_size:
            raise ConfigError(f"progressive.seqlen_start={p.seqlen_start} is larger than model.block_size="
                              f"{m.block_size}: the warmup starts shorter than the full length")
        if p.seqlen_start % p.seqlen_step:
            raise ConfigError(f"progressive.seqlen_step={p.seqlen_step} does not divide progressive.seqlen_start="
                              f"{p.seqlen_start}: every length is a multiple of the step")
        if m.block_size % p.seqlen_step:
            raise ConfigError(f"progressive.seqlen_step={p.seqlen_step} does not divide model.block_size="
                              f"{m.block_size}: every length, the full one included, is a multiple of the step")
        if p.total_steps <= 0:
            raise ConfigError(f"progressive.total_steps must be positive with progressive.seqlen_start (the step "
                              f"from which the full length is used), got {p.total_steps}")
    elif p.total_steps < 0:
        raise ConfigError(f"progressive.total_steps must be >= 0, got {p.total_steps}")
    from .progressive import GROW_INITS, check_grow
    p.grow = check_grow(p.grow, m.n_layer)
    if p.grow_init not in GROW_INITS:
        raise ConfigError(f"progressive.grow_init={p.grow_init!r}: valid values are {', '.join(GROW_INITS)}")
    if p.grow:
        for bad, why in ((m.share_layers, "model.share_layers (shared blocks)"),
                         (m.layer_heads is not None or m.layer_mlp is not None,
                          "model.layer_heads / layer_mlp (per-layer widths)"),
                         (t.init_from, "train.init_from (fine-tuning keeps the base's depth)"),
                         (t.log_memory or t.log_grad_stats, "train.log_memory / train.log_grad_stats")):
            if bad:
                raise ConfigError(f"progressive.grow cannot be combined with {why}; remove one of them")



def _validate_distill(cfg: Config) -> None:
    dc = cfg.distill
    if dc.kind not in DISTILL_KINDS:
        raise ConfigError(f"distill.kind must be one of {', '.join(DISTILL_KINDS)}, got {dc.kind!r}")
    if not (dc.temperature == dc.temperature and 0 < dc.temperature < float("inf")):
        raise ConfigError(f"distill.temperature must be a positive number (1: the plain softmax), "
                          f"got {dc.temperature!r}")
    if not 0.0 <= dc.alpha <= 1.0:
        raise ConfigError(f"distill.alpha must be in [0, 1] (the weight of the cross-entropy on the data; "
                          f"0: the teacher's soft targets only), got {dc.alpha!r}")
    dev = str(dc.teacher_device).lower()
    if dev and not (dev in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", dev)):
        raise ConfigError(f"distill.teacher_device must be '', 'cpu' or 'cuda', got {dc.teacher_device!r}")
    if dc.teacher and not os.path.isdir(dc.teacher):
        raise ConfigError(f"distill.teacher={dc.teacher} is not a folder: pass the 'model' folder of a "
                          f"trained run (it holds config.json and the weights)")


def _validate_lora(cfg: Config) -> None:
    lo, t = cfg.lora, cfg.train
    if t.init_from and not os.path.isdir(t.init_from):
        raise ConfigError(f"train.init_from={t.init_from} is not a folder: pass the 'model' folder of a "
                          f"finished run (it holds config.json and the weights)")
    if lo.r is None:
        for k in ("quantize_base", "merge"):
            if getattr(lo, k):
                raise ConfigError(f"lora.{k} needs adapters: set lora.r (e.g. lora.r=8)")
        return
    if lo.r <= 0:
        raise ConfigError(f"lora.r must be a positive integer (e.g. 8), got {lo.r}; "
                          "leave it unset to fine-tune every weight")
    if not t.init_from:
        raise ConfigError("lora.r needs train.init_from=<model folder>: adapters fine-tune a trained model")
    if not lo.targets:
        raise ConfigError("lora.targets is empty; name the layers to adapt, e.g. [c_attn, c_proj, c_fc]")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if lo.alpha <= 0:
        raise ConfigError(f"lora.alpha must be positive, got {lo.alpha}")
    if lo.quantize_base not in ("", "nf4", "q4_0"):
        raise ConfigError(f"lora.quantize_base must be '', 'nf4' or 'q4_0', got {lo.quantize_base!r}")


def save_yaml(cfg: Config, path: str) -> None:
    from minigrad.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
