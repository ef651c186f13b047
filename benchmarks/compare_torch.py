"""minigrad next to PyTorch (CPU): training step, attention kernels, generation.

    python benchmarks/compare_torch.py                      # full run (5-10 minutes on 2 cores)
    python benchmarks/compare_torch.py --quick              # smoke run (a minute or two)
    python benchmarks/compare_torch.py --data tinyshakespeare.txt
    python benchmarks/compare_torch.py --threads 1          # on a machine busy with other jobs

What is measured, and how:

* **Training step.** The same GPT twice: ``lm.model.GPT`` and a nanoGPT-shaped PyTorch
  model written below with the same parameter names, loaded with *our* initial weights
  (lm_head tied to wte), trained on the same batches with the same AdamW (lr 1e-3,
  betas (0.9, 0.99), eps 1e-8, weight decay 0.1 on tensors with ndim >= 2, exactly the
  groups of ``GPT.configure_optimizer``) and gradient clipping at 1.0. The first-batch
  losses must agree to 1e-4 (same weights, same work) before anything is timed. Each
  step is split into forward (incl. the loss), backward (incl. zero_grad) and optimizer
  (clip + step). The machines are shared and noisy, so the two frameworks take turns in
  blocks of 5 steps (who goes first alternates), the first step of each block is not
  timed (the other framework's thread pool may still be spinning), and we report medians
  and their ratio. The load drifts over minutes, so the report adds a paired estimate: the
  ratio of median step times within each chunk (both frameworks back to back), with its
  spread over the chunks.
* **MFU.** Model FLOPs per token ``6 N + 12 L C T`` (PaLM appendix B: 6N + 12 L H Q T
  with H Q = C; N = non-embedding parameters, i.e. without wpe, the tied wte/lm_head
  counted once; T = block size; the attention term counts the full, non-causal T x T
  and no elementwise work, as nanoGPT's estimate_mfu does). Divided by the median step
  time gives achieved FLOP/s; divided again by the median NumPy float32 matmul rate
  (2 n^3 / t for an n x n sgemm, timed here, interleaved with torch.mm) gives MFU.
* **Attention.** Forward + backward of causal attention, batch 1, 4 heads, head size 64,
  float32, for several T: our kernels (``minigrad.kernels.attention``: blocked, flash,
  reference) on raw arrays, our autograd node ``attention(...)`` (impl auto), our
  composite ``F.scaled_dot_product_attention`` and PyTorch's SDPA. Time: medians of
  interleaved repeats. Extra memory (peak above the inputs, outputs and gradients
  included) two ways: ``tracemalloc`` peak in this process (sees NumPy buffers, not
  Numba's internal allocations, not PyTorch), and for every implementation, PyTorch
  included, the resident-set high-water mark in a fresh subprocess (warm-up at a tiny
  T, inputs allocated, peak reset through /proc/self/clear_refs, then one forward +
  backward: VmHWM - VmRSS). A fresh process matters: a used one serves new arrays from
  memory it already holds. Implementations whose extrapolated need (tracemalloc peak at
  the previous T times (T / T_prev)^2) exceeds 2 GB are skipped.
* **Threads.** ``--threads`` (default: all cores) is given to PyTorch, Numba and NumPy's
  OpenBLAS alike. On a machine whose cores are taken by other jobs, a multi-threaded BLAS
  or OpenMP call waits at its barrier for a thread the scheduler has parked: small
  operations then take 10-100x longer, for both frameworks, and the numbers measure the
  scheduler. ``--threads 1`` compares the frameworks core for core.
* **Generation.** Greedy decoding of 200 new tokens with ``lm.generate.generate_ids``
  with and without the KV cache (outputs must be identical), and PyTorch without a
  cache (nanoGPT's ``generate``) for reference.

Writes report.md, results.json and compare_torch.png under --output_dir.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import subprocess
import sys
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import minigrad as mg  # noqa: E402
from minigrad import functional as MF  # noqa: E402
from minigrad import attention as mattn  # noqa: E402
from minigrad.kernels import attention as katt  # noqa: E402
from lm.config import ModelConfig  # noqa: E402
from lm.generate import generate_ids  # noqa: E402
from lm.model import GPT  # noqa: E402

try:
    import torch
    from torch import nn as tnn
    from torch.nn import functional as TF
except ImportError:  # the script explains itself in main()
    torch = None

CONFIGS = {
    # nanoGPT's "I only have a macbook" run
    "nanoGPT-CPU": dict(batch=12, block_size=64, n_layer=4, n_head=4, n_embd=128),
    # nanoGPT's shakespeare_char "baby GPT"
    "baby-GPT": dict(batch=8, block_size=256, n_layer=6, n_head=6, n_embd=384),
}
DEFAULT_STEPS = {"nanoGPT-CPU": 60, "baby-GPT": 20}   # timed steps of a full run (a baby-GPT step takes seconds)
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, (0.9, 0.99), 1e-8, 0.1, 1.0
LOSS_TOL = 1e-4
ATTN_HEADS, ATTN_HS = 4, 64
MEM_LIMIT = 2 * 1024 ** 3
ATTN_LABELS = {
    "blocked": "ours: blocked kernel (one thread)",
    "flash": "ours: flash kernel (Numba)",
    "reference": "ours: reference kernel",
    "node": "ours: autograd node (auto: blocked, heads on the BLAS threads)",
    "composite": "ours: composite F.sdpa",
    "torch": "PyTorch SDPA",
}
QUADRATIC = ("reference", "composite")   # the ones that hold T x T arrays


# --------------------------------------------------------------------------- the PyTorch GPT
if torch is not None:
    class TorchSelfAttention(tnn.Module):
        def __init__(self, c: ModelConfig):
            super().__init__()
            self.c_attn = tnn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
            self.c_proj = tnn.Linear(c.n_embd, c.n_embd, bias=c.bias)
            self.n_head = c.n_head

        def forward(self, x):
            B, T, C = x.shape
            nh, hs = self.n_head, C // self.n_head
            q, k, v = self.c_attn(x).split(C, dim=2)
            q = q.view(B, T, nh, hs).transpose(1, 2)                      # (B, nh, T, hs)
            k = k.view(B, T, nh, hs).transpose(1, 2)                      # (B, nh, T, hs)
            v = v.view(B, T, nh, hs).transpose(1, 2)                      # (B, nh, T, hs)
            y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class TorchMLP(tnn.Module):
        def __init__(self, c: ModelConfig):
            super().__init__()
            self.c_fc = tnn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
            self.c_proj = tnn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
            # the GELU our config asks for: GPT-2's tanh approximation unless "exact"
            self.approximate = "none" if getattr(c, "gelu", "tanh") == "exact" else "tanh"

        def forward(self, x):
            return self.c_proj(TF.gelu(self.c_fc(x), approximate=self.approximate))

    class TorchBlock(tnn.Module):
        def __init__(self, c: ModelConfig):
            super().__init__()
            self.ln_1 = tnn.LayerNorm(c.n_embd, bias=c.bias)
            self.attn = TorchSelfAttention(c)
            self.ln_2 = tnn.LayerNorm(c.n_embd, bias=c.bias)
            self.mlp = TorchMLP(c)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(tnn.Module):
        """nanoGPT's model without dropout (every run here uses dropout 0)."""

        def __init__(self, c: ModelConfig):
            super().__init__()
            self.config = c
            self.transformer = tnn.ModuleDict(dict(
                wte=tnn.Embedding(c.vocab_size, c.n_embd),
                wpe=tnn.Embedding(c.block_size, c.n_embd),
                h=tnn.ModuleList([TorchBlock(c) for _ in range(c.n_layer)]),
                ln_f=tnn.LayerNorm(c.n_embd, bias=c.bias)))
            self.lm_head = tnn.Linear(c.n_embd, c.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight             # weight tying

        def forward(self, idx, targets=None):
            T = idx.shape[1]
            x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T))
            for block in self.transformer.h:
                x = block(x)
            x = self.transformer.ln_f(x)
            if targets is None:
                return self.lm_head(x[:, [-1], :]), None
            logits = self.lm_head(x)                                      # (B, T, V)
            return logits, TF.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def torch_twin(model: GPT):
    """A TorchGPT holding a copy of ``model``'s current weights."""
    tm = TorchGPT(model.config)
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    tm.load_state_dict(sd, strict=True)
    return tm


