"""Quantization, measured: quality, size on disk, decode speed, bandwidth and memory, in one run.

    python benchmarks/quantization.py --data /path/to/tinyshakespeare.txt            # everything
    python benchmarks/quantization.py --parts quality --model_dir output/model       # another model
    python benchmarks/quantization.py --parts speed --shapes gpt2 --repeats 5

Parts (``--parts``, comma separated):

* ``quality``: the reference model of ``benchmarks/reference.py`` (char-level Tiny Shakespeare,
  4 layers x 256, context 128; trained once and cached) or ``--model_dir``. Each scheme goes
  through the tool (``lm.compress``: quantize, save, and load back through ``lm.loader``), then
  the report's metrics (``lm.report.quality``) over the validation split: loss before/after,
  KL divergence, same-top-1, perplexity ratio; and the size of model.safetensors against the
  float32 file. GPTQ calibrates on ``--calib_batches`` batches of the training split. Each
  scheme is written with the tool's defaults (the 4-bit ones store the float tensors that stay,
  norms, biases and position embeddings, as float16); ``q4_0+f32`` keeps them float32, ``q8_0+f16``
  makes them float16 (``lm.compress --rest_dtype``).
* ``speed``: greedy decoding at batch 1 with the KV cache, ``--new_tokens`` new tokens after a
  one-token prompt, at the baby GPT shape (6 x 384, vocab 65, context 256) and a GPT-2-small
  shape (12 x 768, vocab 50304, context 1024), random weights (speed does not depend on the
  values). Ours in float32 and quantized; PyTorch float32 and PyTorch dynamic int8
  (``torch.ao.quantization.quantize_dynamic`` over ``nn.Linear``) on the same weights, with
  a KV cache written here (PyTorch's nanoGPT-style twin has none). All variants take turns,
  ``--repeats`` rounds after a warm-up round; medians. Bandwidth: weight bytes read per token
  (every matrix once, the tied head included) x tokens/s, against the copy bandwidth of a
  256 MiB array measured in the same run (read + write bytes / time).
* ``memory``: a GPT-2-small shape saved in float32 and in q4_0, each loaded through
  ``lm.loader`` in a fresh process that generates ``--new_tokens`` tokens: the bytes the model
  holds (weights, scales, float parameters, KV cache sized for the generation, the step's
  largest activations), counted with ``minigrad.memory.unique_nbytes``, and the process's
  peak resident memory (``VmHWM``).

Writes ``quantization.json`` and ``quantization.md`` under ``--out`` and prints the tables.
The machines these run on are shared: the timings are ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import minigrad as mg  # noqa: E402
from minigrad import quant  # noqa: E402

QUALITY_SCHEMES = ("fp16", "bf16", "int8", "q8_0", "q4_0", "nf4", "gptq")
SPEED_SCHEMES = ("int8", "q8_0", "q4_0", "nf4")
SHAPES = {"baby": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=65, block_size=256),
          "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024)}


def md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- quality and size
def bench_quality(model_dir: str, data: str | None, out: str, eval_batches: int, calib_batches: int,
                  schemes, log=print) -> dict:
    from lm import compress as lc
    from lm.loader import load_model, read_config
    from lm.report import quality
    base, tok = load_model(model_dir)
    conf = read_config(model_dir)
    corpus = data or conf["data"]["corpus"]
    f32_bytes = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    res = {"model_dir": model_dir, "float32_bytes": f32_bytes, "schemes": {}}
    cache = {}
    for s in schemes:
        folder = os.path.join(out, "models", s)
        if os.path.isdir(folder):
            import shutil
            shutil.rmtree(folder)
        argv = ["--model_dir", model_dir, "--quantize", s.split("+")[0], "--output_dir", folder, "--no_report",
                "--no_progress", "--data", corpus] + (["--rest_dtype", "float16"] if s.endswith("+f16") else
                                                 ["--rest_dtype", "float32"] if s.endswith("+f32") else [])
        if s.startswith("gptq"):
            argv += ["--calib_data", corpus, "--calib_batches", str(calib_batches)]
        t0 = time.perf_counter()
        args = lc.build_parser().parse_args(argv)
        lc.compress(args, log=lambda *a: None)
        t_quant = time.perf_counter() - t0
        model, _ = load_model(folder)
        from lm.data import prepare_data
        val = prepare_data(corpus, tokenizer=tok, val_fraction=conf["data"].get("val_fraction", 0.1)).val
        q = quality(base, model, val, base.config.block_size, 16, eval_batches or None, cache=cache)
        size = os.path.getsize(os.path.join(folder, "model.safetensors"))
        head = quant.bytes_report(model)["by_module"].get("lm_head", {}).get("bytes", 0)
        r = {"delta_loss": q["loss_after"] - q["loss_before"], "kl": q["kl_divergence"], "same_top1": q["same_top1"],
             "ppl_ratio": float(np.exp(q["loss_before"] - q["loss_after"])), "loss": q["loss_after"],
             "bytes": size, "size_pct": 100 * size / f32_bytes, "bpw": quant.bits_per_weight(s.split("+")[0]),
             "head_bytes": head, "quantize_s": t_quant}
        res["schemes"][s] = r
        res["loss_float"] = q["loss_before"]
        res["tokens"] = q["tokens"]
        log(f"  {s}: dloss {r['delta_loss']:+.5f} KL {r['kl']:.5f} top1 {100 * r['same_top1']:.2f}% "
            f"size {r['size_pct']:.1f}% ({t_quant:.1f} s)")
    return res


def quality_table(q: dict) -> str:
    rows = []
    for s, r in q["schemes"].items():
        rows.append([s, f"{r['bpw']:.2f}", f"{r['bytes'] / 2**20:.2f} MiB", f"{r['size_pct']:.1f}%",
                     f"{r['delta_loss']:+.5f}", f"{r['kl']:.5f}", f"{100 * r['same_top1']:.2f}%", f"{r['ppl_ratio']:.4f}"])
    return (f"Model: `{q['model_dir']}` (float32 file {q['float32_bytes'] / 2**20:.2f} MiB, validation loss "
            f"{q['loss_float']:.4f} over {q['tokens']:,} tokens)\n\n"
            + md_table(["scheme", "bits/weight", "file", "of float32", "Δ loss (nats)", "KL", "same top-1",
                        "PPL ratio float/quant"], rows))


# --------------------------------------------------------------------------- speed
def torch_decoder(tm, n_layer: int):
    """Greedy decoding with a KV cache for the nanoGPT-shaped PyTorch twin (compare_torch.py)."""
    import torch
    import torch.nn.functional as TF

    @torch.no_grad()
    def run(prompt, new):
        ids = list(prompt)
        cache = [None] * n_layer
        x_ids = torch.tensor([ids])
        pos = 0
        for step in range(new):
            T = x_ids.shape[1]
            x = tm.transformer.wte(x_ids) + tm.transformer.wpe(torch.arange(pos, pos + T))
            for i, blk in enumerate(tm.transformer.h):
                a = blk.attn
                B, T, C = x.shape
                nh = a.n_head
                q, k, v = a.c_attn(blk.ln_1(x)).split(C, dim=2)
                q = q.view(B, T, nh, C // nh).transpose(1, 2)
                k = k.view(B, T, nh, C // nh).transpose(1, 2)
                v = v.view(B, T, nh, C // nh).transpose(1, 2)
                if cache[i] is not None:
                    k = torch.cat([cache[i][0], k], 2)
                    v = torch.cat([cache[i][1], v], 2)
                cache[i] = (k, v)
                y = TF.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
                x = x + a.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
                x = x + blk.mlp(blk.ln_2(x))
            logits = tm.lm_head(tm.transformer.ln_f(x[:, -1:, :]))
            pos += T
            nxt = int(logits[0, -1].argmax())
            ids.append(nxt)
            x_ids = torch.tensor([[nxt]])
        return ids
    return run


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes moved per second (read + write) by a large array copy."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / min(ts)


def weight_bytes_per_token(model) -> int:
    """Bytes of every matrix a decode step reads (each Linear once; embeddings: one row, ignored)."""
    from minigrad.nn.layers import Linear
    from minigrad.nn.quantized import QuantLinear
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, QuantLinear):
            n += m.weight.nbytes
        elif type(m) is Linear:
            n += m.weight.data.nbytes
    return n


def bench_speed(shape: str, new_tokens: int, repeats: int, schemes, torch_ok: bool, log=print) -> dict:
    from lm.config import ModelConfig
    from lm.generate import generate_ids
    from lm.model import GPT
    cfg = ModelConfig(dropout=0.0, **SHAPES[shape])
    mg.manual_seed(0)
    base = GPT(cfg).eval()
    runs, bytes_tok = {}, {}
    runs["ours float32"] = lambda m=base: generate_ids(m, [1], new_tokens, strategy="greedy")[0]
    bytes_tok["ours float32"] = weight_bytes_per_token(base)
    state = {k: v.copy() for k, v in base.state_dict().items()}
    for s in schemes:
        m = GPT.__new__(GPT)
        m = GPT(cfg).eval()
        m.load_state_dict(state)
        quant.quantize_(m, s)
        runs[f"ours {s}"] = lambda m=m: generate_ids(m, [1], new_tokens, strategy="greedy")[0]
        bytes_tok[f"ours {s}"] = weight_bytes_per_token(m)
    if torch_ok:
        import torch
        from compare_torch import torch_twin
        tm = torch_twin(base).eval()
        runs["PyTorch float32"] = lambda f=torch_decoder(tm, cfg.n_layer): f([1], new_tokens)
        bytes_tok["PyTorch float32"] = bytes_tok["ours float32"]
        tq = torch.ao.quantization.quantize_dynamic(torch_twin(base).eval(), {torch.nn.Linear}, dtype=torch.qint8)
        runs["PyTorch dynamic int8"] = lambda f=torch_decoder(tq, cfg.n_layer): f([1], new_tokens)
        bytes_tok["PyTorch dynamic int8"] = sum(
            (mod.weight().numel() + 4 * mod.weight().shape[0]) for mod in tq.modules()
            if type(mod).__name__ == "Linear" and hasattr(mod, "weight") and callable(mod.weight))
    times = {k: [] for k in runs}
    outs = {}
    order = list(runs)
    for rep in range(repeats + 1):
        for k in (order if rep % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            outs[k] = runs[k]()
            dt = time.perf_counter() - t0
            if rep:
                times[k].append(new_tokens / dt)
        if rep:
            log(f"  {shape} round {rep}: " + ", ".join(f"{k} {times[k][-1]:.0f}" for k in order))
    tps = {k: statistics.median(v) for k, v in times.items()}
    same = {k: sum(a == b for a, b in zip(outs[k], outs["ours float32"])) / len(outs[k]) for k in outs}
    return {"shape": shape, "config": SHAPES[shape], "new_tokens": new_tokens, "tokens_per_s": tps,
            "weight_bytes_per_token": bytes_tok, "same_tokens_as_float32": same}


def speed_table(sp: dict, bw: float) -> str:
    tps = sp["tokens_per_s"]
    f32 = tps["ours float32"]
    tdyn = tps.get("PyTorch dynamic int8")
    rows = []
    for k, v in tps.items():
        b = sp["weight_bytes_per_token"][k]
        rows.append([k, f"{v:.1f}", f"{v / f32:.2f}x", f"{v / tdyn:.2f}x" if tdyn else "-",
                     f"{b / 2**20:.1f} MiB", f"{b * v / 1e9:.2f} GB/s", f"{100 * b * v / bw:.0f}%"])
    c = sp["config"]
    return (f"Shape {sp['shape']}: {c['n_layer']} layers x {c['n_embd']}, vocab {c['vocab_size']}; batch 1, KV cache, "
            f"{sp['new_tokens']} new tokens\n\n"
            + md_table(["model", "tokens/s", "vs ours float32", "vs PyTorch dyn. int8", "weights read/token",
                        "bandwidth reached", "of copy bandwidth"], rows))


# --------------------------------------------------------------------------- memory
def _vm_hwm() -> int:
    """Peak resident bytes of this process image (VmHWM; ru_maxrss would carry the parent's
    peak across fork + exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_memory(model_dir: str, new_tokens: int) -> None:
    """In a fresh process: load, generate, print what the model held and the peak RSS (JSON)."""
    from lm.loader import load_model
    from lm.model import KVCache
    from minigrad.memory import unique_nbytes
    model, _ = load_model(model_dir)
    rss_loaded = _vm_hwm()
    cache = KVCache(model.config.n_layer, capacity=1 + new_tokens)   # sized for the generation
    ids = np.array([[1]])
    biggest = 0
    with mg.no_grad():
        for _ in range(new_tokens):
            logits, _ = model.forward(ids, cache=cache)
            biggest = max(biggest, logits.data.nbytes + 4 * 4 * model.config.n_embd * 4)   # logits + hidden, qkv, mlp
            ids = np.array([[int(logits.data[0, -1].argmax())]])
    rep = quant.bytes_report(model)
    kv = unique_nbytes([b for b in cache._kbuf + cache._vbuf if b is not None])
    print(json.dumps({"weights": rep["codes"], "scales": rep["scales"], "float": rep["float"],
                      "model": unique_nbytes(model.state_dict().values()), "kv_cache": kv, "activations": biggest,
                      "rss_peak": _vm_hwm(),
                      "rss_after_load": rss_loaded, "head_bytes": rep["by_module"].get("lm_head", {}).get("bytes")}))


def bench_memory(root: str, new_tokens: int, log=print) -> dict:
    from lm import compress as lc
    from lm.config import Config, apply_overrides
    from lm.model import GPT
    from lm.tokenizer import CharTokenizer
    from lm.train import save_model_dir
    f32 = os.path.join(root, "gpt2-float32")
    q4 = os.path.join(root, "gpt2-q4_0")
    if not os.path.isfile(os.path.join(f32, "model.safetensors")):
        c = SHAPES["gpt2"]
        cfg = apply_overrides(Config(), [f"model.{k}={v}" for k, v in c.items()] + ["model.dropout=0.0"])
        mg.manual_seed(0)
        tok = CharTokenizer([chr(0x100 + i) for i in range(c["vocab_size"])])
        save_model_dir(f32, GPT(cfg.model), tok, cfg)
    if not os.path.isfile(os.path.join(q4, "model.safetensors")):
        lc.compress(lc.build_parser().parse_args(["--model_dir", f32, "--quantize", "q4_0", "--output_dir", q4,
                                                  "--no_report", "--no_progress"]), log=lambda *a: None)
    res = {}
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    for name, d in (("float32", f32), ("q4_0", q4)):
        p = subprocess.run([sys.executable, __file__, "--child_memory", d, "--new_tokens", str(new_tokens)],
                           capture_output=True, text=True, env=env, check=True)
        res[name] = json.loads(p.stdout.strip().splitlines()[-1])
        res[name]["held"] = res[name]["model"] + res[name]["kv_cache"] + res[name]["activations"]
        log(f"  memory {name}: held {res[name]['held'] / 2**20:.1f} MiB, peak RSS {res[name]['rss_peak'] / 2**20:.1f} MiB")
    res["held_ratio"] = res["q4_0"]["held"] / res["float32"]["held"]
    return res


def memory_table(m: dict) -> str:
    rows = []
    for k in ("float32", "q4_0"):
        r = m[k]
        rows.append([k, f"{r['weights'] / 2**20:.1f}", f"{r['scales'] / 2**20:.1f}", f"{r['float'] / 2**20:.1f}",
                     f"{r['kv_cache'] / 2**20:.1f}", f"{r['activations'] / 2**20:.2f}", f"{r['held'] / 2**20:.1f}",
                     f"{r['rss_peak'] / 2**20:.0f}"])
    return (md_table(["GPT-2-small shape", "codes MiB", "scales MiB", "float params MiB", "KV cache MiB",
                      "activations MiB", "held MiB", "peak RSS MiB"], rows)
            + f"\n\nHeld by the q4_0 model: {100 * m['held_ratio']:.1f}% of float32's.")


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="quality,speed,memory")
    p.add_argument("--model_dir", default=None, help="model to measure quality on (default: the reference model)")
    p.add_argument("--data", default=None, help="tinyshakespeare.txt (default: the built-in name)")
    p.add_argument("--out", default=os.path.join(os.path.expanduser("~"), ".cache", "minigrad-lm", "bench", "quantization"))
    p.add_argument("--schemes", default=",".join(QUALITY_SCHEMES))
    p.add_argument("--speed_schemes", default=",".join(SPEED_SCHEMES))
    p.add_argument("--shapes", default="baby,gpt2")
    p.add_argument("--eval_batches", type=int, default=0, help="validation batches of 16 x context (0: the whole split)")
    p.add_argument("--calib_batches", type=int, default=48)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="1: one thread for everyone (PyTorch, OpenBLAS, our kernels), fairer on a busy machine")
    p.add_argument("--child_memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_memory:
        _child_memory(args.child_memory, args.new_tokens)
        return 0
    parts = set(args.parts.split(","))
    os.makedirs(args.out, exist_ok=True)
    res, md = {}, ["# Quantization benchmark", ""]
    from minigrad.kernels import threads
    if args.threads:
        threads.set_blas_threads(args.threads)
        if args.threads == 1:
            threads.enable(False)
    res["machine"] = {"cpus": os.cpu_count(), "blas": threads.blas_info(), "load_avg": os.getloadavg()}
    if "quality" in parts:
        from reference import reference_model_dir
        model_dir = args.model_dir or reference_model_dir(args.data)
        print(f"quality on {model_dir}")
        res["quality"] = bench_quality(model_dir, args.data, args.out, args.eval_batches, args.calib_batches,
                                       args.schemes.split(","))
        md += ["## Quality and size", "", quality_table(res["quality"]), ""]
    if "speed" in parts:
        try:
            import torch  # noqa: F401
            torch_ok = True
            torch.set_num_threads(args.threads or max(1, threads.get_blas_threads()))
        except ImportError:
            torch_ok = False
        bw = copy_bandwidth()
        res["copy_bandwidth"] = bw
        md += ["## Decode speed", "", f"Copy bandwidth measured in this run: {bw / 1e9:.1f} GB/s (read + write).", ""]
        res["speed"] = {}
        for shape in args.shapes.split(","):
            print(f"speed at the {shape} shape")
            res["speed"][shape] = bench_speed(shape, args.new_tokens, args.repeats, args.speed_schemes.split(","),
                                              torch_ok)
            md += [speed_table(res["speed"][shape], bw), ""]
    if "memory" in parts:
        print("memory of a 4-bit GPT-2-small generation")
        res["memory"] = bench_memory(os.path.join(args.out, "memory"), args.new_tokens)
        md += ["## Memory while generating", "", memory_table(res["memory"]), ""]
    res["load_avg_end"] = os.getloadavg()
    md += [f"Load average at start {res['machine']['load_avg'][0]:.1f}, at end {res['load_avg_end'][0]:.1f} "
           f"on {res['machine']['cpus']} CPUs (shared machine)."]
    text = "\n".join(md) + "\n"
    with open(os.path.join(args.out, "quantization.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(args.out, "quantization.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
