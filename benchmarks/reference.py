"""The trained Tiny Shakespeare model that the compression benchmarks share.

    python benchmarks/reference.py --data /path/to/tinyshakespeare.txt      # train once, print the path

Quantization, pruning, the memory bank and the claims all measure one model, so that their
tables can be read side by side. It is trained once by ``lm.train`` and cached under
``$LM_BENCH_DIR`` (default ``~/.cache/minigrad-lm/bench``), in a folder named after a hash of
its config; ``reference_model_dir()`` returns that folder, training it first when it is
missing. Every benchmark that uses it also takes ``--model_dir`` to measure another model.

The model: character level, 4 layers x 4 heads x 256 wide, 128 characters of context,
batch 16, 2000 AdamW steps (lr 1e-3 cosine to 1e-4, warmup 100, weight decay 0.1, beta2
0.99, clip 1, dropout 0), seed 1337. It is the smallest shape the quantization issue accepts
(at least 4 x 256, context >= 128), so that a 2-core machine trains it in about 15 minutes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REFERENCE = [
    "model.block_size=128", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.dropout=0.0",
    "model.bias=true", "model.gelu=tanh", "data.tokenizer=char", "data.val_fraction=0.1",
    "train.batch_size=16", "train.max_iters=2000", "train.learning_rate=1e-3", "train.min_lr=1e-4",
    "train.warmup_iters=100", "train.lr_decay_iters=2000", "train.weight_decay=0.1", "train.beta1=0.9",
    "train.beta2=0.99", "train.grad_clip=1.0", "train.eval_interval=500", "train.eval_iters=20",
    "train.seed=1337", "train.sample_tokens=0",
]


# The claims issue measures a larger model: nanoGPT's baby GPT shape (6 x 6 x 384, context 256),
# batch 8, 2000 steps, dropout 0.1 (it sees about 4 epochs of the corpus). About 0.65 s a step on
# 2 quiet cores, so about 25 minutes to train once.
BABY = [
    "model.block_size=256", "model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.dropout=0.1",
    "train.batch_size=8",
]


def bench_dir() -> str:
    return os.environ.get("LM_BENCH_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "minigrad-lm", "bench")


def find_corpus(data: str | None) -> str:
    """A Tiny Shakespeare path: the one given, or the built-in name (found in $LM_DATA_DIR or downloaded)."""
    return data or "shakespeare"


def reference_model_dir(data: str | None = None, overrides: list[str] | None = None, log=print) -> str:
    """The cached model folder (``.../model``), trained first if it is not there yet."""
    from lm.config import Config, apply_overrides, validate
    from lm.train import train
    over = REFERENCE + list(overrides or [])
    key = hashlib.sha256(json.dumps(over).encode()).hexdigest()[:10]
    out = os.path.join(bench_dir(), f"reference-{key}")
    model_dir = os.path.join(out, "model")
    if os.path.isfile(os.path.join(out, "summary.json")):
        return model_dir
    cfg = apply_overrides(Config(), over + [f"data.corpus={find_corpus(data)}"])
    validate(cfg)
    log(f"training the reference model into {out} (once; later runs reuse it)")
    resume = os.path.isfile(os.path.join(out, "checkpoint.safetensors"))
    train(cfg, out, resume=resume, log=log)
    return model_dir


def baby_reference_dir(data: str | None = None, log=print) -> str:
    """The cached baby-GPT-shape model (``BABY``) that ``benchmarks/claims.py`` measures."""
    return reference_model_dir(data, overrides=BABY, log=log)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="path to tinyshakespeare.txt (default: the built-in name)")
    p.add_argument("--baby", action="store_true", help="the claims issue's baby-GPT-shape model instead")
    args = p.parse_args(argv)
    path = baby_reference_dir(args.data) if args.baby else reference_model_dir(args.data)
    with open(os.path.join(os.path.dirname(path), "summary.json"), encoding="utf-8") as f:
        s = json.load(f)
    print(path)
    print(json.dumps({k: s[k] for k in s if not isinstance(s[k], (list, dict))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
