"""Timing for the benchmarks: interleaved samples, their statistics, and the
machine's copy bandwidth measured the way the steps are timed."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any


def timed_samples(
    runners: dict[str, Callable[[], None]], samples: int, sample_seconds: float
) -> dict[str, list[float]]:
    """Seconds per call of each runner: interleaved samples, each >= sample_seconds,
    in an order rotated from round to round."""
    repeats = {}
    for name, run in runners.items():  # warm up, then calibrate repeats
        for _ in range(3):
            run()
        t0 = time.perf_counter()
        run()
        once = max(time.perf_counter() - t0, 1e-7)
        repeats[name] = max(1, int(sample_seconds / once))
    out: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for i in range(samples):
        # Rotate the order each round so no runner always goes first.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            run = runners[name]
            t0 = time.perf_counter()
            for _ in range(repeats[name]):
                run()
            out[name].append((time.perf_counter() - t0) / repeats[name])
    return out


def stats(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return {
        "median_s": statistics.median(samples),
        "q25_s": q[0],
        "q75_s": q[2],
        "min_s": min(samples),
    }


def copy_bandwidth(jax: Any, jnp: Any, args: argparse.Namespace) -> float:
    """GB/s of a jitted in-place ``x * 2`` (read and write: 2 words per element).

    The buffer is donated, as the optimizer steps' are, so no fresh output
    buffer is allocated (and first touched) on each call.
    """
    n = max(1_000_000, int(64_000_000 * args.scale))
    buf = [jnp.ones((n,), jnp.float32)]
    double = jax.jit(lambda x: x * 2.0, donate_argnums=0)

    def run() -> None:
        buf[0] = double(buf[0])
        jax.block_until_ready(buf[0])

    times = timed_samples({"copy": run}, args.samples, args.sample_seconds)
    return 2 * 4 * n / stats(times["copy"])["median_s"] / 1e9
