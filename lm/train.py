"""Train a GPT: ``python -m lm.train --config configs/default.yaml --output_dir output``.

What a run writes under ``output_dir``:

- ``model/``: ``model.safetensors`` (best validation loss so far), ``config.json``,
  ``tokenizer.json``: everything ``lm.generate`` needs;
- ``checkpoint.safetensors``: the last save, for ``--resume``: weights, optimizer state and,
  in its metadata, the step, the random states and the config. One file written
  atomically, so a run killed at any moment resumes from its last save;
- ``metrics.jsonl``: one JSON line per step (and one per evaluation); with distillation
  (``distill.teacher``, lm.distill) a step's ``loss`` is the mixed loss and ``ce``, ``kd`` its terms;
- ``loss.png``: the loss curves and gradient norms.

Progressive training (``progressive:``, lm.progressive): each step row also has ``seqlen`` (the
length its batch was cut to) and ``n_layer`` (the depth it trained at); growth steps are dashed
lines on ``loss.png``; the checkpoint's ``n_layer`` metadata is the current depth.

Rules of the command line (``main``), checked before any folder is created or any step runs:

- every value is validated (``lm.config.validate``), the corpus is read and the device found;
- an ``--output_dir`` that already holds a run is refused unless ``--resume`` (continue it) or
  ``--overwrite`` (delete that run's files, start again) is given;
- ``--resume`` continues with the model, data and lora settings and the ``train.init_from`` saved
  in the checkpoint: values of those given again on the command line or in ``--config`` that
  differ from the checkpoint's are refused, naming each; training settings (``--max_iters``, the
  learning rate...) and ``lora.merge`` may change. In a fine-tuning run the model section (all
  but ``model.dropout``) and ``data.tokenizer`` are the base's, not the user's;
- ``train.init_from`` is loaded and checked (its tokenizer covers the text, ``lora.targets``
  name layers it has, ``lora.quantize_base`` packs it) before the folder is created too;
- temporary files left by a save that was killed (``.checkpoint.safetensors.*.tmp``) are deleted;
- on resume, ``metrics.jsonl`` is cut back to the checkpoint's step (the steps after it are run
  again), and ``summary.json``'s ``wall_s`` counts every part of the run, killed ones included;
- Ctrl-C says at which step the last save was and prints the command that continues the run.

Fine-tuning (``train.init_from``, the ``lora`` section, ``--merge``): see ``lm.finetune``; an
adapter run's ``model/`` holds the adapter and a reference to its base, and its checkpoint
holds the adapter and its optimizer state only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np

import minigrad as mg
from minigrad import backend
from minigrad.io import atomic_write_text, load_file, load_metadata, save_file
from minigrad.kernels.cores import Governor
from minigrad.nn.lora import has_lora, load_lora_state_dict, lora_state_dict

from .cli import ToolError, add_debug_flag, run_tool
from .config import Config, ConfigError, ModelConfig, apply_overrides, keys_set_by, load_config, validate
from .data import get_batch, prepare_data
from .distill import load_teacher, make_step_loss, plain_loss
from .finetune import ADAPTER, load_base, prepare_model, save_adapter_dir
from .model import GPT
from .progressive import SeqlenSchedule, cut_batch, describe, grow_stack, layers_at
from .probes import StepProbe

CHECKPOINT = "checkpoint.safetensors"


# what a run writes into output_dir (and, for "model", into output_dir/model): --overwrite deletes these
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "summary.json", "loss.png", "memory.png", "grad_flow.png")
MODEL_FILES = ("model.safetensors", ADAPTER, "config.json", "tokenizer.json")
# minigrad.io.atomic_write's temporary names: ".<target>.<random>.tmp"
_TMP_RE = re.compile(r"^\.(?P<target>[^/]+)\.[A-Za-z0-9_]{4,}\.tmp$")


class TrainingDiverged(ToolError):
    def __init__(self, message: str):
        super().__init__(message, code=1)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a callback's KeyboardInterrupt) during training; says what was saved."""

    def __init__(self, step: int, saved_step: int | None, ckpt_path: str):
        super().__init__(step, saved_step, ckpt_path)
        self.step, self.saved_step, self.ckpt_path = step, saved_step, ckpt_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-train", description="Train a GPT language model on minigrad.")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--data", default=None, help="corpus: .txt/.jsonl file, folder, or built-in name "
                                                "(python-docs, shakespeare); overrides data.corpus")
    p.add_argument("--output_dir", default="output", help="where the model, checkpoint and logs go")
    p.add_argument("--seed", type=int, default=None, help="random seed (overrides train.seed)")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint.safetensors")
    p.add_argument("--overwrite", action="store_true",
                   help="output_dir holds a run already: delete its files and start a new run")
    p.add_argument("--device", default=None, help="cpu or cuda (overrides train.device)")
    p.add_argument("--max_iters", type=int, default=None, help="overrides train.max_iters")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--init_from", default=None, help="a trained model folder to fine-tune (sets train.init_from)")
    p.add_argument("--merge", action="store_true", help="LoRA runs: output_dir/model is a merged stand-alone "
                                                       "model instead of the adapter (sets lora.merge)")
    from .knn import add_memory_args
    add_memory_args(p, writable=False)   # --memory STORE: evaluations also report val loss with the memory
    add_debug_flag(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. model.n_layer=2 train.learning_rate=3e-4 (anywhere among the flags)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags and ``key=value`` overrides in any order."""
    return build_parser().parse_intermixed_args(argv)


def resolve_config(args) -> Config:
    cfg = load_config(args.config)
    apply_overrides(cfg, args.overrides)
    if args.data is not None:
        cfg.data.corpus = args.data
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.device is not None:
        cfg.train.device = args.device
    if args.max_iters is not None:
        cfg.train.max_iters = args.max_iters
    if args.no_progress:
        cfg.train.progress = False
    if args.init_from is not None:
        cfg.train.init_from = args.init_from
    if args.merge:
        cfg.lora.merge = True
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- checkpoints
def _rng_to_json(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def _rng_from_json(s: str) -> np.random.Generator:
    state = json.loads(s)
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def save_checkpoint(path: str, model: GPT, opt, step: int, batch_rng, best_val: float, cfg: Config) -> None:
    # an adapter run saves the adapter only: the frozen base is reloaded from train.init_from
    tensors = {f"model.{k}": v for k, v in (lora_state_dict(model) if has_lora(model) else model.state_dict()).items()}
    sd = opt.state_dict()
    scalars = {}
    for name, st in sd["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape") and getattr(v, "ndim", 0) > 0:
                tensors[f"optim.{name}.{k}"] = v
            else:
                scalars[f"{name}.{k}"] = v
    meta = {
        "step": str(step),
        "best_val": repr(best_val),
        "batch_rng": _rng_to_json(batch_rng),
        "minigrad_rng": json.dumps(backend.get_rng_state(np)),
        "optim_scalars": json.dumps(scalars),
        "optim_groups": json.dumps(sd["param_groups"]),
        "optim_step_count": str(sd["step_count"]),
        "config": json.dumps(cfg.to_dict()),
        "n_layer": str(model.config.n_layer),   # progressive.grow: the depth now (the config has the first)
        **({"init_from": json.dumps(model.init_from)} if hasattr(model, "init_from") else {}),
    }
    save_file(tensors, path, meta)


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(arrays, metadata) of a checkpoint, or a ToolError saying it cannot be resumed from."""
    try:
        meta = load_metadata(path)
        arrays = load_file(path)
        for key in ("step", "best_val", "batch_rng", "minigrad_rng", "optim_scalars", "optim_groups",
                    "optim_step_count", "config"):
            if key not in meta:
                raise ValueError(f"its metadata has no {key!r}")
        json.loads(meta["config"])
        int(meta["step"])
    except (OSError, ValueError) as e:   # json.JSONDecodeError is a ValueError
        raise ToolError(f"--resume: {path} is not a checkpoint this trainer can continue from "
                        f"({e}); it may be truncated. Start again with --overwrite, or use another "
                        f"--output_dir") from None
    return arrays, meta


def load_checkpoint(path: str, model: GPT, opt, arrays: dict | None = None, meta: dict | None = None):
    if arrays is None or meta is None:
        arrays, meta = read_checkpoint(path)
    weights = {k[6:]: v for k, v in arrays.items() if k.startswith("model.")}
    if has_lora(model):   # the base was reloaded from train.init_from: it must be the one the run started on
        if "init_from" in meta and json.loads(meta["init_from"])["sha256"] != model.init_from["sha256"]:
            raise ConfigError(f"--resume: the base model {model.init_from['path']} has changed since this run "
                              f"started; restore it, or start the fine-tuning again without --resume")
        load_lora_state_dict(model, weights, where=path)
    else:
        try:
            model.load_state_dict(weights)
        except KeyError as e:   # StateDictError: another architecture's weights
            raise ToolError(f"--resume: the weights in {path} do not fit the model its config describes "
                            f"({str(e).splitlines()[-1].strip()})") from None
    scalars = json.loads(meta["optim_scalars"])
    state: dict = {}
    for k, v in arrays.items():
        if k.startswith("optim."):
            name, key = k[6:].rsplit(".", 1)
            state.setdefault(name, {})[key] = v
    for k, v in scalars.items():
        name, key = k.rsplit(".", 1)
        state.setdefault(name, {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["optim_groups"]),
                         "step_count": int(meta["optim_step_count"])})
    backend.set_rng_state(json.loads(meta["minigrad_rng"]), np)
    return int(meta["step"]), _rng_from_json(meta["batch_rng"]), float(meta["best_val"])


