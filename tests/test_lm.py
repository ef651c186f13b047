"""The GPT, its config, training and generation, with tiny settings."""
import json
import os

import numpy as np
import pytest

import minigrad as mg
from lm import generate as gen
from lm import train as lt
from lm.config import Config, ConfigError, ModelConfig, apply_overrides, config_from_dict, load_config, validate
from lm.model import GPT, KVCache
from minigrad.io import load_file

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "train.batch_size=4", "train.eval_iters=2", "train.warmup_iters=2", "train.progress=false",
        "train.sample_tokens=0", "train.log_interval=5"]


@pytest.fixture()
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    text = "\n".join(" ".join(rng.choice(words, size=8)) + "." for _ in range(400))
    p = tmp_path / "corpus.txt"
    p.write_text(text)
    return str(p)


def tiny_args(corpus, out, *extra, iters=30):
    return ["--data", corpus, "--output_dir", str(out), "--seed", "3", "--max_iters", str(iters),
            *TINY, f"data.cache_dir={out}/cache", *extra]


# --------------------------------------------------------------------------- model
def test_model_shapes_and_param_count():
    mg.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16)
    m = GPT(cfg)
    idx = np.random.default_rng(0).integers(0, 50, (3, 8))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 8, 50) and loss.shape == ()
    logits, loss = m(idx)
    assert logits.shape == (3, 1, 50) and loss is None
    # per block: 2 LayerNorms (2*2C) + c_attn (C*3C+3C) + c_proj (C*C+C) + c_fc (C*4C+4C) + c_proj (4C*C+C)
    C = 16
    block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    total = 50 * C + 8 * C + 2 * block + 2 * C   # lm_head tied to wte: counted once
    assert m.num_parameters() == total
    assert m.num_params() == total - 8 * C
    assert m.lm_head.weight is m.transformer.wte.weight
    names = dict(m.named_parameters())
    assert "transformer.h.1.attn.c_attn.weight" in names and "lm_head.weight" not in names


def test_initial_loss_is_log_vocab():
    mg.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    rng = np.random.default_rng(1)
    idx, tgt = rng.integers(0, 64, (8, 16)), rng.integers(0, 64, (8, 16))
    _, loss = m(idx, tgt)
    assert abs(loss.item() - np.log(64)) < 0.1


def test_sequence_longer_than_block_is_an_error():
    m = GPT(ModelConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="block_size"):
        m(np.zeros((1, 5), dtype=np.int64))


def test_causality_future_tokens_do_not_change_past_logits():
    mg.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16))
    a = np.random.default_rng(0).integers(0, 20, (1, 8))
    b = a.copy()
    b[0, 5:] = (b[0, 5:] + 1) % 20
    la, _ = m(a, a)
    lb, _ = m(b, b)
    np.testing.assert_allclose(la.data[:, :5], lb.data[:, :5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(la.data[:, 5:], lb.data[:, 5:])


def test_kv_cache_matches_full_forward():
    mg.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=30, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    ids = np.random.default_rng(0).integers(0, 30, (2, 10))
    cache = KVCache(2)
    out = [m.logits_last(ids[:, :4], cache)]
    for t in range(4, 10):
        out.append(m.logits_last(ids[:, t:t + 1], cache))
    for i, t in enumerate(range(4, 11)):
        full = m.logits_last(ids[:, :t])
        np.testing.assert_allclose(out[i], full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_generation_same_with_and_without_cache(strategy):
    mg.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=16))
    a = gen.generate_ids(m, [1, 2, 3], 15, strategy=strategy, num_beams=3, use_cache=True)
    b = gen.generate_ids(m, [1, 2, 3], 15, strategy=strategy, num_beams=3, use_cache=False)
    assert a == b and len(a[0]) == 18


def test_generation_beyond_context_window():
    mg.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16))
    for cache in (True, False):
        out = gen.generate_ids(m, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 20, strategy="top_k", top_k=5, seed=0,
                               use_cache=cache)
        assert len(out[0]) == 30 and all(0 <= t < 30 for t in out[0])


