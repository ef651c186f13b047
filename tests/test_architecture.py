"""The GPT's architecture switches: GQA/MQA, sliding window, RoPE, shared layers, low rank.

Each alone and together, with checkpointing, reversible blocks, the KV cache, every decoding
strategy, save/load and --resume; and the config errors that say what cannot be.
"""
import numpy as np
import pytest

import minigrad as mg
from lm import generate as gen
from lm import train as lt
from lm.config import ConfigError, ModelConfig, apply_overrides, Config, validate
from lm.model import GPT, KVCache
from minigrad.io import load_file, save_file
from minigrad.nn.lowrank import LowRankLinear

BASE = dict(vocab_size=13, block_size=16, n_layer=2, n_head=4, n_embd=32)
SWITCHES = {
    "plain": {},
    "mqa": dict(n_kv_head=1),
    "gqa": dict(n_kv_head=2),
    "window": dict(attn_window=5),
    "rope": dict(position="rope"),
    "rope_window": dict(position="rope", attn_window=4, n_kv_head=2),
    "share": dict(n_layer=4, share_layers=2),
    "low_rank": dict(low_rank=6),
    "low_rank_attn": dict(low_rank=6, low_rank_attn=True),
    "all_ckpt": dict(n_kv_head=1, attn_window=6, position="rope", share_layers=1, low_rank=4, checkpoint_every=1),
    "all_rev": dict(n_kv_head=2, attn_window=6, position="rope", n_layer=4, share_layers=2, low_rank=4,
                    low_rank_attn=True, reversible=True, checkpoint_every=2),
}


def make(dtype=np.float32, **kw):
    mg.manual_seed(0)
    m = GPT(ModelConfig(**{**BASE, **kw}))
    return m.to(dtype=dtype) if dtype != np.float32 else m


@pytest.mark.parametrize("name", list(SWITCHES))
def test_kernel_path_equals_naive_composite_float64(name):
    """The fused nodes (attention_qkv with GQA, window, RoPE) against the composite ops path."""
    m = make(np.float64, **SWITCHES[name])
    n = make(np.float64, **SWITCHES[name], attention="naive")
    n.load_state_dict(m.state_dict())
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 13, (2, 15)), rng.integers(0, 13, (2, 15))
    grads = []
    for model in (m, n):
        _, loss = model(x, y)
        loss.backward()
        grads.append({k: p.grad.data for k, p in model.named_parameters()})
    for k in grads[0]:
        np.testing.assert_allclose(grads[0][k], grads[1][k], atol=1e-11, err_msg=k)


@pytest.mark.parametrize("name", list(SWITCHES))
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_decoding_same_tokens_with_and_without_cache(name, strategy):
    m = make(np.float64, **SWITCHES[name])
    for p in m.parameters():                       # sharper logits than at init: ties cannot hide bugs
        p.data = p.data * 4
    kw = dict(num_beams=3) if strategy == "beam" else {}
    a = gen.generate_ids(m, [1, 2, 3], 12, strategy, use_cache=True, **kw)
    b = gen.generate_ids(m, [1, 2, 3], 12, strategy, use_cache=False, **kw)
    assert a == b


@pytest.mark.parametrize("name", list(SWITCHES))
def test_cached_decode_step_logits_equal_full_forward_float64(name):
    """The one-token decode step (raw arrays, no graph nodes) against the full forward, every
    position: the logits agree to rounding, so a step that rotated, cached or split wrongly fails."""
    m = make(np.float64, **SWITCHES[name]).eval()
    for p in m.parameters():
        p.data = p.data * 4
    ids = np.random.default_rng(1).integers(0, 13, (2, 14))
    cache = KVCache(m.config.n_layer, window=m.config.attn_window)
    got = [m.logits_last(ids[:, :3], cache)]
    for t in range(3, 14):
        with mg.no_grad():
            got.append(m.logits_last(ids[:, t:t + 1], cache))
    for i, t in enumerate(range(3, 15)):
        with mg.no_grad():
            full = m.logits_last(ids[:, max(0, t - m.config.block_size):t])
        np.testing.assert_allclose(got[i], full, rtol=1e-10, atol=1e-10, err_msg=f"position {t}")


@pytest.mark.parametrize("name", ["mqa", "window", "rope_window", "share"])
def test_sampling_strategies_run_with_switches(name):
    m = make(np.float64, **SWITCHES[name])          # the text fits the context (2 + 14 = 16)
    for s in ("sample", "top_k", "top_p"):
        a = gen.generate_ids(m, [1, 2], 14, s, seed=3, num_return_sequences=2, top_k=5)
        b = gen.generate_ids(m, [1, 2], 14, s, seed=3, num_return_sequences=2, top_k=5, use_cache=False)
        assert a == b and len(a[0]) == 16


