"""tools/bench.py (`make bench`): the pieces its numbers rest on, checked without timing anything.

The script's ratios are only as good as (1) the FLOP count it divides by, (2) the peak graphs
really computing the products they are named after, (3) the floor graph doing nothing, (4) the
interleaving giving every case samples in every round, (5) the manifest client refusing a file
whose sha256 differs, and (6) the acceptance table comparing in the right direction.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_script", REPO / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_script"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_script()


def _session(model_bytes: bytes):
    from pipeline import runtime

    return runtime.create_session(model_bytes, {}, threads=1)


def _torch_flops(model, shape) -> float:
    """Multiply-adds x 2 of every Conv2d and Linear, counted from the layers' real outputs."""
    import torch
    from torch import nn

    total = 0.0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += 2.0 * output[0].numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += 2.0 * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for handle in handles:
        handle.remove()
    return total


def test_model_flops_matches_the_layers_of_the_exported_model(exported_run_master):
    from pipeline.train import load_checkpoint

    model, _ = load_checkpoint(exported_run_master / "checkpoint.pt")
    config = model.config
    expected = _torch_flops(model, (config.in_channels, config.height, config.width))
    assert expected > 0
    assert bench.model_flops(exported_run_master / "model.onnx") == pytest.approx(expected)


def test_model_flops_of_the_floor_graph_is_zero(tmp_path):
    path = tmp_path / "identity.onnx"
    path.write_bytes(bench.identity_graph((1, 8, 8)))
    assert bench.model_flops(path) == 0.0


def test_floor_graph_returns_its_input():
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    (y,) = _session(bench.identity_graph((1, 8, 8))).run(None, {"input": x})
    assert np.array_equal(x, y)


def test_peak_graphs_compute_the_products_they_are_named_after():
    graphs = bench.gemm_graphs(16, 32, 8)
    fp32_graph, a = graphs["fp32 MatMul"]
    import onnx
    from onnx import numpy_helper

    def weight(graph_bytes):
        return next(numpy_helper.to_array(t) for t in onnx.load_from_string(graph_bytes).graph.initializer if t.name == "W")

    (y,) = _session(fp32_graph).run(None, {"A": a})
    np.testing.assert_allclose(y, a @ weight(fp32_graph), rtol=1e-4, atol=1e-4)

    int_graph, a8 = graphs["int8 MatMulInteger u8s8"]
    # On x86 without VNNI (AVX2), ONNX Runtime multiplies u8 x s8 pairs into int16 with saturation (vpmaddubsw),
    # so full-range inputs are not exact there; activations below 128 keep every pair sum in range on any host.
    a8 = a8 // 2
    (y,) = _session(int_graph).run(None, {"A": a8})
    exact = (a8.astype(np.int32) - 128) @ weight(int_graph).astype(np.int32)
    assert y.dtype == np.int32 and np.array_equal(y, exact)
    # Negative control: the product without the activation zero point is a different matrix.
    assert not np.array_equal(y, a8.astype(np.int32) @ weight(int_graph).astype(np.int32))

    q_graph, a8 = graphs["int8 QLinearMatMul u8s8"]
    a8 = a8 // 2  # as above: exact on hosts without VNNI too
    (y,) = _session(q_graph).run(None, {"A": a8})
    real = 0.02 * (a8.astype(np.float64) - 128) @ (0.01 * weight(q_graph).astype(np.float64))
    expected = np.clip(np.rint(real / 4.0) + 128, 0, 255)
    assert y.dtype == np.uint8 and np.abs(y.astype(np.int32) - expected).max() <= 1


def test_interleaved_gives_every_case_samples_in_every_round():
    order: list[str] = []
    cases = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    slots = bench.interleaved(cases, seconds=0.03, rounds=4)
    assert set(slots) == {"a", "b", "c"}
    assert all(sorted(set(slot.rounds)) == [0, 1, 2, 3] and min(slot.latencies_ns) >= 0 for slot in slots.values())
    assert order[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # warm-up, then the timed rounds
    # Round 1 runs the cases in reverse: c's block comes before a's.
    timed = [name for name in order[9:]]
    first_c = timed.index("c")
    assert "a" in timed[:first_c] and timed[first_c:].index("a") > 0


def test_training_timing_drops_the_first_step_of_every_round():
    from pipeline.timing import Slot

    slot = Slot(run=lambda: None, latencies_ns=[9, 1, 1, 9, 2, 9], rounds=[0, 0, 0, 1, 1, 2])
    assert bench.first_of_round_dropped(slot) == [1e-9, 1e-9, 2e-9]


def test_run_client_refuses_a_file_whose_sha256_differs(exported_run_master, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported_run_master, run)
    assert bench.RunModels(run).path("fp32").is_file()
    with open(run / "model.onnx", "r+b") as f:  # flip one byte of the shipped file
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SystemExit, match="sha256"):
        bench.RunModels(run).path("fp32")