def save_model_dir(model_dir: str, model: GPT, tokenizer, cfg: Config, extra: dict | None = None) -> None:
    """Weights, model config and tokenizer: everything generation needs."""
    if has_lora(model):   # the adapter and a reference to its base (lm.finetune)
        return save_adapter_dir(model_dir, model, tokenizer, cfg, extra)
    os.makedirs(model_dir, exist_ok=True)
    save_file(model.state_dict(), os.path.join(model_dir, "model.safetensors"),
              {"format": "minigrad-gpt", **({k: json.dumps(v) for k, v in (extra or {}).items()})})
    m_cfg = model.config if isinstance(getattr(model, "config", None), ModelConfig) else cfg.model   # grown: its depth
    atomic_write_text(os.path.join(model_dir, "config.json"),
                      json.dumps({"model": asdict(m_cfg), "data": asdict(cfg.data)}, indent=2))
    tokenizer.save(os.path.join(model_dir, "tokenizer.json"))
    # an adapter of an earlier save (a resumed run that now merges) would be a second model here
    stale = os.path.join(model_dir, ADAPTER)
    if os.path.exists(stale):
        os.remove(stale)


# --------------------------------------------------------------------------- the output folder
def check_output_dir(output_dir: str, resume: bool = False, overwrite: bool = False,
                     existing_run_ok: bool = False) -> None:
    """Refuse, before anything is written, an output_dir that training cannot or must not use.

    Without ``resume``, ``overwrite`` or ``existing_run_ok``, a folder that holds a run is refused.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in "
                          f"{output_dir}, --overwrite deletes it")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir} is a file, not a folder: choose another --output_dir")
    parent = os.path.abspath(output_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--output_dir {output_dir} lies under {parent}, which is a file: choose another "
                          f"--output_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {output_dir}: no permission to write in {parent}; choose a folder "
                          f"you can write to")
    model_dir = os.path.join(output_dir, "model")
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir} is a file, but training writes its model folder there: move the "
                          f"file away or choose another --output_dir")
    ckpt = os.path.join(output_dir, CHECKPOINT)
    if resume:
        if not os.path.isfile(ckpt):
            raise ConfigError(f"--resume: no checkpoint at {ckpt}; start a new run without --resume")
    elif not (overwrite or existing_run_ok) and holds_run(output_dir):
        raise ConfigError(f"{output_dir} holds a run already; continue it with --resume, or replace it "
                          f"with --overwrite (or choose another --output_dir)")


def holds_run(output_dir: str) -> bool:
    """Whether output_dir has a checkpoint, metrics or a model written by a run."""
    return (any(os.path.exists(os.path.join(output_dir, f)) for f in (CHECKPOINT, "metrics.jsonl"))
            or any(os.path.exists(os.path.join(output_dir, "model", f)) for f in MODEL_FILES))


def remove_run(output_dir: str) -> None:
    """--overwrite: delete the files a run wrote (nothing else in the folder)."""
    for f in RUN_FILES:
        if os.path.isfile(os.path.join(output_dir, f)):
            os.remove(os.path.join(output_dir, f))
    model_dir = os.path.join(output_dir, "model")
    for f in MODEL_FILES:
        if os.path.isfile(os.path.join(model_dir, f)):
            os.remove(os.path.join(model_dir, f))


def remove_stale_tmp(output_dir: str, log=print) -> int:
    """Delete the temporary files of our atomic writes that a kill left behind; returns bytes freed."""
    ours = set(RUN_FILES) | set(MODEL_FILES)
    freed, n = 0, 0
    for folder in (output_dir, os.path.join(output_dir, "model")):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            m = _TMP_RE.match(name)
            if (m and m.group("target") in ours) or name == "loss.png.tmp.png":   # plot_training's
                path = os.path.join(folder, name)
                try:
                    size = os.path.getsize(path)
                    os.remove(path)
                except OSError:
                    continue
                freed, n = freed + size, n + 1
    if n:
        log(f"removed {n} temporary file(s) of an interrupted save ({freed / 1e6:.1f} MB)")
    return freed


def resume_settings(cfg: Config, saved: dict, given: set, ckpt_path: str, log=print) -> None:
    """Take the checkpoint's model, data and lora settings and its ``train.init_from``; refuse
    values given now that differ from them.

    ``given``: the ``section.key`` names set on the command line or in the config file. In a
    fine-tuning run (``train.init_from``) the model section, but ``model.dropout``, and
    ``data.tokenizer`` are set by the base (``lm.finetune.load_base``), not by the user: values
    given for them are overridden on every run, so they are not compared here either.
    ``lora.merge`` (how ``model/`` is written) and the ``distill`` section may change: given now,
    they win; else the checkpoint's are kept.
    """
    saved_train = saved.get("train", {})
    if cfg.train.init_from or saved_train.get("init_from"):
        given = {k for k in given if not ((k.startswith("model.") and k != "model.dropout") or k == "data.tokenizer")}
    conflicts, taken = [], []
    sections = [(s, getattr(cfg, s), saved.get(s, {})) for s in ("model", "data", "lora")]
    sections.append(("train", cfg.train, {"init_from": saved_train.get("init_from", ""),
                                          "optimizer": saved_train.get("optimizer", "adamw")}))   # its state's form
    for section, current, old in sections:
        for k, v in old.items():
            if not hasattr(current, k) or k == "cache_dir":   # a cache location may move
                continue
            now = getattr(current, k)
            if section == "model" and k == "vocab_size" and now == 0:   # 0: "from the tokenizer"
                now = v
            if (section, k) == ("train", "init_from") and now and v and os.path.abspath(now) == os.path.abspath(v):
                now = v
            if (section, k) == ("lora", "merge") and "lora.merge" in given:
                continue
            if now == v:
                continue
            if f"{section}.{k}" in given:
                what = f"--data {now}" if (section, k) == ("data", "corpus") else f"{section}.{k}={now!r}"
                conflicts.append(f"{what} (the checkpoint has {v!r})")
            else:
                taken.append(f"{section}.{k}={v!r}")
            setattr(current, k, v)
    for k, v in saved.get("distill", {}).items():   # distillation goes on as it started, unless given again
        if hasattr(cfg.distill, k) and f"distill.{k}" not in given and getattr(cfg.distill, k) != v:
            setattr(cfg.distill, k, v)
            taken.append(f"distill.{k}={v!r}")
    for k, v in saved.get("progressive", {}).items():   # so do the seqlen warmup and the growth steps
        if hasattr(cfg.progressive, k) and f"progressive.{k}" not in given and getattr(cfg.progressive, k) != v:
            setattr(cfg.progressive, k, v)
            taken.append(f"progressive.{k}={v!r}")
    if conflicts:
        raise ConfigError(f"--resume continues the run in {ckpt_path} with its own model and data, but "
                          f"these differ: {'; '.join(conflicts)}. Drop them to resume, or start a new run "
                          f"with them (--overwrite, or another --output_dir)")
    if taken:
        log(f"note: resuming with the checkpoint's settings {', '.join(taken)}")


def trim_metrics(metrics_path: str, step: int, keep_eval_at_step: bool) -> float:
    """Cut metrics.jsonl back to ``step`` (what resuming from there repeats); returns the wall
    seconds that all earlier parts of the run took, the killed steps after ``step`` included."""
    if not os.path.isfile(metrics_path):
        return 0.0
    kept, wall = [], 0.0
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:   # a line cut short by the kill
                continue
            wall = max(wall, float(r.get("wall_s", 0.0)))
            s_ = r.get("step", 0)
            if s_ < step or (s_ == step and (r.get("kind") != "eval" or keep_eval_at_step)):
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(metrics_path, "".join(kept))
    return wall


# --------------------------------------------------------------------------- evaluation
@mg.no_grad()
def estimate_loss(model: GPT, data, cfg: Config, seed: int) -> dict:
    """Mean loss over ``eval_iters`` random batches per split, the same batches at every call."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        rng = np.random.default_rng(seed)
        losses = []
        for _ in range(cfg.train.eval_iters):
            x, y = get_batch(data.split(split), cfg.train.batch_size, cfg.model.block_size, rng)
            _, loss = model(_dev(x, cfg), _dev(y, cfg))
            losses.append(loss.item())
        out[split] = float(np.mean(losses))
    model.train()
    return out


