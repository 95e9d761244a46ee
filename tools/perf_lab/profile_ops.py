"""Per-op time share from ORT's profiler: python tools/perf_lab/profile_ops.py MODEL.onnx [--batch 256 --threads 2 --disable X]"""
import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--disable", action="append", default=[])
    a = p.parse_args()
    o = ort.SessionOptions()
    o.intra_op_num_threads = a.threads
    o.enable_profiling = True
    o.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "prof")
    s = ort.InferenceSession(a.model, o, providers=["CPUExecutionProvider"], disabled_optimizers=a.disable)
    x = np.random.default_rng(0).standard_normal((a.batch, 1, 28, 28)).astype(np.float32)
    for _ in range(a.runs):
        s.run(None, {s.get_inputs()[0].name: x})
    events = json.load(open(s.end_profiling()))
    per = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[(e["args"]["op_name"], e["name"][:-12])] += e["dur"]
    total = sum(per.values())
    for (op, name), d in per.most_common():
        print(f"{op:22s} {name:45s} {d / a.runs:9.0f} us {100 * d / total:5.1f}%")


if __name__ == "__main__":
    main()