def test_kv_cache_holds_n_kv_head_heads():
    m = make(**SWITCHES["mqa"])
    cache = KVCache(2, capacity=16)
    m.logits_last(np.zeros((1, 10), dtype=np.int64), cache)
    assert cache.k[0].shape == (1, 1, 10, 8)                   # (B, n_kv_head, S, hs)
    plain = KVCache(2, capacity=16)
    make().logits_last(np.zeros((1, 10), dtype=np.int64), plain)
    assert plain.nbytes() == 4 * cache.nbytes()                # n_head / n_kv_head = 4


def test_rope_window_generates_past_block_size_on_a_window_cache():
    """4 x block_size tokens with a rolling cache of w positions, each token equal to the greedy
    choice of a full (uncached, unbounded) forward over the whole text."""
    m = make(np.float64, position="rope", attn_window=5, n_kv_head=2)
    for p in m.parameters():
        p.data = p.data * 4
    seen, chunks = [], []
    real = KVCache._append_rolling

    def spy(self, layer, k, v):
        out = real(self, layer, k, v)
        seen.append(self._kbuf[layer].shape[2])
        chunks.append(k.shape[2])
        return out
    KVCache._append_rolling = spy
    try:
        seq = gen.generate_ids(m, [1, 2, 3], 4 * 16, "greedy")[0]
    finally:
        KVCache._append_rolling = real
    assert len(seq) == 3 + 64 and set(seen) == {5}
    assert chunks[:2] == [3, 3] and set(chunks[2:]) == {1}      # one prefill, never re-read
    with mg.no_grad():
        for t in range(3, len(seq), 7):
            logits, _ = m(np.array([seq[:t]]))
            assert int(logits.data[0, -1].argmax()) == seq[t], t


def test_rolling_cache_chunks_equal_full_forward():
    """Feeding a long text in chunks through the rolling cache gives the full forward's logits."""
    m = make(np.float64, position="rope", attn_window=6, n_kv_head=1)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 13, (2, 40))
    with mg.no_grad():
        full, _ = m(idx, idx)                                  # logits of every position
        cache = KVCache(2, window=6)
        got = []
        for a, b in ((0, 9), (9, 10), (10, 27), (27, 28), (28, 40)):
            lg, _ = m(idx[:, a:b], idx[:, a:b], cache=cache)
            got.append(lg.data)
    np.testing.assert_allclose(np.concatenate(got, axis=1), full.data, atol=1e-10)
    assert cache._kbuf[0].shape[2] == 6


def test_learned_positions_still_stop_at_block_size():
    m = make(attn_window=4)
    with pytest.raises(ValueError, match="block_size"):
        m(np.zeros((1, 17), dtype=np.int64))
    assert len(gen.generate_ids(m, [1], 40, "greedy")[0]) == 41   # cropping, as before


# --------------------------------------------------------------------------- sharing
@pytest.mark.parametrize("extra", [{}, {"checkpoint_every": 1}, {"reversible": True}])
def test_shared_layer_gradients_accumulate(extra):
    """A block used by layers 0 and 2 gets the sum of the gradients an unshared model with two
    equal copies gives those two layers."""
    shared = make(np.float64, n_layer=4, share_layers=2, **extra)
    plain = make(np.float64, n_layer=4, **extra)
    sd = shared.state_dict()
    full = {}
    for k, v in plain.state_dict().items():
        if k.startswith("transformer.h."):
            i = int(k.split(".")[2])
            full[k] = sd[k.replace(f"h.{i}.", f"h.{i % 2}.", 1)]
        else:
            full[k] = sd[k]
    plain.load_state_dict(full)
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 13, (2, 16)), rng.integers(0, 13, (2, 16))
    for model in (shared, plain):
        model(x, y)[1].backward()
    pg = dict(plain.named_parameters())
    for k, p in shared.named_parameters():
        if k.startswith("transformer.h."):
            i = int(k.split(".")[2])
            want = pg[k].grad.data + pg[k.replace(f"h.{i}.", f"h.{i + 2}.", 1)].grad.data
            np.testing.assert_allclose(p.grad.data, want, atol=1e-10, err_msg=k)
        else:
            np.testing.assert_allclose(p.grad.data, pg[k].grad.data, atol=1e-10, err_msg=k)


def test_shared_state_dict_stores_each_tensor_once_and_round_trips(tmp_path):
    m = make(n_layer=4, share_layers=1)
    sd = m.state_dict()
    assert sorted({k.split(".")[2] for k in sd if k.startswith("transformer.h.")}) == ["0"]
    one = make(n_layer=1)
    assert m.num_params() == one.num_params()                  # 1/L of the block parameters
    save_file(sd, str(tmp_path / "w.safetensors"))
    m2 = GPT(ModelConfig(**{**BASE, "n_layer": 4, "share_layers": 1}))
    m2.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert m2.transformer.h[0] is m2.transformer.h[3]
    x = np.arange(10)[None] % 13
    np.testing.assert_array_equal(m.logits_last(x), m2.logits_last(x))