def torch_optimizer(tm):
    """AdamW with the groups of GPT.configure_optimizer: decay on ndim >= 2 only."""
    params = [p for p in tm.parameters() if p.requires_grad]   # the tied weight once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # nanoGPT asks for fused AdamW on CUDA only; on CPU it gets PyTorch's default, as here
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)


# --------------------------------------------------------------------------- helpers
def set_threads(n: int) -> dict:
    """Threads for PyTorch, Numba and NumPy's OpenBLAS (the last through its C API, if found:
    minigrad's kernels run on that pool, ``minigrad/kernels/threads.py``)."""
    torch.set_num_threads(n)
    import numba
    from minigrad.kernels import threads
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    blas = threads.set_blas_threads(n)
    info = threads.blas_info()
    return {"torch": torch.get_num_threads(), "numba": numba.get_num_threads(),
            "numpy_blas": threads.get_blas_threads() if blas else "unchanged (not OpenBLAS?)",
            "pool": info["pool"], "pool_note": info["note"]}


def _median(xs):
    return float(np.median(np.asarray(xs, dtype=np.float64))) if len(xs) else float("nan")


def md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _mb(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2 ** 20:,.1f}"


SETTINGS = {"gelu": "tanh", "bias": True}   # GPT-2's; --nanogpt_settings: nanoGPT train.py's (exact, no bias)
NANOGPT = {"module": None}                   # --nanogpt_dir: nanoGPT's own model.py, a third contestant


def model_config(name: str, vocab: int, block_size=None) -> tuple[ModelConfig, int]:
    c = dict(CONFIGS[name])
    batch = c.pop("batch")
    if block_size:
        c["block_size"] = block_size
    return ModelConfig(vocab_size=vocab, dropout=0.0, attention="auto", **SETTINGS, **c), batch


def load_nanogpt(nanogpt_dir: str):
    """nanoGPT's model.py, imported from a user's checkout (never copied into this project)."""
    import importlib.util
    path = os.path.join(os.path.expanduser(nanogpt_dir), "model.py")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --nanogpt_dir {nanogpt_dir}: no model.py there; clone "
                         "https://github.com/karpathy/nanoGPT")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def nanogpt_twin(model: GPT):
    """nanoGPT's own GPT holding a copy of ``model``'s weights, and nanoGPT's own AdamW
    (its ``configure_optimizers``: decay on ndim >= 2, as ours)."""
    m, c = NANOGPT["module"], model.config
    nm = m.GPT(m.GPTConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                           n_embd=c.n_embd, dropout=0.0, bias=c.bias))
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    missing, unexpected = nm.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith(".attn.bias")]:
        raise RuntimeError(f"nanoGPT's parameter names differ: missing {missing}, unexpected {unexpected}")
    import contextlib
    with contextlib.redirect_stdout(io.StringIO()):      # it prints its parameter counts
        opt = nm.configure_optimizers(WEIGHT_DECAY, LR, BETAS, "cpu")
    return nm, opt


def flops_per_token(n_params: int, cfg: ModelConfig) -> int:
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


class Batches:
    """Random token batches from a fixed generator, or windows of a corpus (``--data``)."""

    def __init__(self, data_path: str | None, seed: int):
        self.rng = np.random.default_rng(seed)
        self.tokens = None
        self.vocab = 65
        if data_path:
            from lm.data import prepare_data
            ds = prepare_data(data_path, tokenizer_kind="char", use_cache=False)
            self.tokens, self.vocab = np.asarray(ds.train), ds.tokenizer.vocab_size
        self.source = f"{data_path} (char level)" if data_path else f"random tokens (vocab {self.vocab})"

    def get(self, B: int, T: int):
        if self.tokens is None:
            xy = self.rng.integers(0, self.vocab, size=(B, T + 1))
            return xy[:, :-1].copy(), xy[:, 1:].copy()
        from lm.data import get_batch
        return get_batch(self.tokens, B, T, self.rng)


