"""A device-side client that knows only the manifest: raw pixels -> preprocess -> onnxruntime -> label.

`classify` uses json, numpy and onnxruntime and nothing from this repository, which is the point:
it proves that `manifest.json` is a complete contract (file, input name, preprocessing, labels,
runtime settings). `main` is the test harness around it: it takes the run's raw test pixels from
`pipeline.data` (the same split the recorded accuracy was measured on) and checks that the client
reproduces the manifest's `test_accuracy`.

    python tools/manifest_client.py models/digits [--variant fp32]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def classify(run_dir: Path, raw: np.ndarray, variant: str | None = None) -> list[str]:
    """Labels for raw pixels (N, C, H, W) in the source's own range, using only the manifest."""
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    record = manifest["artifacts"][variant or manifest.get("recommended", "fp32")]
    path = Path(run_dir) / record["file"]
    if hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        raise SystemExit(f"{path}: sha256 differs from the manifest's record")
    pre = manifest["preprocess"]
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    x = ((raw.astype(np.float32) * np.float32(pre["scale"]) - mean) / std).astype(np.float32)
    runtime = record.get("runtime", {})
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[runtime.get("graph_optimization_level", "all")]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(runtime.get("disabled_optimizers", [])))
    logits = np.concatenate([session.run(None, {record["input"]["name"]: x[i:i + 512]})[0] for i in range(0, len(x), 512)])
    return [manifest["labels"][i] for i in logits.argmax(1)]


def check_recorded_accuracy(run_dir: Path, variant: str | None = None) -> tuple[float, float]:
    """(client's test accuracy, the manifest's recorded test_accuracy) on the run's test split."""
    # The harness only: where the raw test pixels come from (the classification itself uses no pipeline code).
    from pipeline.config import DataConfig
    from pipeline.data import load_trained_on
    from pipeline.errors import DataError

    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    name = variant or manifest.get("recommended", "fp32")
    try:
        splits = load_trained_on(DataConfig.from_dict(manifest["dataset"]["config"]), manifest["dataset"]["fingerprint"],
                                 str(run_dir))
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    predicted = classify(run_dir, splits.x_test, name)
    truth = [manifest["labels"][i] for i in splits.y_test]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    return accuracy, manifest["artifacts"][name]["test_accuracy"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    variant = argv[argv.index("--variant") + 1] if "--variant" in argv else None
    accuracy, recorded = check_recorded_accuracy(Path(argv[0]), variant)
    same = accuracy == recorded
    print(f"{argv[0]}: manifest-only client accuracy {100 * accuracy:.2f}%, recorded {100 * recorded:.2f}%: "
          f"{'reproduced' if same else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
