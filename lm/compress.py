"""Compress a trained model folder into a new one, and report what it cost.

    python -m lm.compress --model_dir output/model --quantize q4_0 --output_dir output/model-q4_0
    python -m lm.compress --model_dir output/model --quantize gptq --calib_data data.txt --output_dir out/gptq
    python -m lm.compress --model_dir output/model --prune wanda --sparsity 0.5 --data data.txt \
        --finetune_iters 200 --quantize q4_0 --output_dir out/wanda50-q4
    python -m lm.compress --model_dir output/model --structured heads=0.25,mlp=0.4 --data data.txt \
        --finetune_iters 200 --output_dir out/structured
    python -m lm.compress --model_dir output/model --rank 64 --finetune_iters 200 --output_dir out/rank64
    python -m lm.compress --model_dir output/model --kv_heads 1 --finetune_iters 200 --data data.txt \
        --output_dir out/mqa                                                  # multi-query, uptrained
    python -m lm.compress --model_dir ft-lora/model --merge_lora --output_dir ft-merged     # a LoRA adapter run

A pipeline: load the folder (``lm.loader.load_model``, any kind it knows), run the chosen
steps in ``STEPS`` order on the model, save the new folder (it opens with the same loader,
so ``lm.generate --model_dir`` runs it as it is), load it back and measure it against the
original with the one compression report (``lm.report``: bytes on disk, validation loss,
KL divergence and same-top-1, decode tokens/s), written as ``compress_report.json`` and
``.md`` in the new folder and printed.

Every flag is checked, and every step's own checks run, before a folder is created or a
model is changed; bad input ends in one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from minigrad import quant
from minigrad.io import atomic_write_text, save_file
from minigrad.sparse import VALUE_SCHEMES

from .loader import QUANTIZED_FORMAT, ModelDirError, detect_kind, load_model, read_config


class CompressError(ValueError):
    """Bad input to lm.compress: the message says what to do."""


@dataclass
class Context:
    """What the steps share: the parsed flags, the source folder, and what they add."""
    args: argparse.Namespace
    model_dir: str
    conf: dict
    kind: str
    tokenizer: object = None
    log: object = print
    sections: dict = field(default_factory=dict)   # config.json sections the steps add
    done: list = field(default_factory=list)       # {"name": ..., ...} of each step that ran
    _data: dict = field(default_factory=dict)

    def corpus(self, source: str | None = None):
        """The TokenDataset of ``source`` (default: ``--data``, else the model's own corpus),
        encoded with the model's tokenizer; read once per source."""
        from .data import prepare_data
        source = source or self.args.data or (self.conf.get("data") or {}).get("corpus") or "python-docs"
        if source not in self._data:
            d = self.conf.get("data") or {}
            self._data[source] = prepare_data(source, tokenizer=self.tokenizer,
                                              val_fraction=d.get("val_fraction", 0.1),
                                              cache_dir=d.get("cache_dir"))
        return self._data[source]


@dataclass
class Step:
    name: str
    wanted: object      # (args) -> bool
    check: object       # (ctx) -> None: raise CompressError before any work
    run: object         # (model, ctx) -> model


# --------------------------------------------------------------------------- quantization
def _check_quantize(ctx: Context) -> None:
    a = ctx.args
    if a.quantize not in quant.SCHEMES:
        raise CompressError(f"unknown --quantize scheme {a.quantize!r}; valid: {', '.join(quant.SCHEMES)}")
    if a.quantize == "gptq" and (a.prune or "sparse" in ctx.conf):
        raise CompressError("--quantize gptq moves every weight of a row to compensate its errors, so it "
                            "would fill the pruned zeros: with pruning use q4_0 or q8_0")
    if any("+" in f or f in VALUE_SCHEMES for f in (ctx.conf.get("sparse") or {}).get("layout", {}).values()):
        raise CompressError(f"{ctx.model_dir} is already pruned and quantized: start from the float model")
    if ctx.kind == "quantized":
        raise CompressError(f"{ctx.model_dir} is already quantized "
                            f"({ctx.conf['quantization'].get('scheme', '?')}): quantize the float model it came from")
    if a.quantize == "gptq":
        if not a.calib_data:
            raise CompressError("--quantize gptq needs calibration text: pass --calib_data FILE "
                                "(a .txt/.jsonl file, a folder, or a built-in corpus name)")
        if a.calib_batches < 1:
            raise CompressError(f"--calib_batches must be at least 1, got {a.calib_batches}")


def _calib_batches(ctx: Context, model):
    from .data import get_batch
    data = ctx.corpus(ctx.args.calib_data)
    rng = np.random.default_rng(ctx.args.seed)
    T = model.config.block_size
    return [get_batch(data.train, ctx.args.calib_batch_size, T, rng)[0] for _ in range(ctx.args.calib_batches)]


def _run_quantize(model, ctx: Context):
    a = ctx.args
    if "sparse" in ctx.conf and "sparse" not in ctx.sections:   # a folder pruned by an earlier run
        ctx.sections["sparse"] = json.loads(json.dumps(ctx.conf["sparse"]))
    if ctx.sections.get("sparse") and a.quantize in VALUE_SCHEMES:
        return _run_sparse_quantize(model, ctx)
    if ctx.sections.pop("sparse", None):
        ctx.log(f"note: {a.quantize} stores every weight, zeros included: the sparsity saves no bytes "
                f"on disk with it (q4_0 and q8_0 store only the kept values)")
    calib = _calib_batches(ctx, model) if a.quantize == "gptq" else None
    quant.quantize_(model, a.quantize, exclude=a.exclude or None, calib=calib,
                    run=lambda m, x: m(x, x), progress=a.progress,
                    gptq_options={"sequential": True} if a.gptq_sequential else None)
    rep = quant.bytes_report(model)
    ctx.sections["quantization"] = {"scheme": a.quantize, "exclude": a.exclude,
                                    **quant.quant_plan(model)}
    ctx.done.append({"name": f"quantize {a.quantize}", "exclude": a.exclude,
                     "calib_batches": a.calib_batches if calib else 0,
                     "bytes": {k: rep[k] for k in ("codes", "scales", "float", "total")}})
    ctx.log(quant.format_bytes_report(rep))
    return model


# --------------------------------------------------------------------------- merging a LoRA adapter
def _check_merge_lora(ctx: Context) -> None:
    if ctx.kind != "lora":
        raise CompressError(f"--merge_lora: {ctx.model_dir} is a {ctx.kind} folder, not a LoRA adapter run "
                            "(lm.train with train.init_from and lora.r writes one)")


def _run_merge_lora(model, ctx: Context):
    """The adapter merged into the float base it was trained on (lm.finetune.merge_adapter_dir)."""
    from .finetune import merge_adapter_dir
    merged, _, conf = merge_adapter_dir(ctx.model_dir)
    # the result is a plain model: it no longer names a base or an adapter
    ctx.conf = {k: v for k, v in ctx.conf.items() if k not in ("lora", "base")}
    ctx.done.append({"name": "merge_lora", "base": conf["base"], "lora": conf["lora"]})
    ctx.log(f"merged the r={conf['lora']['r']} adapter into {conf['base']['path']}"
            + (f" (dequantized from {conf['lora']['quantize_base']})" if conf["lora"].get("quantize_base") else ""))
    return merged


# --------------------------------------------------------------------------- pruning and low rank
# Recovery fine-tuning (lm.recover) distils from the model as loaded, before pruning (or from
# --finetune_teacher): --finetune_distill none for plain cross-entropy.
def _needs_calib(ctx: Context, what: str) -> None:
    if not (ctx.args.data or ctx.args.calib_data):
        raise CompressError(f"{what} ranks weights by their activations and needs calibration text: "
                            f"pass --data FILE (or --calib_data FILE)")


def _float_source(ctx: Context, flag: str) -> None:
    if ctx.kind == "lora" and not ctx.args.merge_lora:
        raise CompressError(f"{flag} needs a plain model, and {ctx.model_dir} is a LoRA adapter run: "
                            f"add --merge_lora (the adapter is merged into its base first)")
    if ctx.kind == "quantized":
        raise CompressError(f"{flag} needs float weights, and {ctx.model_dir} is quantized: "
                            f"start from the float model it came from")


def _check_structured(ctx: Context) -> None:
    from .structured import parse_spec
    _float_source(ctx, "--structured")
    try:
        spec = parse_spec(ctx.args.structured)
    except ValueError as e:
        raise CompressError(str(e)) from None
    m = ctx.conf["model"]
    for k, f in spec.items():
        if not 0.0 <= f < 1.0:
            raise CompressError(f"--structured {k}={f}: give the fraction to remove, in [0, 1)")
    if m.get("n_kv_head", 0) not in (0, m["n_head"]) or m.get("share_layers", 0):
        from .config import ModelConfig
        from .structured import check_prunable
        try:
            check_prunable(ModelConfig(n_head=m["n_head"], n_kv_head=m.get("n_kv_head", 0),
                                       share_layers=m.get("share_layers", 0)))
        except ValueError as e:
            raise CompressError(f"--structured: {e}") from None
    heads = m.get("layer_heads") or [m["n_head"]] * m["n_layer"]
    for i, h in enumerate(heads):
        if round(spec.get("heads", 0.0) * h) >= h:
            raise CompressError(f"--structured heads={spec['heads']} would remove every head of layer {i} "
                                f"({h} heads): keep at least one")
    _needs_calib(ctx, "--structured")
    ctx.args._structured = spec


def _run_structured(model, ctx: Context):
    from .structured import block_parameters, prune_structured_
    n0 = block_parameters(model)
    spec = ctx.args._structured
    # kept MLP widths are multiples of 32 (when wide enough), so the 4-bit block formats apply
    prune_structured_(model, heads=spec.get("heads", 0.0), mlp=spec.get("mlp", 0.0),
                      calib=_calib_batches(ctx, model), mlp_multiple=quant.BLOCK)
    n1 = block_parameters(model)
    ctx.done.append({"name": f"structured {ctx.args.structured}", "layer_heads": model.config.layer_heads,
                     "layer_mlp": model.config.layer_mlp, "block_params": [n0, n1],
                     "importance": "||X_j||_2 * ||W_proj[:, j]||_2 at each block's output projection"})
    ctx.log(f"structured pruning: block parameters {n0:,} -> {n1:,} ({100 * (1 - n1 / n0):.1f}% fewer); "
            f"heads per layer {model.config.layer_heads}, MLP widths {model.config.layer_mlp}")
    return model


def _check_kv_heads(ctx: Context) -> None:
    from .config import ModelConfig
    from .kv_heads import check_poolable
    a = ctx.args
    _float_source(ctx, "--kv_heads")
    if a.structured is not None:
        raise CompressError("--kv_heads and --structured cannot run together (structured pruning needs one "
                            "key/value head per query head): pool in one lm.compress run, or prune in one")
    m = ctx.conf["model"]
    cfg = ModelConfig(**{k: v for k, v in m.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}})
    try:
        check_poolable(cfg, a.kv_heads)
    except ValueError as e:
        raise CompressError(f"--kv_heads {a.kv_heads}: {e}") from None
    if a.finetune_iters <= 0:
        ctx.log("note: --kv_heads without --finetune_iters: the pooled model is saved untrained "
                "(Ainslie et al. uptrain it for a few percent of the pre-training steps)")


