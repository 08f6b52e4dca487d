"""What the benchmark scripts share: alternating timed rounds, and the table they print/write."""

from __future__ import annotations

import platform
import time

import _isa
import numpy as np


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


GAP = 0.01  # seconds of busy wait before each timed round (time_alternating)


def time_alternating(runners, repeats: int, steps: int, round_seconds: float = 0.0):
    """Steps/s of each ``runners[name](n)`` (runs ``n`` steps): after a warm-up of two single
    steps each, ``repeats`` rounds of ``n`` steps alternate between the runners, so the machine's
    noise hits all alike; medians. ``n`` is ``steps``, or fewer where a round would take longer
    than ``round_seconds`` (if > 0). Each round starts after a pause (``GAP`` s) and one more
    step, both untimed: the pause lets threads the previous runner left spinning stop (torch's
    OpenMP workers spin about 5 ms after each parallel region, keras_fancyrnn's shard workers
    2 ms after each kernel), which would otherwise share the CPUs with a round of a few ms; the
    step wakes this runner's own threads, as the step before it would in a run of steps. The
    pause is a busy wait: after a sleep of 50 ms every runner's next steps ran up to 30 % slower
    (an idle CPU's clock and caches), after a busy wait of 10 ms they did not."""
    slowest = 0.0
    for run in runners.values():  # warm-up: tracing, compilation, first allocations
        run(1)
        start = time.perf_counter()
        run(1)
        slowest = max(slowest, time.perf_counter() - start)
    n = steps
    if round_seconds > 0:
        n = int(min(steps, max(1, round_seconds // slowest)))
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            pause = time.perf_counter()
            while time.perf_counter() - pause < GAP:
                pass
            run(1)
            start = time.perf_counter()
            run(n)
            times[name].append(time.perf_counter() - start)
    return {name: n / np.median(ts) for name, ts in times.items()}


def emit(rows: list[str], footer: str, out: str | None) -> None:
    """Prints the footer (rows were printed as they came) and writes the table to ``out``; with
    ``KERAS_FANCYRNN_BENCH_ISA`` set, the footer says so (``_isa.py``)."""
    if _isa.ISA and _isa.describe() not in footer:
        footer += f"\n{_isa.describe()}."
    print(footer)
    if out:
        with open(out, "w") as f:
            f.write("\n".join(rows) + "\n" + footer + "\n")
