"""The thread governor (minigrad/kernels/cores.py): decisions from made-up readings."""
import numpy as np
import pytest

import minigrad as mg
from minigrad.kernels import cores, threads


def test_others_cores_subtracts_our_own_time():
    # 2 CPUs, 100 ticks of wall time each (200 in all); 150 busy ticks, 0.5 s (50 ticks) ours
    assert cores.others_cores(150, 200, 2, 0.5, 100.0) == pytest.approx(1.0)
    # all the busy time was ours: nobody else
    assert cores.others_cores(120, 200, 2, 1.2, 100.0) == 0.0
    # clamped to the CPU count, never negative
    assert cores.others_cores(500, 200, 2, 0.0, 100.0) == 2.0
    assert cores.others_cores(10, 0, 2, 0.0, 100.0) == 0.0


@pytest.mark.parametrize("current,others,want", [
    (2, 0.0, 2),     # quiet: keep both
    (2, 0.5, 2),     # half a core taken: still both
    (2, 0.67, 1),    # a busy loop next to our two spinning threads gets 2/3 of a core: down
    (2, 0.75, 1),    # most of a core taken: down
    (2, 1.0, 1),     # a busy loop: down
    (1, 1.0, 1),     # stays down while it runs
    (1, 0.5, 1),     # half a core: not clearly free, stay down
    (1, 0.25, 1),    # a quarter: still not clearly free
    (1, 0.1, 2),     # free again: up
    (2, 2.0, 1),     # never below one thread
])
def test_next_threads_on_two_cores(current, others, want):
    assert cores.next_threads(current, 2, 2, others) == want


def test_next_threads_respects_the_starting_count_and_many_cores():
    assert cores.next_threads(4, 4, 8, 0.0) == 4          # never above what the run started with
    assert cores.next_threads(8, 8, 8, 3.0) == 5          # 8 cores, 3 taken: 5 threads
    assert cores.next_threads(5, 8, 8, 2.5) == 5          # 5.5 free: within the band, keep 5
    assert cores.next_threads(5, 8, 8, 1.2) == 7          # 6.8 free: up to 7 (7.0 with the margin)
    assert cores.next_threads(7, 8, 8, 1.6) == 6          # 6.4 free: 7 threads no longer fit


def test_read_proc_stat_sums_the_allowed_cpus(tmp_path):
    p = tmp_path / "stat"
    p.write_text("cpu  1 2 3 4 5 6 7 8 0 0\n"
                 "cpu0 10 5 20 100 3 1 1 2 0 0\n"
                 "cpu1 30 0 10 50 0 0 0 0 0 0\n"
                 "intr 1 2 3\n")
    busy, total, n = cores.read_proc_stat(None, path=str(p))
    assert n == 2
    assert busy == (10 + 20 + 1 + 1 + 2) + (30 + 10)              # nice is not busy
    assert total == busy + (100 + 3 + 5) + 50                      # ... it is free time
    busy0, total0, n0 = cores.read_proc_stat({0}, path=str(p))
    assert (busy0, n0) == (34, 1)
    busy_n, _, _ = cores.read_proc_stat({0}, count_nice=True, path=str(p))
    assert busy_n == 39                                            # a niced run books its time there
    assert cores.read_proc_stat(None, path=str(tmp_path / "missing")) is None


class FakeMachine:
    """Readings of a 2-CPU machine where ``others`` cores go to other programs and we use ``ours``."""

    def __init__(self):
        self.t, self.busy, self.total, self.self_s = 0.0, 0, 0, 0.0
        self.others, self.ours = 0.0, 2.0
        self.set_to = []

    def advance(self, seconds):
        ticks = 100 * seconds
        self.t += seconds
        self.total += int(2 * ticks)
        self.busy += int((self.others + self.ours) * ticks)
        self.self_s += self.ours * seconds

    def governor(self, warn):
        return cores.Governor(warn=warn, interval=1.0, reader=lambda: (self.busy, self.total, 2),
                              clock=lambda: self.t, self_time=lambda: self.self_s,
                              setter=self.set_to.append, max_threads=2)


def test_governor_goes_down_warns_once_and_comes_back(monkeypatch):
    monkeypatch.delenv("MINIGRAD_ADAPT_THREADS", raising=False)
    m, said = FakeMachine(), []
    g = m.governor(said.append)
    g.ticks_per_s = 100.0
    assert g.active
    for _ in range(5):                      # quiet: two threads, nothing said
        m.advance(1.0)
        assert g.tick() == 2
    m.others, m.ours = 1.0, 1.0             # a busy loop starts
    m.advance(1.0)
    assert g.tick() == 1
    assert m.set_to == [1] and len(said) == 1 and "about 1.0 of the 2 cores" in said[0]
    for _ in range(4):
        m.advance(1.0)
        assert g.tick() == 1
    m.others, m.ours = 0.0, 1.0             # it stops: we use our one core, the other is free
    m.advance(1.0)
    assert g.tick() == 2
    m.others, m.ours = 1.0, 1.0             # and comes back: down again, but no second warning
    m.advance(1.0)
    assert g.tick() == 1
    assert m.set_to == [1, 2, 1] and len(said) == 1
    g.close()
    assert m.set_to[-1] == 2 and g.current == 2


def test_governor_reads_at_most_once_per_interval(monkeypatch):
    monkeypatch.delenv("MINIGRAD_ADAPT_THREADS", raising=False)
    m = FakeMachine()
    g = m.governor(None)
    g.ticks_per_s = 100.0
    m.others, m.ours = 1.0, 1.0
    m.advance(0.3)
    assert g.tick() == 2                    # too soon to judge
    m.advance(0.8)
    assert g.tick() == 1


def test_governor_off_by_env_without_proc_stat_or_with_one_thread(monkeypatch):
    monkeypatch.setenv("MINIGRAD_ADAPT_THREADS", "0")
    m = FakeMachine()
    assert not m.governor(None).active
    monkeypatch.delenv("MINIGRAD_ADAPT_THREADS")
    g = cores.Governor(reader=lambda: None, setter=m.set_to.append, max_threads=2)
    assert not g.active and g.tick() == 2
    g1 = cores.Governor(reader=lambda: (0, 0, 2), setter=m.set_to.append, max_threads=1)
    assert not g1.active
    assert m.set_to == []


def _step_result():
    from lm.config import ModelConfig
    from lm.model import GPT
    mg.manual_seed(3)
    model = GPT(ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=64))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, (6, 32))
    _, loss = model(x, np.roll(x, -1, axis=1))
    loss.backward()
    return float(loss.item()), {n: p.grad.data.copy() for n, p in model.named_parameters()}


def test_results_do_not_depend_on_the_thread_count():
    before = threads.get_blas_threads()
    if not threads.set_blas_threads(2):
        pytest.skip("NumPy's BLAS is not OpenBLAS: its thread count cannot be set here")
    try:
        l2, g2 = _step_result()
        threads.set_blas_threads(1)
        l1, g1 = _step_result()
    finally:
        threads.set_blas_threads(before)
    assert l1 == pytest.approx(l2, abs=1e-6)
    for n in g1:
        np.testing.assert_allclose(g1[n], g2[n], rtol=1e-4, atol=1e-6, err_msg=n)