def _run_kv_heads(model, ctx: Context):
    from .kv_heads import pool_kv_heads
    n0 = model.config.n_kv_head or model.config.n_head
    p0 = model.num_parameters()
    model = pool_kv_heads(model, ctx.args.kv_heads)
    ctx.done.append({"name": f"kv_heads {ctx.args.kv_heads}", "from": n0, "params": [p0, model.num_parameters()],
                     "method": "mean of each group's key and value projections (Ainslie et al. 2023)"})
    ctx.log(f"key/value heads: {n0} -> {ctx.args.kv_heads} per layer (mean-pooled), parameters "
            f"{p0:,} -> {model.num_parameters():,}; the KV cache holds {ctx.args.kv_heads}/{n0} of the heads")
    return model


def _check_factorize(ctx: Context) -> None:
    a = ctx.args
    _float_source(ctx, "--rank/--energy")
    if a.rank is not None and a.energy is not None:
        raise CompressError("give --rank R or --energy E, not both")
    if a.energy is not None and not 0.0 < a.energy <= 1.0:
        raise CompressError(f"--energy must be in (0, 1] (the share of sum(s^2) to keep), got {a.energy}")
    if a.rank is not None:
        m = ctx.conf["model"]
        hs = m["n_embd"] // m["n_head"]
        smallest = m["n_embd"]
        spec = getattr(a, "_structured", {})
        for h in m.get("layer_heads") or [m["n_head"]] * m["n_layer"]:
            smallest = min(smallest, (h - int(round(spec.get("heads", 0.0) * h))) * hs)
        if a.rank < 1 or a.rank >= smallest:
            raise CompressError(f"--rank must be in [1, {smallest}): a rank >= min(in, out) of a layer "
                                f"(here {smallest}) factorizes nothing")


