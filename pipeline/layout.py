"""Graph rewrites that change the memory layout a model asks for, never what it computes.

`flatten_nhwc`: a CNN flattens its last feature map in NCHW order (channel-major) before the first
fully connected layer. Engines that keep int8 activations channels-last (OpenVINO's CPU plugin, ONNX
Runtime's NHWC int8 kernels) must then reorder the whole feature map back to NCHW just to flatten it:
on an AMX Xeon that reorder was ~10% of the int8 model's time at batch 256 (OpenVINO's per-layer
counters, issue 16). Flattening in NHWC order instead (a Transpose to NHWC, which such an engine
elides, since its data already is in that order) and permuting the fully connected layer's weight
columns to match computes the same products, summed in another order (fp32 differences ~1e-6).

`space_to_depth`: a strided Conv on few input channels (the first Conv of an image model: one channel
for MNIST, three for RGB) leaves most of an int8 kernel's input lanes empty, since VNNI and AMX multiply
groups of four input channels. Rewritten as SpaceToDepth(stride) + a stride-1 Conv on stride^2 times the
channels (kernel ceil(k/stride), zero-padded weights), it computes the same sums; padding that is whole
blocks becomes the new Conv's own, other padding a Pad node before the SpaceToDepth. On the AMX Xeon it
made ONNX Runtime's int8 1.3-1.4x faster at batch 256 and 1.06-1.16x at batch 1, while OpenVINO ran it
slower (its SpaceToDepth stays fp32): which engine gains is the speed check's to measure.

Imports onnx and numpy only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

NHWC = (0, 2, 3, 1)


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (graph inputs and initializers included)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _constant_ints(model: onnx.ModelProto, name: str) -> list[int] | None:
    """The value of an initializer or Constant node output, as ints; None if `name` is computed."""
    for init in model.graph.initializer:
        if init.name == name:
            return [int(v) for v in numpy_helper.to_array(init).ravel()]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return [int(v) for v in numpy_helper.to_array(attr.t).ravel()]
    return None


def _chw(model: onnx.ModelProto, name: str) -> tuple[int, int, int] | None:
    """(C, H, W) of a 4D tensor whose last three dimensions shape inference knows; None otherwise."""
    for value in (*model.graph.value_info, *model.graph.input):
        if value.name != name:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]):
            return None
        return dims[1].dim_value, dims[2].dim_value, dims[3].dim_value
    return None


def _is_flatten_to_2d(model: onnx.ModelProto, node: onnx.NodeProto, features: int) -> bool:
    """Flatten(axis=1), or Reshape to (-1 or batch, C*H*W)."""
    if node.op_type == "Flatten":
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        return axis == 1
    if node.op_type == "Reshape" and len(node.input) == 2:
        shape = _constant_ints(model, node.input[1])
        return shape is not None and len(shape) == 2 and shape[1] == features and shape[0] == -1
    return False


def _weight_column_axis(model: onnx.ModelProto, consumer: onnx.NodeProto, flat: str) -> int | None:
    """The axis of the consumer's weight that multiplies the flattened features, if it is a fully connected
    layer taking `flat` as its data input and a 2D initializer as its weight; None otherwise."""
    attrs = {a.name: a.i for a in consumer.attribute}
    if consumer.op_type == "Gemm" and consumer.input[0] == flat and not attrs.get("transA", 0):
        axis = 1 if attrs.get("transB", 0) else 0
    elif consumer.op_type == "MatMul" and consumer.input[0] == flat:
        axis = 0
    else:
        return None
    weight = next((i for i in model.graph.initializer if i.name == consumer.input[1]), None)
    return axis if weight is not None and len(weight.dims) == 2 else None


def flatten_nhwc(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every flatten of a 4D feature map whose only consumers are fully connected layers with
    their own weights, to flatten in NHWC order; returns how many were rewritten (0: the model has none)."""
    model_with_shapes = onnx.shape_inference.infer_shapes(model)
    readers = consumers(model)
    rewritten = 0
    for node in list(model.graph.node):
        chw = _chw(model_with_shapes, node.input[0]) if node.input else None
        if chw is None or chw[1] * chw[2] == 1 or not _is_flatten_to_2d(model, node, int(np.prod(chw))):
            continue
        users = readers.get(node.output[0], [])
        axes = [_weight_column_axis(model, user, node.output[0]) for user in users]
        if not users or None in axes or any(len(readers.get(u.input[1], [])) != 1 for u in users):
            continue
        for user, axis in zip(users, axes, strict=True):
            _permute_weight(model, user.input[1], axis, chw)
        nhwc = f"{node.input[0]}_nhwc"
        position = list(model.graph.node).index(node)
        model.graph.node.insert(position, onnx.helper.make_node(
            "Transpose", [node.input[0]], [nhwc], perm=list(NHWC), name=f"{node.name or node.output[0]}_to_nhwc"))
        node.input[0] = nhwc
        rewritten += 1
    return rewritten