# --------------------------------------------------------------------------- training step
def ours_step(model, opt, params, x, y):
    t0 = time.perf_counter()
    _, loss = model(x, y)
    lossf = loss.item()
    t1 = time.perf_counter()
    opt.zero_grad()
    loss.backward()
    t2 = time.perf_counter()
    gnorm = mg.optim.clip_grad_norm_(params, GRAD_CLIP)
    opt.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, lossf, float(gnorm)


def torch_step(model, opt, params, x, y):
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.perf_counter()
    _, loss = model(x, y)
    lossf = loss.item()
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    gnorm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    opt.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, lossf, float(gnorm)


BLOCK = 5   # training steps per framework before switching to the other


def bench_training(name: str, batches: Batches, steps: int, warmup: int, seed: int, peak_n: int,
                   profile_steps: int, log=print) -> dict:
    cfg, B = model_config(name, batches.vocab)
    mg.manual_seed(seed)
    model = GPT(cfg)
    tm = torch_twin(model)
    opt = model.configure_optimizer(LR, WEIGHT_DECAY, BETAS, EPS)
    topt = torch_optimizer(tm)
    params, tparams = list(model.parameters()), [p for p in tm.parameters()]
    data = [batches.get(B, cfg.block_size) for _ in range(warmup + steps)]

    # same weights, same batch: the same loss, or the comparison is not of equal work
    with mg.no_grad():
        _, l_ours = model(*data[0])
    with torch.no_grad():
        _, l_torch = tm(torch.from_numpy(data[0][0]), torch.from_numpy(data[0][1]))
    l_ours, l_torch = float(l_ours.item()), float(l_torch.item())
    log(f"[{name}] first-batch loss: ours {l_ours:.6f}, PyTorch {l_torch:.6f}, |diff| {abs(l_ours - l_torch):.2e}")
    if abs(l_ours - l_torch) > LOSS_TOL:
        raise RuntimeError(f"{name}: first-batch losses differ by {abs(l_ours - l_torch):.3g} > {LOSS_TOL}; "
                           "the two models do not compute the same function")

    rec = {"ours": [], "torch": []}
    runners = {"ours": lambda x, y: ours_step(model, opt, params, x, y),
               "torch": lambda x, y: torch_step(tm, topt, tparams, x, y)}
    if NANOGPT["module"] is not None:   # nanoGPT's own model.py, same weights
        nm, nopt = nanogpt_twin(model)
        nparams = list(nm.parameters())
        with torch.no_grad():
            _, l_nano = nm(torch.from_numpy(data[0][0]), torch.from_numpy(data[0][1]))
        log(f"[{name}] first-batch loss: nanoGPT's model {float(l_nano):.6f}")
        if abs(float(l_nano) - l_torch) > LOSS_TOL:
            raise RuntimeError(f"{name}: nanoGPT's model and our twin differ in the first loss by "
                               f"{abs(float(l_nano) - l_torch):.3g}")
        rec["nanogpt"] = []
        runners["nanogpt"] = lambda x, y: torch_step(nm, nopt, nparams, x, y)
    # the matmul peak is timed between the steps too, so MFU divides by a rate measured under the same load
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((peak_n, peak_n)).astype(np.float32) for _ in range(2))
    c = np.empty_like(a)
    sgemm = []
    # Steps run in blocks of BLOCK per framework, and the first step of each block is not
    # timed: NumPy's BLAS threads and PyTorch's OpenMP threads both spin for a while after
    # their work, so a step that follows the other framework's step pays for its idle spinning.
    # Alternating single steps made PyTorch's nanoGPT-CPU step look 3x slower than run alone.
    timed = {w: [] for w in runners}
    block_ratios = []   # per chunk: median ours step / median PyTorch step, both run back to back
    chunks = [data[i:i + BLOCK] for i in range(0, len(data), BLOCK)]
    for ci, chunk in enumerate(chunks):
        order = list(runners)[ci % len(runners):] + list(runners)[:ci % len(runners)]   # who goes first rotates
        in_chunk = {w: [] for w in runners}
        for who in order:
            for j, (x, y) in enumerate(chunk):
                r = runners[who](x, y)
                rec[who].append(r)
                if j > 0 and ci * BLOCK + j >= warmup:
                    timed[who].append(r)
                    in_chunk[who].append(sum(r[:3]))
        if in_chunk["ours"] and in_chunk["torch"]:
            block_ratios.append(_median(in_chunk["ours"]) / _median(in_chunk["torch"]))
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        sgemm.append(time.perf_counter() - t0)
        log(f"[{name}] steps {ci * BLOCK + len(chunk)}/{len(data)}: ours {sum(rec['ours'][-1][:3]) * 1e3:.0f} ms, "
            f"PyTorch {sum(rec['torch'][-1][:3]) * 1e3:.0f} ms")

    n_params = model.num_params()
    fpt = flops_per_token(n_params, cfg)
    tokens = B * cfg.block_size
    peak = 2.0 * peak_n ** 3 / _median(sgemm[1:] or sgemm)
    out = {"config": dict(CONFIGS[name], **SETTINGS), "n_params": n_params, "tokens_per_step": tokens, "peak_flops": peak,
           "flops_per_step": fpt * tokens, "loss_first": {"ours": l_ours, "torch": l_torch},
           "grad_norm_first": {w: rec[w][0][4] for w in rec},
           "loss_last": {w: rec[w][-1][3] for w in rec},
           "block_ratios": block_ratios}
    for who, r in timed.items():
        fwd, bwd, opt_t = ([s[j] for s in r] for j in range(3))
        total = _median([a + b + c for a, b, c in zip(fwd, bwd, opt_t)])
        flops_s = fpt * tokens / total
        out[who] = {"fwd": _median(fwd), "bwd": _median(bwd), "opt": _median(opt_t), "total": total,
                    "tokens_s": tokens / total, "flops_s": flops_s, "mfu": flops_s / peak}
    out["profile"] = profile_ours(model, opt, params, data[:profile_steps]) if profile_steps else None
    out["op_profile"] = (op_profile(model, opt, params, tm, topt, tparams, data[-min(len(data), 2 * profile_steps):])
                         if profile_steps else None)
    return out


