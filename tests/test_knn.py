"""The memory bank (lm.knn): exact search, faiss, kNN-LM, datastore, writable memory, CLIs."""
import json
import os

import numpy as np
import pytest

import minigrad as mg
from lm import generate as gen
from lm import knn
from lm import train as lt
from lm.knn_index import FaissIndex, exact_search, faiss_available, merge
from lm.loader import load_model

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "train.batch_size=4", "train.eval_iters=2", "train.warmup_iters=2", "train.progress=false",
        "train.sample_tokens=0", "train.log_interval=5", "train.eval_interval=10"]


def brute(q, keys, k, metric):
    q, keys = q.astype(np.float64), keys.astype(np.float64)
    if metric == "l2":
        d = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
        i = np.argsort(d, axis=1, kind="stable")[:, :k]
    else:
        d = q @ keys.T
        i = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, i, axis=1), i


# --------------------------------------------------------------------------- search
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_exact_search_matches_brute_force(metric, dtype):
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((3001, 24)).astype(dtype)
    q = rng.standard_normal((13, 24))
    for k in (1, 7, 3001):
        # a tiny block_bytes forces many blocks, so the running top-k merge is exercised
        d, i = exact_search(q, keys, k, metric, block_bytes=20_000)
        bd, bi = brute(q, keys, k, metric)
        if dtype == np.float64 or k < 100:
            np.testing.assert_array_equal(i, bi)
        else:   # a full float32 sort may swap near-ties; every key is still there once
            np.testing.assert_array_equal(np.sort(i, axis=1), np.sort(bi, axis=1))
        tol = 1e-9 if dtype == np.float64 else 1e-3
        np.testing.assert_allclose(d, bd, rtol=tol, atol=tol)
    norms = (keys.astype(np.float32) ** 2).sum(1)
    d2, i2 = exact_search(q, keys, 5, metric, key_sqnorms=norms, block_bytes=20_000)
    np.testing.assert_array_equal(i2, brute(q, keys, 5, metric)[1])


def test_exact_search_errors():
    keys = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="empty"):
        exact_search(np.zeros((1, 3)), keys[:0], 1)
    with pytest.raises(ValueError, match="k=5"):
        exact_search(np.zeros((1, 3)), keys, 5)
    with pytest.raises(ValueError, match="metric"):
        exact_search(np.zeros((1, 3)), keys, 1, "cos")


def test_merge_keeps_the_best_of_both():
    a = (np.array([[1.0, 4.0]]), np.array([[10, 40]]))
    b = (np.array([[2.0, 3.0]]), np.array([[20, 30]]))
    d, p = merge([a, b], 3, "l2")
    assert d.tolist() == [[1.0, 2.0, 3.0]] and p.tolist() == [[10, 20, 30]]
    d, p = merge([a, b], 2, "ip")
    assert p.tolist() == [[40, 30]]


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_equals_exact(metric):
    pytest.importorskip("faiss", reason="faiss-cpu is optional (the knn extra)")
    assert faiss_available()
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((2000, 16)).astype(np.float32)
    q = rng.standard_normal((9, 16)).astype(np.float32)
    d, i = exact_search(q, keys, 8, metric)
    fd, fi = FaissIndex(keys, metric, "flat", block=300).search(q, 8)
    np.testing.assert_array_equal(fi, i)
    np.testing.assert_allclose(fd, d, rtol=1e-4, atol=1e-4)
    # IVF visiting every cell is exact too
    ivf = FaissIndex(keys, metric, "ivf", nlist=16, nprobe=16)
    np.testing.assert_array_equal(ivf.search(q, 8)[1], i)


# --------------------------------------------------------------------------- kNN-LM
def test_p_knn_sums_to_one_on_stored_tokens():
    rng = np.random.default_rng(3)
    d = np.sort(rng.random((5, 6)) * 10, axis=1)
    tok = rng.integers(0, 4, (5, 6)) * 3            # tokens 0, 3, 6, 9 only
    p = knn.knn_distribution(d, tok, 12, temperature=2.0)
    np.testing.assert_allclose(p.sum(1), 1.0)
    mask = np.zeros_like(p, bool)
    np.put_along_axis(mask, tok, True, axis=1)
    assert (p[~mask] == 0).all() and (p[mask] > 0).all()
    # the nearest neighbour has the largest weight; a repeated token gathers its neighbours' weights
    w = np.exp(-d / 2.0)
    w /= w.sum(1, keepdims=True)
    for r in range(5):
        for t in np.unique(tok[r]):
            assert p[r, t] == pytest.approx(w[r][tok[r] == t].sum())
    with pytest.raises(ValueError):
        knn.knn_distribution(d, tok, 12, temperature=0)


