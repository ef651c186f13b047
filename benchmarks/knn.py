"""The memory bank's numbers (issue 17): kNN-LM quality, memorization, search and decode speed, memory.

    python benchmarks/knn.py --data /path/to/tinyshakespeare.txt      # the reference model
    python benchmarks/knn.py --model_dir output/model --data corpus.txt

On the shared reference model (``benchmarks/reference.py``) it

1. builds a datastore from the whole training split (float16 keys), timed;
2. quality: at 10%, 30% and 100% of that store (its first positions: a store built from the
   first part of the training text), tunes lambda, k and the temperature on the first half of
   the validation split and evaluates on the second half, against the LM alone on the same
   positions (``--positions`` of each half, from its start);
3. memorization: a new passage (written for this benchmark, in no corpus) is read once into a
   writable memory; the loss on its second occurrence, after other text, with and without it;
4. search speed: exact queries/s over the >= 1M keys at several batch sizes (ours, faiss
   flat, faiss IVF and its recall@1 against exact);
5. decode tokens/s with and without the memory, alternating, median of ``--repeats``;
6. memory: bytes per stored position, and the resident memory of a fresh process searching
   the memory-mapped store (with and without handing pages back).

Writes ``knn.md`` and ``knn.json`` under ``--out`` (default: the bench cache folder).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.reference import bench_dir, reference_model_dir  # noqa: E402

# Written for this benchmark; they appear in no corpus. The first tunes lambda, k and the
# temperature of the memory, the second is the one measured.
PASSAGE_TUNE = ("Beneath the old mill a ferryman called Tobin Grey kept a tally of every barrel he carried "
                "across the river, notched in a willow staff, and each midsummer he burned the staff on the "
                "green and cut a new one from the same tree beside the sluice.")
PASSAGE = ("Upon the salt marsh stood a lantern-keeper named Orrin Vell, who counted herons by moonlight "
           "and kept their numbers in a ledger bound with eel skin. Each autumn he walked the dykes to "
           "Harrowmere, sold his ledger to the abbess for a jar of plum wine, and began another.")
BEFORE = "\nA second reading, slower, by the fire:\n"


def rss() -> dict:
    """This process's resident memory (kB): total, anonymous, file-backed, and the peak."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def rss_child(store_path: str, release: bool, n_queries: int) -> dict:
    """Run in a fresh process: open the store memory-mapped, search it, report RSS (MiB)."""
    from lm.knn import Datastore
    before = rss()
    store = Datastore.open(store_path, release_pages=release)
    opened = rss()
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}

    def watch(s, e):
        store._release(s, e)
        for k, v in rss().items():
            if k in peak:
                peak[k] = max(peak[k], v)
    store.index.on_block = watch
    q = np.random.default_rng(0).standard_normal((n_queries, store.dim)).astype(np.float32)
    t = time.perf_counter()
    store.search(q, 32)
    dt = time.perf_counter() - t
    mib = lambda kb: kb / 1024  # noqa: E731
    return {"release_pages": release, "store_MiB": os.path.getsize(os.path.join(store_path, "keys.npy")) / 2**20,
            "rss_before_MiB": mib(before["VmRSS"]), "rss_open_MiB": mib(opened["VmRSS"]),
            "peak_rss_MiB": mib(peak["VmRSS"]), "peak_anon_MiB": mib(peak["RssAnon"]),
            "peak_file_MiB": mib(peak["RssFile"]), "search_s": dt, "queries": n_queries}


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="tinyshakespeare.txt (or the corpus of --model_dir)")
    p.add_argument("--model_dir", default=None, help="default: the reference model (trained once, cached)")
    p.add_argument("--out", default=None, help="default: <bench cache>/knn")
    p.add_argument("--positions", type=int, default=4096, help="validation positions per half (tune / eval)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode_tokens", type=int, default=100)
    p.add_argument("--rebuild", action="store_true", help="rebuild the datastore even if cached")
    p.add_argument("--rss_child", nargs=3, metavar=("STORE", "RELEASE", "QUERIES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child[0], args.rss_child[1] == "1", int(args.rss_child[2]))))
        return 0

    from lm import knn
    from lm.data import prepare_data
    from lm.generate import generate_ids
    from lm.knn_index import FaissIndex, faiss_available
    from lm.loader import load_model, read_config

    model_dir = args.model_dir or reference_model_dir(args.data)
    out = args.out or os.path.join(bench_dir(), "knn")
    os.makedirs(out, exist_ok=True)
    model, tok = load_model(model_dir)
    dconf = read_config(model_dir).get("data") or {}
    data = prepare_data(args.data or dconf.get("corpus"), tokenizer=tok,
                        val_fraction=float(dconf.get("val_fraction", 0.1)))
    train, val = np.asarray(data.train), np.asarray(data.val)
    report = {"model_dir": model_dir, "train_tokens": len(train), "val_tokens": len(val)}
    log = lambda m: print(m, flush=True)  # noqa: E731

    # ---- 1. build
    store_dir = os.path.join(out, "store")
    store = None
    if not args.rebuild and os.path.isfile(os.path.join(store_dir, "store.json")):
        try:
            store = knn.Datastore.open(store_dir, model)
            log(f"reusing the datastore in {store_dir}")
        except knn.StoreError as e:
            log(f"rebuilding: {e}")
    if store is None:
        store = knn.build_datastore(model, train, store_dir, "float16", batch_size=16,
                                    info={"corpus": args.data, "split": "train", "model_dir": model_dir})
    m = store.meta
    report["build"] = {"positions": len(store), "dim": store.dim, "key_dtype": m["key_dtype"],
                       "bytes_per_position": store.bytes_per_position(),
                       "MiB": len(store) * store.bytes_per_position() / 2**20,
                       "build_s": m["build_s"], "positions_per_s": m["positions_per_s"]}
    log(f"store: {len(store):,} positions, {store.bytes_per_position()} bytes/position, built at "
        f"{m['positions_per_s']:,.0f} positions/s")

    # ---- 2. quality at three sizes
    half = len(val) // 2
    tune_tok = val[:half][:args.positions + 1]
    eval_tok = val[half:][:args.positions + 1]
    quality = []
    for frac in (0.1, 0.3, 1.0):
        sub = store.subset(max(64, int(round(frac * len(store)))))
        cache = os.path.join(out, f"scores-{len(sub)}-{args.positions}.npz")
        if os.path.isfile(cache):
            z = np.load(cache)
            s_tune = {k[5:]: z[k] for k in z.files if k.startswith("tune_")}
            s_eval = {k[5:]: z[k] for k in z.files if k.startswith("eval_")}
        else:
            t = time.perf_counter()
            s_tune = knn.score(model, sub, tune_tok, max(knn.KS), progress=True)
            s_eval = knn.score(model, sub, eval_tok, max(knn.KS), progress=True)
            log(f"  searched {len(s_tune['y']) + len(s_eval['y']):,} queries over {len(sub):,} keys in "
                f"{time.perf_counter() - t:.0f} s")
            np.savez(cache, **{f"tune_{k}": v for k, v in s_tune.items() if k != "metric"},
                     **{f"eval_{k}": v for k, v in s_eval.items() if k != "metric"})
        s_tune["metric"] = s_eval["metric"] = "l2"
        log(f"-- {frac:.0%} of the training split ({len(sub):,} keys): tuning on the first half of val")
        best = knn.tune(scores=s_tune, log=log)
        ev = knn.evaluate(None, None, None, best["lambda"], best["k"], best["temperature"], scores=s_eval)
        row = {"fraction": frac, "keys": len(sub), "lambda": best["lambda"], "k": best["k"],
               "temperature": best["temperature"], "tune_gain": best["lm_loss"] - best["loss"],
               "eval_positions": ev["positions"], "lm_loss": ev["lm_loss"], "knn_loss": ev["knn_loss"],
               "gain": ev["lm_loss"] - ev["knn_loss"],
               "lambda_curve": [knn.loss_from_scores(s_eval, lam, best["k"], best["temperature"])
                                for lam in knn.LAMBDAS]}
        quality.append(row)
        log(f"   eval (second half of val, {ev['positions']:,} positions): LM {ev['lm_loss']:.4f}, kNN-LM "
            f"{ev['knn_loss']:.4f}, gain {row['gain']:.4f} nats")
    report["quality"] = quality
    best100 = quality[-1]

    # ---- 3. memorization: read a passage once, then meet it again after other text
    def second_reading(passage):
        ids = np.array(tok.encode(passage))
        doc = np.concatenate([val[half:half + 200], np.array(tok.encode(BEFORE)), ids])
        mem = knn.Memory(model.config.n_embd, max_size=10_000)
        mem.read(model, ids)
        s = knn.score(model, mem, doc, 16)
        n = len(ids)                          # the positions that predict each character of the passage
        return {k: (v[-n:] if isinstance(v, np.ndarray) else v) for k, v in s.items()}
    s_a, s_b = second_reading(PASSAGE_TUNE), second_reading(PASSAGE)
    log("-- memorization: tuning the memory's lambda, k, temperature on one passage")
    mbest = knn.tune(scores=s_a, ks=(1, 4, 8, 16), lambdas=(0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95), log=log)
    lm_l = float(-s_b["lm_lp"].mean())
    lk = knn.loss_from_scores(s_b, mbest["lambda"], mbest["k"], mbest["temperature"])
    lk_ds = knn.loss_from_scores(s_b, best100["lambda"], min(16, best100["k"]), best100["temperature"])
    report["memorization"] = {"passage_chars": len(PASSAGE), "positions": len(s_b["y"]), "lm_loss": lm_l,
                              "lambda": mbest["lambda"], "k": mbest["k"], "temperature": mbest["temperature"],
                              "loss": lk, "ratio": lk / lm_l, "loss_datastore_params": lk_ds}
    log(f"memorization ({len(PASSAGE)} chars, read once): LM {lm_l:.4f}, with memory {lk:.4f} = {lk / lm_l:.1%} "
        f"(lambda {mbest['lambda']}, k {mbest['k']}, T {mbest['temperature']:.3g}); with the datastore's "
        f"parameters {lk_ds:.4f}")

    # ---- 4. search speed over the whole store
    speed = []
    # the queries decoding makes: hidden states of validation text (not stored keys, which IVF finds too easily)
    qpool = np.concatenate([h for h, _ in knn.hidden_states(model, val[half // 2:half // 2 + 513])])[:512]
    for b in (1, 16, 256):
        q = qpool[:b]
        reps = 2 if b < 256 else 1
        dt = median_time(lambda: store.search(q, 32), reps)
        speed.append({"index": "exact (ours, float16 mmap)", "batch": b, "qps": b / dt, "ms_per_batch": dt * 1e3})
        log(f"exact search over {len(store):,} keys, batch {b}: {b / dt:,.1f} queries/s")
    if faiss_available():
        import faiss
        if os.environ.get("MINIGRAD_THREADS"):    # the same number of threads as our search
            faiss.omp_set_num_threads(int(os.environ["MINIGRAD_THREADS"]))
        t = time.perf_counter()
        ivf = FaissIndex(store.keys, "l2", "ivf", nlist=1024, nprobe=8)
        ivf_build = time.perf_counter() - t
        exact_d = store.search(qpool[:256], 1)[0][:, 0]
        for nprobe in (8, 32):
            ivf.nprobe = nprobe
            # recall by distance: the store holds identical keys (same short contexts), so ids may tie
            got = ivf.search(qpool[:256], 1)[0][:, 0]
            recall = float((np.abs(got - exact_d) <= 1e-3 * (1 + exact_d)).mean())
            for b in (1, 256):
                q = qpool[:b]
                dt = median_time(lambda: ivf.search(q, 32), 3)
                speed.append({"index": f"faiss IVF1024 nprobe {nprobe}", "batch": b, "qps": b / dt,
                              "ms_per_batch": dt * 1e3, "recall_at_1": recall})
                log(f"faiss IVF nprobe {nprobe}, batch {b}: {b / dt:,.0f} queries/s, recall@1 {recall:.3f}")
        report["ivf_build_s"] = ivf_build
    report["search"] = speed

    # ---- 5. decode speed
    prompt = tok.encode("ROMEO:\nWhat light through yonder window breaks? ")
    small = knn.Memory(model.config.n_embd, max_size=20_000)
    small.read(model, val[:20_001])
    configs = [("none", None), ("writable memory, 20k positions, exact", knn.KNNLM(small, 0.25, 32, best100["temperature"]))]
    if faiss_available():
        ivf.nprobe = 8
        st_ivf = knn.Datastore.open(store_dir, model)
        st_ivf.index = ivf
        configs.append((f"datastore {len(store) / 1e6:.2f}M, faiss IVF nprobe 8", knn.KNNLM(st_ivf, best100["lambda"],
                                                                                       best100["k"], best100["temperature"])))
    configs.append((f"datastore {len(store) / 1e6:.2f}M, exact", knn.KNNLM(store, best100["lambda"], best100["k"],
                                                                           best100["temperature"])))
    times = {name: [] for name, _ in configs}
    for r in range(args.repeats):
        for name, kn in configs:
            n_tok = args.decode_tokens if "exact" not in name or "writable" in name else max(8, args.decode_tokens // 10)
            t = time.perf_counter()
            generate_ids(model, prompt, n_tok, "top_k", top_k=40, temperature=0.8, seed=r, knn=kn)
            times[name].append(n_tok / (time.perf_counter() - t))
    base = float(np.median(times["none"]))
    report["decode"] = [{"memory": name, "tokens_per_s": float(np.median(v)), "ratio": float(np.median(v)) / base}
                        for name, v in times.items()]
    for d in report["decode"]:
        log(f"decode with memory '{d['memory']}': {d['tokens_per_s']:.0f} tokens/s ({d['ratio']:.2f}x)")

    # ---- 6. resident memory while searching the memory-mapped store (fresh processes)
    env = {**os.environ, "PYTHONPATH": ROOT}
    report["rss"] = []
    for release in (False, True):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss_child", store_dir,
                            "1" if release else "0", "64"], capture_output=True, text=True, env=env, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        report["rss"].append(res)
        log(f"RSS searching a {res['store_MiB']:.0f} MiB store (release_pages={release}): peak {res['peak_rss_MiB']:.0f} "
            f"MiB (anonymous {res['peak_anon_MiB']:.0f}, file-backed {res['peak_file_MiB']:.0f}); "
            f"{res['rss_open_MiB']:.0f} MiB after opening")

    with open(os.path.join(out, "knn.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(os.path.join(out, "knn.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {out}/knn.md and knn.json")
    return 0


def markdown(r: dict) -> str:
    b = r["build"]
    lines = [f"Datastore: {b['positions']:,} positions x {b['dim']} ({b['key_dtype']} keys), "
             f"{b['bytes_per_position']} bytes/position ({b['MiB']:.0f} MiB), built in {b['build_s']:.0f} s "
             f"({b['positions_per_s']:,.0f} positions/s).", "",
             "| datastore | keys | lambda | k | temperature | LM loss | kNN-LM loss | gain (nats) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for q in r["quality"]:
        lines.append(f"| {q['fraction']:.0%} of train | {q['keys']:,} | {q['lambda']} | {q['k']} | "
                     f"{q['temperature']:.3g} | {q['lm_loss']:.4f} | {q['knn_loss']:.4f} | {q['gain']:.4f} |")
    mz = r["memorization"]
    lines += ["", f"Memorization: a {mz['passage_chars']}-character passage read once into a writable memory; "
                  f"loss on its second occurrence ({mz['positions']} positions, after other text): LM alone "
                  f"{mz['lm_loss']:.4f}, with the memory {mz['loss']:.4f} nats = {mz['ratio']:.1%} (lambda "
                  f"{mz['lambda']}, k {mz['k']}, temperature {mz['temperature']:.3g}, tuned on another passage)."]
    lines += ["", "| search | batch | queries/s | ms/batch | recall@1 |", "|---|---:|---:|---:|---:|"]
    for s in r["search"]:
        lines.append(f"| {s['index']} | {s['batch']} | {s['qps']:,.1f} | {s['ms_per_batch']:.1f} | "
                     f"{s.get('recall_at_1', 1.0):.3f} |")
    lines += ["", "| decode with | tokens/s | vs none |", "|---|---:|---:|"]
    for d in r["decode"]:
        lines.append(f"| {d['memory']} | {d['tokens_per_s']:.1f} | {d['ratio']:.3f}x |")
    lines += ["", "| searching the mmap store | store MiB | peak RSS | anonymous | file-backed |",
              "|---|---:|---:|---:|---:|"]
    for x in r["rss"]:
        lines.append(f"| release_pages={x['release_pages']} | {x['store_MiB']:.0f} | {x['peak_rss_MiB']:.0f} | "
                     f"{x['peak_anon_MiB']:.0f} | {x['peak_file_MiB']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
