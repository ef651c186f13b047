"""Structured pruning (lm.structured): whole heads and MLP channels out, a smaller dense GPT.

Removing heads/channels that contribute nothing must leave the outputs unchanged; the pruned
config (per-layer heads and MLP widths) must build, save, load, generate and train.
"""
import numpy as np
import pytest

import minigrad as mg
from lm.config import Config, ConfigError, ModelConfig, validate
from lm.generate import generate_ids
from lm.model import GPT
from lm.structured import block_parameters, parse_spec, prune_structured_


def tiny(**kw):
    mg.manual_seed(0)
    return GPT(ModelConfig(vocab_size=20, block_size=16, n_layer=2, n_head=4, n_embd=32, **kw))


def calib(n=3):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 20, (2, 16)) for _ in range(n)]


def test_removing_what_contributes_nothing_keeps_outputs():
    m = tiny()
    hs = 8
    dead_head = {0: 2, 1: 0}
    dead_mlp = {0: np.arange(10, 130, 3)[:32], 1: np.arange(0, 128, 4)}
    for i, block in enumerate(m.transformer.h):  # these heads and channels write nothing
        block.attn.c_proj.weight.data[:, dead_head[i] * hs:(dead_head[i] + 1) * hs] = 0
        block.mlp.c_proj.weight.data[:, dead_mlp[i]] = 0
    idx = calib(1)[0]
    before, _ = m(idx, idx)
    n0 = block_parameters(m)
    prune_structured_(m, heads=0.25, mlp=0.25, calib=calib())
    assert m.config.layer_heads == [3, 3] and m.config.layer_mlp == [96, 96]
    # per layer: 3 heads of (3 x 8 rows + 8 columns) of 32 and their biases, 32 channels of 2 x 32 + 1
    assert n0 - block_parameters(m) == 2 * (32 * 24 + 24 + 32 * 8 + 32 * (64 + 1))
    after, _ = m(idx, idx)
    np.testing.assert_allclose(after.data, before.data, rtol=1e-5, atol=1e-5)
    for block in m.transformer.h:  # only live columns are left
        assert (np.abs(block.mlp.c_proj.weight.data).sum(0) > 0).all()
        assert (np.abs(block.attn.c_proj.weight.data).reshape(32, 3, hs).sum((0, 2)) > 0).all()


