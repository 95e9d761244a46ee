"""The one timing harness: every latency in this project is measured here, the same way.

Interleaved rounds, warm-up, percentiles, spread. It imports only the standard library and
numpy, and nothing from `pipeline`, so the device runner can carry it to a device unchanged
(`pipeline pack` copies this source into the bundle's runner).

How a measurement is made honest:
- warm-up runs first (first runs allocate memory and choose kernels), bounded in time;
- the timed runs are split into rounds, interleaved across the slots being compared, with the
  order reversed on odd rounds, so a load spike from a neighbour hits every slot alike and
  ratios measured in one call hold even on a shared machine;
- every loop is bounded in time (`TimingPlan.warmup_seconds`, `duration`, `time_limit`);
- the clock is `perf_counter_ns` around exactly one call of `run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

SETTLE_SECONDS = 0.05
"""The settling time every interleaved comparison of sessions uses (`TimingPlan.settle_seconds`): with rounds of
0.05 s and no settling, ONNX Runtime's fp32 at batch 256 measured 30-34 ms against 17 ms in 0.4 s rounds; 0.02 s
(one or two runs at batch 256) still left int8 at 16-18 ms against 12.3; 0.05 s brought it to 12.9-13.7 (README,
issue 16). The plan's own default stays 0 so that a plan says exactly which runs it makes."""


@dataclass(frozen=True)
class TimingPlan:
    """How long and in how many interleaved rounds a group of slots is timed."""

    warmup: int = 10
    """Untimed runs after the first run, before timing (stopped early after `warmup_seconds`)."""
    warmup_seconds: float = 1.0
    """Upper bound on the warm-up time of one slot."""
    runs: int | None = None
    """Timed runs per slot; None times for `duration` seconds instead."""
    duration: float = 0.6
    """Seconds of timed runs per slot when `runs` is None (at least one run per round)."""
    rounds: int = 3
    """The timed runs are split into this many rounds, interleaved across the slots, so load drifts hit all alike."""
    time_limit: float = 20.0
    """Hard upper bound in seconds on the timed runs of one slot, even with `runs`."""
    settle_seconds: float = 0.0
    """Untimed runs of a slot at the start of each of its rounds, for up to this long (at least one run when > 0).
    The previous slot's worker threads (ONNX Runtime's spinning pool, OpenVINO's TBB arena) keep a core busy for a
    while after its last run; on a 2-core host they halved the next slot's first runs, so short rounds measured
    the neighbour, not the model."""

    def __post_init__(self) -> None:
        problems = [message for ok, message in (
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (self.warmup_seconds > 0, f"warmup seconds must be > 0, got {self.warmup_seconds}"),
            (self.runs is None or self.runs >= 1, f"runs must be >= 1, got {self.runs}"),
            (self.duration > 0, f"duration must be > 0 seconds, got {self.duration}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.time_limit > 0, f"time limit must be > 0 seconds, got {self.time_limit}"),
            (self.settle_seconds >= 0, f"settle seconds must be >= 0, got {self.settle_seconds}"),
        ) if not ok]
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Slot:
    """One thing to time (a session at one batch size and thread count): `run` does exactly one timed inference."""

    run: Callable[[], object]
    info: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    latencies_ns: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    warmup_runs: int = 0
    timed_seconds: float = 0.0
    stopped_by: str = ""


def _warm(slot: Slot, plan: TimingPlan) -> None:
    deadline = time.perf_counter() + plan.warmup_seconds
    while slot.warmup_runs < plan.warmup and time.perf_counter() < deadline:
        slot.run()
        slot.warmup_runs += 1


def _settle(slot: Slot, seconds: float) -> None:
    """Untimed runs for up to `seconds` (at least one when `seconds` > 0): the slot's own threads take the cores back."""
    if seconds <= 0:
        return
    deadline = time.perf_counter() + seconds
    slot.run()
    while time.perf_counter() < deadline:
        slot.run()


def time_interleaved(slots: Sequence[Slot], plan: TimingPlan) -> None:
    """Warm up every slot, then time them in `plan.rounds` interleaved rounds (order reversed on odd rounds)."""
    for slot in slots:
        _warm(slot, plan)
    per_round_seconds = plan.duration / plan.rounds
    clock = time.perf_counter_ns
    for round_index in range(plan.rounds):
        # `runs` spread over the rounds exactly (7 runs in 3 rounds: 3, 2, 2); a round may get none.
        per_round_runs = None
        if plan.runs:
            per_round_runs = plan.runs // plan.rounds + (round_index < plan.runs % plan.rounds)
            if per_round_runs == 0:
                continue
        for slot in (slots if round_index % 2 == 0 else list(reversed(slots))):
            if slot.timed_seconds >= plan.time_limit:
                continue
            _settle(slot, plan.settle_seconds)
            round_started, done = clock(), 0
            while True:
                started = clock()
                slot.run()
                ended = clock()
                slot.latencies_ns.append(ended - started)
                slot.rounds.append(round_index)
                done += 1
                in_round = (ended - round_started) / 1e9
                if slot.timed_seconds + in_round >= plan.time_limit:
                    slot.stopped_by = "time_limit"
                    break
                if per_round_runs is not None and done >= per_round_runs:
                    break
                if per_round_runs is None and in_round >= per_round_seconds:
                    break
            slot.timed_seconds += (clock() - round_started) / 1e9
    for slot in slots:
        slot.stopped_by = slot.stopped_by or ("runs" if plan.runs else "duration")


def summarize(latencies_ns: Sequence[int], batch: int) -> dict:
    """Percentiles and spread in milliseconds, throughput in images per second."""
    import numpy as np  # here, not at the top: configs import TimingPlan, and `pipeline --help` stays light

    ms = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    mean = float(ms.mean())
    std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {"runs": int(len(ms)),
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "mean": mean, "std": std,
                           "min": float(ms.min()), "max": float(ms.max())},
            "cv": std / mean if mean > 0 else 0.0,
            "throughput_ips": batch / (mean / 1e3) if mean > 0 else 0.0}


def round_medians(slot: Slot) -> list[float]:
    """The p50 latency (ms) of each round, for paired comparisons between slots of one group."""
    import numpy as np

    values = np.asarray(slot.latencies_ns, dtype=np.float64) / 1e6
    rounds = np.asarray(slot.rounds)
    return [float(np.median(values[rounds == r])) for r in sorted(set(slot.rounds))]


def ratio_of_medians(slot: Slot, baseline: Slot) -> float:
    """p50(slot) / p50(baseline) over all timed runs: below 1 means `slot` is faster."""
    import numpy as np

    return float(np.median(slot.latencies_ns) / np.median(baseline.latencies_ns))


def paired_ratio(slot: Slot, baseline: Slot) -> float:
    """The median over rounds of p50(slot) / p50(baseline) within the round: below 1 means `slot` is faster.

    Both were timed in the same round, seconds apart, so a load change between rounds cancels out of each
    round's ratio; the pooled `ratio_of_medians` lets a slow round of one slot meet a fast round of the other.
    """
    import numpy as np

    return float(np.median(np.asarray(round_medians(slot)) / np.asarray(round_medians(baseline))))