def _dev(a, cfg):
    return backend.to_device(a, cfg.train.device) if cfg.train.device != "cpu" else a


# --------------------------------------------------------------------------- training
class Progress:
    """The tqdm bar of training, whose rate and ETA count training steps only.

    ``exclude(seconds)`` takes time spent outside steps (an evaluation, the first step of a
    process, which compiles kernels) off the bar's clock; without it the first bar showed
    hours of ETA. A disabled Progress does nothing.
    """

    def __init__(self, total: int, initial: int, enabled: bool = True, **kw):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, **kw)

    def exclude(self, seconds: float) -> None:
        if self.bar is not None:   # what tqdm.unpause does, for a measured span
            self.bar.start_t += seconds
            self.bar.last_print_t += seconds

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(refresh=False, **postfix)
            self.bar.update(n)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: Config, output_dir: str, resume: bool = False, log=print, callback=None,
          given: set | None = None, overwrite: bool = False, memory=None, on_eval=None) -> dict:
    """Run training; returns a summary dict (losses, steps, timings).

    ``callback(step, loss)``, if given, is called after every optimizer step (notebooks
    use it for live plots; tests use it to interrupt a run). ``on_eval(step, losses)``, if
    given, is called after every evaluation (``losses``: {"train", "val"}, and "val_memory"
    with ``memory``), once its checkpoint is saved; ``lm.search`` reports them to its pruner
    there, and an exception it raises ends the run. ``memory(model)``, if given,
    returns an ``lm.knn.KNNLM`` whose validation loss each evaluation also reports (while the
    weights are those its datastore was built with). ``given``: the config keys the
    user set (``--resume`` refuses those that differ from the checkpoint's; None: none).
    ``overwrite``: delete an earlier run's files in output_dir once everything is checked.
    Everything is checked before output_dir is created; a run that fails before its first
    save removes the folder it created. The rule about existing runs is ``main``'s
    (``check_output_dir``): called directly, ``train`` writes over an earlier run.
    """
    t_cfg, m_cfg = cfg.train, cfg.model
    validate(cfg)
    try:
        t_cfg.device = backend.check_device(t_cfg.device)
    except (RuntimeError, ValueError) as e:
        raise ToolError(f"--device {t_cfg.device}: {e}") from None
    check_output_dir(output_dir, resume, overwrite, existing_run_ok=True)
    backend.keep_freed_memory()   # reuse freed arrays' memory: about 25% faster steps (see backend)
    dtype = np.dtype(t_cfg.dtype)
    ckpt_path = os.path.join(output_dir, CHECKPOINT)
    model_dir = os.path.join(output_dir, "model")
    metrics_path = os.path.join(output_dir, "metrics.jsonl")

    ckpt = None
    if resume:
        ckpt = read_checkpoint(ckpt_path)
        resume_settings(cfg, json.loads(ckpt[1]["config"]), given or set(), ckpt_path, log)
        validate(cfg)

    # fine-tuning (lm.finetune): the base's model settings and tokenizer; a bad base or text fails here
    base = load_base(cfg, log) if cfg.train.init_from else None
    data = prepare_data(cfg.data.corpus, tokenizer_kind=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size,
                        val_fraction=cfg.data.val_fraction, cache_dir=cfg.data.cache_dir,
                        text_field=cfg.data.text_field, tokenizer=base.tokenizer if base else None)
    try:
        data.check_block_size(m_cfg.block_size)
    except ValueError as e:
        raise ConfigError(f"model.block_size: {e}") from None
    if m_cfg.vocab_size == 0:
        m_cfg.vocab_size = data.tokenizer.vocab_size
    elif m_cfg.vocab_size < data.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size {m_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{data.tokenizer.vocab_size}")
    model = None
    if base is not None:   # adapters (lora.targets) and a quantized base are checked before the folder exists
        mg.manual_seed(t_cfg.seed)
        model = prepare_model(base, cfg, log)
    # distillation (lm.distill): the teacher is loaded and checked against the student here, too
    teacher = load_teacher(cfg.distill, data.tokenizer, m_cfg.block_size, m_cfg.vocab_size, t_cfg.device,
                           log) if cfg.distill.teacher else None

    # checked: now the folder may be made (and is removed again if nothing gets saved)
    if overwrite and not resume and os.path.isdir(output_dir):
        remove_run(output_dir)
    created = not os.path.exists(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise ToolError(f"cannot create --output_dir {output_dir}: {e.strerror or e}; choose another "
                        f"--output_dir") from None
    saved = {"step": None}
    try:
        return _train(cfg, data, output_dir, ckpt, saved, log, callback, dtype, ckpt_path, model_dir,
                      metrics_path, memory, model, on_eval, make_step_loss(cfg.distill, teacher))
    except BaseException as e:
        if created and saved["step"] is None:
            shutil.rmtree(output_dir, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, TrainingInterrupted):
            raise TrainingInterrupted(-1, saved["step"], ckpt_path) from None
        raise


def _train(cfg, data, output_dir, ckpt, saved, log, callback, dtype, ckpt_path, model_dir, metrics_path,
           memory=None, model=None, on_eval=None, step_loss=plain_loss):
    t_cfg, m_cfg = cfg.train, cfg.model
    resume = ckpt is not None
    remove_stale_tmp(output_dir, log)
    if model is None:   # a fine-tuning run's model comes prepared (train: prepare_model)
        mg.manual_seed(t_cfg.seed)
        model = GPT(m_cfg)
    # progressive (lm.progressive): seqlen warmup cuts the batches; a run that grew resumes at its depth
    seqlen_of = SeqlenSchedule(cfg.progressive, m_cfg.block_size)
    if resume and int(ckpt[1].get("n_layer", m_cfg.n_layer)) != m_cfg.n_layer:
        n_now, at = int(ckpt[1]["n_layer"]), int(ckpt[1]["step"])
        if n_now > layers_at(at, m_cfg.n_layer, cfg.progressive.grow):
            raise ConfigError(f"--resume: the checkpoint's model has grown to {n_now} layers by step {at}, but "
                              f"progressive.grow={cfg.progressive.grow} gives fewer then; restore its growth steps")
        model = GPT(dataclasses.replace(m_cfg, n_layer=n_now))
    if seqlen_of.enabled or cfg.progressive.grow:
        log(describe(cfg.progressive, m_cfg.block_size))
    if dtype != np.float32:
        model.to(dtype=dtype)
    model.to(t_cfg.device)
    opt = model.configure_optimizer(t_cfg.learning_rate, t_cfg.weight_decay, (t_cfg.beta1, t_cfg.beta2),
                                    optimizer=t_cfg.optimizer)
    sched = mg.optim.WarmupCosine(opt, t_cfg.warmup_iters, t_cfg.lr_decay_iters or t_cfg.max_iters,
                                  t_cfg.min_lr, base_lr=t_cfg.learning_rate)
    batch_rng = np.random.default_rng(t_cfg.seed)
    step, best_val, wall_before = 0, math.inf, 0.0
    if resume:
        step, batch_rng, best_val = load_checkpoint(ckpt_path, model, opt, *ckpt)
        saved["step"] = step
        rerun_eval = step % t_cfg.eval_interval == 0 or step >= t_cfg.max_iters
        wall_before = trim_metrics(metrics_path, step, keep_eval_at_step=not rerun_eval)
        log(f"resumed from {ckpt_path} at step {step}")
    knn = memory(model) if memory is not None else None   # checks the store was built by these weights
    if not resume:
        open(metrics_path, "w").close()
        save_model_dir(model_dir, model, data.tokenizer, cfg)   # config and tokenizer exist from the start
    n_params = model.num_params()
    log(f"model: {n_params / 1e6:.2f}M parameters (non-embedding), vocab {m_cfg.vocab_size}, "
        f"{len(data.train):,} train / {len(data.val):,} val tokens, device {t_cfg.device}")

    def checkpoint(at_step):
        save_checkpoint(ckpt_path, model, opt, at_step, batch_rng, best_val, cfg)
        saved["step"] = at_step

    eval_seed = t_cfg.seed + 1_000_003
    history = {"step": [], "loss": [], "grad_norm": [], "eval": []}
    tokens_per_step = t_cfg.batch_size * m_cfg.block_size
    pbar = Progress(t_cfg.max_iters, step, enabled=t_cfg.progress)
    t_start = time.perf_counter()
    step_times = []
    last_eval = None
    first_step = True
    probe = StepProbe(model, opt, t_cfg)   # memory / gradient statistics, when the config asks
    # fewer BLAS threads while other programs hold cores (minigrad/kernels/cores.py); says so once
    governor = Governor(warn=lambda m: (pbar.write if pbar.bar is not None else log)("warning: " + m)) \
        if t_cfg.device == "cpu" else None
    try:
        with open(metrics_path, "a", encoding="utf-8") as mlog, probe:
            while True:
                is_last = step >= t_cfg.max_iters
                n_grow = layers_at(step, m_cfg.n_layer, cfg.progressive.grow)
                if not is_last and model.config.n_layer < n_grow:   # progressive.grow: G_stack, before step `step`
                    model, opt = grow_stack(model, opt, n_grow, lambda m: m.configure_optimizer(
                        t_cfg.learning_rate, t_cfg.weight_decay, (t_cfg.beta1, t_cfg.beta2),
                        optimizer=t_cfg.optimizer), init=cfg.progressive.grow_init)
                    sched.opt = opt   # the schedule continues: lr_at(step) as before
                    log(f"step {step}: grew the model to {n_grow} layers ({model.num_params() / 1e6:.2f}M parameters)")
                if step % t_cfg.eval_interval == 0 or is_last:
                    t_eval = time.perf_counter()
                    losses = estimate_loss(model, data, cfg, eval_seed)
                    if knn is not None:   # the same val batches, with the memory (None once the weights moved on)
                        v = knn.estimate_loss(model, data.val, t_cfg.batch_size, m_cfg.block_size,
                                              t_cfg.eval_iters, eval_seed, log=log)
                        if v is not None:
                            losses["val_memory"] = v
                    last_eval = losses
                    history["eval"].append((step, losses["train"], losses["val"]))
                    mlog.write(json.dumps({"kind": "eval", "step": step, "train_loss": losses["train"],
                                           "val_loss": losses["val"],
                                           **({"val_loss_memory": losses["val_memory"]} if "val_memory" in losses
                                              else {}),
                                           "wall_s": wall_before + time.perf_counter() - t_start}) + "\n")
                    mlog.flush()
                    msg = f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                    if "val_memory" in losses:
                        msg += f", val loss with memory {losses['val_memory']:.4f}"
                    if pbar.bar is not None:
                        pbar.write(msg)
                    else:
                        log(msg)
                    if losses["val"] < best_val and step > 0:
                        best_val = losses["val"]
                        save_model_dir(model_dir, model, data.tokenizer, cfg, {"step": step, "val_loss": best_val})
                    if step > 0 or not resume:
                        checkpoint(step)
                    if on_eval is not None:   # lm.search: its pruner; an exception ends the run
                        on_eval(step, losses)
                    pbar.exclude(time.perf_counter() - t_eval)
                if is_last:
                    break
                t0 = time.perf_counter()
                lr = sched.lr_at(step)
                opt.set_lr(lr)
                x, y = get_batch(data.train, t_cfg.batch_size, m_cfg.block_size, batch_rng)
                seqlen = seqlen_of(step)   # progressive: full windows drawn (same data stream), then cut
                x, y = cut_batch(x, y, seqlen)
                tokens_per_step = t_cfg.batch_size * seqlen
                probe.begin_step()
                loss, terms = step_loss(model, _dev(x, cfg), _dev(y, cfg))   # lm.distill: CE (+ teacher's KD)
                lossf = loss.item()
                if not math.isfinite(lossf):
                    raise TrainingDiverged(
                        f"loss became {lossf} at step {step}; the last good checkpoint is kept at {ckpt_path} "
                        f"(try a lower train.learning_rate or train.grad_clip)")
                opt.zero_grad()
                probe.mark("backward")
                loss.backward()
                probe.after_backward(step)
                gnorm = mg.optim.clip_grad_norm_(model.parameters(), t_cfg.grad_clip) if t_cfg.grad_clip > 0 else \
                    math.sqrt(sum(float((p.grad.data.astype(np.float64) ** 2).sum()) for p in model.parameters()
                                  if p.grad is not None))
                if not math.isfinite(gnorm):
                    raise TrainingDiverged(f"gradient norm became {gnorm} at step {step}; the last good checkpoint "
                                           f"is kept at {ckpt_path}")
                opt.step()
                extra = probe.end_step(step + 1)
                if governor is not None:
                    extra["threads"] = governor.tick()
                dt = time.perf_counter() - t0
                step_times.append(dt)
                step += 1
                history["step"].append(step)
                history["loss"].append(lossf)
                history["grad_norm"].append(gnorm)
                if callback is not None:
                    callback(step, lossf)
                mlog.write(json.dumps({"step": step, "loss": lossf, "lr": lr, "grad_norm": gnorm,
                                       "ms": dt * 1e3, "tokens_per_s": tokens_per_step / dt,
                                       "seqlen": seqlen, "n_layer": model.config.n_layer,
                                       "wall_s": wall_before + time.perf_counter() - t_start, **terms,
                                       **extra}) + "\n")
                if first_step:   # compiles kernels on first use: not what the rate is about
                    pbar.exclude(dt)
                    first_step = False
                if step % t_cfg.log_interval == 0 or step == t_cfg.max_iters:
                    if pbar.bar is None:
                        log(f"step {step}: loss {lossf:.4f}, {dt * 1e3:.0f} ms, {tokens_per_step / dt:,.0f} tok/s")
                    pbar.update(1, loss=f"{lossf:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}", lr=f"{lr:.2e}")
                else:
                    pbar.update(1)
    except KeyboardInterrupt:
        raise TrainingInterrupted(step, saved["step"], ckpt_path) from None
    finally:
        pbar.close()
        if governor is not None:
            governor.close()
    probe.finish(output_dir, log)
    wall_part = time.perf_counter() - t_start
    wall = wall_before + wall_part
    if best_val == math.inf:  # no evaluation after step 0 (max_iters == 0 or resumed at the end)
        save_model_dir(model_dir, model, data.tokenizer, cfg)
    try:
        plot_training(metrics_path, os.path.join(output_dir, "loss.png"))
    except Exception as e:  # a plot must never lose a finished run
        log(f"warning: could not draw loss.png: {e}")
    ms = 1e3 * float(np.median(step_times)) if step_times else float("nan")
    summary = {"steps": step, "train_loss": last_eval["train"] if last_eval else None,
               "val_loss": last_eval["val"] if last_eval else None, "best_val_loss": best_val,
               "wall_s": wall, "wall_s_this_part": wall_part, "resumed": resume,
               "ms_per_step": ms, "n_params": model.num_params(), "model_dir": model_dir}
    if last_eval and "val_memory" in last_eval:
        summary["val_loss_memory"] = last_eval["val_memory"]
    atomic_write_text(os.path.join(output_dir, "summary.json"), json.dumps(summary, indent=2))
    log(f"done: {step} steps in {wall:.1f} s ({ms:.1f} ms/step median), "
        f"val loss {summary['val_loss']:.4f}; model in {model_dir}")
    if t_cfg.sample_tokens > 0:
        from .generate import generate_text
        text = generate_text(model, data.tokenizer, "\n", max_new_tokens=t_cfg.sample_tokens,
                             strategy="top_k", top_k=40, temperature=0.8, seed=t_cfg.seed)[0]
        summary["sample"] = text
        log("sample:\n" + text)
    return summary


def plot_training(metrics_path: str, png_path: str) -> None:
    """Draw ``training_figure`` into a PNG (written atomically)."""
    fig = training_figure(metrics_path)
    fig.savefig(png_path + ".tmp.png", dpi=110)
    os.replace(png_path + ".tmp.png", png_path)


def training_figure(metrics_path: str):
    """Loss (per step and evaluated) and gradient norm against step, from the metrics log;
    growth steps (progressive.grow) are dashed vertical lines labelled "grown to N layers"."""
    # a bare Figure (no pyplot): drawing a file must not switch a notebook's backend
    from matplotlib.figure import Figure

    steps, losses, gnorms, evals, grown = [], [], [], [], []
    n_layer = None
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "eval":
                evals.append((r["step"], r["train_loss"], r["val_loss"]))
            else:
                steps.append(r["step"])
                losses.append(r["loss"])
                gnorms.append(r["grad_norm"])
                if n_layer is not None and r.get("n_layer", n_layer) > n_layer:
                    grown.append((r["step"] - 1, r["n_layer"]))   # grown before this row's step ran
                n_layer = r.get("n_layer", n_layer)
    fig = Figure(figsize=(11, 4))
    a1, a2 = fig.subplots(1, 2)
    if steps:
        a1.plot(steps, losses, lw=0.7, alpha=0.6, label="batch loss")
    if evals:
        e = np.array(evals)
        a1.plot(e[:, 0], e[:, 1], "o-", label="train (eval)")
        a1.plot(e[:, 0], e[:, 2], "s-", label="val (eval)")
    a1.set_xlabel("step")
    a1.set_ylabel("cross-entropy (nats/token)")
    a1.set_title("loss")
    a1.legend()
    a1.grid(alpha=0.3)
    if steps:
        a2.plot(steps, gnorms, lw=0.7)
        a2.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_title("gradient norm (before clipping)")
    a2.grid(alpha=0.3)
    for at, n in grown:
        for a in (a1, a2):
            a.axvline(at, color="k", ls="--", lw=0.8, label=f"grown to {n} layers" if a is a1 else None)
    if grown:
        a1.legend()
    fig.tight_layout()
    return fig


def resume_command(argv) -> str:
    """The command line that continues the run ``argv`` started."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", "-m", "lm.train", *args])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def body():
        from .knn import check_memory_args, knn_from_args
        cfg = resolve_config(args)
        check_memory_args(args)   # a bad flag or missing store: StoreError, one error line (run_tool)
        memory = (lambda model: knn_from_args(args, model)) if args.memory else None
        check_output_dir(args.output_dir, args.resume, args.overwrite)
        given = keys_set_by(args.config, args.overrides)
        if args.data is not None:
            given.add("data.corpus")
        if args.init_from is not None:
            given.add("train.init_from")
        if args.merge:
            given.add("lora.merge")
        train(cfg, args.output_dir, resume=args.resume, given=given, overwrite=args.overwrite,
              memory=memory)

    def on_interrupt(e):
        ckpt_path = os.path.join(args.output_dir, CHECKPOINT)
        step, saved = (e.step, e.saved_step) if isinstance(e, TrainingInterrupted) else (-1, None)
        if saved is None and args.resume and os.path.isfile(ckpt_path):   # stopped before training began
            try:
                saved = int(load_metadata(ckpt_path)["step"])
            except (OSError, ValueError, KeyError):
                saved = None
        if saved is None:
            return "nothing was saved yet; run the same command again to start over"
        at = f" at step {step}" if step >= 0 else ""
        return (f"stopped{at}; the last save is at step {saved} ({ckpt_path}). "
                f"Continue with: {resume_command(argv)}")

    return run_tool(body, debug=args.debug, on_interrupt=on_interrupt)


if __name__ == "__main__":
    sys.exit(main())
