"""Compress a trained model folder into a new one, and report what it cost.

    python -m lm.compress --model_dir output/model --quantize q4_0 --output_dir output/model-q4_0
    python -m lm.compress --model_dir output/model --quantize gptq --calib_data data.txt --output_dir out/gptq
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
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from minigrad import quant
from minigrad.io import atomic_write_text, save_file

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
    calib = _calib_batches(ctx, model) if a.quantize == "gptq" else None
    quant.quantize_(model, a.quantize, exclude=a.exclude or None, calib=calib,
                    run=lambda m, x: m(x, x), progress=a.progress)
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


# Steps run in this order on the loaded model. A technique adds its flags in add_arguments()
# and one Step here: merging a LoRA adapter first, then pruning and low-rank factorization,
# and quantization last (it packs the weights that the others change).
STEPS: list[Step] = [
    Step("merge_lora", lambda a: a.merge_lora, _check_merge_lora, _run_merge_lora),
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
    save_file(model.state_dict(), os.path.join(out_dir, "model.safetensors"), meta)
    conf = {k: v for k, v in ctx.conf.items()}
    conf.update(ctx.sections)
    conf["compress"] = {"source": os.path.abspath(ctx.model_dir), "steps": ctx.done}
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(conf, indent=2))
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))


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
    g.add_argument("--calib_data", default=None, help="calibration text for gptq (file, folder or built-in name)")
    g.add_argument("--calib_batches", type=int, default=8, help="calibration batches for gptq")
    g.add_argument("--calib_batch_size", type=int, default=8, help="sequences per calibration batch")
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
                            + ", ".join(quant.SCHEMES) + ") or --merge_lora")
    for n in ("eval_batches", "decode_tokens", "batch_size", "repeats", "calib_batch_size"):
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
    if args.quantize == "gptq":
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