def _run_factorize(model, ctx: Context):
    from minigrad.nn.lowrank import factorize_
    a = ctx.args
    n0 = model.num_parameters()
    factorize_(model, rank=a.rank, energy=a.energy, targets=a.prune_targets or None)
    ranks = dict(model.low_rank_ranks)
    ctx.sections["low_rank"] = ranks
    ctx.done.append({"name": f"factorize {'rank ' + str(a.rank) if a.rank else 'energy ' + str(a.energy)}",
                     "ranks": ranks, "params": [n0, model.num_parameters()]})
    ctx.log(f"low rank: {len(ranks)} layers factorized, parameters {n0:,} -> {model.num_parameters():,}")
    return model


def _check_prune(ctx: Context) -> None:
    from minigrad.prune import METHODS, SCOPES, parse_pattern
    a = ctx.args
    _float_source(ctx, "--prune")
    if a.prune not in METHODS:
        raise CompressError(f"unknown --prune method {a.prune!r}; valid: {', '.join(METHODS)}")
    if a.scope not in SCOPES:
        raise CompressError(f"unknown --scope {a.scope!r}; valid: {', '.join(SCOPES)}")
    try:
        nm = parse_pattern(a.pattern)
    except ValueError as e:
        raise CompressError(str(e)) from None
    if nm is None and a.sparsity is None:
        raise CompressError("--prune needs --sparsity S (a fraction in [0, 1)) for unstructured pruning")
    if a.sparsity is not None and not 0.0 <= a.sparsity < 1.0:
        raise CompressError(f"--sparsity must be in [0, 1), got {a.sparsity}")
    if nm is not None:
        if a.sparsity is not None and abs(a.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise CompressError(f"--pattern {a.pattern} means --sparsity {1 - nm[0] / nm[1]:g}; drop --sparsity "
                                f"or make them agree")
        m = ctx.conf["model"]
        hs = m["n_embd"] // m["n_head"]
        widths = [m["n_embd"]] + [h * hs for h in m.get("layer_heads") or [m["n_head"]]] + \
            list(m.get("layer_mlp") or [4 * m["n_embd"]])
        bad = [w for w in widths if w % nm[1]]
        if bad:
            raise CompressError(f"--pattern {a.pattern} needs every layer's input size to be a multiple of "
                                f"{nm[1]}; this model has input sizes {sorted(set(bad))}")
    if a.prune == "wanda":
        _needs_calib(ctx, "--prune wanda")


def _run_prune(model, ctx: Context):
    from minigrad.prune import prune_, sparsity_of
    from minigrad.sparse import layout_for
    a = ctx.args
    calib = _calib_batches(ctx, model) if a.prune == "wanda" else None
    nm = a.pattern != "unstructured"
    prune_(model, a.prune, sparsity=None if nm else a.sparsity, pattern=a.pattern,
           scope=a.scope, calib=calib, targets=a.prune_targets or None, run=lambda m, x: m(x))
    got = sparsity_of(model, a.prune_targets or None)["total"]
    ctx.sections["sparse"] = {"pattern": a.pattern, "layout": layout_for(model, a.pattern)}
    ctx.done.append({"name": f"prune {a.prune} {a.pattern}" + ("" if nm else f" {a.sparsity:g}"),
                     "scope": a.scope, "sparsity": got, "calib_batches": len(calib) if calib else 0})
    ctx.log(f"pruned {a.prune} {a.pattern}: {100 * got:.1f}% of the pruned layers' weights are zero "
            f"(stored compactly; no speed-up is claimed: the matmuls stay dense)")
    return model


def _check_finetune(ctx: Context) -> None:
    a = ctx.args
    _float_source(ctx, "--finetune_iters")
    if a.finetune_lr <= 0:
        raise CompressError(f"--finetune_lr must be > 0, got {a.finetune_lr}")
    if a.finetune_distill == "none":
        return
    if not 0.0 <= a.finetune_alpha <= 1.0:
        raise CompressError(f"--finetune_alpha must be in [0, 1] (the weight of the cross-entropy), "
                            f"got {a.finetune_alpha}")
    if not 0 < a.finetune_temperature < float("inf"):
        raise CompressError(f"--finetune_temperature must be a positive number, got {a.finetune_temperature}")
    if a.finetune_teacher is not None and not os.path.isdir(a.finetune_teacher):
        raise CompressError(f"--finetune_teacher {a.finetune_teacher} is not a folder: pass a model folder "
                            f"(default: --model_dir, the model before pruning)")


def _run_finetune(model, ctx: Context):
    from minigrad.prune import restore_masks_
    from .recover import finetune
    a = ctx.args
    if "sparse" in ctx.conf and not ctx.sections.get("sparse"):   # a pruned folder: keep its zeros
        restore_masks_(model)
        ctx.sections["sparse"] = ctx.conf["sparse"]
    teacher, loss_name = None, "cross-entropy (no distillation)"
    if a.finetune_distill != "none":   # the dense model, loaded again: the one being pruned has changed
        from .config import ConfigError, DistillConfig
        from .distill import load_teacher
        dc = DistillConfig(teacher=a.finetune_teacher or ctx.model_dir, kind=a.finetune_distill,
                           temperature=a.finetune_temperature, alpha=a.finetune_alpha)
        try:
            teacher = load_teacher(dc, ctx.tokenizer, model.config.block_size, model.config.vocab_size,
                                   model.device, ctx.log)
        except ConfigError as e:
            raise CompressError(str(e).replace("distill.teacher=", "--finetune_teacher ")) from None
        loss_name = (f"{a.finetune_alpha:g} * cross-entropy + {1 - a.finetune_alpha:g} * T^2 {a.finetune_distill} "
                     f"from {dc.teacher} (T {a.finetune_temperature:g})")
    losses = finetune(model, ctx.corpus().train, a.finetune_iters, lr=a.finetune_lr,
                      batch_size=a.finetune_batch_size, seed=a.seed, progress=a.progress, teacher=teacher,
                      kind=a.finetune_distill, temperature=a.finetune_temperature, alpha=a.finetune_alpha)
    del teacher
    ctx.done.append({"name": f"finetune {a.finetune_iters}", "loss": loss_name,
                     "lr": a.finetune_lr, "first_loss": losses[0], "last_loss": losses[-1]})
    ctx.log(f"recovery fine-tune: {a.finetune_iters} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return model


def _run_sparse_quantize(model, ctx: Context):
    """Prune, then quantize: the kept values of each pruned weight go into q4_0/q8_0 blocks
    (``minigrad.sparse``), the tied embedding into plain blocks; the rest stays float."""
    from minigrad.sparse import stored_bytes
    a = ctx.args
    sp = ctx.sections["sparse"]
    base = "bitmask" if sp["pattern"] == "unstructured" else sp["pattern"]
    layout = {n: f"{base}+{a.quantize}" for n in sp["layout"]}
    wte = "transformer.wte.weight"
    if model.transformer.wte.weight.shape[1] % quant.BLOCK == 0:
        layout[wte] = a.quantize
    sp["layout"] = layout
    b = stored_bytes(model.state_dict(), layout)
    ctx.done.append({"name": f"quantize {a.quantize} (kept values only)", "bytes": b})
    ctx.log(f"prune + {a.quantize}: tensor bytes {b['dense']:,} -> {b['packed']:,} "
            f"({100 * b['packed'] / b['dense']:.1f}%)")
    return model


# Steps run in this order on the loaded model. A technique adds its flags in add_arguments()
# and one Step here: merging a LoRA adapter first, then pruning and low-rank factorization,
# and quantization last (it packs the weights that the others change).
STEPS: list[Step] = [
    Step("merge_lora", lambda a: a.merge_lora, _check_merge_lora, _run_merge_lora),
    Step("structured", lambda a: a.structured is not None, _check_structured, _run_structured),
    Step("kv_heads", lambda a: a.kv_heads is not None, _check_kv_heads, _run_kv_heads),
    Step("factorize", lambda a: a.rank is not None or a.energy is not None, _check_factorize, _run_factorize),
    Step("prune", lambda a: a.prune is not None, _check_prune, _run_prune),
    Step("finetune", lambda a: a.finetune_iters > 0, _check_finetune, _run_finetune),
    Step("quantize", lambda a: a.quantize is not None, _check_quantize, _run_quantize),
]


# --------------------------------------------------------------------------- saving
def save_compressed(model, tokenizer, ctx: Context, out_dir: str) -> None:
    """model.safetensors (packed arrays as they are), config.json (the source's, plus the
    sections the steps added), tokenizer.json."""
    os.makedirs(out_dir, exist_ok=True)
    quantized = "quantization" in ctx.sections or "quantization" in ctx.conf
    meta = {"format": QUANTIZED_FORMAT if quantized else "minigrad-gpt",
            "compress_steps": json.dumps(ctx.done)}
    if quantized:
        meta["quantization"] = json.dumps(ctx.sections.get("quantization") or ctx.conf["quantization"])
    state = model.state_dict()
    sparse = ctx.sections.get("sparse")
    if sparse:   # pruned weights packed (minigrad.sparse); the loader's 'pruned' kind unpacks them
        from minigrad.sparse import LAYOUT_KEY, pack_state
        state, layout = pack_state(state, sparse["layout"])
        meta[LAYOUT_KEY] = json.dumps(layout)
        meta["format"] = "minigrad-gpt-sparse"
        meta.pop("quantization", None)
    if rest_dtype(ctx.args) == "float16":
        # the float tensors that stay (norms, biases, position embeddings) as float16 on disk;
        # loading casts them back to the parameters' float32
        from minigrad.sparse import PACKED_SUFFIXES
        packed = {f"{n}.{b}" for n, m in model.named_modules() for b in getattr(m, "_buffers", {})
                  if getattr(m, "_keep_buffer_dtypes", False)}
        state = {k: (v.astype(np.float16) if k not in packed and not k.endswith(PACKED_SUFFIXES)
                     and v.dtype == np.float32 else v)
                 for k, v in state.items()}
        meta["rest_dtype"] = "float16"
    save_file(state, os.path.join(out_dir, "model.safetensors"), meta)
    conf = {k: v for k, v in ctx.conf.items()}
    conf.update(ctx.sections)
    conf["model"] = dataclasses.asdict(model.config)   # structured pruning changes the shapes
    conf.pop("quantization" if sparse else "sparse", None)   # one of the two describes the weights
    conf["compress"] = {"source": os.path.abspath(ctx.model_dir), "steps": ctx.done}
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(conf, indent=2))
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))


