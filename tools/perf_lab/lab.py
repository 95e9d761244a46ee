"""Research helpers for issue 9: export variants, quantize variants, interleaved timing.

Not product code: the pipeline's own export/quantize stages are what ship. This exists so
that the int8 recipe can be chosen by measurement (see tools/perf_lab/NOTES.md).
"""
from __future__ import annotations

import io
import statistics
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from pipeline.config import DataConfig, ModelConfig
from pipeline.model import DropoutCNN

MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist-test"


def load_splits():
    from pipeline import data
    return data.load(DataConfig(dataset="idx", data_dir=MNIST))


def load_weights(path: Path) -> DropoutCNN:
    """A model from checkpoint.pt, or from a .partial run's train_state.pt (weights of the last epoch)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = ModelConfig.from_dict(payload["model_config"])
    model = DropoutCNN(config)
    model.load_state_dict(payload.get("state_dict") or payload["model"])
    return model.eval()


class NHWCFlatten(nn.Module):
    """Flatten in H, W, C order: lets ORT's NHWC int8 conv output feed the FC without a transpose back."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1)


def with_nhwc_flatten(model: DropoutCNN) -> nn.Module:
    """Same function as `model`, the first Linear's columns permuted to (H, W, C) order."""
    import copy
    m = copy.deepcopy(model)
    flat_idx = next(i for i, mod in enumerate(m.classifier) if isinstance(mod, nn.Flatten))
    lin = next(mod for mod in m.classifier if isinstance(mod, nn.Linear))
    c = model.config.conv_channels[-1]
    hw = lin.in_features // c
    h = w = int(round(hw ** 0.5))
    with torch.no_grad():
        wt = lin.weight.view(lin.out_features, c, h, w).permute(0, 2, 3, 1).reshape(lin.out_features, -1)
        lin.weight.copy_(wt.contiguous())
    m.classifier[flat_idx] = NHWCFlatten()
    return m.eval()


def export_fp32(model: nn.Module, shape=(1, 28, 28), simplify=True) -> bytes:
    x = torch.randn(2, *shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    prog = torch.onnx.export(model.eval(), (x,), dynamo=True, external_data=False,
                             input_names=["input"], output_names=["logits"],
                             dynamic_shapes={"x": {0: batch}}, verbose=False)
    buf = io.BytesIO()
    prog.save(buf) if hasattr(prog, "save") else None
    mp = onnx.load_from_string(buf.getvalue())
    if simplify:
        import onnxsim
        mp, ok = onnxsim.simplify(mp)
        assert ok
    return mp.SerializeToString()


def session(model: bytes | str, threads: int, level="all", disabled=()):
    from pipeline.runtime import create_session
    return create_session(model if isinstance(model, bytes) else Path(model),
                          runtime={"graph_optimization_level": level, "disabled_optimizers": list(disabled)},
                          threads=threads)


def accuracy(sess, x, y, batch=1000) -> float:
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def interleaved(cases: dict, rounds: int, inner: int = 1) -> dict:
    """cases: name -> zero-arg callable. Per-call seconds of each, from one `pipeline.timing.time_interleaved`
    call: `rounds` rounds alternating the cases (order reversed on odd rounds), `inner` calls each per round,
    every call timed on its own (an average over calls would fold preemptions by the neighbours' jobs into
    every sample; the median of single calls mostly skips them)."""
    from pipeline.timing import Slot, TimingPlan, time_interleaved

    slots = {name: Slot(run=fn) for name, fn in cases.items()}
    time_interleaved(list(slots.values()), TimingPlan(warmup=3, runs=rounds * inner, rounds=rounds, time_limit=120.0))
    return {name: [ns / 1e9 for ns in slot.latencies_ns] for name, slot in slots.items()}


def med(ts):
    return statistics.median(ts)


def op_counts(model_bytes: bytes) -> dict:
    from collections import Counter
    return dict(Counter(n.op_type for n in onnx.load_from_string(model_bytes).graph.node))


class _Reader:
    def __init__(self, x: np.ndarray, name: str, batch: int = 32):
        self.batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)

    def rewind(self):  # pragma: no cover - not used by quantize_static's single pass
        pass


def quantize(fp32: bytes, calib: np.ndarray, fmt="qdq", act="u8", wt="s8", per_channel=True,
             reduce_range=False, exclude=(), preprocess=False, extra=None, method="minmax") -> bytes:
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.onnx"
        src.write_bytes(fp32)
        if preprocess:
            pre = Path(d) / "pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            src = pre
        name = onnx.load_from_string(src.read_bytes()).graph.input[0].name
        dst = Path(d) / "out.onnx"
        quantize_static(str(src), str(dst), _Reader(calib, name),
                        quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                        activation_type=types[act], weight_type=types[wt], per_channel=per_channel,
                        reduce_range=reduce_range, nodes_to_exclude=list(exclude),
                        calibrate_method={"minmax": CalibrationMethod.MinMax,
                                          "entropy": CalibrationMethod.Entropy,
                                          "percentile": CalibrationMethod.Percentile}[method],
                        extra_options=extra or {})
        return dst.read_bytes()


def node_names(model_bytes: bytes, op: str | None = None) -> list[str]:
    return [n.name for n in onnx.load_from_string(model_bytes).graph.node if op is None or n.op_type == op]


def optimized_ops(model_bytes: bytes, threads=1, level="all", disabled=()) -> dict:
    """Op histogram of the graph ORT actually runs (after its optimizers)."""
    import tempfile
    from collections import Counter
    with tempfile.TemporaryDirectory() as d:
        o = ort.SessionOptions()
        o.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                      "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
        o.intra_op_num_threads = threads
        o.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(model_bytes, o, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
        g = onnx.load(o.optimized_model_filepath).graph
        return dict(Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in g.node))