# --------------------------------------------------------------------------- low rank, counts
def test_low_rank_layers_and_parameter_counts():
    m = make(low_rank=6, low_rank_attn=True)
    blk = m.transformer.h[0]
    for lin in (blk.mlp.c_fc, blk.mlp.c_proj, blk.attn.c_attn, blk.attn.c_proj):
        assert isinstance(lin, LowRankLinear) and lin.rank == 6
    assert not isinstance(make(low_rank=6).transformer.h[0].attn.c_attn, LowRankLinear)
    C, r, L = 32, 6, 2
    per_block = 4 * C + (r * (C + 3 * C) + 3 * C) + (r * (2 * C) + C) + (r * 5 * C + 4 * C) + (r * 5 * C + C)
    assert m.num_params() == 13 * C + L * per_block + 2 * C   # wte (tied) + blocks + ln_f
    # GQA: c_attn makes (n_head + 2 n_kv_head) heads
    assert make(n_kv_head=1).transformer.h[0].attn.c_attn.weight.shape == ((4 + 2) * 8, 32)
    # RoPE has no position table; learned counts without it (as nanoGPT)
    assert make(position="rope").num_params() == make().num_params()
    assert not hasattr(make(position="rope").transformer, "wpe")


def test_low_rank_init_has_dense_std():
    m = make(low_rank=16, n_embd=64, n_head=4)
    w = m.transformer.h[0].mlp.c_fc.dense_weight()
    assert 0.015 < w.std() < 0.025


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("over,msg", [
    ("model.n_kv_head=3", "must divide model.n_head"),
    ("model.attn_window=-1", "attn_window must be >= 0"),
    ("model.share_layers=3", "must divide model.n_layer"),
    ("model.low_rank=32", "low_rank must be in"),
    ("model.low_rank_attn=true", "needs model.low_rank"),
    ("model.position=alibi", "'learned' or 'rope'"),
])
def test_config_errors(over, msg, tmp_path, capsys):
    cfg = apply_overrides(Config(), ["model.n_layer=4", "model.n_head=4", "model.n_embd=32", over])
    with pytest.raises(ConfigError, match=msg):
        validate(cfg)
    with pytest.raises(ConfigError, match=msg):
        GPT(ModelConfig(**{**BASE, **{k: v for k, v in vars(cfg.model).items() if k in ModelConfig.__dataclass_fields__},
                           "vocab_size": 13}))
    out = tmp_path / "o"
    assert lt.main(["--output_dir", str(out), "model.n_layer=4", "model.n_head=4", "model.n_embd=32", over]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_rope_needs_even_head_size():
    with pytest.raises(ConfigError, match="must be even"):
        validate(apply_overrides(Config(), ["model.n_head=4", "model.n_embd=12", "model.position=rope"]))


# --------------------------------------------------------------------------- train, save, load, resume
def test_train_resume_load_generate_with_all_switches(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=8)) for _ in range(300)))
    sw = ["model.n_kv_head=1", "model.attn_window=8", "model.position=rope", "model.share_layers=1",
          "model.low_rank=8", "model.low_rank_attn=true"]
    over = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16", "train.batch_size=4",
            "train.eval_iters=2", "train.warmup_iters=2", "train.progress=false", "train.sample_tokens=0",
            "train.eval_interval=6", f"data.cache_dir={tmp_path}/cache", *sw]
    full, part = tmp_path / "full", tmp_path / "part"

    def argv(out, *flags):
        return ["--data", str(corpus), "--seed", "3", "--max_iters", "12", "--output_dir", str(out), *flags, *over]
    assert lt.main(argv(full)) == 0

    def crash(step, loss):
        if step == 9:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        lt.train(lt.resolve_config(lt.build_parser().parse_args(argv(part))), str(part), callback=crash)
    assert lt.main(argv(part, "--resume")) == 0
    a, b = load_file(str(full / "checkpoint.safetensors")), load_file(str(part / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    model, tok = gen.load_model(str(full / "model"))
    c = model.config
    assert (c.n_kv_head, c.attn_window, c.position, c.share_layers, c.low_rank) == (1, 8, "rope", 1, 8)
    assert model.transformer.h[0] is model.transformer.h[1]
    assert gen.main(["--model_dir", str(full / "model"), "--prompt", "the", "--max_new_tokens", "70",
                     "--strategy", "greedy"]) == 0
