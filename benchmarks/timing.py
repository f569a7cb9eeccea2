"""How every CPU comparison in benchmarks/ is timed, and when its ratio is not a result.

The machine is shared, and contention does not hit both sides alike: PyTorch's threads
suffer far more than XLA's (a 0.83x training step once read 4.95x at load 5-6). So:
  * both sides are timed in one process, interleaved repetition by repetition in a fresh
    shuffled order (neither side always runs right after the other), after one warm-up
    (compile) call each; medians are reported, and process CPU seconds (all threads) beside
    the wall seconds;
  * the 1-minute load average is read before and after; when either exceeds the number of
    cores the run is "loaded" and its headline ratios are withheld (`ratio_cell`).
"""

from __future__ import annotations

import os
import random
import time


def cores() -> int:
    return len(os.sched_getaffinity(0))


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def load1() -> float:
    return os.getloadavg()[0]


def loaded(info: dict) -> bool:
    """True when `info`'s 1-minute load before or after the timing exceeded its cores."""
    return max(info["load1_before"], info["load1_after"]) > info["cores"]


def ratio_cell(value: float, is_loaded: bool, digits: int = 2, bold: bool = True) -> str:
    """A ratio as the report prints it: withheld when the run was loaded."""
    if is_loaded:
        return "withheld (loaded)"
    text = f"{value:.{digits}f}x"
    return f"**{text}**" if bold else text


def loaded_line(info: dict) -> list[str]:
    """The report's warning line for a loaded run (none otherwise)."""
    if not loaded(info):
        return []
    return [f"LOADED: the 1-minute load average ({max(info['load1_before'], info['load1_after']):.2f}) "
            f"exceeded the {info['cores']} cores, so the ratios are withheld; the times below are "
            f"not results. Rerun on a quiet machine."]


def interleaved_samples(fns: dict, repeats: int, seed: int = 0) -> tuple[dict, dict]:
    """-> (wall seconds, process CPU seconds): name -> one sample per repetition. One
    warm-up (compile) call each first, then every repetition calls every fn once, in a
    shuffled order."""
    for fn in fns.values():
        fn()
    order = list(fns)
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    shuffle = random.Random(seed).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu
