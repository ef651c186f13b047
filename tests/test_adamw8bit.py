"""8-bit AdamW (minigrad/optim8bit.py): the code, the round trip, trajectories, state, resume."""
import numpy as np
import pytest

import minigrad as mg
import minigrad.optim8bit as O
from lm import train as lt
from lm.config import Config, ConfigError, apply_overrides, validate
from lm.model import GPT
from lm.config import ModelConfig
from minigrad import nn
from minigrad.io import load_file
from minigrad.memory import static_memory
from minigrad.optim import AdamW, AdamW8bit
from minigrad.optim8bit import SIGNED, UNSIGNED, dequantize_blockwise, dynamic_code, quantize_blockwise

from test_lm import TINY, corpus  # noqa: F401  (the fixture)


def test_dynamic_codes_follow_their_definition():
    s, u = dynamic_code(True), dynamic_code(False)
    for c in (s, u):
        assert c.size == 256 and c.dtype == np.float32 and np.all(np.diff(c) > 0)
        assert c[-1] == 1.0 and 0.0 in c
    assert s[0] == -s[-2] and np.all(u >= 0)                      # signed is symmetric but for the exact 1
    # E = 0 (values in [0.1, 1)) gets 64 signed / 128 unsigned fractions; each decade down halves that
    for e, n_s in enumerate((64, 32, 16, 8, 4, 2, 1)):
        lo, hi = 0.1 * 10.0 ** -e, 10.0 ** -e
        assert ((s > lo) & (s < hi)).sum() == n_s, e
        assert ((u > lo) & (u < hi)).sum() == 2 * n_s, e
    assert s[s > 0].min() == pytest.approx(0.55e-6, rel=1e-6)      # (0.1 + 1) / 2 * 1e-6


def test_round_trip_error_bound():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(5000) * np.exp(rng.standard_normal(5000) * 3)).astype(np.float32)
    q, a = quantize_blockwise(x, SIGNED)
    assert q.dtype == np.uint8 and q.shape == (5000,) and a.shape == (20,) and a.dtype == np.float32
    y = dequantize_blockwise(q, a, SIGNED)
    # nearest code: the error is at most half the gap to the neighbouring code entry, at scale absmax
    scale = np.repeat(a, 256)[:5000]
    gaps = np.diff(SIGNED.values)
    idx = q.astype(int)
    half_gap = 0.5 * np.maximum(gaps[np.clip(idx - 1, 0, 254)], gaps[np.clip(idx, 0, 254)]) * scale
    # below the lowest entry (-0.993: the signed code holds +1 but not -1) the error is up to 1 - 0.993
    bound = np.where(idx == 0, np.maximum(half_gap, (1 + SIGNED.values[0]) * scale), half_gap)
    assert np.all(np.abs(y - x) <= bound * (1 + 1e-5) + 1e-12)
    # relative precision by decade: 2**(6 - e) fractions of [0.1, 1] x 10**-e, so the error relative
    # to the value is at most 0.45 / 2**(6 - e) / 0.1 (at the decade's bottom)
    r = np.abs(x) / scale
    for e in range(5):
        inside = (r >= 0.1 * 10.0 ** -e) & (r < 10.0 ** -e) & (idx > 0)
        assert inside.sum() > 20
        assert np.all(np.abs(y - x)[inside] <= 4.5 / 2 ** (6 - e) * np.abs(x)[inside] * (1 + 1e-4)), e
    # a block's largest positive value is stored exactly, and nearest really is nearest (brute force)
    top = np.argmax(x[:4864].reshape(19, 256), axis=1) + 256 * np.arange(19)
    pos = x[top] == a[:19]
    assert pos.any() and np.array_equal(y[top][pos], x[top][pos])
    brute = np.abs((x[:256] / a[0])[:, None] - SIGNED.values[None]).argmin(1)
    assert np.array_equal(brute, q[:256])
    v = np.abs(x)
    qv, av = quantize_blockwise(v, UNSIGNED)
    assert np.all(dequantize_blockwise(qv, av, UNSIGNED) >= 0)