def test_interpolation_lambda_zero_is_the_lm_and_one_is_knn():
    rng = np.random.default_rng(4)
    lp = knn._log_softmax(rng.standard_normal((3, 7)))
    p_knn = knn.knn_distribution(rng.random((3, 4)), rng.integers(0, 7, (3, 4)), 7)
    np.testing.assert_array_equal(knn.interpolate(lp, p_knn, 0.0), lp)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(knn.interpolate(lp, p_knn, 1.0), np.log(p_knn))
    mix = np.exp(knn.interpolate(lp, p_knn, 0.3))
    np.testing.assert_allclose(mix, 0.3 * p_knn + 0.7 * np.exp(lp))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            knn.interpolate(lp, p_knn, bad)


# --------------------------------------------------------------------------- writable memory
def test_memory_add_search_evict_reset():
    rng = np.random.default_rng(5)
    mem = knn.Memory(8, max_size=10)
    keys = rng.standard_normal((14, 8)).astype(np.float32)
    mem.add(keys[:6], np.arange(6))
    assert len(mem) == 6
    d, ids = mem.search(keys[[2, 5]], 1)
    assert ids[:, 0].tolist() == [2, 5] and np.allclose(d, 0, atol=1e-5)
    assert mem.neighbours(keys[[4]], 1)[1].tolist() == [[4]]
    mem.add(keys[6:], np.arange(6, 14))               # 14 added, room for 10: 0..3 evicted (FIFO)
    assert len(mem) == 10 and mem.n_evicted == 4
    d, ids = mem.search(keys[:4], 1)
    assert not set(ids[:, 0].tolist()) & {0, 1, 2, 3}
    assert sorted(mem.search(keys[0:1], 10)[1][0].tolist()) == list(range(4, 14))
    assert mem.neighbours(keys[[13]], 1)[1].tolist() == [[13]]
    big = rng.standard_normal((25, 8))                 # more than fits at once: only the newest 10 stay
    mem.add(big, np.arange(100, 125))
    assert sorted(mem.neighbours(big[:1], 10)[1][0].tolist()) == list(range(115, 125))
    mem.reset()
    assert len(mem) == 0 and mem.n_added == 0
    with pytest.raises(ValueError, match="empty"):
        mem.search(keys[:1], 1)
    with pytest.raises(ValueError, match="empty"):
        knn.KNNLM(mem)


# --------------------------------------------------------------------------- with a tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("knn")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    text = "\n".join(" ".join(rng.choice(words, size=8)) + "." for _ in range(300))
    corpus = out / "corpus.txt"
    corpus.write_text(text)
    rc = lt.main(["--data", str(corpus), "--output_dir", str(out / "run"), "--seed", "3", "--max_iters", "12",
                  *TINY, f"data.cache_dir={out}/cache"])
    assert rc == 0
    return {"dir": out, "corpus": str(corpus), "model_dir": str(out / "run" / "model")}


def _build(tiny, name="store", *extra):
    out = str(tiny["dir"] / name)
    rc = knn.main(["build", "--model_dir", tiny["model_dir"], "--out", out, "--no_progress", *extra])
    assert rc == 0
    return out


