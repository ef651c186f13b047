"""lm.kv_heads: multi-head attention mean-pooled into grouped/multi-query attention, and the
lm.compress --kv_heads step (save, load, uptrain, quantize, errors)."""
import json

import numpy as np
import pytest
from helpers import tiny_model_folder

import minigrad as mg
from lm import compress as lc
from lm import generate as gen
from lm.config import ModelConfig
from lm.kv_heads import check_poolable, pool_kv_heads
from lm.loader import load_model
from lm.model import GPT

FAST = ["--eval_batches", "2", "--batch_size", "4", "--decode_tokens", "8", "--repeats", "1", "--no_progress"]


def _model(dtype=np.float64, **kw):
    mg.manual_seed(0)
    cfg = dict(vocab_size=13, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return GPT(ModelConfig(**{**cfg, **kw})).to(dtype=dtype).eval()


def _equalize_groups(m, groups: int):
    """Make the key and value rows of the heads of each group equal (then pooling loses nothing)."""
    nh, hs = m.config.n_head, m.config.n_embd // m.config.n_head
    nkv = m.config.n_kv_head or nh
    g = nkv // groups
    for blk in m.transformer.h:
        lin = blk.attn.c_attn
        for arr in ([lin.U.data] if hasattr(lin, "U") else [lin.weight.data]) + \
                ([lin.bias.data] if lin.bias is not None else []):
            for base in (nh * hs, (nh + nkv) * hs):                  # keys, then values
                for j in range(groups):
                    first = arr[base + j * g * hs: base + (j * g + 1) * hs].copy()
                    for h in range(1, g):
                        arr[base + (j * g + h) * hs: base + (j * g + h + 1) * hs] = first


@pytest.mark.parametrize("kw,target", [({}, 1), ({}, 2), (dict(n_kv_head=2), 1),
                                       (dict(low_rank=6, low_rank_attn=True), 1),
                                       (dict(position="rope", attn_window=5), 2)])
def test_pooling_equal_heads_keeps_the_function(kw, target):
    m = _model(**kw)
    _equalize_groups(m, target)
    new = pool_kv_heads(m, target)
    assert new.config.n_kv_head == target and m.config.n_kv_head == kw.get("n_kv_head", 0)
    ids = np.random.default_rng(0).integers(0, 13, (2, 12))
    with mg.no_grad():
        a, _ = m(ids)
        b, _ = new(ids)
    np.testing.assert_allclose(b.data, a.data, rtol=1e-11, atol=1e-11)
    # the KV cache holds `target` heads, and decoding with it gives the same tokens
    assert gen.generate_ids(new, [1, 2], 10, "greedy") == gen.generate_ids(m, [1, 2], 10, "greedy")


def test_pooled_rows_are_group_means_and_queries_are_kept():
    m = _model()
    new = pool_kv_heads(m, 2)
    nh, hs = 4, 8
    w0 = m.transformer.h[1].attn.c_attn.weight.data
    w1 = new.transformer.h[1].attn.c_attn.weight.data
    b0, b1 = m.transformer.h[1].attn.c_attn.bias.data, new.transformer.h[1].attn.c_attn.bias.data
    assert w1.shape == ((nh + 2 * 2) * hs, 32)
    np.testing.assert_array_equal(w1[:nh * hs], w0[:nh * hs])
    for part, (o0, o1) in enumerate([(nh * hs, nh * hs), (2 * nh * hs, (nh + 2) * hs)]):   # keys, values
        for j in range(2):
            mean = (w0[o0 + 2 * j * hs: o0 + (2 * j + 1) * hs] + w0[o0 + (2 * j + 1) * hs: o0 + (2 * j + 2) * hs]) / 2
            np.testing.assert_allclose(w1[o1 + j * hs: o1 + (j + 1) * hs], mean, rtol=0, atol=1e-15)
            bmean = (b0[o0 + 2 * j * hs: o0 + (2 * j + 1) * hs] + b0[o0 + (2 * j + 1) * hs: o0 + (2 * j + 2) * hs]) / 2
            np.testing.assert_allclose(b1[o1 + j * hs: o1 + (j + 1) * hs], bmean, rtol=0, atol=1e-15)
    sd0, sd1 = m.state_dict(), new.state_dict()
    for k in sd0:
        if ".attn.c_attn." not in k:
            np.testing.assert_array_equal(sd1[k], sd0[k])


def test_pooling_draws_no_random_numbers_and_keeps_dtype_and_mode():
    m = _model(np.float32)
    m.train()
    before = mg.backend.get_rng_state(np)
    new = pool_kv_heads(m, 1)
    assert mg.backend.get_rng_state(np) == before
    assert new.transformer.wte.weight.dtype == np.float32 and new.training
    m.eval()                                  # a model in eval mode comes back in eval mode
    assert not pool_kv_heads(m, 1).training


@pytest.mark.parametrize("kw,n,msg", [({}, 4, "give fewer"), ({}, 3, "do not divide"), ({}, 0, "positive"),
                                      (dict(n_kv_head=2), 2, "give fewer"),
                                      (dict(share_layers=1), 1, "shares blocks"),
                                      (dict(layer_heads=[4, 2]), 1, "own head counts")])
def test_check_poolable_errors(kw, n, msg):
    cfg = ModelConfig(vocab_size=13, block_size=16, n_layer=2, n_head=4, n_embd=32, **kw)
    with pytest.raises(ValueError, match=msg):
        check_poolable(cfg, n)


# --------------------------------------------------------------------------- lm.compress --kv_heads
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvheads")
    tiny_model_folder(root)
    return root


def test_compress_kv_heads_uptrain_and_quantize(model_dir, tmp_path, capsys):
    corpus = str(model_dir / "corpus.txt")
    out = tmp_path / "mqa"
    assert lc.main(["--model_dir", str(model_dir / "model"), "--kv_heads", "1", "--data", corpus,
                    "--finetune_iters", "3", "--finetune_batch_size", "4", "--quantize", "q8_0",
                    "--output_dir", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "key/value heads: 2 -> 1" in printed and "recovery fine-tune: 3 steps" in printed
    conf = json.loads((out / "config.json").read_text())
    assert conf["model"]["n_kv_head"] == 1
    assert [s["name"] for s in conf["compress"]["steps"]][:2] == ["kv_heads 1", "finetune 3"]
    m, _ = load_model(str(out))
    assert m.config.n_kv_head == 1 and m.transformer.h[0].attn.n_kv_head == 1
    hs = 64 // 2
    assert m.transformer.h[0].attn.c_attn.out_features == (2 + 2) * hs
    assert gen.main(["--model_dir", str(out), "--prompt", "the cat", "--max_new_tokens", "6", "--seed", "1"]) == 0


def test_compress_kv_heads_without_uptraining_says_so(model_dir, tmp_path, capsys):
    out = tmp_path / "mqa0"
    assert lc.main(["--model_dir", str(model_dir / "model"), "--kv_heads", "1", "--output_dir", str(out),
                    "--no_report"]) == 0
    assert "saved untrained" in capsys.readouterr().out
    m, _ = load_model(str(out))
    assert m.config.n_kv_head == 1


@pytest.mark.parametrize("flags,msg", [(["--kv_heads", "2"], "give fewer"), (["--kv_heads", "0"], "positive"),
                                       (["--kv_heads", "1", "--structured", "heads=0.5"], "cannot run together")])
def test_compress_kv_heads_errors(model_dir, tmp_path, capsys, flags, msg):
    out = tmp_path / "bad"
    assert lc.main(["--model_dir", str(model_dir / "model"), *flags, "--data", str(model_dir / "corpus.txt"),
                    "--output_dir", str(out), "--no_report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    assert not out.exists() or not any(out.iterdir())