def _enclosing_class(path: str, line: int) -> str:
    """'Linear.' for a method defined inside ``class Linear`` (cProfile names only the function)."""
    import linecache
    if linecache.getline(path, line)[:1] not in (" ", "\t"):
        return ""                                   # a module-level function
    for n in range(line - 1, 0, -1):
        text = linecache.getline(path, n)
        if text.startswith("class "):
            return text[6:].split("(")[0].split(":")[0].strip() + "."
        if text[:1] not in ("", " ", "\t", "\n", "#", "@", ")"):
            return ""
    return ""


def profile_ours(model, opt, params, data, top: int = 14) -> list:
    """cProfile of our steps: the functions with the most own time, per step."""
    pr = cProfile.Profile()
    pr.enable()
    for x, y in data:
        ours_step(model, opt, params, x, y)
    pr.disable()
    st = pstats.Stats(pr, stream=io.StringIO())
    total = sum(v[2] for v in st.stats.values())
    rows = []
    for (fn, line, func), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        path = os.path.relpath(fn, ROOT) if fn.startswith(ROOT) else os.path.basename(fn)
        where = func if fn == "~" else f"{path}:{line}({_enclosing_class(fn, line)}{func})"
        rows.append({"function": where, "calls_per_step": nc / len(data), "ms_per_step": tt * 1e3 / len(data),
                     "share": tt / total})
    return rows


OP_CATEGORIES = [
    # (category, our Function class names, substrings of PyTorch's aten op names)
    ("matrix products (Linear)", ("Linear",), ("aten::mm", "aten::addmm")),
    ("attention", ("QKVAttention", "Attention"), ("scaled_dot_product",)),
    ("GELU", ("GeluTanh", "GeluExact"), ("aten::gelu",)),
    ("LayerNorm", ("LayerNorm",), ("native_layer_norm",)),
    ("embedding", ("GetItem",), ("embedding",)),
    ("loss", ("SoftmaxCrossEntropy",), ("log_softmax", "nll_loss")),
]


def _function_classes():
    from minigrad.tensor import Function
    todo, out = [Function], []
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def op_profile(model, opt, params, tm, topt, tparams, data) -> dict:
    """ms per step in each op category, ours (timers around every Function's forward and
    backward) and PyTorch's (torch.profiler self CPU time), over the same batches."""
    ours = {}
    originals = []
    for cls in _function_classes():
        for meth in ("forward", "backward"):
            f = cls.__dict__.get(meth)
            if f is None:
                continue
            originals.append((cls, meth, f))

            def timed(self, *a, _f=f, _name=cls.__name__, **kw):
                t0 = time.perf_counter()
                try:
                    return _f(self, *a, **kw)
                finally:
                    ours[_name] = ours.get(_name, 0.0) + time.perf_counter() - t0
            setattr(cls, meth, timed)
    try:
        t0 = time.perf_counter()
        for x, y in data:
            ours_step(model, opt, params, x, y)
        ours_total = time.perf_counter() - t0
    finally:
        for cls, meth, f in originals:
            setattr(cls, meth, f)
    from torch.profiler import ProfilerActivity, profile
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in data:
            torch_step(tm, topt, tparams, x, y)
    torch_total = time.perf_counter() - t0
    theirs = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    n = len(data)
    rows = []
    for cat, our_names, their_keys in OP_CATEGORIES:
        o = sum(v for k, v in ours.items() if k in our_names)
        t = sum(v for k, v in theirs.items() if any(s in k for s in their_keys))
        rows.append({"category": cat, "ours_ms": o * 1e3 / n, "torch_ms": t * 1e3 / n})
    rows.append({"category": "step with the profilers on", "ours_ms": ours_total * 1e3 / n,
                 "torch_ms": torch_total * 1e3 / n})
    return {"steps": n, "rows": rows}


