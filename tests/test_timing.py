"""The one timing harness: interleaving, run counts, bounds. Structural, never timed."""

from __future__ import annotations

import pytest

from pipeline.timing import Slot, TimingPlan, round_medians, summarize, time_interleaved


def recording_slots(names, order):
    return [Slot(run=lambda name=name: order.append(name)) for name in names]


def test_rounds_interleave_and_reverse_on_odd_rounds():
    order: list[str] = []
    slots = recording_slots("ab", order)
    time_interleaved(slots, TimingPlan(warmup=0, runs=3, rounds=3))
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert [s.rounds for s in slots] == [[0, 1, 2], [0, 1, 2]]
    assert all(s.stopped_by == "runs" for s in slots)


def test_runs_are_spread_exactly_over_rounds():
    order: list[str] = []
    slots = recording_slots("a", order)
    time_interleaved(slots, TimingPlan(warmup=2, runs=7, rounds=3))
    assert slots[0].warmup_runs == 2
    assert slots[0].rounds == [0, 0, 0, 1, 1, 2, 2]
    assert len(order) == 2 + 7


def test_time_limit_bounds_a_slot_even_with_runs():
    slots = [Slot(run=lambda: None)]
    time_interleaved(slots, TimingPlan(warmup=0, runs=10**9, rounds=1, time_limit=0.05))
    assert slots[0].stopped_by == "time_limit"
    assert slots[0].timed_seconds < 1.0


def test_summary_and_round_medians():
    slot = Slot(run=lambda: None, latencies_ns=[1_000_000, 3_000_000, 2_000_000, 4_000_000], rounds=[0, 0, 1, 1])
    stats = summarize(slot.latencies_ns, batch=2)
    assert stats["latency_ms"]["p50"] == pytest.approx(2.5)
    assert stats["throughput_ips"] == pytest.approx(2 / 2.5e-3)
    assert round_medians(slot) == [2.0, 3.0]


def test_plan_refuses_nonsense():
    with pytest.raises(ValueError, match="rounds"):
        TimingPlan(rounds=0)


def test_harness_imports_nothing_from_the_package():
    """The device runner carries this module's source to devices: it must stand alone."""
    import ast
    from pathlib import Path

    import pipeline.timing as timing

    tree = ast.parse(Path(timing.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] == "pipeline"}
    assert {name.split(".")[0] for name in imported} <= {"__future__", "time", "collections", "dataclasses", "numpy"}


def test_settling_runs_precede_every_round_of_every_slot_untimed():
    order: list[str] = []
    slots = recording_slots("ab", order)
    time_interleaved(slots, TimingPlan(warmup=0, runs=2, rounds=2, settle_seconds=1e-9))
    # One settling run (untimed) before each slot's round, then its timed run.
    assert order == ["a", "a", "b", "b", "b", "b", "a", "a"]
    assert [len(s.latencies_ns) for s in slots] == [2, 2]
    # Negative control: without settling, only the timed runs happen.
    order.clear()
    time_interleaved(recording_slots("ab", order), TimingPlan(warmup=0, runs=2, rounds=2))
    assert order == ["a", "b", "b", "a"]


def test_paired_ratio_cancels_a_load_change_between_rounds():
    from pipeline.timing import paired_ratio, ratio_of_medians

    # Round 0 is quiet, round 1 three times slower for both; b is 0.8x a in each round. b got more runs in the
    # quiet round (duration-bounded rounds), which the pooled ratio mistakes for speed.
    a = Slot(run=lambda: None, latencies_ns=[10, 30, 30, 30], rounds=[0, 1, 1, 1])
    b = Slot(run=lambda: None, latencies_ns=[8, 8, 8, 24], rounds=[0, 0, 0, 1])
    assert paired_ratio(b, a) == pytest.approx(0.8)
    # Negative control: the pooled medians (8 vs 30) call b 3.75x faster.
    assert ratio_of_medians(b, a) == pytest.approx(8 / 30)
