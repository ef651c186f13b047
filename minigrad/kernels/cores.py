"""Use fewer threads while other programs hold the cores: the thread governor.

Why: a multi-threaded matrix product is split into equal parts, one per thread, and ends
when its slowest part ends. When another busy program holds one of a 2-core machine's
cores, our second thread shares that core and gets half of it, or is parked for a whole
scheduler slice (milliseconds): every product waits for it, and a training step that
takes 60 ms on a quiet machine takes 200-250 ms. OpenBLAS's workers make it worse: after
each product they spin for a while waiting for the next one, on the core the other program
also wants. One thread on the free core has no one to wait for: about 85 ms.
``benchmarks/contention.py`` measures all of this side by side.

``Governor`` watches, about once a second, how much of the machine's CPU time went to
other processes (``/proc/stat`` for the cores this process may run on, minus this
process's own CPU time from ``os.times``), and sets NumPy's OpenBLAS thread count (our
kernels on its pool follow, see ``threads.py``) to the cores left free, between 1 and the
count it started with. It switches down as soon as a core is taken and back up only when
it is clearly free again (hysteresis), so a flickering load does not make it flip. Niced
processes (``nice`` > 0) do not count: the scheduler gives us their core when we want it.

The decisions are plain functions of what was read (``others_cores``, ``next_threads``),
tested with made-up readings. Where ``/proc/stat`` does not exist (macOS, Windows) the
governor does nothing. ``MINIGRAD_ADAPT_THREADS=0`` turns it off; results do not depend
on the thread count (each output element is computed the same way whatever the split).
"""
from __future__ import annotations

import math
import os
import time

from . import threads

__all__ = ["Governor", "others_cores", "next_threads", "read_proc_stat", "usable_cpus", "enabled"]

STAY, RISE = 0.5, 0.2   # cores (see next_threads)
INTERVAL_S = 1.0     # seconds between two readings


def enabled() -> bool:
    return os.environ.get("MINIGRAD_ADAPT_THREADS", "1").strip().lower() not in ("0", "false", "no", "off")


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (all of them where the OS does not say)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def read_proc_stat(cpus: set[int] | None = None, count_nice: bool = False, path: str = "/proc/stat"):
    """(busy ticks, all ticks, number of CPUs) summed over ``cpus`` (all when None), or None.

    Busy is user + system + irq + softirq + steal (+ nice when ``count_nice``: this process
    is itself niced, so its own time is booked there); all adds idle and iowait.
    """
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = n = 0
    for line in lines:
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *vals = line.split()
        try:
            idx = int(name[3:])
            v = [int(x) for x in vals[:8]] + [0] * max(0, 8 - len(vals))
        except ValueError:
            continue
        if cpus is not None and idx not in cpus:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
        b = user + system + irq + softirq + steal + (nice if count_nice else 0)
        busy += b
        total += b + idle + iowait + (0 if count_nice else nice)
        n += 1
    return (busy, total, n) if n else None


def others_cores(d_busy_ticks: float, d_total_ticks: float, n_cpus: int, d_self_s: float,
                 ticks_per_s: float) -> float:
    """Cores' worth of CPU time that went to other processes between two readings.

    ``d_total_ticks / n_cpus`` ticks of wall time passed on each CPU; of the busy ticks,
    ``d_self_s * ticks_per_s`` were ours (all our threads, spinning BLAS workers included).
    """
    if d_total_ticks <= 0 or n_cpus <= 0:
        return 0.0
    wall_ticks = d_total_ticks / n_cpus
    other = d_busy_ticks - d_self_s * ticks_per_s
    return max(0.0, min(float(n_cpus), other / wall_ticks))


def next_threads(current: int, max_threads: int, n_cpus: int, others: float,
                 stay: float = STAY, rise: float = RISE) -> int:
    """The thread count for the next interval.

    The free cores are ``n_cpus - others``. n threads stay while ``free + stay`` reaches n
    (on 2 cores: down to 1 as soon as other programs take more than half a core; with our two
    spinning threads and one busy loop on 2 cores, the loop gets 2/3 of a core), and the
    count rises to n only when ``free + rise`` reaches it (others under 0.2 of a core): a
    load between the two keeps whatever count is in use, so it does not flip.
    """
    free = max(0.0, n_cpus - others)
    down = max(1, min(max_threads, math.floor(free + stay)))
    up = max(1, min(max_threads, math.floor(free + rise)))
    if current > down:
        return down
    if current < up:
        return up
    return max(1, min(current, max_threads))


class Governor:
    """Call ``tick()`` once per training step; it reads the load about once a second and
    sets the BLAS thread count. ``warn(msg)`` is called once, the first time it lowers the
    count. ``reader``, ``clock``, ``self_time`` and ``setter`` are for tests."""

    def __init__(self, warn=None, interval: float = INTERVAL_S, reader=None, clock=time.monotonic,
                 self_time=None, setter=None, max_threads: int | None = None):
        self.cpus = usable_cpus()
        count_nice = (os.nice(0) if hasattr(os, "nice") else 0) > 0
        self.reader = reader or (lambda: read_proc_stat(self.cpus, count_nice))
        self.clock, self.interval, self.warn = clock, interval, warn
        self.self_time = self_time or (lambda: sum(os.times()[:2]))
        self.setter = setter or threads.set_blas_threads
        self.max_threads = max_threads if max_threads is not None else threads.get_blas_threads()
        self.current = self.max_threads
        self.ticks_per_s = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self.warned = False
        self.lowered_steps = 0        # ticks spent below max_threads (reported in the summary)
        self.ticks = 0
        self.last_others = 0.0
        self.active = enabled() and self.max_threads > 1
        self._prev = self._read() if self.active else None
        if self._prev is None:
            self.active = False

    def _read(self):
        r = self.reader()
        if r is None:
            return None
        return (*r, self.self_time(), self.clock())

    def tick(self) -> int:
        """Maybe re-decide; returns the thread count in use."""
        if not self.active:
            return self.current
        self.ticks += 1
        if self.current < self.max_threads:
            self.lowered_steps += 1
        if self.clock() - self._prev[4] < self.interval:
            return self.current
        now = self._read()
        if now is None:
            return self.current
        busy0, total0, n, self0, _ = self._prev
        busy1, total1, _, self1, _ = now
        self._prev = now
        self.last_others = others_cores(busy1 - busy0, total1 - total0, n, self1 - self0, self.ticks_per_s)
        new = next_threads(self.current, self.max_threads, n, self.last_others)
        if new != self.current:
            self.setter(new)
            if new < self.current and not self.warned and self.warn is not None:
                self.warned = True
                self.warn(f"other programs are using about {self.last_others:.1f} of the {n} cores this run may "
                          f"use: running on {new} thread{'s' if new > 1 else ''} instead of {self.max_threads} while "
                          f"they do (a product split over a busy core waits for it). Stop them for full speed; "
                          f"MINIGRAD_ADAPT_THREADS=0 keeps {self.max_threads} threads")
            self.current = new
        return self.current

    def close(self) -> None:
        """Give the BLAS library its starting thread count back."""
        if self.active and self.current != self.max_threads:
            self.setter(self.max_threads)
            self.current = self.max_threads
