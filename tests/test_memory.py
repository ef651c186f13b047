"""minigrad.memory: exact byte accounting by category, checked by hand and against tracemalloc."""
import gc
import json
import sys
import tracemalloc

import numpy as np
import pytest

import minigrad as mg
from minigrad import functional as F, nn
from minigrad.memory import CATEGORIES, MemoryTracker, array_root, summary_table, unique_nbytes

engine = sys.modules["minigrad.tensor"]   # `minigrad.tensor` the attribute is the factory function


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def saved_roots(t):
    """Distinct buffers saved for backward by the live graph behind ``t`` (walked independently)."""
    roots, stack, seen = {}, [t.creator], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        for a in fn.saved or ():
            if a is not None:
                r = array_root(a)
                roots[id(r)] = r
        stack.extend(x.creator for x in fn.inputs)
    return roots


def test_views_count_their_buffer_once():
    a = np.zeros((10, 10))
    assert unique_nbytes([a, a[2:], a.T, a.reshape(100), None]) == a.nbytes
    assert unique_nbytes([np.broadcast_to(np.zeros(3), (1000, 3))]) == 24   # a broadcast view owns 3 values


def test_known_model_equals_sum_of_its_arrays():
    model = mlp()
    opt = mg.optim.AdamW(model.named_parameters())
    params = list(model.parameters())
    p_bytes = sum(p.data.nbytes for p in params)
    x = mg.randn(32, 8)
    with MemoryTracker(model, opt) as mt:
        assert mt.current()["parameters"] == p_bytes
        assert mt.current()["gradients"] == mt.current()["optimizer"] == 0
        loss = F.mse_loss(model(x), mg.zeros(32, 4))
        now = mt.current()
        weights = {id(array_root(p.data)) for p in params}
        expected = sum(r.nbytes for k, r in saved_roots(loss).items() if k not in weights)
        assert now["activations"] == expected > 0
        # by hand: Linear 1 keeps x (32x8), Tanh keeps its output h (32x16), which Linear 2 keeps
        # too (one buffer), the loss keeps the difference d (32x4) for d*d and mean keeps 1/n (0-d)
        assert now["activations"] == 4 * (32 * 8 + 32 * 16 + 32 * 4 + 1)
        loss.backward()
        now = mt.current()
        assert now["activations"] == 0                      # backward freed every saved array
        assert now["gradients"] == p_bytes
        opt.step()
        now = mt.current()
        assert now["optimizer"] == 2 * p_bytes              # AdamW: exp_avg and exp_avg_sq
        s = mt.summary()
    assert s["peak_bytes"] == max(sum(r[c] for c in CATEGORIES) for r in mt.timeline)
    assert set(s["at_peak"]) == set(CATEGORIES)
    assert not mt.active and mt not in engine._observers


def test_dropped_graph_is_uncounted():
    model = mlp()
    with MemoryTracker(model) as mt:
        out = model(mg.randn(16, 8)).sum()
        assert mt.current()["activations"] > 0 and mt.current()["other"] > 0
        del out                                             # graph collected without a backward
        gc.collect()
        now = mt.current()
    assert now["activations"] == 0 and now["other"] == 0


def test_weight_views_are_not_activations():
    w = nn.Parameter(np.ones((4, 4)))
    with MemoryTracker(params=[w]) as mt:
        y = (w.T * 2.0).sum()                               # Transpose of a weight is a view of it
        assert mt.current()["parameters"] == w.data.nbytes
        assert mt.current()["activations"] == 8             # the constant 2.0 that Mul keeps
    del y