def test_pruned_config_builds_and_loads():
    m = tiny()
    prune_structured_(m, heads=0.5, mlp=0.5, calib=calib())
    fresh = GPT(m.config)
    fresh.load_state_dict(m.state_dict())
    idx = calib(1)[0]
    np.testing.assert_array_equal(fresh(idx, idx)[0].data, m(idx, idx)[0].data)
    # generation with the KV cache equals the uncached path
    a = generate_ids(fresh, [1, 2, 3], 8, "greedy", use_cache=True)
    b = generate_ids(fresh, [1, 2, 3], 8, "greedy", use_cache=False)
    assert a == b
    # and it trains
    opt = fresh.configure_optimizer(1e-2, 0.1, (0.9, 0.99))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        _, loss = fresh(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        losses.append(float(loss.data))
    assert losses[-1] < losses[0]


def test_config_validation():
    cfg = Config()
    cfg.model.layer_heads = [4, 4, 0, 4]
    with pytest.raises(ConfigError, match="layer_heads"):
        validate(cfg)
    cfg.model.layer_heads = [4, 4, 5, 4]
    with pytest.raises(ConfigError, match="cannot exceed"):
        validate(cfg)
    cfg.model.layer_heads = [4, 4]
    with pytest.raises(ConfigError, match="list of 4"):
        validate(cfg)
    cfg.model.layer_heads, cfg.model.layer_mlp = [1, 2, 3, 4], [10, 20, 30, 40]
    validate(cfg)


@pytest.mark.parametrize("kw,msg", [
    (dict(heads=1.0), "fraction in"),
    (dict(heads=0.9), "every head of layer 0"),
    (dict(mlp=-0.1), "fraction in"),
    (dict(heads=0.25, calib=None), "pass calib"),
])
def test_bad_input(kw, msg):
    kw = dict({"calib": calib()}, **kw)
    with pytest.raises(ValueError, match=msg):
        prune_structured_(tiny(), **kw)


def test_parse_spec():
    assert parse_spec("heads=0.25,mlp=0.3") == {"heads": 0.25, "mlp": 0.3}
    with pytest.raises(ValueError, match="heads=F"):
        parse_spec("layers=0.5")
    with pytest.raises(ValueError, match="not a number"):
        parse_spec("heads=x")


def test_kept_width_rounding():
    from lm.structured import kept_width
    assert kept_width(1024, 0.4) == 614
    assert kept_width(1024, 0.4, 32) == 608
    assert kept_width(40, 0.5, 32) == 20        # less than one multiple left: as asked
    m = tiny()
    prune_structured_(m, mlp=0.3, calib=calib(), mlp_multiple=32)
    assert m.config.layer_mlp == [96, 96]


# --------------------------------------------------------------------------- with the architecture switches
def test_structured_with_rope_window_and_low_rank_saves_loads_generates(tmp_path):
    """A structurally pruned RoPE + sliding-window + low-rank model is an ordinary model folder:
    it saves, loads (lm.loader), matches the pruned model and generates (cached = uncached)."""
    from lm.loader import load_model
    from lm.tokenizer import build_tokenizer
    from lm.train import save_model_dir
    from minigrad import nn
    from minigrad.nn import LowRankLinear
    tok = build_tokenizer("char", "abcdefghijklmnopqrst")
    assert tok.vocab_size == 20                 # tiny()'s vocabulary
    m = tiny(position="rope", attn_window=6, low_rank=8, low_rank_attn=True)
    batches = calib()
    prune_structured_(m, heads=0.75, mlp=0.5, calib=batches)
    assert m.config.layer_heads == [1, 1] and m.config.layer_mlp == [64, 64]
    for block in m.transformer.h:
        assert isinstance(block.mlp.c_fc, LowRankLinear) and isinstance(block.attn.c_attn, LowRankLinear)
        assert block.mlp.c_fc.out_features == 64 and block.attn.c_attn.out_features == 3 * 8
        # 1 head: attn.c_proj is 8 -> 32, rank 8 is not below min(in, out): a plain Linear (lm.model's rule)
        assert type(block.attn.c_proj) is nn.Linear
    cfg = Config(model=m.config)
    save_model_dir(str(tmp_path / "model"), m, tok, cfg)
    loaded, _ = load_model(str(tmp_path / "model"))
    assert loaded.config.layer_heads == [1, 1] and loaded.config.position == "rope"
    idx = batches[0]
    m.eval()
    np.testing.assert_allclose(loaded(idx, idx)[0].data, m(idx, idx)[0].data, rtol=1e-6, atol=1e-6)
    # past block_size on the rolling cache (RoPE + window): cached equals uncached within the window
    a = generate_ids(loaded, [1, 2, 3], 20, "greedy", use_cache=True)
    b = generate_ids(loaded, [1, 2, 3], 20, "greedy", use_cache=False)
    assert a == b and len(a[0]) == 23           # 23 > block_size 16


def test_structured_refuses_gqa_and_shared_layers():
    with pytest.raises(ValueError, match="grouped-query / multi-query attention .* not supported"):
        prune_structured_(tiny(n_kv_head=2), heads=0.25, calib=calib())
    with pytest.raises(ValueError, match="share_layers"):
        prune_structured_(tiny(share_layers=1), heads=0.25, calib=calib())
    # n_kv_head = n_head is plain multi-head attention: allowed, and a pruned layer keeps one kv head per head
    m = tiny(n_kv_head=4, position="rope")
    prune_structured_(m, heads=0.5, calib=calib())
    assert [b.attn.n_kv_head for b in m.transformer.h] == [2, 2]
    fresh = GPT(m.config)
    fresh.load_state_dict(m.state_dict())
    idx = calib(1)[0]
    np.testing.assert_array_equal(fresh(idx, idx)[0].data, m(idx, idx)[0].data)
    # and the config says the same before any model is built
    cfg = Config()
    cfg.model.n_kv_head, cfg.model.layer_heads = 2, [2, 2, 2, 2]
    with pytest.raises(ConfigError, match="n_kv_head = 0 or n_head"):
        validate(cfg)
    cfg.model.n_kv_head, cfg.model.share_layers = 0, 2
    cfg.model.layer_heads = [2, 3, 2, 3]
    validate(cfg)
    cfg.model.layer_heads = [2, 3, 3, 2]
    with pytest.raises(ConfigError, match="period 2"):
        validate(cfg)