def test_sampling_strategies_seeded_and_filtered():
    mg.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16))
    for s in ("sample", "top_k", "top_p"):
        a = gen.generate_ids(m, [1], 10, strategy=s, seed=5, num_return_sequences=3)
        b = gen.generate_ids(m, [1], 10, strategy=s, seed=5, num_return_sequences=3)
        assert a == b and len(a) == 3
    z = np.array([[3.0, 2.0, 1.0, 0.0]])
    assert np.isinf(gen.filter_top_k(z, 2)[0, 2:]).all() and np.isfinite(gen.filter_top_k(z, 2)[0, :2]).all()
    p = np.exp(z) / np.exp(z).sum()
    kept = np.isfinite(gen.filter_top_p(z, float(p[0, 0]) + 1e-3))[0]
    assert kept.tolist() == [True, True, False, False]
    assert np.isfinite(gen.filter_top_p(z, 0.01))[0].tolist() == [True, False, False, False]
    pen = gen.apply_repetition_penalty(np.array([[2.0, -2.0, 1.0]]), [[0, 1]], 2.0)
    assert pen.tolist() == [[1.0, -4.0, 1.0]]


def test_generation_argument_errors():
    m = GPT(ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="strategy"):
        gen.generate_ids(m, [1], 3, strategy="nope")
    with pytest.raises(ValueError, match="temperature"):
        gen.generate_ids(m, [1], 3, strategy="sample", temperature=0)
    with pytest.raises(ValueError, match="num_beams"):
        gen.generate_ids(m, [1], 3, strategy="beam", num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="empty"):
        gen.generate_ids(m, [], 3)