def _numpy_bytes():
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
    return sum(t.size for t in snap.traces)


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
def test_tracemalloc_agrees(kind):
    """NumPy reports its buffers to tracemalloc: the growth it sees equals the tracker's."""
    if kind == "mlp":
        model = mlp()
        run = lambda: F.mse_loss(model(mg.randn(64, 8)), mg.zeros(64, 4))      # noqa: E731
        slack = 64   # 0-d results (a full sum) are NumPy scalars: their bytes live in the object, not a buffer
    else:
        from lm.config import ModelConfig
        from lm.model import GPT
        model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
        idx = np.random.default_rng(0).integers(0, 40, (4, 16))
        run = lambda: model(idx, idx)[1]                                        # noqa: E731
        slack = 0.01 * 2 ** 20   # also getitem's index and where's mask, kept as attributes, not saved
    opt = mg.optim.AdamW(model.named_parameters())
    gc.collect()
    tracemalloc.start()
    try:
        with MemoryTracker(model, opt) as mt:
            b0, c0 = _numpy_bytes(), sum(mt.current()[c] for c in CATEGORIES)
            loss = run()
            b1, c1 = _numpy_bytes(), sum(mt.current()[c] for c in CATEGORIES)
            loss.backward()
            opt.step()
            del loss
            gc.collect()
            b2, c2 = _numpy_bytes(), sum(mt.current()[c] for c in CATEGORIES)
    finally:
        tracemalloc.stop()
    assert abs((b1 - b0) - (c1 - c0)) <= max(slack, 0.01 * (b1 - b0)), (b1 - b0, c1 - c0)
    assert (b2 - b0) == (c2 - c0)   # after the step: exactly the gradients and the optimizer state


def test_timeline_marks_and_plot(tmp_path):
    model = mlp()
    opt = mg.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    with MemoryTracker(model, opt) as mt:
        mt.mark("forward")
        loss = model(mg.randn(8, 8)).sum()
        mt.mark("backward")
        loss.backward()
        mt.mark("optimizer")
        opt.step()
        mt.mark("end")
    labels = [r["label"] for r in mt.timeline]
    assert labels.index("forward") < labels.index("backward") < labels.index("optimizer") < labels.index("end")
    assert [r["t"] for r in mt.timeline] == sorted(r["t"] for r in mt.timeline)
    assert all(set(r) == {"t", "label", *CATEGORIES} for r in mt.timeline)
    fig = mt.plot(path=tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0 and fig is not None
    table = summary_table({"mlp": mt.summary()["at_peak"]})
    assert table.count("\n") == 2 and "activations" in table


def test_engine_has_no_observer_when_off():
    assert engine._observers == []
    x = mg.Tensor(np.ones(3), requires_grad=True)
    (x * 2.0).sum().backward()


def test_trainer_logs_memory_and_grad_stats(tmp_path):
    from lm import train as lt
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. " * 300)
    out = tmp_path / "run"
    rc = lt.main(["--data", str(corpus), "--output_dir", str(out), "--max_iters", "6", "--no_progress",
                  "model.n_layer=2", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
                  "train.batch_size=2", "train.eval_iters=1", "train.eval_interval=6", "train.log_interval=3",
                  "train.sample_tokens=0", "train.log_memory=true", "train.log_grad_stats=true",
                  f"data.cache_dir={out}/cache"])
    assert rc == 0
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"kind"' not in line]
    assert len(steps) == 6
    for r in steps:
        assert r["peak_mb"] > 0 and all(f"mem_{c}" in r for c in CATEGORIES)
        assert r["mem_parameters"] > 0
    with_stats = [r["step"] for r in steps if "layer_grad_norm" in r]
    assert with_stats == [1, 3, 6]
    assert "transformer.h.1" in steps[0]["layer_grad_norm"] and steps[0]["update_ratio"]["transformer.h.0"] > 0
    assert (out / "memory.png").stat().st_size > 0 and (out / "grad_flow.png").stat().st_size > 0
    assert engine._observers == []


@pytest.mark.parametrize("device", ["cuda"])
def test_cuda_uses_the_memory_pool(device):
    if not mg.backend.cuda_available():
        pytest.skip("CUDA backend not available (CuPy missing or no GPU)")
    model = mlp().to("cuda")
    with MemoryTracker(model) as mt:
        loss = model(mg.randn(64, 8, device="cuda")).sum()
        now = mt.current()
        used, held = mg.backend.memory_pool_bytes()
        assert sum(now[c] for c in CATEGORIES) == max(used, sum(now[c] for c in CATEGORIES if c != "other"))
        assert now["activations"] > 0 and held >= used
        loss.backward()
    assert "pool_used_bytes" in mt.summary()
