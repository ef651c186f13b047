"""Progressive training (lm.progressive): the seqlen schedule, growth by stacking, and their
use in lm.train (batch cutting, metrics, loss.png marks, --resume across a growth step)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import minigrad as mg
from lm import train as lt
from lm.config import ModelConfig
from lm.model import GPT
from lm.progressive import (SCHEDULES, cut_batch, discrete_lengths, grow_stack, identity_params, layers_at,
                            seqlen_at)

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.batch_size=4", "train.eval_iters=2", "train.warmup_iters=2", "train.progress=false",
        "train.sample_tokens=0", "train.log_interval=5", "model.dropout=0.1"]
GROW = "progressive.grow=[{at: 4, n_layer: 2}, {at: 8, n_layer: 3}]"
WARM = ["progressive.seqlen_start=8", "progressive.total_steps=10"]


@pytest.fixture()
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(" ".join(rng.choice(words, size=8)) + "." for _ in range(300)))
    return str(p)


def args(corpus, out, *extra, iters=12):
    return ["--data", corpus, "--output_dir", str(out), "--seed", "3", "--max_iters", str(iters), *TINY,
            f"data.cache_dir={out}/cache", *extra]


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("start,step,block,total", [(8, 8, 64, 20), (16, 16, 256, 100), (32, 32, 256, 7)])
def test_seqlen_multiples_clamped_full_at_total(schedule, start, step, block, total):
    vals = [seqlen_at(s, start, block, total, step, schedule) for s in range(total + 5)]
    assert all(v % step == 0 for v in vals)
    assert all(start <= v <= block for v in vals)
    assert vals[0] == start
    assert all(v == block for v in vals[total:])      # full length at and after total_steps
    assert all(a <= b for a, b in zip(vals, vals[1:]))   # never shorter again
    assert max(vals[:total]) < block or schedule == "root"


def test_schedule_values():
    # linear: start + (block - start) * s / total, rounded down to the step
    assert [seqlen_at(s, 8, 64, 8, 8, "linear") for s in range(0, 10, 2)] == [8, 22 // 8 * 8, 36 // 8 * 8, 50 // 8 * 8, 64]
    # root grows faster than linear at the same step
    assert seqlen_at(25, 32, 256, 100, 32, "root") == 32 + (224 * 0.5) // 32 * 32 and \
        seqlen_at(25, 32, 256, 100, 32, "linear") == 64
    # discrete: doubling stages, equal shares of total_steps
    assert discrete_lengths(32, 256) == [32, 64, 128]
    assert [seqlen_at(s, 32, 256, 90, 32, "discrete") for s in (0, 29, 30, 59, 60, 89, 90)] == \
        [32, 32, 64, 64, 128, 128, 256]
    # a step that does not divide the interpolated value rounds down; never below start
    assert seqlen_at(1, 24, 48, 100, 24, "linear") == 24


def test_cut_batch():
    x, y = np.arange(24).reshape(2, 12), np.arange(24).reshape(2, 12) + 1
    cx, cy = cut_batch(x, y, 4)
    assert cx.shape == cy.shape == (2, 4) and np.array_equal(cx, x[:, :4]) and np.array_equal(cy, y[:, :4])
    assert cut_batch(x, y, 12)[0] is x


def test_layers_at():
    grow = [{"at": 4, "n_layer": 2}, {"at": 8, "n_layer": 3}]
    assert [layers_at(s, 1, grow) for s in (0, 3, 4, 7, 8, 100)] == [1, 1, 2, 2, 3, 3]


# --------------------------------------------------------------------------- growth
def _trained_pair(**model):
    mg.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, **model))
    opt = m.configure_optimizer(1e-2, 0.1, (0.9, 0.99))
    x = np.random.default_rng(0).integers(0, 11, (3, 8))
    for _ in range(3):
        _, loss = m(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m, opt, x


def test_grow_copies_the_stack_and_its_optimizer_state():
    m, opt, x = _trained_pair()
    make = lambda model: model.configure_optimizer(1e-2, 0.1, (0.9, 0.99))  # noqa: E731
    rng_before = mg.backend.get_rng_state(np)
    new, new_opt = grow_stack(m, opt, 5, make)
    assert mg.backend.get_rng_state(np) == rng_before   # growth draws no random numbers
    assert new.config.n_layer == 5 and len(new.transformer.h) == 5 and m.config.n_layer == 2
    old_sd, new_sd = m.state_dict(), new.state_dict()
    for k, v in new_sd.items():
        src = k
        if k.startswith("transformer.h."):
            i, rest = k[len("transformer.h."):].split(".", 1)
            src = f"transformer.h.{int(i) % 2}.{rest}"        # G_stack: block i is old block i % 2
        assert np.array_equal(v, old_sd[src]), k
        assert v is not old_sd[src]
    # the function: embeddings, blocks 0 1 0 1 0 of the old model, final norm, head
    with mg.no_grad():
        logits_new, _ = new(x, x)
        h = m.transformer.wte(x) + m.transformer.wpe(np.arange(8))
        for i in (0, 1, 0, 1, 0):
            h = m.transformer.h[i](h)
        ref = m.lm_head(m.transformer.ln_f(h))
    np.testing.assert_allclose(logits_new.data, ref.data, rtol=1e-5, atol=1e-6)
    # optimizer: every parameter has state of its shape, copied (not shared) from its source
    old_state = opt.state_dict()["state"]
    for _, name, p in new_opt.named_params():
        st = new_opt.state[name]
        src = name if not name.startswith("transformer.h.") else \
            "transformer.h.{}.{}".format(int(name.split(".")[2]) % 2, name.split(".", 3)[3])
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].shape == p.shape
            assert np.array_equal(st[key], old_state[src][key]) and st[key] is not old_state[src][key]
        assert st["step"] == old_state[src]["step"] == 3
    assert new_opt.step_count == opt.step_count and new_opt.lr == opt.lr
    assert not np.shares_memory(new_opt.state["transformer.h.2.mlp.c_fc.weight"]["exp_avg"],
                                new_opt.state["transformer.h.0.mlp.c_fc.weight"]["exp_avg"])
    # the grown model trains
    _, loss = new(x, x)
    new_opt.zero_grad()
    loss.backward()
    new_opt.step()
    assert new_opt.state["transformer.h.4.attn.c_attn.weight"]["step"] == 4


@pytest.mark.parametrize("low_rank", [0, 4])
def test_identity_growth_keeps_the_function_and_trains_the_new_blocks(low_rank):
    """grow_init=identity: the new blocks' output projections are zero, so the grown model computes
    the shallow one's logits; their optimizer state starts anew; after one step they are not zero."""
    m, opt, x = _trained_pair(low_rank=low_rank)
    make = lambda model: model.configure_optimizer(1e-2, 0.1, (0.9, 0.99))  # noqa: E731
    new, new_opt = grow_stack(m, opt, 4, make, init="identity")
    zeroed = identity_params([n for n, _ in new.named_parameters()], 2)
    expect = {f"transformer.h.{i}.{part}.c_proj.{w}" for i in (2, 3) for part in ("attn", "mlp")
              for w in ("bias", "weight" if not low_rank else "U")}
    if low_rank:   # attention's c_proj is a plain Linear unless low_rank_attn
        expect = {n.replace("attn.c_proj.U", "attn.c_proj.weight") for n in expect}
    assert set(zeroed) == expect
    params = dict(new.named_parameters())
    for n in zeroed:
        assert not params[n].data.any() and n not in new_opt.state
    with mg.no_grad():
        a, _ = m(x, x)
        b, _ = new(x, x)
    np.testing.assert_allclose(b.data, a.data, rtol=1e-6, atol=1e-6)
    # the other parameters of the new blocks are the copies, with their sources' state
    assert np.array_equal(params["transformer.h.3.attn.c_attn.weight"].data, m.transformer.h[1].attn.c_attn.weight.data)
    assert new_opt.state["transformer.h.3.attn.c_attn.weight"]["step"] == 3
    _, loss = new(x, x)
    new_opt.zero_grad()
    loss.backward()
    new_opt.step()
    assert all(params[n].data.any() for n in zeroed)
    with pytest.raises(ValueError, match="copy, identity"):
        grow_stack(m, opt, 4, make, init="zeros")