def test_kernel_buckets_hold_at_most_one_midpoint():
    from minigrad.kernels.adam8bit import SHIFT
    for code in (SIGNED, UNSIGNED):
        bits = code.mids.view(np.uint32)
        keys = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)
        _, counts = np.unique(keys >> SHIFT, return_counts=True)
        assert counts.max() == 1


def _pair(n_big=6000, small=(7, 300), seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w": (n_big // 60, 60), "b": small}
    named = lambda: [(k, nn.Parameter(rng0.copy())) for k, rng0 in init.items()]  # noqa: E731
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]  # noqa: E731
    a, b = named(), named()
    return a, b, AdamW(groups(a), lr=1e-2, betas=(0.9, 0.99)), AdamW8bit(groups(b), lr=1e-2, betas=(0.9, 0.99))


def _quadratic_steps(params, opt, steps, target):
    for _ in range(steps):
        for name, p in params:
            p.grad = mg.Tensor((p.data - target[name]).astype(np.float32))   # grad of 0.5 |p - t|^2
        opt.step()


def test_trajectory_close_to_float32_adamw():
    """A quadratic with minimum at ``target``, 200 steps at lr 1e-2 (each parameter travels
    about 0.7): the 8-bit run's parameters stay within 0.03 of the float32 run's on average
    (4% of the way) and 0.12 at most; the float32-moment tensor (under 4,096 values) follows
    AdamW bit for bit."""
    a, b, oa, ob = _pair()
    rng = np.random.default_rng(5)
    target = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in a}
    start = {k: p.data.copy() for k, p in a}
    _quadratic_steps(a, oa, 200, target)
    _quadratic_steps(b, ob, 200, target)
    (_, wa), (_, ba) = a
    (_, wb), (_, bb) = b
    d = np.abs(wa.data - wb.data)
    assert d.mean() < 0.03 and d.max() < 0.12, (d.mean(), d.max())
    assert np.array_equal(ba.data, bb.data)
    for k, p in b:
        assert np.abs(p.data - target[k]).mean() < 0.3 * np.abs(start[k] - target[k]).mean(), k


def test_gpt_training_loss_close_to_float32_adamw():
    """A tiny GPT, 40 steps on one repeated batch: losses within 2% of float32 AdamW's."""
    losses = {}
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 30, (4, 16)), rng.integers(0, 30, (4, 16))
    for name in ("adamw", "adamw8bit"):
        mg.manual_seed(0)
        m = GPT(ModelConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=32))
        opt = m.configure_optimizer(3e-3, 0.1, (0.9, 0.99), optimizer=name)
        out = []
        for _ in range(40):
            opt.zero_grad()
            _, loss = m(x, y)
            loss.backward()
            opt.step()
            out.append(loss.item())
        losses[name] = np.array(out)
    assert losses["adamw"][-1] < 0.7 * losses["adamw"][0]
    np.testing.assert_allclose(losses["adamw8bit"], losses["adamw"], rtol=0.02)


def test_small_tensors_stay_float32_and_state_bytes():
    a, b, oa, ob = _pair(n_big=6000, small=(7, 300))      # 2100 values: under 4096
    _quadratic_steps(b, ob, 1, {k: np.zeros(p.shape, np.float32) for k, p in b})
    st = ob.state
    assert st["w"]["exp_avg_q"].dtype == np.uint8 and st["w"]["exp_avg_q"].shape == (6000,)
    assert st["w"]["exp_avg_absmax"].shape == (24,) and "exp_avg" not in st["w"]   # ceil(6000 / 256)
    assert st["b"]["exp_avg"].dtype == np.float32 and st["b"]["exp_avg"].shape == (7, 300)
    assert "exp_avg_q" not in st["b"]
    # minigrad.memory counts exactly these arrays: 2 x (6000 + 4 x 24) + 2 x 4 x 2100
    assert static_memory(optimizer=ob)["optimizer"]["trainable"] == 2 * (6000 + 96) + 8 * 2100
    assert O.state_nbytes(6000) + O.state_nbytes(2100) == 2 * (6000 + 96) + 8 * 2100
    # a lower threshold puts the small tensor in 8 bits too
    ps = [("w", nn.Parameter(np.ones((70, 60), np.float32))), ("b", nn.Parameter(np.ones((7, 300), np.float32)))]
    o = AdamW8bit(ps, min_8bit_size=1000)
    for _, p in ps:
        p.grad = mg.Tensor(np.ones(p.shape, np.float32))
    o.step()
    assert "exp_avg_q" in o.state["b"]


