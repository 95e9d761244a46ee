"""Acceptance client for issue 4: judge a run's int8 artifact from the manifest and the files alone.

It trusts none of the numbers the pipeline recorded: it checks each file's sha256 against the
manifest, reads the test split the manifest names (dataset config + fingerprint), applies the
manifest's preprocessing, runs fp32 and int8 through ONNX Runtime with each artifact's recorded
`runtime` settings, and compares. Imports no torch.

    python tools/check_quantized.py models/digits [--variant int8] [--max-size-ratio 0.30] [--max-drop 0.5] [--json]

Exit 0 when the int8 file is at most `--max-size-ratio` of the fp32 bytes and its test accuracy is
at most `--max-drop` points below fp32's; 1 otherwise (the reasons are printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(run_dir: Path, variant: str, max_size_ratio: float, max_drop: float) -> dict:
    from pipeline import data, runtime
    from pipeline.config import DataConfig

    manifest = json.loads((run_dir / "manifest.json").read_text())
    records = manifest["artifacts"]
    failures = []
    for name in ("fp32", variant):
        path = run_dir / records[name]["file"]
        if sha256(path) != records[name]["sha256"]:
            failures.append(f"{path.name}: sha256 differs from the manifest")
    saved = manifest["dataset"]["config"]
    config = DataConfig(**{**saved, "data_dir": Path(saved["data_dir"]) if saved.get("data_dir") else None,
                           "image_size": tuple(saved["image_size"]) if saved.get("image_size") else None})
    splits = data.load(config)
    if splits.fingerprint != manifest["dataset"]["fingerprint"]:
        failures.append("the test data differs from the data the run was trained on (fingerprint)")
    x = data.Preprocess.from_dict(manifest["preprocess"]).apply(splits.x_test)
    accuracy, predictions = {}, {}
    for name in ("fp32", variant):
        session = runtime.create_session(run_dir / records[name]["file"], records[name].get("runtime"))
        predictions[name] = runtime.run_batched(session, x).argmax(1)
        accuracy[name] = float(np.mean(predictions[name] == splits.y_test))
    size_ratio = (run_dir / records[variant]["file"]).stat().st_size / (run_dir / records["fp32"]["file"]).stat().st_size
    drop = 100.0 * (accuracy["fp32"] - accuracy[variant])
    if size_ratio > max_size_ratio:
        failures.append(f"{variant} is {size_ratio:.1%} of the fp32 bytes (limit {max_size_ratio:.0%})")
    if drop > max_drop + 1e-9:
        failures.append(f"{variant} accuracy drop {drop:.2f} points exceeds {max_drop}")
    return {"run_dir": str(run_dir), "variant": variant, "test_images": int(len(splits.y_test)),
            "fp32_bytes": records["fp32"]["bytes"], "int8_bytes": records[variant]["bytes"], "size_ratio": round(size_ratio, 4),
            "fp32_accuracy": accuracy["fp32"], "int8_accuracy": accuracy[variant], "drop_points": round(drop, 4),
            "agreement": float(np.mean(predictions["fp32"] == predictions[variant])),
            "recommended": manifest.get("recommended"), "passed": not failures, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--variant", default="int8")
    parser.add_argument("--max-size-ratio", type=float, default=0.30)
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = check(args.run_dir, args.variant, args.max_size_ratio, args.max_drop)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['run_dir']} {result['variant']}: {result['size_ratio']:.1%} of fp32 bytes, "
              f"accuracy {100 * result['int8_accuracy']:.2f}% vs fp32 {100 * result['fp32_accuracy']:.2f}% "
              f"(drop {result['drop_points']:.2f} points, agreement {100 * result['agreement']:.2f}%, "
              f"{result['test_images']} test images): {'PASS' if result['passed'] else 'FAIL: ' + '; '.join(result['failures'])}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
