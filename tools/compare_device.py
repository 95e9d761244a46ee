"""The build host's `pipeline bench` next to the device's `--selftest`, line by line.

    python tools/compare_device.py bench.json device_report.json [more bench.json ...]

Both files hold records with the same fields (artifact, provider, batch, threads, latency_ms, ...),
timed by the same harness (pipeline/timing.py). A line per (artifact, provider, batch, threads)
measured on either side, then per batch size the variant each side would run. The device report
names the `pipeline bench` command lines that time its candidates on the build host.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def records(doc: dict, key: str) -> dict:
    return {(r["artifact"], r["provider"], r["batch"], r["threads"]): r for r in doc.get(key, []) if r.get("status") == "ok"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def fastest(timed: dict) -> dict:
    best: dict = {}
    for (artifact, provider, batch, _), r in timed.items():
        if batch not in best or r["latency_ms"]["p50"] < best[batch][1]:
            best[batch] = (f"{artifact}/{provider}", r["latency_ms"]["p50"])
    return best


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    device_doc = json.loads(Path(argv[1]).read_text())
    host: dict = {}
    for path in [argv[0], *argv[2:]]:
        host.update(records(json.loads(Path(path).read_text()), "records"))
    device = records(device_doc, "timings")
    print(f"{'artifact':<8} {'prov':<5} {'batch':>5} {'thr':>3} {'host p50 ms':>12} {'device p50 ms':>14} {'device/host':>11}")
    for key in sorted(set(host) | set(device), key=lambda k: (k[2], k[1], k[0], k[3])):
        h, d = host.get(key), device.get(key)
        hp = h["latency_ms"]["p50"] if h else None
        dp = d["latency_ms"]["p50"] if d else None
        ratio = f"{dp / hp:.2f}" if hp and dp else "-"
        print(f"{key[0]:<8} {key[1]:<5} {key[2]:>5} {key[3]:>3} {_ms(hp):>12} {_ms(dp):>14} {ratio:>11}")
    host_best = fastest(host)
    for choice in device_doc.get("choice", []):
        built = host_best.get(choice["batch"])
        print(f"batch {choice['batch']}: device runs {choice['artifact']}/{choice['provider']} ({choice['verdict']}); "
              f"build host's fastest: {built[0] if built else 'not measured'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