def test_kernel_equals_array_code(monkeypatch):
    """The compiled step against its array-code reference: the same update, codes that differ
    at most by rounding (a value on a midpoint), parameters within 2% of one step."""
    a, b, _, _ = _pair(n_big=60000)
    oa, ob = AdamW8bit(a, lr=1e-2), AdamW8bit(b, lr=1e-2)
    rng = np.random.default_rng(3)
    for i in range(10):
        gs = {k: (rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-4, 1)).astype(np.float32) for k, p in a}
        for ps in (a, b):
            for k, p in ps:
                p.grad = mg.Tensor(gs[k].copy())
        oa.step()
        with monkeypatch.context() as mp:
            mp.setattr(O._k, "step_inplace", lambda *args, **kw: False)
            ob.step()
    sa, sb = oa.state["w"], ob.state["w"]
    assert (sa["exp_avg_q"] != sb["exp_avg_q"]).mean() < 1e-3
    assert (sa["exp_avg_sq_q"] != sb["exp_avg_sq_q"]).mean() < 1e-3
    np.testing.assert_allclose(sa["exp_avg_absmax"], sb["exp_avg_absmax"], rtol=1e-5)
    d = np.abs(a[0][1].data - b[0][1].data)   # after 10 steps of at most lr = 1e-2 each
    assert d.max() < 2e-4 and d.mean() < 1e-6, (d.max(), d.mean())


@pytest.mark.parametrize("threads", [1, 2])
def test_pool_split_equals_one_thread_bitwise(monkeypatch, threads):
    """The step split by blocks over the pool (kernels.adam8bit._pooled) gives the bits of the
    one-thread pass: every value depends on its own block only. A tensor of 64 blocks and a
    ragged one (last block short) go through the pool; with threads=1 there is no pool."""
    from minigrad.kernels import adam8bit as K, threads as T
    if threads == 2 and T.num_workers() < 2:
        pytest.skip("no BLAS pool of 2 threads here")
    rng = np.random.default_rng(5)
    for n in (64 * 256, 64 * 256 + 77):
        a = [("w", nn.Parameter(rng.standard_normal(n).astype(np.float32)))]
        b = [("w", nn.Parameter(a[0][1].data.copy()))]
        oa, ob = AdamW8bit(a, lr=1e-2, weight_decay=0.1), AdamW8bit(b, lr=1e-2, weight_decay=0.1)
        calls = []
        real = K._pooled
        for i in range(4):
            g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 0)).astype(np.float32)
            a[0][1].grad, b[0][1].grad = mg.Tensor(g.copy()), mg.Tensor(g.copy())
            with monkeypatch.context() as mp:
                mp.setattr(K, "_pooled", lambda *x, **k: calls.append(real(*x, **k)) or calls[-1])
                mp.setattr(T, "num_workers", lambda: threads)
                oa.step()
            with monkeypatch.context() as mp:
                mp.setattr(K, "_pooled", lambda *x, **k: False)
                ob.step()
        assert calls and all(c is (threads == 2) for c in calls)
        for k in ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"):
            np.testing.assert_array_equal(oa.state["w"][k], ob.state["w"][k], err_msg=k)
        np.testing.assert_array_equal(a[0][1].data, b[0][1].data)


def test_state_dict_round_trip_continues_bitwise():
    a, b, _, ob = _pair()
    rng = np.random.default_rng(1)
    target = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in b}
    _quadratic_steps(b, ob, 5, target)
    sd = ob.state_dict()
    # a fresh optimizer on copies of the parameters continues exactly as the original
    c = [(k, nn.Parameter(p.data.copy())) for k, p in b]
    oc = AdamW8bit([{"params": [c[0]], "weight_decay": 0.1}, {"params": [c[1]], "weight_decay": 0.0}],
                   lr=1e-2, betas=(0.9, 0.99))
    oc.load_state_dict({"state": {n: {k: (v.copy() if hasattr(v, "copy") else v) for k, v in s.items()}
                                  for n, s in sd["state"].items()},
                        "param_groups": sd["param_groups"], "step_count": sd["step_count"]})
    _quadratic_steps(b, ob, 5, target)
    _quadratic_steps(c, oc, 5, target)
    for (k, pb), (_, pc) in zip(b, c):
        assert np.array_equal(pb.data, pc.data), k
    assert np.array_equal(ob.state["w"]["exp_avg_q"], oc.state["w"]["exp_avg_q"])


