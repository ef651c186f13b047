"""Fine-tuning three ways: full, LoRA and QLoRA, side by side (issue 14's Must-reach numbers).

    python benchmarks/finetune.py --data /path/to/tinyshakespeare.txt

The base model is pretrained once on the built-in Python documentation (the reference shape:
character level, 4 layers x 4 heads x 256 wide, 128 characters of context) and cached under
``$LM_BENCH_DIR`` (default ``~/.cache/minigrad-lm/bench``) in a folder named after a hash of its
config. It is then fine-tuned on Tiny Shakespeare for the same number of steps on the same
batches: every weight (full), a LoRA adapter on a frozen float base, and a LoRA adapter on a
frozen NF4 base (QLoRA).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.reference import bench_dir  # noqa: E402

BASE = [
    "model.block_size=128", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.dropout=0.0",
    "model.bias=true", "model.gelu=tanh", "data.corpus=python-docs", "data.tokenizer=char",
    "data.val_fraction=0.1", "train.batch_size=16", "train.max_iters=800", "train.learning_rate=1e-3",
    "train.min_lr=1e-4", "train.warmup_iters=100", "train.lr_decay_iters=800", "train.weight_decay=0.1",
    "train.beta1=0.9", "train.beta2=0.99", "train.grad_clip=1.0", "train.eval_interval=400",
    "train.eval_iters=20", "train.seed=1337", "train.sample_tokens=0",
]


def base_model_dir(log=print) -> str:
    """The cached base model folder (``.../model``), pretrained on python-docs first if missing."""
    from lm.config import Config, apply_overrides, validate
    from lm.train import train
    key = hashlib.sha256(json.dumps(BASE).encode()).hexdigest()[:10]
    out = os.path.join(bench_dir(), f"finetune-base-{key}")
    model_dir = os.path.join(out, "model")
    if os.path.isfile(os.path.join(out, "summary.json")):
        return model_dir
    cfg = apply_overrides(Config(), list(BASE) + ["train.progress=false"])
    validate(cfg)
    log(f"pretraining the base model on python-docs into {out} (once; later runs reuse it)")
    train(cfg, out, resume=os.path.isfile(os.path.join(out, "checkpoint.safetensors")), log=log)
    return model_dir


if __name__ == "__main__":
    print(base_model_dir())
