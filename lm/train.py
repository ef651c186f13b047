"""Train a GPT: ``python -m lm.train --config configs/default.yaml --output_dir output``.

What a run writes under ``output_dir``:

- ``model/``: ``model.safetensors`` (best validation loss so far), ``config.json``,
  ``tokenizer.json``: everything ``lm.generate`` needs;
- ``checkpoint.safetensors``: the last save, for ``--resume``: weights, optimizer state and,
  in its metadata, the step, the random states and the config. One file written
  atomically, so a run killed at any moment resumes from its last save;
- ``metrics.jsonl``: one JSON line per step (and one per evaluation);
- ``loss.png``: the loss curves and gradient norms.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np

import minigrad as mg
from minigrad import backend
from minigrad.io import atomic_write_text, load_file, load_metadata, save_file

from .config import Config, ConfigError, ModelConfig, apply_overrides, load_config, validate
from .data import CorpusError, get_batch, prepare_data
from .model import GPT
from .probes import StepProbe

CHECKPOINT = "checkpoint.safetensors"


class TrainingDiverged(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-train", description="Train a GPT language model on minigrad.")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--data", default=None, help="corpus: .txt/.jsonl file, folder, or built-in name "
                                                "(python-docs, shakespeare); overrides data.corpus")
    p.add_argument("--output_dir", default="output", help="where the model, checkpoint and logs go")
    p.add_argument("--seed", type=int, default=None, help="random seed (overrides train.seed)")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint.safetensors")
    p.add_argument("--device", default=None, help="cpu or cuda (overrides train.device)")
    p.add_argument("--max_iters", type=int, default=None, help="overrides train.max_iters")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. model.n_layer=2 train.learning_rate=3e-4")
    return p


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
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
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
    }
    save_file(tensors, path, meta)


def load_checkpoint(path: str, model: GPT, opt):
    arrays = load_file(path)
    meta = load_metadata(path)
    model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model.")})
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
    os.makedirs(model_dir, exist_ok=True)
    save_file(model.state_dict(), os.path.join(model_dir, "model.safetensors"),
              {"format": "minigrad-gpt", **({k: json.dumps(v) for k, v in (extra or {}).items()})})
    atomic_write_text(os.path.join(model_dir, "config.json"),
                      json.dumps({"model": asdict(cfg.model), "data": asdict(cfg.data)}, indent=2))
    tokenizer.save(os.path.join(model_dir, "tokenizer.json"))


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
def train(cfg: Config, output_dir: str, resume: bool = False, log=print, callback=None, on_eval=None) -> dict:
    """Run training; returns a summary dict (losses, steps, timings).

    ``callback(step, loss)``, if given, is called after every optimizer step (notebooks
    use it for live plots; tests use it to interrupt a run). ``on_eval(step, losses)`` is
    called after every evaluation (``losses``: {"train", "val"}); ``lm.search`` reports
    them to its pruner there, and an exception it raises ends the run.
    """
    t_cfg, m_cfg = cfg.train, cfg.model
    backend.keep_freed_memory()   # reuse freed arrays' memory: about 25% faster steps (see backend)
    dtype = np.dtype(t_cfg.dtype)
    backend.check_device(t_cfg.device)
    os.makedirs(output_dir, exist_ok=True)
    ckpt_path = os.path.join(output_dir, CHECKPOINT)
    model_dir = os.path.join(output_dir, "model")
    metrics_path = os.path.join(output_dir, "metrics.jsonl")

    if resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        saved = json.loads(load_metadata(ckpt_path)["config"])
        for section in ("model", "data"):   # the architecture and data must be those of the run
            current = asdict(getattr(cfg, section))
            if section == "model" and current["vocab_size"] == 0:   # 0 means "from the tokenizer"
                current["vocab_size"] = saved["model"]["vocab_size"]
            if saved[section] != current:
                log(f"note: resuming with the {section} settings saved in the checkpoint")
                for k, v in saved[section].items():
                    setattr(getattr(cfg, section), k, v)

    data = prepare_data(cfg.data.corpus, tokenizer_kind=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size,
                        val_fraction=cfg.data.val_fraction, cache_dir=cfg.data.cache_dir,
                        text_field=cfg.data.text_field)
    data.check_block_size(m_cfg.block_size)
    if m_cfg.vocab_size == 0:
        m_cfg.vocab_size = data.tokenizer.vocab_size
    elif m_cfg.vocab_size < data.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size {m_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{data.tokenizer.vocab_size}")

    mg.manual_seed(t_cfg.seed)
    model = GPT(m_cfg)
    if dtype != np.float32:
        model.to(dtype=dtype)
    model.to(t_cfg.device)
    opt = model.configure_optimizer(t_cfg.learning_rate, t_cfg.weight_decay, (t_cfg.beta1, t_cfg.beta2))
    sched = mg.optim.WarmupCosine(opt, t_cfg.warmup_iters, t_cfg.lr_decay_iters or t_cfg.max_iters,
                                  t_cfg.min_lr, base_lr=t_cfg.learning_rate)
    batch_rng = np.random.default_rng(t_cfg.seed)
    step, best_val = 0, math.inf
    if resume:
        step, batch_rng, best_val = load_checkpoint(ckpt_path, model, opt)
        log(f"resumed from {ckpt_path} at step {step}")
    else:
        open(metrics_path, "w").close()
        save_model_dir(model_dir, model, data.tokenizer, cfg)   # config and tokenizer exist from the start
    n_params = model.num_params()
    log(f"model: {n_params / 1e6:.2f}M parameters (non-embedding), vocab {m_cfg.vocab_size}, "
        f"{len(data.train):,} train / {len(data.val):,} val tokens, device {t_cfg.device}")

    def checkpoint(at_step):
        save_checkpoint(ckpt_path, model, opt, at_step, batch_rng, best_val, cfg)

    eval_seed = t_cfg.seed + 1_000_003
    history = {"step": [], "loss": [], "grad_norm": [], "eval": []}
    tokens_per_step = t_cfg.batch_size * m_cfg.block_size
    pbar = None
    if t_cfg.progress:
        from tqdm import tqdm
        pbar = tqdm(total=t_cfg.max_iters, initial=step, desc="train", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    step_times = []
    last_eval = None
    probe = StepProbe(model, opt, t_cfg)   # memory / gradient statistics, when the config asks
    with open(metrics_path, "a", encoding="utf-8") as mlog, probe:
        while True:
            is_last = step >= t_cfg.max_iters
            if step % t_cfg.eval_interval == 0 or is_last:
                losses = estimate_loss(model, data, cfg, eval_seed)
                last_eval = losses
                history["eval"].append((step, losses["train"], losses["val"]))
                mlog.write(json.dumps({"kind": "eval", "step": step, "train_loss": losses["train"],
                                       "val_loss": losses["val"]}) + "\n")
                mlog.flush()
                msg = f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                if pbar is not None:
                    pbar.write(msg)
                else:
                    log(msg)
                if losses["val"] < best_val and step > 0:
                    best_val = losses["val"]
                    save_model_dir(model_dir, model, data.tokenizer, cfg, {"step": step, "val_loss": best_val})
                if step > 0 or not resume:
                    checkpoint(step)
                if on_eval is not None:
                    on_eval(step, losses)
            if is_last:
                break
            t0 = time.perf_counter()
            lr = sched.lr_at(step)
            opt.set_lr(lr)
            x, y = get_batch(data.train, t_cfg.batch_size, m_cfg.block_size, batch_rng)
            probe.begin_step()
            _, loss = model(_dev(x, cfg), _dev(y, cfg))
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
            dt = time.perf_counter() - t0
            step_times.append(dt)
            step += 1
            history["step"].append(step)
            history["loss"].append(lossf)
            history["grad_norm"].append(gnorm)
            if callback is not None:
                callback(step, lossf)
            mlog.write(json.dumps({"step": step, "loss": lossf, "lr": lr, "grad_norm": gnorm,
                                   "ms": dt * 1e3, "tokens_per_s": tokens_per_step / dt, **extra}) + "\n")
            if pbar is not None:
                pbar.update(1)
                if step % t_cfg.log_interval == 0 or step == t_cfg.max_iters:
                    pbar.set_postfix(loss=f"{lossf:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}", lr=f"{lr:.2e}")
            elif step % t_cfg.log_interval == 0:
                log(f"step {step}: loss {lossf:.4f}, {dt * 1e3:.0f} ms, {tokens_per_step / dt:,.0f} tok/s")
    if pbar is not None:
        pbar.close()
    probe.finish(output_dir, log)
    wall = time.perf_counter() - t_start
    if best_val == math.inf:  # no evaluation after step 0 (max_iters == 0 or resumed at the end)
        save_model_dir(model_dir, model, data.tokenizer, cfg)
    try:
        plot_training(metrics_path, os.path.join(output_dir, "loss.png"))
    except Exception as e:  # a plot must never lose a finished run
        log(f"warning: could not draw loss.png: {e}")
    ms = 1e3 * float(np.median(step_times)) if step_times else float("nan")
    summary = {"steps": step, "train_loss": last_eval["train"] if last_eval else None,
               "val_loss": last_eval["val"] if last_eval else None, "best_val_loss": best_val,
               "wall_s": wall, "ms_per_step": ms, "n_params": n_params, "model_dir": model_dir}
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
    """Loss (per step and evaluated) and gradient norm against step, from the metrics log."""
    # a bare Figure (no pyplot): drawing a file must not switch a notebook's backend
    from matplotlib.figure import Figure

    steps, losses, gnorms, evals = [], [], [], []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "eval":
                evals.append((r["step"], r["train_loss"], r["val_loss"]))
            else:
                steps.append(r["step"])
                losses.append(r["loss"])
                gnorms.append(r["grad_norm"])
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
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=110)
    os.replace(png_path + ".tmp.png", png_path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
        train(cfg, args.output_dir, resume=args.resume)
    except (ConfigError, CorpusError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