FOUR_BIT = ("q4_0", "gptq", "nf4")


def rest_dtype(args) -> str:
    """The file dtype of the float tensors that stay: --rest_dtype, where auto is float16 with a
    4-bit scheme (the norms, biases and position embeddings are then ~10% of a small model's
    file, and float16 changes its loss by under 1e-5 nats) and float32 otherwise."""
    if args.rest_dtype != "auto":
        return args.rest_dtype
    return "float16" if getattr(args, "quantize", None) in FOUR_BIT else "float32"


# --------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_dir", default="output/model", help="the model folder to compress (any kind lm.generate opens)")
    p.add_argument("--output_dir", required=True, help="new folder for the compressed model (must not exist, or be empty)")
    p.add_argument("--data", default=None,
                   help="corpus for the report's validation split (default: the corpus named in the model's config.json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("quantization")
    g.add_argument("--quantize", default=None, metavar="SCHEME", help="one of " + ", ".join(quant.SCHEMES))
    g.add_argument("--exclude", default="", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated layer names to keep in float, e.g. lm_head or c_proj")
    g.add_argument("--rest_dtype", default="auto", choices=("auto", "float32", "float16"),
                   help="file dtype of the float tensors that are not quantized (norms, biases, wpe); "
                        "auto: float16 with a 4-bit --quantize (" + ", ".join(FOUR_BIT) + "), else float32")
    g.add_argument("--calib_data", default=None, help="calibration text for gptq (file, folder or built-in name)")
    g.add_argument("--calib_batches", type=int, default=8, help="calibration batches for gptq")
    g.add_argument("--calib_batch_size", type=int, default=8, help="sequences per calibration batch")
    g.add_argument("--gptq_sequential", action="store_true",
                   help="gptq: each layer's Hessian from a pass through the model quantized so far "
                        "(one calibration pass per layer; default: one pass over the float model)")
    g = p.add_argument_group("pruning and low rank (run before --quantize: prune, then quantize)")
    g.add_argument("--prune", default=None, metavar="METHOD", help="magnitude or wanda (wanda needs --data)")
    g.add_argument("--sparsity", type=float, default=None, help="fraction of weights to prune, in [0, 1)")
    g.add_argument("--pattern", default="unstructured", help="unstructured, 2:4 or 4:8 (N of every M inputs kept)")
    g.add_argument("--scope", default="layer", help="layer (each layer reaches the sparsity) or global")
    g.add_argument("--prune_targets", default="", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated module names to prune/factorize (default: every untied Linear)")
    g.add_argument("--structured", default=None, metavar="SPEC",
                   help="remove whole heads and MLP channels, e.g. heads=0.25,mlp=0.3 (needs --data)")
    g.add_argument("--kv_heads", type=int, default=None, metavar="N",
                   help="N key/value heads per layer (1: multi-query), each the mean of its group's "
                        "(lm.kv_heads); follow with --finetune_iters to uptrain")
    g.add_argument("--rank", type=int, default=None, help="factorize Linear layers by truncated SVD to this rank")
    g.add_argument("--energy", type=float, default=None, help="or: per layer, the rank keeping this share of sum(s^2)")
    g.add_argument("--finetune_iters", type=int, default=0,
                   help="recovery fine-tune steps after pruning/factorizing (on --data; loss: --finetune_distill)")
    g.add_argument("--finetune_lr", type=float, default=3e-4, help="peak learning rate of the recovery fine-tune")
    g.add_argument("--finetune_batch_size", type=int, default=16, help="sequences per recovery step")
    g.add_argument("--finetune_distill", default="forward_kl", choices=("none", "forward_kl", "reverse_kl", "jsd"),
                   help="recovery loss: distillation from the unpruned model (lm.distill; default forward_kl), "
                        "or none: plain cross-entropy")
    g.add_argument("--finetune_teacher", default=None, metavar="DIR",
                   help="the teacher of the recovery fine-tune (default: --model_dir, the model before pruning)")
    g.add_argument("--finetune_alpha", type=float, default=0.5, help="weight of the cross-entropy in the recovery loss")
    g.add_argument("--finetune_temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--merge_lora", action="store_true",
                   help="--model_dir is a LoRA adapter run: write base + adapter merged into one float model")
    r = p.add_argument_group("report")
    r.add_argument("--no_report", action="store_true", help="save only; skip the before/after measurement")
    r.add_argument("--eval_batches", type=int, default=40, help="validation batches (0: the whole split)")
    r.add_argument("--batch_size", type=int, default=16, help="sequences per validation batch")
    r.add_argument("--decode_tokens", type=int, default=128, help="new tokens per decode-speed run")
    r.add_argument("--repeats", type=int, default=3, help="timed decode runs per model (median)")
    r.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-compress", description="Quantize (and otherwise compress) a trained model folder.")
    add_arguments(p)
    return p


def _validate(args) -> Context:
    if not os.path.isdir(args.model_dir):
        raise CompressError(f"--model_dir {args.model_dir} is not a folder: pass the 'model' folder lm.train wrote")
    kind = detect_kind(args.model_dir)
    ctx = Context(args=args, model_dir=args.model_dir, conf=read_config(args.model_dir), kind=kind)
    if os.path.abspath(args.output_dir) == os.path.abspath(args.model_dir):
        raise CompressError("--output_dir must differ from --model_dir (the source is never overwritten)")
    if os.path.exists(args.output_dir) and (not os.path.isdir(args.output_dir) or os.listdir(args.output_dir)):
        raise CompressError(f"--output_dir {args.output_dir} exists and is not empty: choose a new folder")
    steps = [s for s in STEPS if s.wanted(args)]
    if not steps:
        raise CompressError("nothing to do: choose a step, e.g. --quantize q8_0 (schemes: "
                            + ", ".join(quant.SCHEMES) + "), --prune wanda --sparsity 0.5, "
                            "--structured heads=0.25,mlp=0.3, --rank 64 or --merge_lora")
    if args.finetune_iters < 0:
        raise CompressError(f"--finetune_iters must be >= 0, got {args.finetune_iters}")
    for n in ("eval_batches", "decode_tokens", "batch_size", "repeats", "calib_batch_size", "finetune_batch_size"):
        if getattr(args, n) < (0 if n == "eval_batches" else 1):
            raise CompressError(f"--{n} must be {'>= 0' if n == 'eval_batches' else '>= 1'}, got {getattr(args, n)}")
    for s in steps:
        s.check(ctx)
    return ctx


def compress(args, log=print) -> dict:
    """Run the pipeline for parsed ``args``; returns the report dict ({} with --no_report)."""
    ctx = _validate(args)
    ctx.log = log
    steps = [s for s in STEPS if s.wanted(args)]
    model, tok = load_model(args.model_dir, args.device)
    ctx.tokenizer = tok
    if args.quantize == "gptq" or args.prune == "wanda" or args.structured:
        ctx.corpus(args.calib_data)                  # a bad corpus fails before any work
    if not args.no_report:
        ctx.corpus()
    for s in steps:
        model = s.run(model, ctx)
    save_compressed(model, tok, ctx, args.output_dir)
    log(f"saved {args.output_dir}")
    if args.no_report:
        return {}
    from .report import compare_models, write_report
    del model
    before, _ = load_model(args.model_dir, args.device)
    after, _ = load_model(args.output_dir, args.device)   # what was saved is what is measured
    val = ctx.corpus().val
    rep = compare_models(before, after, val, before_dir=args.model_dir, after_dir=args.output_dir,
                         steps=ctx.done, batch_size=args.batch_size, max_batches=args.eval_batches or None,
                         decode_tokens=args.decode_tokens, repeats=args.repeats, progress=args.progress)
    log(write_report(args.output_dir, rep))
    return rep


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        compress(args)
    except (CompressError, ModelDirError, quant.QuantError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