# --------------------------------------------------------------------------- matmul peak
def bench_peak(n: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    c = np.empty_like(a)
    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.empty(n, n)
    np.matmul(a, b, out=c)
    torch.mm(ta, tb, out=tc)
    times = {"numpy": [], "torch": []}
    for i in range(reps):
        for who in (("numpy", "torch") if i % 2 == 0 else ("torch", "numpy")):
            t0 = time.perf_counter()
            np.matmul(a, b, out=c) if who == "numpy" else torch.mm(ta, tb, out=tc)
            times[who].append(time.perf_counter() - t0)
    fl = 2.0 * n ** 3
    return {"n": n, **{f"{w}_median": fl / _median(t) for w, t in times.items()},
            **{f"{w}_best": fl / min(t) for w, t in times.items()}}


# --------------------------------------------------------------------------- attention
def attn_inputs(T: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((1, ATTN_HEADS, T, ATTN_HS)).astype(np.float32) for _ in range(4))


def attn_runner(name: str, q, k, v, do):
    """A function that runs one forward + backward and returns (t_fwd, t_bwd, out, dq)."""
    B, nh, T, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    if name in katt.IMPLS:
        fwd, bwd = katt.IMPLS[name]
        q3, k3, v3, do3 = (a.reshape(B * nh, T, hs) for a in (q, k, v, do))

        def run():
            t0 = time.perf_counter()
            o, lse = fwd(q3, k3, v3, scale, True)
            t1 = time.perf_counter()
            dq, dk, dv = bwd(q3, k3, v3, o, lse, do3, scale, True)
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1, o.reshape(q.shape), dq.reshape(q.shape)
    elif name in ("node", "composite"):
        def run():
            qt, kt, vt = (mg.Tensor(a, requires_grad=True) for a in (q, k, v))
            t0 = time.perf_counter()
            y = mattn.attention(qt, kt, vt, causal=True, impl="auto") if name == "node" else \
                MF.scaled_dot_product_attention(qt, kt, vt, causal=True)
            t1 = time.perf_counter()
            y.backward(do)
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1, y.data, qt.grad.data
    elif name == "torch":
        qt, kt, vt = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
        dot = torch.from_numpy(do)

        def run():
            for t in (qt, kt, vt):
                t.grad = None
            t0 = time.perf_counter()
            y = TF.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            t1 = time.perf_counter()
            y.backward(dot)
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1, y.detach().numpy(), qt.grad.numpy()
    else:
        raise ValueError(f"unknown attention implementation {name!r}")
    return run


def tracemalloc_extra(run) -> int:
    """Peak bytes allocated through Python/NumPy during ``run()`` (inputs excluded)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        res = run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del res
    return peak - base


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child_attn_rss(name: str, T: int) -> dict:
    """Run in a fresh process: resident-set peak of one forward + backward above the inputs."""
    attn_runner(name, *attn_inputs(64))()          # thread pools, JIT caches, lazy imports
    gc.collect()
    q, k, v, do = attn_inputs(T)
    run = attn_runner(name, q, k, v, do)
    try:
        with open("/proc/self/clear_refs", "w") as f:   # Linux >= 4.0: reset VmHWM to VmRSS
            f.write("5")
        method = "VmHWM after clear_refs"
        base = _status_kb("VmRSS")
    except OSError:
        import resource
        method = "ru_maxrss (upper-bounded by earlier peaks)"
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = run()
    peak = _status_kb("VmHWM")
    del res
    return {"extra_bytes": (peak - base) * 1024, "method": method}


def rss_extra_subprocess(name: str, T: int, threads: int) -> int | None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child_attn", f"{name}:{T}:{threads}"],
                       capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        print(f"  (RSS child {name} T={T} failed: {p.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])["extra_bytes"]


def bench_attention(Ts, names, reps_at_256: int, min_reps: int, rss: bool, threads: int, log=print) -> dict:
    for name in names:                         # compile / load the Numba kernels before timing
        attn_runner(name, *attn_inputs(64))()
    results, est_prev = {}, {}
    for T in Ts:
        q, k, v, do = attn_inputs(T)
        live, row = [], {}
        for name in names:
            r = row[name] = {}
            if name in QUADRATIC and name in est_prev:
                est = est_prev[name][1] * (T / est_prev[name][0]) ** 2
                if est > MEM_LIMIT:
                    r.update(skipped=True, est_bytes=est)
                    continue
            live.append(name)
        runners = {n: attn_runner(n, q, k, v, do) for n in live}
        reps = max(min_reps, int(reps_at_256 * 256 / T))
        times = {n: [] for n in live}
        outs = {}
        for i in range(reps):
            order = live[i % len(live):] + live[:i % len(live)]   # rotate who goes first
            for n in order:
                tf, tb, o, dq = runners[n]()
                times[n].append((tf, tb))
                outs[n] = (o, dq)
        ref_o, ref_dq = outs["blocked"] if "blocked" in outs else next(iter(outs.values()))
        for n in live:
            r = row[n]
            r["fwd"] = _median([a for a, _ in times[n]])
            r["bwd"] = _median([b for _, b in times[n]])
            r["total"] = _median([a + b for a, b in times[n]])
            r["max_abs_diff_o"] = float(np.abs(outs[n][0] - ref_o).max())
            r["max_abs_diff_dq"] = float(np.abs(outs[n][1] - ref_dq).max())
            r["tracemalloc_bytes"] = None if n == "torch" else tracemalloc_extra(runners[n])
            if n in QUADRATIC:
                est_prev[n] = (T, r["tracemalloc_bytes"])
            r["rss_bytes"] = rss_extra_subprocess(n, T, threads) if rss else None
        outs.clear()
        del runners
        results[T] = row
        log(f"[attention] T={T}: " + ", ".join(
            f"{n} {row[n]['total'] * 1e3:.1f} ms" if not row[n].get("skipped") else f"{n} skipped" for n in names))
    return results


# --------------------------------------------------------------------------- generation
def bench_generation(batches: Batches, new_tokens: int, reps: int, seed: int, log=print) -> dict:
    cfg, _ = model_config("nanoGPT-CPU", batches.vocab, block_size=256)
    mg.manual_seed(seed)
    model = GPT(cfg)
    tm = torch_twin(model).eval()
    prompt = [int(t) for t in batches.get(1, 16)[0][0]]
    assert len(prompt) + new_tokens <= cfg.block_size, "the text must fit in the window for a fair comparison"

    @torch.no_grad()
    def torch_generate():
        idx = torch.tensor([prompt])
        for _ in range(new_tokens):
            logits, _ = tm(idx[:, -cfg.block_size:])
            idx = torch.cat([idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)], dim=1)
        return idx[0].tolist()

    runs = {"ours, KV cache": lambda: generate_ids(model, prompt, new_tokens, "greedy", use_cache=True)[0],
            "ours, no cache": lambda: generate_ids(model, prompt, new_tokens, "greedy", use_cache=False)[0],
            "PyTorch, no cache": torch_generate}
    times = {k: [] for k in runs}
    outs = {}
    names = list(runs)
    for i in range(reps):
        for k in names[i % 3:] + names[:i % 3]:
            t0 = time.perf_counter()
            outs[k] = runs[k]()
            times[k].append(time.perf_counter() - t0)
    if outs["ours, KV cache"] != outs["ours, no cache"]:
        a, b = outs["ours, KV cache"], outs["ours, no cache"]
        first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        raise AssertionError(f"greedy outputs differ with and without the KV cache from position {first}")
    same_torch = sum(x == y for x, y in zip(outs["ours, no cache"], outs["PyTorch, no cache"])) - len(prompt)
    res = {k: {"s": _median(t), "tokens_s": new_tokens / _median(t)} for k, t in times.items()}
    res.update(new_tokens=new_tokens, prompt_len=len(prompt), identical_cache=True,
               torch_agreeing_tokens=same_torch)
    log("[generation] " + ", ".join(f"{k} {v['tokens_s']:.0f} tok/s" for k, v in res.items() if isinstance(v, dict)))
    return res


# --------------------------------------------------------------------------- report
def environment() -> dict:
    blas = "?"
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:  # older NumPy: the report just says "?"
        pass
    import numba
    try:   # what exactly was measured: the commit, and whether the tree had uncommitted changes
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        rev = (rev + (" + uncommitted changes" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    return {"git": rev, "python": platform.python_version(), "numpy": np.__version__, "numpy_blas": blas,
            "numba": numba.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "minigrad": mg.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "numba_threads": numba.get_num_threads()}


def write_report(res: dict, out_dir: str) -> str:
    env, peak = res["env"], res["peak"]
    parts = ["# minigrad vs PyTorch (CPU)", "",
             f"{env['cpu']}, {env['cores']} cores; Python {env['python']}, NumPy {env['numpy']} "
             f"({env['numpy_blas']}), Numba {env['numba']}, "
             f"PyTorch {env['torch']}, minigrad {env['minigrad']} (git {env['git']}). "
             f"Threads: PyTorch {res['threads']['torch']}, "
             f"Numba {res['threads']['numba']}, NumPy BLAS {res['threads']['numpy_blas']}; our kernels "
             + ("run on NumPy's OpenBLAS threads. " if res['threads'].get('pool')
                else f"run on one thread ({res['threads'].get('pool_note', '')}). ") +
             f"Load average before/after: {res['load_before']} / {res['load_after']} (a shared machine: "
             f"ratios from interleaved runs are the numbers to read, absolute times are noisy). "
             f"Data: {res['data']}. Mode: {res['mode']}; total run time {res['wall_s']:.0f} s.", ""]

    parts += ["## Training step", "",
              f"Medians over steps ({', '.join(f'{n}: {k}' for n, k in res['steps'].items())}) run in "
              f"alternating blocks of {BLOCK} per framework, the first step of each block and the first "
              f"{res['warmup']} steps untimed (thread pools spin after their work: a step right after the "
              "other framework's is slowed by it). "
              "fwd includes the loss; bwd includes zero_grad; opt is clip_grad_norm (1.0) + AdamW step. "
              "MFU: model FLOPs per step = tokens x (6 N + 12 L C T), N = non-embedding parameters "
              "(PaLM's formula, as nanoGPT's estimate_mfu), over step time, over the NumPy float32 "
              f"matmul rate ({peak['n']}^3 sgemm) timed between the steps of the same config, so both "
              "are measured under the same load: "
              + ", ".join(f"{n} {r['peak_flops'] / 1e9:.1f} GFLOP/s" for n, r in res["training"].items())
              + f". Before the steps, alternating, NumPy's sgemm ran at {peak['numpy_median'] / 1e9:.1f} "
              f"GFLOP/s (median; best {peak['numpy_best'] / 1e9:.1f}) and torch.mm at "
              f"{peak['torch_median'] / 1e9:.1f} (best {peak['torch_best'] / 1e9:.1f}).", ""]
    rows, checks = [], []
    for name, r in res["training"].items():
        for who, label in (("ours", "minigrad"), ("torch", "PyTorch")):
            s = r[who]
            rows.append([name, label, f"{s['fwd'] * 1e3:.1f}", f"{s['bwd'] * 1e3:.1f}", f"{s['opt'] * 1e3:.1f}",
                         f"{s['total'] * 1e3:.1f}", f"{s['tokens_s']:,.0f}", f"{s['flops_s'] / 1e9:.2f}",
                         f"{100 * s['mfu']:.1f}%"])
        o, t = r["ours"], r["torch"]
        rows.append([name, "**ours / PyTorch**", *(f"**{o[k] / t[k]:.2f}x**" for k in ("fwd", "bwd", "opt", "total")),
                     f"{o['tokens_s'] / t['tokens_s']:.2f}x", "", ""])
        if "nanogpt" in r:   # nanoGPT's own model.py: the twin must be at least as fast, or we compare to it
            s = n = r["nanogpt"]
            rows.append([name, "nanoGPT's model.py", f"{s['fwd'] * 1e3:.1f}", f"{s['bwd'] * 1e3:.1f}",
                         f"{s['opt'] * 1e3:.1f}", f"{s['total'] * 1e3:.1f}", f"{s['tokens_s']:,.0f}",
                         f"{s['flops_s'] / 1e9:.2f}", f"{100 * s['mfu']:.1f}%"])
            f = n if n["total"] < t["total"] else t
            rows.append([name, "**ours / the faster PyTorch model**" + (" (nanoGPT's)" if f is n else " (twin)"),
                         *(f"**{o[k] / f[k]:.2f}x**" for k in ("fwd", "bwd", "opt", "total")),
                         f"{o['tokens_s'] / f['tokens_s']:.2f}x", "", ""])
        checks.append([name, f"{r['n_params'] / 1e6:.2f}M", f"{r['tokens_per_step']}",
                       f"{r['flops_per_step'] / 1e9:.2f}",
                       f"{r['loss_first']['ours']:.6f}", f"{r['loss_first']['torch']:.6f}",
                       f"{abs(r['loss_first']['ours'] - r['loss_first']['torch']):.1e}",
                       f"{r['grad_norm_first']['ours']:.5f} / {r['grad_norm_first']['torch']:.5f}",
                       f"{r['loss_last']['ours']:.4f} / {r['loss_last']['torch']:.4f}"])
    parts += [md_table(["config", "framework", "fwd ms", "bwd ms", "opt ms", "step ms", "tokens/s",
                        "GFLOP/s", "MFU"], rows), ""]
    paired = []
    for name, r in res["training"].items():
        br = np.asarray(r.get("block_ratios") or [np.nan])
        paired.append([name, len(br), f"{np.median(br):.2f}x", f"{np.percentile(br, 25):.2f}x - {np.percentile(br, 75):.2f}x",
                       f"{br.min():.2f}x - {br.max():.2f}x", f"{np.mean(br <= 1.0):.0%}"])
    parts += ["Paired estimate: the machine's load drifts over minutes, so each chunk of steps (ours and "
              "PyTorch's back to back, a few seconds apart) gives its own ratio of median step times; "
              "their spread shows how much of a difference is the load's.", "",
              md_table(["config", "chunks", "median ratio", "middle half", "range", "chunks at <= 1.0x"], paired), ""]
    parts += ["Same work, checked:", "",
              md_table(["config", "N", "tokens/step", "GFLOP/step", "first loss (ours)", "first loss (PyTorch)",
                        "abs diff", "grad norm step 1 (ours / PyTorch)", "loss at last step (ours / PyTorch)"],
                       checks), ""]
    for name, r in res["training"].items():
        if r.get("op_profile"):
            op = r["op_profile"]
            parts += [f"Time per op category in our {name} step and PyTorch's ({op['steps']} more steps each, "
                      "ms per step): ours from timers around every Function's forward and backward, PyTorch's "
                      "from torch.profiler's self CPU time of its aten ops. Both profilers add overhead, "
                      "so the last row is slower than the step times above.", "",
                      md_table(["op category", "minigrad ms", "PyTorch ms", "ours / PyTorch"],
                               [[p["category"], f"{p['ours_ms']:.2f}", f"{p['torch_ms']:.2f}",
                                 f"{p['ours_ms'] / p['torch_ms']:.2f}x" if p["torch_ms"] > 0 else "n/a"]
                                for p in op["rows"]]), ""]
        if r.get("profile"):
            parts += [f"Where our {name} step spends its time (cProfile, own time per step; the profiler "
                      "inflates Python overhead, and a product written `a @ b` is no call of its own, so "
                      "BLAS time counts as own time of the function that computes it: the Linear op's "
                      "forward and backward are mostly matrix products):", "",
                      md_table(["function", "calls/step", "ms/step", "share"],
                               [[f"`{p['function']}`", f"{p['calls_per_step']:.0f}", f"{p['ms_per_step']:.1f}",
                                 f"{100 * p['share']:.1f}%"] for p in r["profile"]]), ""]

    a = res["attention"]
    if a:
        parts += ["## Attention forward + backward", "",
                  f"Causal, batch 1, {ATTN_HEADS} heads, head size {ATTN_HS}, float32. Time: medians of interleaved "
                  "repeats. Extra memory = peak above the inputs (outputs, saved state and gradients included). "
                  "tracemalloc: this process, NumPy buffers only (Numba-internal allocations and PyTorch are "
                  "invisible to it). RSS: a fresh subprocess per cell, VmHWM reset by /proc/self/clear_refs "
                  "after warm-up and input allocation, then one forward + backward; page-granular and includes "
                  "allocator slack, so small values are noisy. max|diff|: output and dq against our blocked kernel.",
                  ""]
        rows = []
        for T, row in a.items():
            for n, r in row.items():
                if r.get("skipped"):
                    rows.append([T, ATTN_LABELS[n], "skipped", "", "", "", f"needs ~{r['est_bytes'] / 2 ** 30:.1f} GB "
                                 "(> 2 GB)", "", ""])
                    continue
                tr = r["total"] / row["torch"]["total"] if "torch" in row and "total" in row["torch"] else float("nan")
                rows.append([T, ATTN_LABELS[n], f"{r['fwd'] * 1e3:.1f}", f"{r['bwd'] * 1e3:.1f}", f"{r['total'] * 1e3:.1f}",
                             f"{tr:.2f}x", _mb(r["tracemalloc_bytes"]), _mb(r["rss_bytes"]),
                             f"{r['max_abs_diff_o']:.1e} / {r['max_abs_diff_dq']:.1e}"])
        parts += [md_table(["T", "implementation", "fwd ms", "bwd ms", "fwd+bwd ms", "vs PyTorch", "extra MB (tracemalloc)",
                            "extra MB (RSS)", "max abs diff o / dq"], rows), ""]

    g = res["generation"]
    if g:
        parts += ["## Generation", "",
                  f"nanoGPT-CPU model with block 256 (4 layers, 4 heads, 128 wide), untrained, greedy, "
                  f"{g['new_tokens']} new tokens after a {g['prompt_len']}-token prompt, batch 1; medians of "
                  f"interleaved repeats. Ours with and without the cache gave identical tokens; PyTorch agreed on "
                  f"{g['torch_agreeing_tokens']}/{g['new_tokens']} new tokens (an untrained model's logits are "
                  "close together, so float rounding can flip an argmax).", ""]
        rows = [[k, f"{v['s']:.2f}", f"{v['tokens_s']:,.0f}"] for k, v in g.items() if isinstance(v, dict)]
        speedup = g["ours, KV cache"]["tokens_s"] / g["ours, no cache"]["tokens_s"]
        rows.append(["ours: cache speed-up", "", f"{speedup:.2f}x"])
        parts += [md_table(["run", "seconds", "tokens/s"], rows), ""]
    text = "\n".join(parts)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def plot(res: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    colors = {"fwd": "#4c72b0", "bwd": "#dd8452", "opt": "#55a868"}
    for ax, (name, r) in zip(axes[0], res["training"].items()):
        bottom = np.zeros(2)
        for part in ("fwd", "bwd", "opt"):
            vals = np.array([r["ours"][part], r["torch"][part]]) * 1e3
            ax.bar(["minigrad", "PyTorch"], vals, bottom=bottom, label=part, color=colors[part])
            bottom += vals
        ratio = r["ours"]["total"] / r["torch"]["total"]
        ax.set_title(f"{name}: ms per training step (ours / PyTorch = {ratio:.2f}x)")
        ax.set_ylabel("ms")
        ax.legend()
    attn = {int(T): row for T, row in res["attention"].items()}   # keys are strings after a JSON round trip
    Ts = sorted(attn)
    styles = dict(zip(ATTN_LABELS, ("o-", "s-", "^-", "x--", "v-", "D-")))
    for n in ATTN_LABELS:
        pts = [(T, attn[T][n]) for T in Ts if n in attn[T] and not attn[T][n].get("skipped")]
        if not pts:
            continue
        axes[1, 0].plot([T for T, _ in pts], [r["total"] * 1e3 for _, r in pts], styles[n], label=ATTN_LABELS[n])
        mem = [(T, r["rss_bytes"] if r["rss_bytes"] is not None else r["tracemalloc_bytes"]) for T, r in pts]
        mem = [(T, m) for T, m in mem if m is not None and m > 0]
        if mem:
            axes[1, 1].plot([T for T, _ in mem], [m / 2 ** 20 for _, m in mem], styles[n], label=ATTN_LABELS[n])
    axes[1, 0].set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="ms",
                   title="attention forward + backward time")
    axes[1, 1].set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="MB",
                   title="attention extra memory (RSS peak, fresh process)")
    for ax in axes[1]:
        ax.set_xticks(Ts, [str(T) for T in Ts])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run (few steps, small T)")
    p.add_argument("--output_dir", default="benchmarks/results/compare_torch")
    p.add_argument("--data", default=None, help="a text file (e.g. tinyshakespeare.txt); default: random tokens")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per config (default: 20 nanoGPT-CPU, 10 baby-GPT; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3, quick 1)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--attn_T", type=int, nargs="+", default=None, help="default 256 1024 4096 (quick 128 256)")
    p.add_argument("--gen_tokens", type=int, default=None, help="default 200 (quick 40)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for PyTorch, Numba and NumPy's BLAS alike (default: all cores)")
    p.add_argument("--no_rss", action="store_true", help="skip the fresh-process memory measurements")
    p.add_argument("--nanogpt_dir", default=None, help="a nanoGPT checkout: its model.py's step is timed too "
                   "(same weights), and ours is reported against the faster of it and our twin")
    p.add_argument("--nanogpt_settings", action="store_true", help="no biases and exact GELU (nanoGPT train.py's "
                   "defaults) instead of GPT-2's biases and tanh GELU")
    p.add_argument("--skip", nargs="+", default=[], choices=["attention", "generation"],
                   help="parts not to run")
    p.add_argument("--no_profile", action="store_true", help="skip the cProfile table of our step")
    p.add_argument("--_child_attn", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # as lm.train does; the allocator setting holds for the whole process, PyTorch included
    mg.backend.keep_freed_memory()

    if torch is None:
        print("error: this benchmark needs PyTorch as the reference (pip install torch); "
              "minigrad itself does not", file=sys.stderr)
        return 2
    if args._child_attn:
        name, T, threads = args._child_attn.split(":")
        set_threads(int(threads))
        print(json.dumps(child_attn_rss(name, int(T))))
        return 0

    if args.nanogpt_settings:
        SETTINGS.update(gelu="exact", bias=False)
    if args.nanogpt_dir:
        NANOGPT["module"] = load_nanogpt(args.nanogpt_dir)
        if SETTINGS["gelu"] != "exact":
            print("note: nanoGPT's model.py has exact GELU only: --nanogpt_dir implies --nanogpt_settings' GELU")
            SETTINGS.update(gelu="exact")
    threads = set_threads(args.threads)
    if args.threads > 1 and os.getloadavg()[0] > os.cpu_count():
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. Multi-threaded "
              "BLAS/OpenMP calls wait at barriers for threads the scheduler has parked, which can make "
              "small-op workloads 10-50x slower and the numbers meaningless; consider --threads 1.",
              file=sys.stderr)
    q = args.quick
    steps = {name: args.steps if args.steps is not None else (3 if q else DEFAULT_STEPS[name]) for name in CONFIGS}
    warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    Ts = args.attn_T or ([128, 256] if q else [256, 1024, 4096])
    gen_tokens = args.gen_tokens or (40 if q else 200)
    os.makedirs(args.output_dir, exist_ok=True)
    t_start = time.perf_counter()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())

    res = {"mode": "quick" if q else "full", "steps": {n: steps[n] for n in args.configs}, "warmup": warmup,
           "env": environment(), "threads": threads}
    batches = Batches(args.data, args.seed)
    res["data"] = batches.source
    print(f"environment: {res['env']}")

    res["peak"] = bench_peak(1024 if q else 2048, 3 if q else 7)
    print(f"float32 matmul {res['peak']['n']}^3: NumPy {res['peak']['numpy_median'] / 1e9:.1f} GFLOP/s, "
          f"torch.mm {res['peak']['torch_median'] / 1e9:.1f} GFLOP/s (medians)")

    res["training"] = {}
    for name in args.configs:
        res["training"][name] = bench_training(name, batches, steps[name], warmup, args.seed,
                                               res["peak"]["n"], 0 if (q or args.no_profile) else 3)

    names = ["blocked", "flash", "reference", "node", "composite", "torch"]
    res["attention"] = {} if "attention" in args.skip else bench_attention(
        Ts, names, reps_at_256=2 if q else 24, min_reps=2 if q else 3, rss=not args.no_rss, threads=args.threads)
    res["generation"] = None if "generation" in args.skip else bench_generation(batches, gen_tokens, 1 if q else 3,
                                                                                args.seed)

    res["wall_s"] = time.perf_counter() - t_start
    res["load_before"], res["load_after"] = load_before, " ".join(f"{x:.1f}" for x in os.getloadavg())
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2, default=str)
    text = write_report(res, args.output_dir)
    plot(res, os.path.join(args.output_dir, "compare_torch.png"))
    print()
    print(text)
    print(f"\nwrote {os.path.join(args.output_dir, 'report.md')} and compare_torch.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
