"""Layout rewrites (`pipeline.layout`) and the int8 options built on them: the same outputs, another layout.

Structural: small hand-built graphs run through ONNX Runtime; nothing is timed here (issue 16's speed
numbers are in `make bench`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline import layout, quantize
from pipeline.config import QuantizeConfig

C, H, W, OUT = 3, 4, 5, 6


def conv_fc_model(flatten: str = "reshape", fc: str = "gemm", trans_b: int = 1, shared_weight: bool = False) -> onnx.ModelProto:
    """input (N, 2, H, W) -> Conv (C channels) -> Relu -> flatten -> fully connected (OUT): a CNN's tail."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(C, 2, 3, 3)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.normal(size=C).astype(np.float32), "conv_b")]
    nodes = [helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu")]
    if flatten == "reshape":
        inits.append(numpy_helper.from_array(np.array([-1, C * H * W], dtype=np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["relu", "shape"], ["flat"], name="flatten"))
    else:
        nodes.append(helper.make_node("Flatten", ["relu"], ["flat"], axis=1, name="flatten"))
    weight = rng.normal(size=(OUT, C * H * W)).astype(np.float32)
    if fc == "gemm":
        inits.append(numpy_helper.from_array(weight if trans_b else weight.T.copy(), "fc_w"))
        nodes.append(helper.make_node("Gemm", ["flat", "fc_w"], ["fc"], transB=trans_b, name="fc"))
    else:
        inits.append(numpy_helper.from_array(weight.T.copy(), "fc_w"))
        nodes.append(helper.make_node("MatMul", ["flat", "fc_w"], ["fc"], name="fc"))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", OUT])]
    nodes.append(helper.make_node("Identity", ["fc"], ["logits"], name="out"))
    if shared_weight:  # the same weight feeds a second consumer: permuting it would change that one too
        nodes.append(helper.make_node("Identity", ["fc_w"], ["weight_copy"], name="copy"))
        outputs.append(helper.make_tensor_value_info("weight_copy", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, H, W])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The model's `logits` output under ONNX Runtime (both test graphs name their output so)."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]


X = np.random.default_rng(1).normal(size=(4, 2, H, W)).astype(np.float32)


@pytest.mark.parametrize("flatten, fc, trans_b", [("reshape", "gemm", 1), ("reshape", "gemm", 0),
                                                   ("flatten", "gemm", 1), ("reshape", "matmul", 0)])
def test_flatten_nhwc_computes_the_same_logits(flatten, fc, trans_b):
    model = conv_fc_model(flatten, fc, trans_b)
    before = logits(model, X)
    assert layout.flatten_nhwc(model) == 1
    onnx.checker.check_model(model)
    transpose = [n for n in model.graph.node if n.op_type == "Transpose"]
    assert len(transpose) == 1 and list(transpose[0].attribute[0].ints) == [0, 2, 3, 1]
    assert np.abs(logits(model, X) - before).max() < 1e-4


def test_flatten_nhwc_without_permuted_weights_changes_the_logits(monkeypatch):
    # Negative control: the Transpose alone reorders the features, so the equality above rests on the permutation.
    model = conv_fc_model()
    before = logits(model, X)
    monkeypatch.setattr(layout, "_permute_weight", lambda *args: None)
    assert layout.flatten_nhwc(model) == 1
    assert np.abs(logits(model, X) - before).max() > 1e-2


def test_flatten_nhwc_leaves_a_shared_weight_and_a_non_4d_input_alone():
    shared = conv_fc_model(shared_weight=True)
    assert layout.flatten_nhwc(shared) == 0
    assert not [n for n in shared.graph.node if n.op_type == "Transpose"]
    flat_input = helper.make_model(helper.make_graph(
        [helper.make_node("Gemm", ["input", "w"], ["logits"], transB=1)], "fc",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.ones((2, 8), np.float32), "w")]), opset_imports=[helper.make_opsetid("", 17)])
    assert layout.flatten_nhwc(flat_input) == 0


