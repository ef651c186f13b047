"""Reversible layers: exact inversion, plain-backprop gradients, flat activation memory, a GPT that trains."""

import numpy as np
import pytest

import minigrad as mg
from minigrad import functional as F, nn
from minigrad.checkpoint import checkpoint
from minigrad.memory import MemoryTracker
from minigrad.nn.reversible import ReversibleBlock, ReversibleSequence, reversible_sequence

from lm.config import ModelConfig
from lm.model import GPT

D = 8


def sublayer(p_drop=0.0):
    return nn.Sequential(nn.LayerNorm(D, dtype=np.float64), nn.Linear(D, 2 * D, dtype=np.float64), nn.Tanh(),
                         nn.Dropout(p_drop), nn.Linear(2 * D, D, dtype=np.float64))


def stack(n, p_drop=0.0):
    mg.manual_seed(0)
    return ReversibleSequence([ReversibleBlock(sublayer(p_drop), sublayer(p_drop)) for _ in range(n)])


def streams(seed=0, shape=(3, 5, D)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape)


def test_inversion_over_12_blocks_float64():
    seq = stack(12).eval()
    a, b = streams()
    with mg.no_grad():
        y1, y2 = seq(mg.Tensor(a), mg.Tensor(b))
    x1, x2 = seq.inverse(y1, y2)
    err = max(np.abs(x1.numpy() - a).max(), np.abs(x2.numpy() - b).max())
    assert err < 1e-10, err
    assert np.abs(y1.numpy() - a).max() > 0.1     # the blocks did change the streams


def grads_of(seq, a, b, reconstruct, seed=5):
    seq.zero_grad()
    x1, x2 = mg.Tensor(a, requires_grad=True), mg.Tensor(b, requires_grad=True)
    mg.manual_seed(seed)
    y1, y2 = seq(x1, x2, reconstruct=reconstruct)
    w = np.random.default_rng(9).standard_normal(a.shape)
    ((y1 * w).sum() + (y2 * y2).sum()).backward()
    after = mg.backend.get_rng(np).random(3)
    return [x1.grad.numpy(), x2.grad.numpy()] + [p.grad.numpy() for p in seq.parameters()], y1.numpy(), after


def test_gradients_equal_plain_two_stream_autograd_with_dropout():
    seq = stack(12, p_drop=0.2)
    a, b = streams(1)
    g_rev, y_rev, r_rev = grads_of(seq, a, b, reconstruct=True)
    g_ref, y_ref, r_ref = grads_of(seq, a, b, reconstruct=False)
    np.testing.assert_array_equal(y_rev, y_ref)
    assert len(g_rev) == 2 + len(list(seq.parameters()))
    for i, (g, r) in enumerate(zip(g_rev, g_ref)):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-10, err_msg=f"gradient {i}")
    np.testing.assert_array_equal(r_rev, r_ref)    # the replayed dropout did not shift the random stream


def test_keeps_only_its_output():
    seq = stack(6)
    a, b = streams(2)
    x1, x2 = mg.Tensor(a, requires_grad=True), mg.Tensor(b, requires_grad=True)
    with MemoryTracker(seq) as mt:
        y1, y2 = seq(x1, x2)
        assert mt.current()["activations"] == a.nbytes + b.nbytes
    assert y1.creator is y2.creator and len(y1.creator.saved) == 2


def test_inputs_without_grad_still_train_the_weights():
    seq = stack(3)
    a, b = streams(3)
    mg.manual_seed(0)
    y1, y2 = seq(mg.Tensor(a), mg.Tensor(b))
    (y1.sum() + y2.sum()).backward()
    got = [p.grad.numpy() for p in seq.parameters()]
    seq.zero_grad()
    y1, y2 = seq(mg.Tensor(a), mg.Tensor(b), reconstruct=False)
    (y1.sum() + y2.sum()).backward()
    for g, r in zip(got, [p.grad.numpy() for p in seq.parameters()]):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-10)


def test_composes_with_checkpoint():
    seq = stack(4, p_drop=0.1)
    a, b = streams(4)

    def run(wrap):
        seq.zero_grad()
        x1, x2 = mg.Tensor(a, requires_grad=True), mg.Tensor(b, requires_grad=True)
        mg.manual_seed(2)
        y1, y2 = checkpoint(seq, x1, x2) if wrap else seq(x1, x2, reconstruct=False)
        (y1 * y2).sum().backward()
        return [x1.grad.numpy(), x2.grad.numpy()] + [p.grad.numpy() for p in seq.parameters()]

    for g, r in zip(run(True), run(False)):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- the GPT switch
def tiny_gpt(**kw):
    mg.manual_seed(0)
    cfg = dict(vocab_size=30, block_size=16, n_layer=4, n_head=2, n_embd=16, dropout=0.1)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg)).to(np.float64)


def two_stream_reference(model, idx, tgt):
    """The reversible GPT's function, written with ordinary autograd (every activation kept)."""
    T = idx.shape[1]
    t = model.transformer
    x = t.drop(t.wte(idx) + t.wpe(np.arange(T)))
    couplings = [(lambda h, b=b: b.attn(b.ln_1(h)), lambda h, b=b: b.mlp(b.ln_2(h))) for b in t.h]
    y1, y2 = reversible_sequence(couplings, x, x, reconstruct=False)
    logits = model.lm_head(t.ln_f((y1 + y2) * 0.5))
    return F.cross_entropy(logits, tgt)


@pytest.mark.parametrize("every", [0, 1, 3])
def test_gpt_reversible_equals_two_stream_autograd(every):
    rev = tiny_gpt(reversible=True, checkpoint_every=every)
    rng = np.random.default_rng(1)
    idx, tgt = rng.integers(0, 30, (3, 16)), rng.integers(0, 30, (3, 16))

    def run(f):
        rev.zero_grad()
        mg.manual_seed(7)
        loss = f()
        loss.backward()
        return loss.item(), {n: p.grad.numpy().copy() for n, p in rev.named_parameters()}

    l0, g0 = run(lambda: two_stream_reference(rev, idx, tgt))
    l1, g1 = run(lambda: rev(idx, tgt)[1])
    assert l1 == l0
    for n in g0:
        np.testing.assert_allclose(g1[n], g0[n], rtol=0, atol=1e-10, err_msg=n)


def test_gpt_reversible_generation_with_cache():
    m = tiny_gpt(reversible=True, dropout=0.0).eval()
    from lm.model import KVCache
    idx = np.random.default_rng(0).integers(0, 30, (2, 10))
    full = m.logits_last(idx)
    cache = KVCache(m.config.n_layer)
    m.logits_last(idx[:, :9], cache)
    step = m.logits_last(idx[:, 9:], cache)
    np.testing.assert_allclose(step, full, rtol=1e-9, atol=1e-9)


def test_gpt_reversible_activation_memory_is_flat_in_depth():
    def peak(n_layer):
        m = tiny_gpt(reversible=True, n_layer=n_layer, dropout=0.0)
        m.to(np.float32)
        idx = np.random.default_rng(0).integers(0, 30, (4, 16))
        with MemoryTracker(m) as mt:
            _, loss = m(idx, idx)
            loss.backward()
        return mt.max_bytes["activations"]

    assert peak(8) <= 1.2 * peak(2)