def _result(**overrides) -> dict:
    """A bench result holding only what `acceptance` reads, every value on its passing side."""
    ratios = {"int8/fp32 throughput, batch 256": 1.6, "int8 p50 / fp32 p50, batch 1": 0.5,
              "fp32 batch-1 p50 / empty-run floor": 3.0, "ORT fp32 / torch eager speed, batch 1": 6.0}
    default = {"ratios": {**ratios, **overrides}, "accuracy": {"drop_points": 0.0}}
    wide = {"ratios": {"int8/fp32 throughput, batch 256": overrides.get("wide", 2.6)}}
    peers = {"ratios": {"best peer p50 / recommended p50, batch 1": overrides.get("peer 1", 1.1),
                        "best peer p50 / recommended p50, batch 256": overrides.get("peer 256", 1.0)}}
    return {"runs": {"default": default, "wide": wide}, "peers": peers}


def test_acceptance_passes_and_fails_on_the_right_side_of_each_target():
    assert all(row["pass"] for row in bench.acceptance(_result()))
    failing = {row["check"]: row["pass"] for row in bench.acceptance(_result(**{
        "int8/fp32 throughput, batch 256": 1.4, "fp32 batch-1 p50 / empty-run floor": 4.5, "wide": 2.4}))}
    assert failing["default int8/fp32 throughput, batch 256"] is False
    assert failing["fp32 batch-1 p50 / empty-run floor"] is False
    assert failing["wide int8/fp32 throughput, batch 256"] is False
    assert failing["ORT fp32 / torch eager speed, batch 1"] is True
    # Peers: the ratio is the best peer's p50 over the recommendation's, so below 1.0 the peer was faster.
    peer = {row["check"]: row["pass"] for row in bench.acceptance(_result(**{"peer 1": 0.95}))}
    assert peer["recommended deployment vs best peer, batch 1 (peer p50 / ours)"] is False
    assert peer["recommended deployment vs best peer, batch 256 (peer p50 / ours)"] is True
    # Exactly at the target passes (>= and <=).
    edge = {row["check"]: row["pass"] for row in bench.acceptance(_result(**{"int8 p50 / fp32 p50, batch 1": 1.0}))}
    assert edge["default int8 p50 / fp32 p50, batch 1"] is True
    # Without the wide run its row is not judged.
    result = _result()
    del result["runs"]["wide"]
    row = next(r for r in bench.acceptance(result) if r["check"].startswith("wide"))
    assert row["value"] is None and row["pass"] is None


def test_the_deployed_file_is_compared_with_the_fastest_candidate_of_the_same_speed_check():
    import bench_peers

    def deployment(batch, artifact, engine, ms, measured="export speed check"):
        return {"batch": batch, "artifact": artifact, "engine": engine, "p50_ms": ms, "measured": measured}

    candidates = [{"recipe": "default", "latency": {"batch_1": {"ms": 0.10, "engine": "onnxruntime"},
                                                     "batch_256": {"ms": 10.0, "engine": "openvino"}}},
                  {"recipe": "per-channel", "latency": {"batch_1": {"ms": 0.08, "engine": "onnxruntime"},
                                                         "batch_256": {"ms": 9.0, "engine": "openvino"}}},
                  {"recipe": "ort-defaults", "passed": False}]
    manifest = {"artifacts": {"int8": {"quantization": {"candidates": candidates}}},
                "deployments": [deployment(1, "int8-per-channel", "onnxruntime", 0.08),
                                deployment(256, "int8", "openvino", 10.0)]}
    rows = bench_peers.deployed_vs_candidates(manifest)
    assert rows["batch 1"]["ratio"] == pytest.approx(1.0) and rows["batch 1"]["fastest_candidate"] == "per-channel on onnxruntime"
    assert rows["batch 256"]["ratio"] == pytest.approx(10 / 9)
    checks = {r["check"]: r["pass"] for r in bench.acceptance({"runs": {}, "peers": {"deployed_vs_candidates": rows}})}
    assert checks["deployed file / fastest int8 candidate, batch 1 (export speed check)"] is True
    assert checks["deployed file / fastest int8 candidate, batch 256 (export speed check)"] is False
    # A deployment that `pipeline bench` rewrote was not measured with the candidates: not compared.
    manifest["deployments"][1]["measured"] = "bench"
    assert set(bench_peers.deployed_vs_candidates(manifest)) == {"batch 1"}