def strided_conv_model(channels: int, size: int, kernel: int, stride: int, pads: list[int]) -> onnx.ModelProto:
    """input (N, channels, size, size) -> Conv (8 outputs, strided) -> logits."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(8, channels, kernel, kernel)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b")]
    node = helper.make_node("Conv", ["input", "w", "b"], ["logits"], strides=[stride, stride], pads=pads,
                            kernel_shape=[kernel, kernel], name="stem")
    graph = helper.make_graph([node], "stem", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8, "H", "W"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# MNIST's stem (28x28, 5x5, stride 2, pad 2), an RGB stem (3x3 stride 2 pad 1 on an odd size: padded to whole
# blocks), and a stride-3 kernel that is not a multiple of the stride.
@pytest.mark.parametrize("channels, size, kernel, stride, pads", [(1, 28, 5, 2, [2, 2, 2, 2]), (3, 15, 3, 2, [1, 1, 1, 1]),
                                                                   (2, 12, 4, 3, [0, 0, 0, 0])])
def test_space_to_depth_computes_the_same_outputs(channels, size, kernel, stride, pads):
    model = strided_conv_model(channels, size, kernel, stride, pads)
    x = np.random.default_rng(4).normal(size=(2, channels, size, size)).astype(np.float32)
    before = logits(model, x)
    assert layout.space_to_depth(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "SpaceToDepth" in ops
    # Padding in whole blocks (MNIST's stem) moves into the new Conv; otherwise a Pad node comes first.
    assert ("Pad" in ops) == (any(p % stride for p in pads) or size % stride != 0)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert list(next(a for a in conv.attribute if a.name == "strides").ints) == [1, 1]
    after = logits(model, x)
    assert after.shape == before.shape and np.abs(after - before).max() < 1e-4


def test_space_to_depth_without_reordered_weights_changes_the_outputs(monkeypatch):
    # Negative control: zero-padding the kernel without moving taps to SpaceToDepth's channel order is wrong,
    # so the equality above rests on that reordering.
    model = strided_conv_model(1, 28, 5, 2, [2, 2, 2, 2])
    x = np.random.default_rng(4).normal(size=(2, 1, 28, 28)).astype(np.float32)
    before = logits(model, x)

    def padded_only(weight, stride):  # the right shape, the taps left in kernel order
        out, channels, kh, kw = weight.shape
        blocks = -(-kh // stride)
        padded = np.zeros((out, channels, blocks * stride, blocks * stride), weight.dtype)
        padded[:, :, :kh, :kw] = weight
        return np.ascontiguousarray(padded.reshape(out, stride * stride * channels, blocks, blocks))

    monkeypatch.setattr(layout, "_blocked_weight", padded_only)
    assert layout.space_to_depth(model) == 1
    assert np.abs(logits(model, x) - before).max() > 1e-2


def test_space_to_depth_leaves_wide_and_unstrided_convs_alone():
    assert layout.space_to_depth(strided_conv_model(8, 16, 3, 2, [1, 1, 1, 1])) == 0  # 8 channels fill the lanes
    assert layout.space_to_depth(strided_conv_model(1, 16, 3, 1, [1, 1, 1, 1])) == 0  # stride 1: nothing to fold
    assert layout.space_to_depth(strided_conv_model(1, 16, 3, 2, [1, 1, 1, 1]), max_channels=0) == 0


def quantized(tmp_path, model: onnx.ModelProto, config: QuantizeConfig) -> onnx.ModelProto:
    source = tmp_path / "fp32.onnx"
    onnx.save(model, str(source))
    prepared = quantize.prepare(source, tmp_path / "prepared.onnx", config.pre_process)
    quantize.rewrite_layout(prepared, config)
    calibration = np.random.default_rng(2).normal(size=(16, 2, H, W)).astype(np.float32)
    out = quantize.quantize_model(prepared, tmp_path / "int8.onnx", config, calibration, ())
    return onnx.load(str(out))


def input_zero_point(model: onnx.ModelProto) -> np.ndarray:
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == q.input[2]))


def test_signed_input_quantizes_the_input_symmetric_int8_and_other_activations_as_configured(tmp_path):
    signed = quantized(tmp_path, conv_fc_model(), QuantizeConfig(signed_input=True, flatten_nhwc=True))
    zero_point = input_zero_point(signed)
    assert zero_point.dtype == np.int8 and int(zero_point) == 0
    relu_q = next(n for n in signed.graph.node if n.op_type == "QuantizeLinear" and n.input[0] != "input")
    assert numpy_helper.to_array(next(i for i in signed.graph.initializer if i.name == relu_q.input[2])).dtype == np.uint8
    assert [n for n in signed.graph.node if n.op_type == "Transpose"]
    # Negative control: without the option the input is an ordinary uint8 activation.
    plain = input_zero_point(quantized(tmp_path, conv_fc_model(), QuantizeConfig()))
    assert plain.dtype == np.uint8


def test_flatten_nhwc_on_a_model_without_a_flatten_is_a_one_line_error(tmp_path):
    conv_only = conv_fc_model()
    del conv_only.graph.node[2:]
    conv_only.graph.output[0].CopyFrom(helper.make_tensor_value_info("relu", TensorProto.FLOAT, None))
    path = tmp_path / "conv.onnx"
    onnx.save(conv_only, str(path))
    with pytest.raises(quantize.QuantizeError, match="no flatten of a 4D feature map"):
        quantize.rewrite_layout(path, QuantizeConfig(flatten_nhwc=True))
    with pytest.raises(quantize.QuantizeError, match="no strided Conv"):  # its Conv has stride 1
        quantize.rewrite_layout(path, QuantizeConfig(space_to_depth=True))


def test_signed_input_needs_static_qdq():
    with pytest.raises(ValueError, match="signed input"):
        QuantizeConfig(signed_input=True, format="qoperator")