def test_load_state_dict_refuses_wrong_shapes_and_float_moments():
    _, b, oa, ob = _pair()
    _quadratic_steps(b, ob, 1, {k: np.zeros(p.shape, np.float32) for k, p in b})
    sd = ob.state_dict()
    bad = {**sd, "state": {**sd["state"], "w": {**sd["state"]["w"], "exp_avg_q": np.zeros(10, np.uint8)}}}
    with pytest.raises(ValueError, match="exp_avg_q has shape"):
        ob.load_state_dict(bad)
    a, _, oa, _ = _pair()
    _quadratic_steps(a, oa, 1, {k: np.zeros(p.shape, np.float32) for k, p in a})
    with pytest.raises(ValueError, match="another optimizer"):
        ob.load_state_dict(oa.state_dict())
    assert ob.state["w"]["exp_avg_q"].shape == (6000,)       # a failed load changed nothing


def test_lm_train_resume_is_bitwise_with_adamw8bit(tmp_path, corpus):  # noqa: F811
    def args(out, *extra):
        return ["--data", corpus, "--output_dir", str(out), "--seed", "3", "--max_iters", "20", *TINY,
                f"data.cache_dir={out}/cache", "train.eval_interval=10", "train.optimizer=adamw8bit", *extra]
    full, part = tmp_path / "full", tmp_path / "part"
    assert lt.main(args(full)) == 0

    def crash(step, loss):   # dies after step 15; the last save was at step 10
        if step == 15:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        lt.train(lt.resolve_config(lt.build_parser().parse_args(args(part))), str(part), callback=crash)
    assert lt.main(args(part, "--resume")) == 0
    a, b = load_file(str(full / "checkpoint.safetensors")), load_file(str(part / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    codes = [k for k in a if k.endswith("exp_avg_q")]
    assert codes and all(a[k].dtype == np.uint8 for k in codes)   # n_embd 32: c_fc (4096 values) is 8-bit
    assert any(k.endswith(".exp_avg") for k in a)                   # and the smaller tensors are not
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_config_rejects_an_unknown_optimizer(tmp_path, corpus, capsys):  # noqa: F811
    cfg = apply_overrides(Config(), ["train.optimizer=sgd"])
    with pytest.raises(ConfigError, match="train.optimizer must be 'adamw' or 'adamw8bit', got 'sgd'"):
        validate(cfg)
    assert lt.main(["--data", corpus, "--output_dir", str(tmp_path / "o"), *TINY, "train.optimizer=lion"]) == 2
    err = capsys.readouterr().err
    assert "adamw8bit" in err and "lion" in err and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="valid: adamw, adamw8bit"):
        GPT(ModelConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=8)).configure_optimizer(
            1e-3, 0.1, (0.9, 0.99), optimizer="adam8")


def test_resume_keeps_the_checkpoints_optimizer(tmp_path, corpus, capsys):  # noqa: F811
    out = tmp_path / "run"
    base = ["--data", corpus, "--output_dir", str(out), "--seed", "3", *TINY, f"data.cache_dir={out}/cache",
            "train.eval_interval=4"]
    assert lt.main(base + ["--max_iters", "4"]) == 0                        # float32 AdamW
    assert lt.main(base + ["--max_iters", "6", "--resume", "train.optimizer=adamw8bit"]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer='adamw8bit' (the checkpoint has 'adamw')" in err
    assert lt.main(base + ["--max_iters", "6", "--resume"]) == 0             # not given: the checkpoint's
    assert not any(k.endswith("exp_avg_q") for k in load_file(str(out / "checkpoint.safetensors")))