def test_build_save_load_round_trip(tiny, capsys):
    out = _build(tiny, "store32", "--key_dtype", "float32", "--max_tokens", "300")
    printed = capsys.readouterr().out
    assert "299 positions" in printed and "positions/s" in printed and "bytes/position" in printed
    model, tok = load_model(tiny["model_dir"])
    store = knn.Datastore.open(out, model)
    assert len(store) == 299 and store.dim == 32 and store.keys.dtype == np.float32
    assert store.bytes_per_position() == 32 * 4 + 4 + 4
    text = open(tiny["corpus"]).read()
    ids = np.array(tok.encode(text)[:300])
    np.testing.assert_array_equal(store.values, ids[1:])
    # keys are ln_f's outputs: the head applied to them gives the model's own logits
    x = ids[None, :16]
    logits, _ = model(x, ids[None, 1:17])
    w = model.lm_head.weight.data
    np.testing.assert_allclose(store.keys[:16] @ w.T, logits.data[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(store.sqnorms, (store.keys.astype(np.float32) ** 2).sum(1), rtol=1e-5)
    meta = json.load(open(os.path.join(out, "store.json")))
    assert meta["model_hash"] == knn.model_hash(model) and meta["n"] == 299
    # a stored key finds itself; a float16 store gives the same neighbours as the float32 one
    d, i = store.search(store.keys[[5, 100]], 1)
    assert i[:, 0].tolist() == [5, 100]
    out16 = _build(tiny, "store16", "--max_tokens", "300")
    s16 = knn.Datastore.open(out16, model)
    assert s16.keys.dtype == np.float16 and s16.bytes_per_position() == 32 * 2 + 8
    np.testing.assert_allclose(s16.keys.astype(np.float32), store.keys, atol=2e-2)
    assert (s16.search(store.keys[:50], 1)[1][:, 0] == np.arange(50)).mean() > 0.9
    sub = store.subset(100)
    assert len(sub) == 100 and sub.search(store.keys[[150]], 3)[1].max() < 100


def test_released_pages_give_the_same_neighbours(tiny):
    out = _build(tiny, "store_rel", "--max_tokens", "400")
    model, _ = load_model(tiny["model_dir"])
    a = knn.Datastore.open(out, model)
    b = knn.Datastore.open(out, model, release_pages=True)
    b.use_index("exact", block_bytes=4096)
    q = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_array_equal(a.search(q, 5)[1], b.search(q, 5)[1])


def test_store_errors(tiny, tmp_path):
    out = _build(tiny, "store_err", "--max_tokens", "200")
    model, _ = load_model(tiny["model_dir"])
    mg.manual_seed(99)
    other = lt.GPT(model.config)
    with pytest.raises(knn.StoreError, match="another model"):
        knn.Datastore.open(out, other)
    with pytest.raises(knn.StoreError, match="no datastore"):
        knn.Datastore.open(str(tmp_path / "nothing"))
    os.makedirs(tmp_path / "empty_folder")
    with pytest.raises(knn.StoreError, match="not a datastore"):
        knn.Datastore.open(str(tmp_path / "empty_folder"))
    # an empty store
    meta = json.load(open(os.path.join(out, "store.json")))
    e = tmp_path / "empty"
    e.mkdir()
    (e / "store.json").write_text(json.dumps({**meta, "n": 0}))
    with pytest.raises(knn.StoreError, match="empty"):
        knn.Datastore.open(str(e))
    with pytest.raises(knn.StoreError, match="at least 2"):
        knn.build_datastore(model, np.array([1]), str(tmp_path / "short"))
    # a truncated keys file
    t = tmp_path / "trunc"
    t.mkdir()
    for f in os.listdir(out):
        data = open(os.path.join(out, f), "rb").read()
        (t / f).write_bytes(data[:len(data) - 100] if f == "keys.npy" else data)
    with pytest.raises(knn.StoreError, match="truncated"):
        knn.Datastore.open(str(t))


def test_cli_build_then_generate_every_strategy(tiny, capsys):
    out = _build(tiny)
    capsys.readouterr()
    base = ["--model_dir", tiny["model_dir"], "--prompt", "the cat", "--max_new_tokens", "20", "--seed", "1"]
    for strategy in gen.STRATEGIES:
        assert gen.main(base + ["--strategy", strategy, "--memory", out, "--knn_k", "8"]) == 0
        text = capsys.readouterr().out
        assert text.startswith("the cat") and len(text) > len("the cat")
    # lambda 0 decodes exactly as the model alone; lambda 1 follows the memory
    assert gen.main(base + ["--strategy", "greedy"]) == 0
    plain = capsys.readouterr().out
    assert gen.main(base + ["--strategy", "greedy", "--memory", out, "--knn_lambda", "0"]) == 0
    assert capsys.readouterr().out == plain
    model, tok = load_model(tiny["model_dir"])
    store = knn.Datastore.open(out, model)
    ids = tok.encode("the cat")
    k1 = knn.KNNLM(store, lam=1.0, k=1)
    seq = gen.generate_ids(model, ids, 1, "greedy", knn=k1)
    with mg.no_grad(), knn.capture(model, knn.KEY_MODULE) as seen:
        model(np.array([ids]))
    assert seq[-1][-1] == store.neighbours(seen[knn.KEY_MODULE][:, -1], 1)[1][0, 0]
    if faiss_available():
        assert gen.main(base + ["--strategy", "top_k", "--memory", out, "--knn_index", "ivf", "--knn_nprobe", "4"]) == 0


@pytest.mark.parametrize("strategy", ["greedy", "sample", "top_k", "top_p", "beam"])
def test_every_strategy_decodes_from_the_memory(tiny, strategy):
    """lambda = 1 and a memory holding one token: every strategy can only produce that token."""
    model, tok = load_model(tiny["model_dir"])
    ids = tok.encode("the cat")
    with mg.no_grad():
        lm_choice = int(model.logits_last(np.array([ids]))[0].argmin())   # the token the LM likes least
    mem = knn.Memory(model.config.n_embd, max_size=4)
    mem.add(np.zeros((1, model.config.n_embd)), [lm_choice])
    out = gen.generate_ids(model, ids, 6, strategy, temperature=1.0, seed=0, num_beams=2,
                           knn=knn.KNNLM(mem, lam=1.0, k=1))
    assert out[0][len(ids):] == [lm_choice] * 6


def test_cli_memory_add_and_bad_input(tiny, tmp_path, capsys):
    out = _build(tiny, "store_cli")
    doc = tmp_path / "doc.txt"
    doc.write_text("a dog sat on the mat and ran home. " * 3)
    base = ["--model_dir", tiny["model_dir"], "--prompt", "a dog", "--max_new_tokens", "10", "--seed", "1"]
    assert gen.main(base + ["--memory_add", str(doc), "--knn_lambda", "0.9", "--strategy", "beam"]) == 0
    assert "memory: read" in capsys.readouterr().err
    assert gen.main(base + ["--memory", out, "--memory_add", str(doc), "--memory_size", "20"]) == 0
    capsys.readouterr()

    def fails(extra, match):
        assert gen.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and "Traceback" not in err, err

    fails(["--memory", out, "--knn_lambda", "1.5"], "[0, 1]")
    fails(["--memory", out, "--knn_lambda", "-0.1"], "[0, 1]")
    fails(["--memory", out, "--knn_k", "1000000"], "larger than the memory")
    fails(["--memory", out, "--knn_k", "0"], "knn_k")
    fails(["--memory", str(tmp_path / "none")], "no datastore")
    fails(["--memory_add", str(tmp_path / "none.txt")], "no such file")
    # a store built by another model
    other = tmp_path / "other"
    assert lt.main(["--data", tiny["corpus"], "--output_dir", str(other), "--seed", "4", "--max_iters", "2",
                    *TINY, f"data.cache_dir={tiny['dir']}/cache"]) == 0
    capsys.readouterr()
    fails(["--memory", out, "--model_dir", str(other / "model")], "another model")
    # a truncated store file
    with open(os.path.join(out, "keys.npy"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(out, "keys.npy")) - 64)
    fails(["--memory", out], "truncated")
    assert knn.main(["tune", "--model_dir", tiny["model_dir"], "--memory", out]) == 2
    assert "truncated" in capsys.readouterr().err
    assert knn.main(["build", "--model_dir", tiny["model_dir"], "--out", str(doc)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_reading_a_document_makes_it_predictable(tiny):
    """Memorizing-Transformers behaviour: a passage read once is then continued from memory."""
    model, tok = load_model(tiny["model_dir"])
    rng = np.random.default_rng(7)
    passage = "".join(rng.choice(list(tok.decode(range(tok.vocab_size))), size=120))   # not in the corpus
    ids = np.array(tok.encode(passage))
    mem = knn.Memory(model.config.n_embd, max_size=1000)
    assert mem.read(model, ids) == len(ids) - 1
    s_lm = knn.score(model, mem, ids, 4)
    plain = float(-s_lm["lm_lp"].mean())
    with_memory = knn.loss_from_scores(s_lm, 0.9, 4, 1.0)
    assert with_memory < 0.3 * plain
    mem.reset()
    mem.add(np.zeros((1, 32)), [0])
    assert knn.loss_from_scores(knn.score(model, mem, ids, 1), 0.9, 1, 1.0) > with_memory


def test_tune_prints_its_search_and_helps_on_repeated_text(tiny, capsys):
    model, tok = load_model(tiny["model_dir"])
    text = open(tiny["corpus"]).read()
    ids = np.array(tok.encode(text))
    mem = knn.Memory(32, max_size=10_000)
    mem.read(model, ids[:2000])
    lines = []
    best = knn.tune(model, mem, ids[:600], ks=(1, 8), log=lines.append)
    assert len([l for l in lines if l.strip().startswith("k=")]) == 2 * len(knn.TEMPERATURE_SCALES)
    assert "best lambda" in lines[-1]
    # the held-out text lies inside the memory, so the search must find lambda > 0 and a lower loss
    assert best["lambda"] > 0 and best["loss"] < best["lm_loss"]
    ev = knn.evaluate(model, mem, ids[600:1200], best["lambda"], best["k"], best["temperature"])
    assert ev["knn_loss"] < ev["lm_loss"]
    assert knn.evaluate(model, mem, ids[600:1200], 0.0, 8, 1.0)["knn_loss"] == pytest.approx(ev["lm_loss"])


def test_cli_tune_saves_choice_and_train_reports_memory_loss(tiny, capsys):
    out = _build(tiny, "store_tune")
    assert knn.main(["tune", "--model_dir", tiny["model_dir"], "--memory", out, "--max_tokens", "400"]) == 0
    printed = capsys.readouterr().out
    assert "tune: best lambda" in printed and "held-out second half" in printed
    tuned = json.load(open(os.path.join(out, "store.json")))["tuned"]
    assert {"lambda", "k", "temperature"} <= set(tuned)
    # lm.train's evaluation with --memory: resume the finished run, whose weights built the store
    run = str(tiny["dir"] / "run")
    resume = ["--data", tiny["corpus"], "--output_dir", run, "--resume", "--seed", "3", "--max_iters", "12", *TINY,
              f"data.cache_dir={tiny['dir']}/cache"]
    assert lt.main(resume + ["--memory", out, "--knn_lambda", "0.5", "--knn_k", "4"]) == 0
    evals = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"eval"' in l]
    assert "val_loss_memory" in evals[-1]
    assert evals[-1]["val_loss_memory"] != evals[-1]["val_loss"]
    assert "val loss with memory" in capsys.readouterr().out
    assert lt.main(resume + ["--memory", out, "--knn_lambda", "2"]) == 2
    assert "[0, 1]" in capsys.readouterr().err


def test_calib_capture_hands_over_each_forward_and_removes_its_hooks():
    from minigrad.calib import capture
    from lm.config import ModelConfig
    mg.manual_seed(0)
    model = lt.GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    x = np.random.default_rng(0).integers(0, 11, (2, 8))
    with mg.no_grad(), capture(model, ["transformer.ln_f", "lm_head"], what="input") as seen_in, \
            capture(model, "transformer.ln_f") as seen_out:
        logits, _ = model(x, x)
        assert seen_in["transformer.ln_f"].shape == (2, 8, 8)
        # ln_f's output is the head's input
        np.testing.assert_array_equal(seen_out["transformer.ln_f"], seen_in["lm_head"])
        model(x[:1, :3])
        assert seen_out["transformer.ln_f"].shape == (1, 3, 8)       # overwritten by the latest forward
    assert not model.transformer.ln_f._forward_hooks and not model.lm_head._forward_hooks
    with pytest.raises(ValueError, match="no module"):
        with capture(model, "nothing"):
            pass


def test_train_memory_loss_stops_when_the_weights_move_on(tiny, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny["dir"] / "run", run)
    out = _build(tiny, "store_stale")
    resume = ["--data", tiny["corpus"], "--output_dir", str(run), "--resume", "--seed", "3", *TINY,
              f"data.cache_dir={tiny['dir']}/cache", "--memory", out, "--knn_k", "4"]
    capsys.readouterr()
    assert lt.main(resume + ["--max_iters", "14"]) == 0      # two more steps, then the last evaluation
    assert "keys are stale" in capsys.readouterr().out
    last = [json.loads(l) for l in open(run / "metrics.jsonl") if '"eval"' in l][-1]
    assert last["step"] == 14 and "val_loss_memory" not in last
    # a fresh run starts from other weights than the store's: a clear error before training
    assert lt.main(["--data", tiny["corpus"], "--output_dir", str(tmp_path / "fresh"), "--max_iters", "2", *TINY,
                    f"data.cache_dir={tiny['dir']}/cache", "--memory", out]) == 2
    assert "another model" in capsys.readouterr().err