def test_identity_growth_in_lm_train_keeps_adamw8bit(tmp_path, corpus):
    """In lm.train, growth rebuilds the optimizer as the configured one (8-bit state here, its
    codes in the checkpoint), not a float32 AdamW."""
    out = tmp_path / "run"
    a = lt.build_parser().parse_args(args(corpus, out, "train.eval_interval=12", "model.n_embd=64",
                                          "progressive.grow=[{at: 4, n_layer: 2}]", "progressive.grow_init=identity",
                                          "train.optimizer=adamw8bit", iters=8))
    lt.train(lt.resolve_config(a), str(out))
    from minigrad.io import load_metadata
    meta = load_metadata(str(out / "checkpoint.safetensors"))
    assert meta["n_layer"] == "2"
    ck = load_file(str(out / "checkpoint.safetensors"))
    assert "optim.transformer.h.1.mlp.c_fc.weight.exp_avg_q" in ck
    assert ck["optim.transformer.h.1.mlp.c_fc.weight.exp_avg_q"].dtype == np.uint8


def test_grow_init_is_checked(tmp_path, corpus, capsys):
    assert lt.main(args(corpus, tmp_path / "r", "progressive.grow=[{at: 4, n_layer: 2}]",
                        "progressive.grow_init=zero")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "copy, identity" in err[0]


def test_grow_must_add_layers():
    m, opt, _ = _trained_pair()
    with pytest.raises(ValueError, match="larger"):
        grow_stack(m, opt, 2, lambda model: model.configure_optimizer(1e-2, 0.1, (0.9, 0.99)))


# --------------------------------------------------------------------------- in lm.train
def test_metrics_loss_png_and_model_folder(tmp_path, corpus):
    out = tmp_path / "run"
    assert lt.main(args(corpus, out, "train.eval_interval=4", GROW, *WARM)) == 0
    steps = [r for r in rows(out) if r.get("kind") != "eval"]
    assert [r["n_layer"] for r in steps] == [1] * 4 + [2] * 4 + [3] * 4
    assert [r["seqlen"] for r in steps] == [seqlen_at(r["step"] - 1, 8, 32, 10, 8) for r in steps]
    assert steps[0]["seqlen"] == 8 and steps[-1]["seqlen"] == 32
    # the learning-rate schedule continues through growth: the cosine of a run without it
    assert [r["lr"] for r in steps] == [mg.optim.cosine_lr(r["step"] - 1, 1e-3, 2, 12, 1e-4) for r in steps]
    cfg = json.loads((out / "model" / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    ck = load_file(str(out / "checkpoint.safetensors"))
    assert any(k.startswith("model.transformer.h.2.") for k in ck)
    from lm.loader import load_model
    model, _ = load_model(str(out / "model"))[:2]
    assert model.config.n_layer == cfg["model"]["n_layer"]
    assert len(model.transformer.h) == model.config.n_layer
    assert summary["steps"] == 12
    fig = lt.training_figure(str(out / "metrics.jsonl"))
    ax = fig.axes[0]
    marks = [ln for ln in ax.get_lines() if ln.get_label().startswith("grown to")]
    assert [(ln.get_xdata()[0], ln.get_label()) for ln in marks] == [(4, "grown to 2 layers"), (8, "grown to 3 layers")]
    assert sum(1 for ln in fig.axes[1].get_lines() if ln.get_linestyle() == "--") == 2


def test_no_marks_without_growth(tmp_path, corpus):
    out = tmp_path / "run"
    assert lt.main(args(corpus, out, "train.eval_interval=6", iters=6)) == 0
    assert all(r["seqlen"] == 32 and r["n_layer"] == 1 for r in rows(out) if r.get("kind") != "eval")
    fig = lt.training_figure(str(out / "metrics.jsonl"))
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("grown")]


def test_warmup_cuts_the_baseline_batches(tmp_path, corpus, monkeypatch):
    """Same windows as without warmup (same generator), only their first L tokens."""
    seen, trained = {}, {}
    real, real_loss = lt.cut_batch, lt.make_step_loss

    def spy(x, y, length):
        seen.setdefault(tag, []).append((x.copy(), length))
        return real(x, y, length)

    def spy_loss(*a, **k):   # what the model is actually given
        fn = real_loss(*a, **k)

        def step_loss(model, x, y):
            trained.setdefault(tag, []).append((x.shape, y.shape))
            return fn(model, x, y)
        return step_loss
    monkeypatch.setattr(lt, "cut_batch", spy)
    monkeypatch.setattr(lt, "make_step_loss", spy_loss)
    for tag in ("base", "warm"):
        extra = WARM if tag == "warm" else []
        assert lt.main(args(corpus, tmp_path / tag, "train.eval_interval=12", *extra)) == 0
    assert len(seen["base"]) == len(seen["warm"]) == 12
    for (xb, lb), (xw, lw) in zip(seen["base"], seen["warm"]):
        assert np.array_equal(xb, xw) and lb == 32 and xw.shape[1] == 32
    assert [lw for _, lw in seen["warm"]][:3] == [8, 8, 8]
    assert trained["warm"] == [((4, seqlen_at(s, 8, 32, 10, 8)),) * 2 for s in range(12)]
    assert trained["base"] == [((4, 32),) * 2] * 12


def test_resume_across_growth_is_bitwise(tmp_path, corpus):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["train.eval_interval=3", GROW, *WARM]
    assert lt.main(args(corpus, full, *common)) == 0

    def crash(step, loss):   # dies after step 7: the last save is at step 6 (grown once, before the second growth)
        if step == 7:
            raise KeyboardInterrupt
    a = lt.build_parser().parse_args(args(corpus, part, *common))
    with pytest.raises(KeyboardInterrupt):
        lt.train(lt.resolve_config(a), str(part), callback=crash)
    from minigrad.io import load_metadata
    assert load_metadata(str(part / "checkpoint.safetensors"))["n_layer"] == "2"
    # resumed without repeating the progressive settings: the checkpoint's go on (the second growth too)
    assert lt.main(args(corpus, part, "train.eval_interval=3", "--resume")) == 0
    x, y = load_file(str(full / "checkpoint.safetensors")), load_file(str(part / "checkpoint.safetensors"))
    assert x.keys() == y.keys() and any(".h.2." in k for k in x)
    for k in x:
        assert np.array_equal(x[k], y[k]), k
    assert [r["n_layer"] for r in rows(part) if r.get("kind") != "eval"] == \
        [r["n_layer"] for r in rows(full) if r.get("kind") != "eval"]


def test_resume_refuses_a_schedule_that_undoes_growth(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert lt.main(args(corpus, out, "train.eval_interval=6", GROW, iters=6)) == 0
    capsys.readouterr()
    assert lt.main(args(corpus, out, "train.eval_interval=6", "progressive.grow=[{at: 8, n_layer: 2}]",
                        "--resume", iters=12)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grown to 2 layers" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("extra,words", [
    (["progressive.seqlen_start=64", "progressive.total_steps=5"], ["seqlen_start=64", "block_size=32"]),
    (["progressive.seqlen_start=12", "progressive.seqlen_step=8", "progressive.total_steps=5"],
     ["seqlen_step=8", "seqlen_start=12"]),
    (["progressive.seqlen_start=12", "progressive.seqlen_step=12", "progressive.total_steps=5"],
     ["seqlen_step=12", "block_size=32"]),
    (["progressive.seqlen_start=8"], ["total_steps"]),
    (["progressive.schedule=cubic", "progressive.seqlen_start=8", "progressive.total_steps=5"], ["schedule", "cubic"]),
    (["progressive.grow=[{at: 8, n_layer: 2}, {at: 4, n_layer: 3}]"], ["grow[1].at=4", "increasing order"]),
    (["progressive.grow=[{at: 4, n_layer: 1}]"], ["grow[0].n_layer=1", "does not add layers"]),
    (["progressive.grow=[{at: 4, n_layer: 3}, {at: 8, n_layer: 3}]"], ["grow[1].n_layer=3", "does not add"]),
    (["progressive.grow=[{at: 0, n_layer: 3}]"], ["grow[0].at", "positive"]),
    (["progressive.grow=[{step: 4, n_layer: 3}]"], ["grow[0]", "'at'"]),
    (["progressive.grow=[{at: 4, n_layer: 4}]", "model.share_layers=1"], ["share_layers"]),
])
def test_bad_progressive_settings(tmp_path, corpus, capsys, extra, words):
    out = tmp_path / "run"
    assert lt.main(args(corpus, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not out.exists()
