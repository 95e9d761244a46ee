"""Peak fp32 MatMul vs int8 MatMulInteger / QLinearMatMul in ORT on this host, interleaved.

python tools/perf_lab/peaks.py [--m 512 --k 1024 --n 1024 --rounds 15 --threads 2]
"""
import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline.timing import Slot, TimingPlan, time_interleaved  # noqa: E402


def matmul_graph(kind, m, k, n, a_type="u8", b_type="s8"):
    rng = np.random.default_rng(0)
    np_t = {"u8": np.uint8, "s8": np.int8}
    onnx_t = {"u8": TensorProto.UINT8, "s8": TensorProto.INT8}
    if kind == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        inp = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])
        out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])
        inits = [w]
    elif kind == "mmi":
        w = numpy_helper.from_array(rng.integers(-100, 100, (k, n)).astype(np_t[b_type]), "W")
        azp = numpy_helper.from_array(np.array(0 if a_type == "s8" else 128, np_t[a_type]), "azp")
        bzp = numpy_helper.from_array(np.array(0, np_t[b_type]), "bzp")
        node = helper.make_node("MatMulInteger", ["A", "W", "azp", "bzp"], ["Y"])
        inp = helper.make_tensor_value_info("A", onnx_t[a_type], ["m", k])
        out = helper.make_tensor_value_info("Y", TensorProto.INT32, ["m", n])
        inits = [w, azp, bzp]
    elif kind == "qlmm":
        w = numpy_helper.from_array(rng.integers(-100, 100, (k, n)).astype(np_t[b_type]), "W")
        sc = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
        zp = lambda name, t, v: numpy_helper.from_array(np.array(v, np_t[t]), name)  # noqa: E731
        inits = [w, sc("as", 0.02), zp("azp", a_type, 0 if a_type == "s8" else 128), sc("bs", 0.01),
                 zp("bzp", b_type, 0), sc("ys", 0.5), zp("yzp", a_type, 0 if a_type == "s8" else 128)]
        node = helper.make_node("QLinearMatMul", ["A", "as", "azp", "W", "bs", "bzp", "ys", "yzp"], ["Y"])
        inp = helper.make_tensor_value_info("A", onnx_t[a_type], ["m", k])
        out = helper.make_tensor_value_info("Y", onnx_t[a_type], ["m", n])
    g = helper.make_graph([node], kind, [inp], [out], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model.SerializeToString()


def session(model_bytes, threads):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, o, providers=["CPUExecutionProvider"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=512)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    m, k, n = a.m, a.k, a.n
    rng = np.random.default_rng(1)
    cases = {
        "fp32 MatMul": (matmul_graph("fp32", m, k, n), rng.standard_normal((m, k)).astype(np.float32)),
        "MatMulInteger u8s8": (matmul_graph("mmi", m, k, n, "u8", "s8"), rng.integers(0, 255, (m, k)).astype(np.uint8)),
        "MatMulInteger s8s8": (matmul_graph("mmi", m, k, n, "s8", "s8"), rng.integers(-100, 100, (m, k)).astype(np.int8)),
        "MatMulInteger u8u8": (matmul_graph("mmi", m, k, n, "u8", "u8"), rng.integers(0, 255, (m, k)).astype(np.uint8)),
        "QLinearMatMul u8s8": (matmul_graph("qlmm", m, k, n, "u8", "s8"), rng.integers(0, 255, (m, k)).astype(np.uint8)),
        "QLinearMatMul s8s8": (matmul_graph("qlmm", m, k, n, "s8", "s8"), rng.integers(-100, 100, (m, k)).astype(np.int8)),
        "QLinearMatMul u8u8": (matmul_graph("qlmm", m, k, n, "u8", "u8"), rng.integers(0, 255, (m, k)).astype(np.uint8)),
    }
    sessions = {name: (session(mb, a.threads), x) for name, (mb, x) in cases.items()}
    slots = {name: Slot(run=lambda s=s, x=x: s.run(None, {"A": x})) for name, (s, x) in sessions.items()}
    time_interleaved(list(slots.values()), TimingPlan(warmup=3, runs=a.rounds, rounds=a.rounds, time_limit=120.0))
    times = {name: [ns / 1e9 for ns in slot.latencies_ns] for name, slot in slots.items()}
    ops = 2 * m * k * n
    base = statistics.median(times["fp32 MatMul"])
    print(f"m={m} k={k} n={n} threads={a.threads} ort={ort.__version__}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:22s} {med*1e3:8.2f} ms  {ops/med/1e9:8.1f} G(FL)OP/s  x{base/med:5.2f} vs fp32")


if __name__ == "__main__":
    main()