def _permute_weight(model: onnx.ModelProto, name: str, axis: int, chw: tuple[int, int, int]) -> None:
    """Reorder the weight's C*H*W axis from (C, H, W) order to (H, W, C) order."""
    init = next(i for i in model.graph.initializer if i.name == name)
    weight = numpy_helper.to_array(init)
    moved = np.moveaxis(weight, axis, 0)  # (C*H*W, outputs)
    permuted = moved.reshape(*chw, -1).transpose(1, 2, 0, 3).reshape(moved.shape)
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.moveaxis(permuted, 0, axis)), name))


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def space_to_depth(model: onnx.ModelProto, max_channels: int = 4) -> int:
    """Rewrite, in place, every strided Conv on at most `max_channels` input channels whose weight is its own as
    SpaceToDepth + stride-1 Conv; returns how many were rewritten (0: the model has none)."""
    model_with_shapes = onnx.shape_inference.infer_shapes(model)
    readers = consumers(model)
    rewritten = 0
    for conv in [n for n in model.graph.node if n.op_type == "Conv"]:
        plan = _space_to_depth_plan(model, model_with_shapes, conv, max_channels, readers)
        if plan is not None:
            _rewrite_space_to_depth(model, conv, *plan)
            rewritten += 1
    return rewritten


def _space_to_depth_plan(model, model_with_shapes, conv, max_channels, readers):
    """(stride, pads of a Pad node before SpaceToDepth, pads of the new Conv) when the rewrite applies to `conv`
    and gives the same output size; None otherwise."""
    attrs = _attributes(conv)
    strides = list(attrs.get("strides", [1, 1]))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if (attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])) or len(strides) != 2
            or strides[0] != strides[1] or strides[0] < 2 or auto_pad not in (b"NOTSET", "NOTSET")):
        return None
    chw = _chw(model_with_shapes, conv.input[0])
    weight = next((i for i in model.graph.initializer if i.name == conv.input[1]), None)
    if chw is None or chw[0] > max_channels or weight is None or len(readers.get(conv.input[1], [])) != 1:
        return None
    stride, (kh, kw) = strides[0], weight.dims[2:]
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    height, width = chw[1] + top + bottom, chw[2] + left + right
    if not (_same_output_size(height, kh, stride) and _same_output_size(width, kw, stride)):
        return None
    pads = [top, left, bottom, right]
    if all(p % stride == 0 for p in pads) and chw[1] % stride == 0 and chw[2] % stride == 0:
        # Whole blocks of zeros (MNIST's stem: 2 pixels at stride 2): the new Conv pads them itself, no Pad node,
        # which ran 6-10% faster on ONNX Runtime than a Pad before the SpaceToDepth.
        return stride, [0, 0, 0, 0], [p // stride for p in pads]
    # Pad to whole blocks: the extra zero rows and columns meet only zero-padded weights.
    return stride, [top, left, bottom + (-height % stride), right + (-width % stride)], [0, 0, 0, 0]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _same_output_size(padded: int, kernel: int, stride: int) -> bool:
    """Whether the stride-1 Conv on whole blocks has as many outputs as the strided Conv along one axis."""
    return (padded - kernel) // stride + 1 == _ceil_div(padded, stride) - _ceil_div(kernel, stride) + 1


def _blocked_weight(weight: np.ndarray, stride: int) -> np.ndarray:
    """(O, C, kh, kw) -> (O, stride^2 * C, ceil(kh / stride), ceil(kw / stride)): the kernel zero-padded to whole
    blocks, each tap moved to the channel where SpaceToDepth puts its input: row offset dh, column offset dw and
    channel c of a block go to channel (dh * stride + dw) * C + c."""
    out, channels, kh, kw = weight.shape
    bh, bw = _ceil_div(kh, stride), _ceil_div(kw, stride)
    padded = np.zeros((out, channels, bh * stride, bw * stride), weight.dtype)
    padded[:, :, :kh, :kw] = weight
    blocked = padded.reshape(out, channels, bh, stride, bw, stride).transpose(0, 3, 5, 1, 2, 4)
    return np.ascontiguousarray(blocked.reshape(out, stride * stride * channels, bh, bw))


def _rewrite_space_to_depth(model: onnx.ModelProto, conv: onnx.NodeProto, stride: int, pads: list[int],
                            conv_pads: list[int]) -> None:
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    blocked = _blocked_weight(numpy_helper.to_array(init), stride)
    init.CopyFrom(numpy_helper.from_array(blocked, init.name))
    bh, bw = blocked.shape[2:]
    source, base = conv.input[0], conv.name or conv.output[0]
    position = list(model.graph.node).index(conv)
    if any(pads):
        pads_name = f"{base}_s2d_pads"
        top, left, bottom, right = pads
        model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, top, left, 0, 0, bottom, right], np.int64),
                                                               pads_name))
        model.graph.node.insert(position, onnx.helper.make_node("Pad", [source, pads_name], [f"{base}_s2d_padded"],
                                                                name=f"{base}_s2d_pad"))
        source, position = f"{base}_s2d_padded", position + 1
    model.graph.node.insert(position, onnx.helper.make_node("SpaceToDepth", [source], [f"{base}_s2d"], blocksize=stride,
                                                            name=f"{base}_s2d"))
    conv.input[0] = f"{base}_s2d"
    kept = [a for a in conv.attribute if a.name not in ("pads", "strides", "kernel_shape", "auto_pad")]
    del conv.attribute[:]
    conv.attribute.extend([*kept, onnx.helper.make_attribute("kernel_shape", [bh, bw]),
                           onnx.helper.make_attribute("strides", [1, 1]), onnx.helper.make_attribute("pads", conv_pads)])
