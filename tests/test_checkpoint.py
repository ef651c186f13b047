"""Gradient checkpointing gives plain backprop's gradients (dropout included) and keeps less."""
import numpy as np
import pytest

import minigrad as mg
from minigrad import functional as F, nn
from minigrad.checkpoint import checkpoint, checkpoint_sequential
from minigrad.memory import MemoryTracker

from lm.config import ModelConfig
from lm.model import GPT


def tiny_gpt(**kw):
    mg.manual_seed(0)
    cfg = dict(vocab_size=30, block_size=16, n_layer=4, n_head=2, n_embd=16, dropout=0.1)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg)).to(np.float64)


def batch(seed=1, B=3, T=16, V=30):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def gpt_grads(model, idx, tgt, seed=7):
    """Loss, every parameter's gradient, and the next random draw (the stream after backward)."""
    model.zero_grad()
    mg.manual_seed(seed)
    _, loss = model(idx, tgt)
    loss.backward()
    after = mg.backend.get_rng(np).random(4)
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, after


def assert_same_grads(got, want, tol=1e-10):
    assert got.keys() == want.keys()
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=0, atol=tol, err_msg=n)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_gpt_checkpointed_equals_plain_with_dropout(every):
    plain = tiny_gpt()
    ck = tiny_gpt(checkpoint_every=every)
    ck.load_state_dict(plain.state_dict())
    idx, tgt = batch()
    l0, g0, r0 = gpt_grads(plain, idx, tgt)
    l1, g1, r1 = gpt_grads(ck, idx, tgt)
    assert l1 == l0
    assert_same_grads(g1, g0)
    np.testing.assert_array_equal(r1, r0)   # the recompute put the random stream back where it was


def test_function_with_weights_in_its_closure():
    mg.manual_seed(0)
    lin1, lin2 = nn.Linear(5, 7, dtype=np.float64), nn.Linear(7, 5, dtype=np.float64)
    x0 = np.random.default_rng(0).standard_normal((4, 5))

    def fn(h):
        return lin2(F.dropout(F.gelu(lin1(h)), 0.3)) * h

    def run(use_ckpt):
        for p in (*lin1.parameters(), *lin2.parameters()):
            p.grad = None
        x = mg.Tensor(x0, requires_grad=True)
        mg.manual_seed(3)
        y = checkpoint(fn, x) if use_ckpt else fn(x)
        (y * y).sum().backward()
        return [x.grad.numpy()] + [p.grad.numpy() for p in (*lin1.parameters(), *lin2.parameters())]

    for a, b in zip(run(True), run(False)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_inputs_without_grad_still_train_the_weights_inside():
    """Frozen embeddings: nothing entering the checkpoint needs a gradient, its weights do."""
    plain, ck = tiny_gpt(dropout=0.0), tiny_gpt(dropout=0.0, checkpoint_every=2)
    ck.load_state_dict(plain.state_dict())
    for m in (plain, ck):
        m.transformer.wte.weight.requires_grad = False
        m.transformer.wpe.weight.requires_grad = False
    idx, tgt = batch()
    _, g0, _ = gpt_grads(plain, idx, tgt)
    _, g1, _ = gpt_grads(ck, idx, tgt)
    assert "transformer.h.0.attn.c_attn.weight" in g1
    assert_same_grads(g1, g0)


def test_gradients_accumulate_into_existing_grad_and_hooks_fire_once():
    mg.manual_seed(0)
    lin = nn.Linear(3, 3, dtype=np.float64)
    calls = []
    lin.weight.register_hook(lambda g: calls.append(1))
    x = mg.Tensor(np.ones((2, 3)), requires_grad=True)
    lin(x).sum().backward()
    g_once = lin.weight.grad.numpy().copy()
    checkpoint(lin, x).sum().backward()          # adds to .grad, as a second plain backward would
    np.testing.assert_allclose(lin.weight.grad.numpy(), 2 * g_once)
    assert len(calls) == 2


def test_under_no_grad_it_just_calls_fn():
    lin = nn.Linear(3, 3)
    with mg.no_grad():
        y = checkpoint(lin, mg.randn(2, 3))
    assert not y.requires_grad and y.creator is None


def test_tuple_outputs_and_non_tensor_arguments():
    a = mg.Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)

    def fn(x, scale, name):
        assert name == "n"
        return x * scale, (x * x).sum(axis=1)

    y1, y2 = checkpoint(fn, a, 2.0, "n")
    (y1.sum() + y2.sum()).backward()
    np.testing.assert_allclose(a.grad.numpy(), 2.0 + 2 * a.numpy())
    (one,) = checkpoint(lambda x: (x * 3.0,), a)
    assert one.shape == a.shape


def test_checkpoint_sequential_equals_plain():
    mg.manual_seed(0)
    layers = [nn.Linear(6, 6, dtype=np.float64) for _ in range(5)]
    funcs = []
    for lin in layers:
        funcs += [lin, nn.Tanh(), nn.Dropout(0.2)]
    x0 = np.random.default_rng(0).standard_normal((4, 6))

    def run(segments):
        for lin in layers:
            lin.zero_grad()
        x = mg.Tensor(x0, requires_grad=True)
        mg.manual_seed(11)
        y = checkpoint_sequential(funcs, segments, x) if segments else nn.Sequential(*funcs)(x)
        (y * y).sum().backward()
        return [x.grad.numpy()] + [p.grad.numpy() for lin in layers for p in lin.parameters()]

    ref = run(0)
    for segments in (1, 2, 4, 15):
        for a, b in zip(run(segments), ref):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_checkpointing_keeps_less_for_backward():
    def peak_activations(model):
        idx, tgt = batch(B=4)
        with MemoryTracker(model) as mt:
            _, loss = model(idx, tgt)
            loss.backward()
        return mt.max_bytes["activations"]

    plain = peak_activations(tiny_gpt(n_layer=6, dropout=0.0))
    ck = peak_activations(tiny_gpt(n_layer=6, dropout=0.0, checkpoint_every=1))
    assert ck < 0.6 * plain, (ck, plain)


def test_config_rejects_negative_checkpoint_every():
    from lm.config import Config, ConfigError, validate
    cfg = Config()
    cfg.model.checkpoint_every = -1
    with pytest.raises(ConfigError, match="checkpoint_every"):
        validate(cfg)


@pytest.mark.parametrize("switches", [["model.checkpoint_every=1"], ["model.reversible=true"],
                                      ["model.reversible=true", "model.checkpoint_every=1"]])
def test_gpt_with_memory_switches_trains(tmp_path, switches):
    from lm import train as lt
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the cat sat on the mat and the dog ran far away home."] * 200))
    out = tmp_path / "run"
    rc = lt.main(["--data", str(corpus), "--output_dir", str(out), "--max_iters", "30", "--no_progress",
                  "--seed", "3", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
                  *switches, "model.dropout=0.1", "train.batch_size=8", "train.eval_iters=2",
                  "train.eval_interval=30", "train.warmup_iters=2", "train.learning_rate=3e-3",
                  "train.sample_tokens=0", f"data.cache_dir={out}/cache"])
    assert rc == 0
    import json
    evals = [json.loads(x) for x in open(out / "metrics.jsonl") if '"kind"' in x]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 0.5
