"""Batch-1 floor (Identity graph), ORT fp32 vs torch eager, threads 1 vs 2, level all vs extended.

python tools/perf_lab/exp_floor.py WEIGHTS [--rounds 15]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))
import lab  # noqa: E402


def identity_model(shape) -> bytes:
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *shape])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", *shape])
    g = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "empty", [inp], [out])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m.SerializeToString()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("weights")
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    model = lab.load_weights(a.weights)
    shape = (model.config.in_channels, model.config.height, model.config.width)
    fp32 = lab.export_fp32(model, shape)
    x1 = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    x256 = np.random.default_rng(0).standard_normal((256, *shape)).astype(np.float32)
    empty = lab.session(identity_model(shape), 1)
    s1 = lab.session(fp32, 1)
    s1x = lab.session(fp32, 1, level="extended")
    s1_2t = lab.session(fp32, 2)
    s256 = lab.session(fp32, 2)
    s256_1t = lab.session(fp32, 1)
    s256x = lab.session(fp32, 2, level="extended")
    t1, t256 = torch.from_numpy(x1), torch.from_numpy(x256)

    def eager(x, threads):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            model(x)

    r1 = lab.interleaved({
        "empty": lambda: empty.run(None, {"input": x1}),
        "ort_1t": lambda: s1.run(None, {"input": x1}),
        "ort_1t_ext": lambda: s1x.run(None, {"input": x1}),
        "ort_2t": lambda: s1_2t.run(None, {"input": x1}),
        "torch_1t": lambda: eager(t1, 1),
    }, a.rounds, inner=50)
    r256 = lab.interleaved({
        "ort_2t": lambda: s256.run(None, {"input": x256}),
        "ort_1t": lambda: s256_1t.run(None, {"input": x256}),
        "ort_2t_ext": lambda: s256x.run(None, {"input": x256}),
        "torch_2t": lambda: eager(t256, 2),
    }, a.rounds)
    print("batch 1 (us):", {k: round(lab.med(v) * 1e6, 1) for k, v in r1.items()})
    print("batch 256 (ms):", {k: round(lab.med(v) * 1e3, 2) for k, v in r256.items()})
    m = {k: lab.med(v) for k, v in r1.items()}
    print(f"fp32 b1 / floor = {m['ort_1t'] / m['empty']:.1f}x; torch/ort b1 = {m['torch_1t'] / m['ort_1t']:.1f}x; "
          f"2t/1t b1 = {m['ort_2t'] / m['ort_1t']:.2f}; ext/all b1 = {m['ort_1t_ext'] / m['ort_1t']:.2f}")
    m = {k: lab.med(v) for k, v in r256.items()}
    print(f"torch/ort b256 = {m['torch_2t'] / m['ort_2t']:.1f}x; 1t/2t = {m['ort_1t'] / m['ort_2t']:.2f}; "
          f"ext/all = {m['ort_2t_ext'] / m['ort_2t']:.2f}")


if __name__ == "__main__":
    main()