# --------------------------------------------------------------------------- config
def test_config_yaml_overrides_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  n_layer: 3\ntrain:\n  learning_rate: 3e-4\n")
    cfg = load_config(str(p))
    assert cfg.model.n_layer == 3 and cfg.train.learning_rate == 3e-4
    apply_overrides(cfg, ["max_iters=7", "model.dropout=0.1", "data.tokenizer=bpe"])
    assert cfg.train.max_iters == 7 and cfg.model.dropout == 0.1 and cfg.data.tokenizer == "bpe"
    with pytest.raises(ConfigError, match="valid keys in 'model'.*n_embd"):
        config_from_dict({"model": {"n_layers": 3}})
    with pytest.raises(ConfigError, match="unknown section"):
        config_from_dict({"optim": {}})
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(Config(), ["model.n_layer=two"])
    with pytest.raises(ConfigError, match="unknown key 'nlayer'"):
        apply_overrides(Config(), ["nlayer=2"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Config(), ["n_layer"])
    bad = Config()
    bad.model.n_embd = 30
    with pytest.raises(ConfigError, match="divisible"):
        validate(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_shipped_configs_load():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("default.yaml", "advanced.yaml"):
        cfg = load_config(os.path.join(root, "configs", name))
        validate(cfg)


# --------------------------------------------------------------------------- training CLI
def test_train_then_generate_end_to_end(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert lt.main(tiny_args(corpus, out, "train.eval_interval=25", "train.learning_rate=3e-3", iters=100)) == 0
    for f in ("model/model.safetensors", "model/config.json", "model/tokenizer.json", "checkpoint.safetensors",
              "metrics.jsonl", "loss.png", "summary.json"):
        assert (out / f).is_file(), f
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if r.get("kind") == "eval"]
    assert len(steps) == 100 and [e["step"] for e in evals] == [0, 25, 50, 75, 100]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5     # it learned
    capsys.readouterr()
    rc = gen.main(["--model_dir", str(out / "model"), "--prompt", "the cat", "--strategy", "top_p",
                   "--temperature", "0.8", "--top_p", "0.9", "--num_return_sequences", "3",
                   "--max_new_tokens", "20", "--seed", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.count("--- sequence") == 3 and text.count("the cat") >= 3
    for s in ("greedy", "sample", "top_k", "beam"):
        assert gen.main(["--model_dir", str(out / "model"), "--prompt", "a", "--strategy", s,
                         "--max_new_tokens", "5", "--num_beams", "2", "--repetition_penalty", "1.2",
                         "--top_k", "3", "--no_cache"]) == 0


def test_resume_gives_bitwise_same_weights(tmp_path, corpus):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["train.eval_interval=10", "model.dropout=0.1"]
    assert lt.main(tiny_args(corpus, full, *common, iters=30)) == 0

    def crash(step, loss):  # the process dies after step 25; the last save was at step 20
        if step == 25:
            raise KeyboardInterrupt
    args = lt.build_parser().parse_args(tiny_args(corpus, part, *common, iters=30))
    with pytest.raises(KeyboardInterrupt):
        lt.train(lt.resolve_config(args), str(part), callback=crash)
    assert lt.main(tiny_args(corpus, part, *common, "--resume", iters=30)) == 0
    a = load_file(str(full / "checkpoint.safetensors"))
    b = load_file(str(part / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_seed_makes_runs_repeatable(tmp_path, corpus):
    for d in ("a", "b"):
        assert lt.main(tiny_args(corpus, tmp_path / d, "train.eval_interval=50", iters=8)) == 0
    a = load_file(str(tmp_path / "a" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)

    def evals(d):   # evaluations are seeded too: the same batches, so the same losses
        rows = [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [(r["train_loss"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    assert evals("a") == evals("b") and len(evals("a")) == 2


def test_seed_changes_the_initial_weights_and_the_batches(tmp_path, corpus, monkeypatch):
    """--seed reaches both the initialisation and the batch order (same seed: same run, above)."""
    seen = {}
    real = lt.get_batch

    def spy(data, batch_size, block_size, rng):
        x, y = real(data, batch_size, block_size, rng)
        seen.setdefault(current, []).append(x.copy())
        return x, y
    monkeypatch.setattr(lt, "get_batch", spy)
    for current in ("3", "4"):
        argv = tiny_args(corpus, tmp_path / current, "train.eval_interval=50", iters=2)
        argv[argv.index("--seed") + 1] = current
        assert lt.main(argv) == 0
    n_eval = 2 * 2   # train.eval_iters=2 batches per split at step 0, then the training batches
    for i in range(n_eval, n_eval + 2):
        assert not np.array_equal(seen["3"][i], seen["4"][i]), i
    for i in range(n_eval):    # evaluation batches are seeded too
        assert not np.array_equal(seen["3"][i], seen["4"][i]), i
    # no step at all: the saved weights are the initial ones, those minigrad.manual_seed(seed) gives
    init = {}
    for current in ("3", "4"):
        argv = tiny_args(corpus, tmp_path / f"init{current}", iters=0)
        argv[argv.index("--seed") + 1] = current
        assert lt.main(argv) == 0
        init[current] = load_file(str(tmp_path / f"init{current}" / "model" / "model.safetensors"))
    w = "transformer.h.0.attn.c_attn.weight"
    assert not np.array_equal(init["3"][w], init["4"][w])
    mg.manual_seed(3)
    fresh = GPT(ModelConfig(**json.loads((tmp_path / "init3" / "model" / "config.json").read_text())["model"]))
    assert all(np.array_equal(v, init["3"][k]) for k, v in fresh.state_dict().items())


def test_sampling_depends_on_its_seed():
    mg.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16))
    for s in ("sample", "top_k", "top_p"):
        a = gen.generate_ids(m, [1], 12, strategy=s, seed=5, num_return_sequences=2, top_k=20)
        b = gen.generate_ids(m, [1], 12, strategy=s, seed=6, num_return_sequences=2, top_k=20)
        assert a != b, s
        assert a[0] != a[1], s    # the sequences of one call are not copies of each other


def test_kv_cache_after_the_window_overflows_reads_the_newest_tokens():
    """Past the context window the cached path must attend to the most recent tokens: at every
    step its logits equal a full forward over some suffix of the text, never over its start."""
    mg.manual_seed(0)
    block = 8
    m = GPT(ModelConfig(vocab_size=40, block_size=block, n_layer=2, n_head=2, n_embd=16)).eval()
    seq = np.random.default_rng(1).integers(0, 40, (1, 30))
    stepper = gen._Stepper(m, use_cache=True)
    got = stepper.first(seq[:, :5])
    for t in range(5, 30):
        if t > 5:
            got = stepper.next(seq[:, :t], seq[:, t - 1])
        ctx = seq[:, :t]
        suffix = [L for L in range(1, min(block, t) + 1)
                  if np.allclose(got, m.logits_last(ctx[:, -L:]), rtol=1e-4, atol=1e-5)]
        assert suffix, f"at length {t} the cached logits match no window of the newest tokens"


def test_generation_with_cache_past_the_window_keeps_following_the_text():
    """Greedy decoding with the cache, past the window, equals decoding where each step reads the
    window the cache holds, built from the newest tokens (the documented 3/4-window refill)."""
    mg.manual_seed(0)
    block = 8
    m = GPT(ModelConfig(vocab_size=30, block_size=block, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    out = gen.generate_ids(m, prompt, 20, strategy="greedy", use_cache=True)[0]
    seq, n_ctx = list(prompt), min(len(prompt), block)
    for _ in range(20):
        seq.append(int(m.logits_last(np.array([seq[-n_ctx:]])).argmax()))
        n_ctx = block - block // 4 if n_ctx + 1 > block else n_ctx + 1
    assert out == seq


def test_loss_png_draws_the_logged_losses(tmp_path, corpus):
    out = tmp_path / "run"
    assert lt.main(tiny_args(corpus, out, "train.eval_interval=5", iters=12)) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig = lt.training_figure(str(out / "metrics.jsonl"))
    a1, a2 = fig.axes[:2]
    lines = {ln.get_label(): ln for ln in a1.lines}
    np.testing.assert_allclose(lines["batch loss"].get_xdata(), [r["step"] for r in steps])
    np.testing.assert_allclose(lines["batch loss"].get_ydata(), [r["loss"] for r in steps])
    np.testing.assert_allclose(lines["val (eval)"].get_ydata(), [r["val_loss"] for r in evals])
    np.testing.assert_allclose(lines["train (eval)"].get_xdata(), [r["step"] for r in evals])
    np.testing.assert_allclose(a2.lines[0].get_ydata(), [r["grad_norm"] for r in steps])
    # the PNG on disk is that figure: its pixels differ from the same axes with nothing drawn
    import matplotlib.image as mpimg
    png = mpimg.imread(str(out / "loss.png"))
    for ax in (a1, a2):
        for ln in list(ax.lines):
            ln.remove()
    fig.savefig(str(tmp_path / "empty.png"), dpi=110)
    empty = mpimg.imread(str(tmp_path / "empty.png"))
    assert png.shape == empty.shape and np.abs(png - empty).sum() > 100


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus, capsys):
    out = tmp_path / "nan"
    rc = lt.main(tiny_args(corpus, out, "train.eval_interval=5", "train.learning_rate=1e30",
                           "train.warmup_iters=0", "train.grad_clip=0", iters=40))
    err = capsys.readouterr().err
    assert rc == 1 and "at step" in err and "checkpoint" in err
    assert (out / "checkpoint.safetensors").is_file()
    ck = load_file(str(out / "checkpoint.safetensors"))
    assert all(np.isfinite(v).all() for v in ck.values())


def test_cli_errors(tmp_path, capsys):
    assert lt.main(["--data", str(tmp_path / "nope.txt"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert lt.main(["--output_dir", str(tmp_path / "o"), "model.n_layers=2"]) == 2
    assert "n_layers" in capsys.readouterr().err
    assert lt.main(["--output_dir", str(tmp_path / "o2"), "--resume"]) == 2
    assert gen.main(["--model_dir", str(tmp_path / "none")]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_parser_has_the_documented_flags():
    a = lt.build_parser().parse_args(["--config", "c.yaml", "--data", "d.jsonl", "--output_dir", "o",
                                      "--seed", "42"])
    assert (a.config, a.data, a.output_dir, a.seed) == ("c.yaml", "d.jsonl", "o", 42)
    g = gen.build_parser().parse_args(["--model_dir", "m", "--prompt", "hello", "--strategy", "top_p",
                                       "--temperature", "0.8", "--top_p", "0.9", "--num_return_sequences", "3"])
    assert (g.model_dir, g.prompt, g.strategy, g.temperature, g.top_p, g.num_return_sequences) == \
        ("m", "hello", "top_p", 0.8, 0.9, 3)
