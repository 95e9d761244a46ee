"""Does the self-test's batch-1 choice hold up? Compare it with a long interleaved A/B on the same host.

    python tools/selftest_ab.py UNPACKED_BUNDLE [--repeats 10] [--ab-seconds 30] [--json]

1. A/B: every shipped variant at batch 1 (one thread, the manifest's runtime settings), timed by the
   bundle's own runner and harness for `--ab-seconds` in total, in 30 interleaved rounds; the winner
   is the lower p50, and "within noise" when the paired per-round ratios straddle 1.
2. `--repeats` runs of `device_runner.py --selftest` (their usual 2 s budget), each in a fresh process.
3. A repeat agrees when it chose the A/B winner, or when it said its batch-1 variants are within noise.
The acceptance bar (issue 17): at least 9 of 10 agree. A benchmark script, not a test: its numbers
depend on the host and its load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def load_runner(bundle: Path):
    sys.path.insert(0, str(bundle))
    try:
        import device_runner
    finally:
        sys.path.remove(str(bundle))
    return device_runner


def ab(bundle: Path, seconds: float) -> dict:
    runner = load_runner(bundle)
    manifest = runner.read_manifest(str(bundle))
    shape = tuple(next(iter(manifest["artifacts"].values()))["input"]["shape"][1:])
    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    slots = {}
    for name, record in manifest["artifacts"].items():
        session = runner.create_session(runner.read_file(str(bundle), record["file"]), record.get("runtime") or {}, 1)
        input_name = session.get_inputs()[0].name
        slots[name] = runner.timing.Slot(run=lambda s=session, n=input_name: s.run(None, {n: x}))
    plan = runner.timing.TimingPlan(warmup=50, warmup_seconds=1.0, duration=seconds / len(slots), rounds=30,
                                    time_limit=seconds)
    runner.timing.time_interleaved(list(slots.values()), plan)
    p50 = {name: runner.timing.summarize(slot.latencies_ns, 1)["latency_ms"]["p50"] for name, slot in slots.items()}
    ranked = sorted(p50, key=p50.get)
    result = {"seconds": seconds, "p50_ms": p50, "winner": ranked[0], "verdict": "only candidate"}
    if len(ranked) > 1:
        ratios, verdict = runner._ratio_verdict(runner.timing.round_medians(slots[ranked[0]]),
                                                runner.timing.round_medians(slots[ranked[1]]))
        result.update(runner_up=ranked[1], verdict=verdict, ratio=p50[ranked[0]] / p50[ranked[1]],
                      round_ratio_range=[min(ratios), max(ratios)] if ratios else None)
    return result


def selftest_choices(bundle: Path, repeats: int) -> list[dict]:
    choices = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            report_path = Path(tmp) / f"report{i}.json"
            done = subprocess.run([sys.executable, "device_runner.py", "--selftest", "--report", str(report_path)],
                                  cwd=bundle, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise SystemExit(f"selftest failed: {done.stderr.strip()}")
            report = json.loads(report_path.read_text())
            first = next(c for c in report["choice"] if c["batch"] == 1)
            choices.append({"artifact": first["artifact"], "verdict": first["verdict"], "seconds": report["seconds"],
                            "ratio_to_runner_up": first.get("ratio_to_runner_up")})
    return choices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ab-seconds", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    reference = ab(args.bundle, args.ab_seconds)
    choices = selftest_choices(args.bundle, args.repeats)
    agree = [c["artifact"] == reference["winner"] or c["verdict"] == "within noise" for c in choices]
    result = {"ab": reference, "selftests": choices, "agree": sum(agree), "repeats": len(choices)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        p50 = ", ".join(f"{k} {v:.4f} ms" for k, v in reference["p50_ms"].items())
        spread = reference.get("round_ratio_range")
        print(f"A/B {reference['seconds']:.0f} s at batch 1: {p50}; winner {reference['winner']} ({reference['verdict']}"
              + (f", per-round ratios {spread[0]:.2f}-{spread[1]:.2f}" if spread else "") + ")")
        for i, (c, ok) in enumerate(zip(choices, agree, strict=True)):
            print(f"  selftest {i + 1}: {c['artifact']} ({c['verdict']}, {c['seconds']:.1f} s) {'agrees' if ok else 'DISAGREES'}")
        print(f"{sum(agree)} of {len(choices)} agree")
    return 0 if sum(agree) >= 0.9 * len(choices) else 1


if __name__ == "__main__":
    sys.exit(main())
