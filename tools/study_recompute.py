"""Recompute a study's MC-dropout block and head-to-head comparisons from its saved tables.npz.

    python tools/study_recompute.py studies/mnist-test

The per-seed x per-image tables are what every interval is computed from; this reruns
`pipeline.study.mc_block` on them with the current code (no training, no test-split choice), so an
interval method fixed after a long study ran can be applied to that study. The report records
that it was recomputed, when, and what.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ("correct", "nll", "confidence")


def recompute(folder: Path) -> Path:
    import numpy as np

    from pipeline import artifacts
    from pipeline.config import StudyConfig
    from pipeline.study import STUDY_JSON, TABLES_NPZ, Setting, comparisons, mc_block

    path = folder / STUDY_JSON
    report = json.loads(path.read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in report["config"].items()}
    config = StudyConfig(**fields)
    tables = np.load(folder / TABLES_NPZ)
    for block in report["by_size"]:
        size = block["train_size"]
        correct = {name: tables[f"n{size}/{name}/correct"] for name in block["variants"]}
        block["comparisons"] = comparisons(correct, block["labels"], size, config)
        if "mc" not in block:
            continue
        stacked = {m: {k: tables[f"n{size}/dropout.{m}/{k}"] for k in KEYS} for m in block["mc"]["methods"]}
        block["mc"] = mc_block(stacked, block["mc"]["temperatures"], Setting(**block["mc"]["setting"]), config)
    report["recomputed"] = {"when": artifacts.now_iso(), "what": "MC block (accuracy, NLL, ECE intervals) and comparisons from tables.npz",
                            "why": "ECE intervals centred on the value (resampling inflates ECE); dropout vs L1/L2 paired"}
    artifacts.atomic_write_json(path, report)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the study folder (study.json and tables.npz)")
    args = parser.parse_args()
    try:
        print(recompute(args.folder))
    except (OSError, KeyError, ValueError) as exc:
        print(f"cannot recompute {args.folder}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
