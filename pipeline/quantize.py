"""fp32 ONNX -> int8 (static or dynamic) and fp16 variants, and the gate that refuses bad ones.

The int8 recipe is onnxruntime.quantization's: `quant_pre_process`, then `quantize_static`
with a calibration reader over training images (or `quantize_dynamic`). Every candidate is
written to a temporary folder and judged through ONNX Runtime on the VALIDATION split:
accuracy against the fp32 file's accuracy, and agreement with the fp32 predictions. Only a
candidate that passes is copied (atomically) to the target path; a failing one is never written
there. The gates here never see the test split: the workflow measures test accuracy once, on the
file chosen, after every choice is made (`score`), so the reported number was not selected on.

When the gate fails, the nodes are ranked by how much their own quantization hurts (the
signal-to-quantization-noise ratio of their weights and activations, measured with
`onnxruntime.quantization.qdq_loss_debug` on training images) and the worst ones are kept in
fp32, one at a time, up to `QuantizeConfig.max_excluded_nodes`; then `AccuracyGateError`.

Imports no torch. The workflow (`workflow.quantize_run`) records the results in the manifest.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from pipeline import artifacts, layout, metrics, onnxfile, runtime
from pipeline.config import Fp16Config, QuantizeConfig, to_dict
from pipeline.errors import PipelineError
from pipeline.timing import SETTLE_SECONDS, Slot, TimingPlan, paired_ratio, summarize, time_interleaved

log = logging.getLogger(__name__)

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
MATMUL_OPS = ("Gemm", "MatMul")
# Dynamic int8 quantizes only MatMul by default (quant_pre_process turns Gemm into MatMul + Add):
# ConvInteger, what it would make of Conv, runs several times slower than fp32 Conv on x86 CPUs.
DYNAMIC_OPS = ("MatMul",)
# Ops whose quantized form in QOperator format replaces the float op.
QOPERATOR_CONV = ("QLinearConv", "ConvInteger")


class QuantizeError(PipelineError):
    """onnxruntime.quantization failed, or the model cannot be quantized as configured."""

    exit_code = 11


class AccuracyGateError(QuantizeError):
    """The int8 model lost more accuracy than allowed, even with its most sensitive nodes in fp32."""

    exit_code = 12

    def __init__(self, message: str, fp32_accuracy: float, accuracy: float, drop_points: float,
                 agreement: float, excluded: tuple[str, ...]) -> None:
        super().__init__(message)
        self.fp32_accuracy = fp32_accuracy
        self.accuracy = accuracy
        self.drop_points = drop_points
        self.agreement = agreement
        self.excluded = excluded


class Fp16Error(QuantizeError):
    """The fp16 model's logits or accuracy are too far from the fp32 model's."""


# --- calibration -----------------------------------------------------------------------------


def sample_images(x: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` images of `x` (all if fewer) drawn without replacement by `seed`, in a fixed order."""
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(x), size=min(count, len(x)), replace=False))
    return np.ascontiguousarray(x[index], dtype=np.float32)


class CalibrationReader(CalibrationDataReader):
    """Feeds preprocessed images (N, C, H, W) to onnxruntime's calibrators in fixed-size batches."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int) -> None:
        if images.ndim != 4 or len(images) == 0:
            raise QuantizeError(f"calibration needs a non-empty N x C x H x W array, got shape {images.shape}")
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.input_name = input_name
        self.batch = batch
        self.position = 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.images):
            return None
        chunk = self.images[self.position:self.position + self.batch]
        self.position += self.batch
        return {self.input_name: chunk}

    def rewind(self) -> None:
        self.position = 0


# --- building one candidate ----------------------------------------------------------------


def prepare(fp32_path: Path, out_path: Path, enabled: bool) -> Path:
    """`quant_pre_process` (shape inference + ORT's basic graph optimization), or a plain copy when disabled."""
    if not enabled:
        shutil.copyfile(fp32_path, out_path)
        return out_path
    try:
        quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=False)
    except Exception as exc:  # shape inference and the optimizer raise many types
        raise QuantizeError(f"quant_pre_process failed on {fp32_path} ({type(exc).__name__}): {_first_line(exc)}") from None
    return out_path


# Ops between a Conv and its pool that change values one by one (the layout and the map size stay).
_ELEMENTWISE = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh")


def feeds_max_pool(model: onnx.ModelProto, conv_name: str) -> bool:
    """Whether the Conv's output reaches a MaxPool through elementwise ops alone (conv -> ReLU -> pool)."""
    readers = layout.consumers(model)
    node = next(n for n in model.graph.node if n.name == conv_name)
    while True:
        following = readers.get(node.output[0], [])
        if len(following) != 1:
            return False
        node = following[0]
        if node.op_type == "MaxPool":
            return True
        if node.op_type not in _ELEMENTWISE:
            return False


def base_exclusions(model: onnx.ModelProto, config: QuantizeConfig) -> tuple[str, ...]:
    """The node names kept in fp32 by configuration, checked against the graph."""
    names = [node.name for node in model.graph.node]
    unknown = [name for name in config.nodes_to_exclude if name not in names]
    if unknown:
        raise QuantizeError(f"nodes to exclude not in the model: {', '.join(unknown)} (its nodes: {', '.join(names[:20])})")
    excluded = list(config.nodes_to_exclude)
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    matmuls = [node.name for node in model.graph.node if node.op_type in MATMUL_OPS]
    keep_first = config.keep_first_conv_fp32
    if keep_first is None:  # graph.node is topologically sorted (ONNX requires it): convs[0] is the first
        keep_first = bool(convs) and feeds_max_pool(model, convs[0])
    if keep_first and convs:
        excluded.append(convs[0])
    if config.keep_last_layer_fp32 and matmuls:
        excluded.append(matmuls[-1])
    return tuple(dict.fromkeys(excluded))


LAYOUT_REWRITES = (
    ("space_to_depth", layout.space_to_depth, "no strided Conv on at most 4 input channels with its own weight"),
    ("flatten_nhwc", layout.flatten_nhwc, "no flatten of a 4D feature map feeds a fully connected layer"),
)


def rewrite_layout(prepared: Path, config: QuantizeConfig) -> None:
    """The prepared model, in place, with the layout rewrites `config` asks for (`pipeline.layout`). One with
    nothing to rewrite in this model is a `QuantizeError`: the recipe is reported as not applicable, not built
    as a copy of another."""
    wanted = [(name, rewrite, missing) for name, rewrite, missing in LAYOUT_REWRITES if getattr(config, name)]
    if not wanted:
        return
    model = onnx.load(str(prepared))
    for name, rewrite, missing in wanted:
        if not rewrite(model):
            raise QuantizeError(f"{name}: {missing} in this model")
    onnx.save_model(model, str(prepared))


def quantize_model(prepared: Path, out_path: Path, config: QuantizeConfig, calibration: np.ndarray | None,
                   exclude: Sequence[str], static_format: str | None = None) -> Path:
    """One int8 candidate of the prepared model at `out_path` (any folder; not judged here).

    `static_format` forces a static model of that format (the sensitivity twin is always QDQ).
    """
    mode = "static" if static_format else config.mode
    extra = dict(config.extra_options)
    if config.method == "percentile":
        extra.setdefault("CalibPercentile", config.percentile)
    op_types = list(config.op_types) or (list(DYNAMIC_OPS) if mode == "dynamic" else None)
    try:
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(out_path), op_types_to_quantize=op_types, per_channel=config.per_channel,
                             reduce_range=config.reduce_range, weight_type=TYPES[config.weight_type],
                             nodes_to_exclude=list(exclude), extra_options=extra)
        else:
            if calibration is None:
                raise QuantizeError("static quantization needs calibration images")
            input_name = onnxfile.io_signature(onnx.load(str(prepared)))["inputs"][0]["name"]
            if config.signed_input:
                extra["TensorQuantOverrides"] = {**extra.get("TensorQuantOverrides", {}),
                                                 input_name: [{"quant_type": QuantType.QInt8, "symmetric": True}]}
            quantize_static(str(prepared), str(out_path), CalibrationReader(calibration, input_name, config.calibration_batch),
                            quant_format=FORMATS[static_format or config.format], op_types_to_quantize=op_types,
                            per_channel=config.per_channel, reduce_range=config.reduce_range,
                            activation_type=TYPES[config.activation_type], weight_type=TYPES[config.weight_type],
                            nodes_to_exclude=list(exclude), calibrate_method=METHODS[config.method], extra_options=extra)
    except QuantizeError:
        raise
    except Exception as exc:
        raise QuantizeError(f"onnxruntime.quantization ({mode}) failed ({type(exc).__name__}): {_first_line(exc)}") from None
    return out_path


def _finish(candidate: Path, fp32_path: Path, config: QuantizeConfig, excluded: Sequence[str]) -> None:
    """Carry the fp32 file's metadata over (labels, preprocessing) and say how the file was made."""
    model = onnx.load(str(candidate))
    source = onnx.load(str(fp32_path))
    meta = {p.key: p.value for p in source.metadata_props}
    meta.update({p.key: p.value for p in model.metadata_props})
    meta["pipeline.variant"] = config.artifact
    meta["pipeline.quantization"] = (f"{config.mode} {config.format if config.mode == 'static' else ''} "
                                     f"{config.method} a={config.activation_type} w={config.weight_type} "
                                     f"per_channel={config.per_channel} space_to_depth={config.space_to_depth} "
                                     f"flatten_nhwc={config.flatten_nhwc} signed_input={config.signed_input} "
                                     f"excluded={','.join(excluded) or '-'}").replace("  ", " ")
    del model.metadata_props[:]
    for key in sorted(meta):
        model.metadata_props.add(key=key, value=meta[key])
    onnx.save_model(model, str(candidate), save_as_external_data=False)


# --- judging ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """A model's predictions on one split, against its labels and the fp32 predictions."""

    accuracy: float
    agreement: float
    predictions: np.ndarray = field(repr=False)


def score(path: Path, runtime_settings: dict, x: np.ndarray, y: np.ndarray, reference: np.ndarray | None,
          provider: str = "cpu") -> tuple[Score, np.ndarray]:
    """(Score, logits) of the model at `path`, run as the manifest says (`runtime_settings`)."""
    session = runtime.create_session(Path(path), runtime_settings, provider=provider)
    logits = runtime.run_batched(session, x)
    predictions = logits.argmax(1)
    agreement = float(np.mean(predictions == reference)) if reference is not None else 1.0
    return Score(float(np.mean(predictions == y)), agreement, predictions), logits


@dataclass(frozen=True)
class Attempt:
    """One candidate the gate judged."""

    excluded: tuple[str, ...]
    accuracy: float
    agreement: float
    drop_points: float
    passed: bool
    worst_class: dict | None = None
    """The gated class whose validation recall dropped most ({label, support, reference_recall, recall, drop_points})."""

    def to_dict(self) -> dict:
        return {"excluded": list(self.excluded), "accuracy": self.accuracy, "agreement": self.agreement,
                "drop_points": round(self.drop_points, 4), "passed": self.passed, "worst_class": self.worst_class}


@dataclass(frozen=True)
class NodeSensitivity:
    """How much a node's own quantization hurts: the lowest SQNR (dB) of its quantized weights and activations."""

    node: str
    op_type: str
    sqnr_db: float

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "sqnr_db": round(self.sqnr_db, 2)}


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize_gated` wrote and every number behind the decision."""

    path: Path
    config: QuantizeConfig
    fp32_accuracy: float
    accuracy: float
    agreement: float
    drop_points: float
    excluded: tuple[str, ...]
    attempts: tuple[Attempt, ...]
    sensitivity: tuple[NodeSensitivity, ...]
    structure: dict
    runtime: dict
    class_drops: tuple[dict, ...] = ()
    """Validation recall drop of every gated class of the shipped candidate, largest first."""

    def gate_dict(self) -> dict:
        return {"passed": True, "split": "validation", "fp32_accuracy": self.fp32_accuracy, "accuracy": self.accuracy,
                "drop_points": round(self.drop_points, 4), "max_accuracy_drop": self.config.max_accuracy_drop,
                "max_class_recall_drop": self.config.max_class_recall_drop,
                "class_min_support": self.config.class_min_support, "class_recall_drops": list(self.class_drops),
                "agreement": self.agreement, "min_agreement": self.config.min_agreement,
                "excluded_nodes": list(self.excluded), "attempts": [a.to_dict() for a in self.attempts],
                "sensitivity": [s.to_dict() for s in self.sensitivity]}


def runtime_settings(config: QuantizeConfig) -> dict:
    """The ORT session settings every consumer of this int8 file must apply (the artifact's `runtime`)."""
    return {"graph_optimization_level": config.graph_optimization_level,
            "disabled_optimizers": list(config.disabled_optimizers)}


def _passes(candidate: Score, fp32: Score, config: QuantizeConfig, y: np.ndarray,
            labels: Sequence[str] | None) -> tuple[bool, float, list[dict]]:
    """(passed, overall drop in points, per-class recall drops of the gated classes, largest first)."""
    drop = 100.0 * (fp32.accuracy - candidate.accuracy)
    # A tiny epsilon: accuracies are ratios of counts, and 0.5 points must pass at exactly 0.5.
    ok = drop <= config.max_accuracy_drop + 1e-9
    if config.min_agreement is not None:
        ok = ok and candidate.agreement >= config.min_agreement
    class_drops = metrics.worst_recall_drop(y, fp32.predictions, candidate.predictions, labels, config.class_min_support)
    ok = ok and _class_gate_passes(class_drops, config.max_class_recall_drop)
    return ok, drop, class_drops


def _class_gate_passes(class_drops: list[dict], max_drop: float) -> bool:
    return not class_drops or class_drops[0]["drop_points"] <= max_drop + 1e-9


def _class_failure(class_drops: list[dict], max_drop: float) -> str:
    """'' when every gated class is within `max_drop`, else the classes beyond it, in one phrase."""
    beyond = [d for d in class_drops if d["drop_points"] > max_drop + 1e-9]
    return "; ".join(f"class {d['label']!r} validation recall {100 * d['recall']:.2f}% vs fp32 "
                     f"{100 * d['reference_recall']:.2f}% ({d['support']} images): drop {d['drop_points']:.2f} points "
                     f"exceeds --max-class-recall-drop {max_drop:.2f}" for d in beyond)


def quantize_gated(fp32_path: Path, out_path: Path, config: QuantizeConfig, calibration: np.ndarray | None,
                   probe: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, fp32_runtime: dict | None = None,
                   labels: Sequence[str] | None = None) -> QuantizeResult:
    """Quantize `fp32_path`, judge it on the validation split, exclude sensitive nodes if needed; write `out_path` only on a pass.

    `calibration`: preprocessed images for the static ranges. `probe`: preprocessed training images
    on which per-node sensitivity is measured (apart from `calibration`, so a bad calibration set
    cannot hide its own damage). `x_val`, `y_val`: the validation split, the only data any choice
    here reads; the accuracies in the result are validation accuracies. Besides the overall drop,
    no class with enough validation images may lose more recall than `max_class_recall_drop`
    (`labels` name the classes in the error).
    """
    settings = runtime_settings(config)
    fp32, _ = score(fp32_path, fp32_runtime or {}, x_val, y_val, None)
    with tempfile.TemporaryDirectory(prefix="pipeline-quantize-") as tmp:
        work = Path(tmp)
        prepared = prepare(fp32_path, work / "prepared.onnx", config.pre_process)
        rewrite_layout(prepared, config)
        prepared_model = onnx.load(str(prepared))
        excluded = list(base_exclusions(prepared_model, config))
        fixed = len(excluded)
        attempts: list[Attempt] = []
        ranking: list[NodeSensitivity] = []
        while True:
            candidate = work / f"candidate-{len(attempts)}.onnx"
            quantize_model(prepared, candidate, config, calibration, excluded)
            _finish(candidate, fp32_path, config, excluded)
            result, _ = score(candidate, settings, x_val, y_val, fp32.predictions)
            ok, drop, class_drops = _passes(result, fp32, config, y_val, labels)
            attempts.append(Attempt(tuple(excluded), result.accuracy, result.agreement, drop, ok,
                                    class_drops[0] if class_drops else None))
            log.info("int8 candidate %d: accuracy %.4f (fp32 %.4f, drop %.2f points), agreement %.4f, excluded %s",
                     len(attempts), result.accuracy, fp32.accuracy, drop, result.agreement, excluded or "-")
            if ok:
                break
            if len(excluded) - fixed >= config.max_excluded_nodes:
                raise _gate_error(fp32, result, drop, excluded, config, attempts, class_drops)
            if not ranking:
                ranking = node_sensitivity(prepared, work, config, calibration, probe, excluded)
            remaining = [s for s in ranking if s.node not in excluded]
            if not remaining:
                raise _gate_error(fp32, result, drop, excluded, config, attempts, class_drops)
            excluded.append(remaining[0].node)
        structure = structure_report(onnx.load(str(candidate)), prepared_model, excluded)
        artifacts.atomic_write_bytes(Path(out_path), candidate.read_bytes())
    return QuantizeResult(Path(out_path), config, fp32.accuracy, result.accuracy, result.agreement, drop,
                          tuple(excluded), tuple(attempts), tuple(ranking), structure, settings, tuple(class_drops))


def _gate_error(fp32: Score, result: Score, drop: float, excluded: Sequence[str], config: QuantizeConfig,
                attempts: Sequence[Attempt], class_drops: list[dict]) -> AccuracyGateError:
    agreement = "" if config.min_agreement is None else f" (min {100 * config.min_agreement:.2f}%)"
    tried = f" after keeping {len(excluded)} node(s) in fp32 ({', '.join(excluded)})" if excluded else ""
    verdict = "exceeds" if drop > config.max_accuracy_drop + 1e-9 else "is within"
    classes = _class_failure(class_drops, config.max_class_recall_drop)
    return AccuracyGateError(
        f"int8 ({config.artifact}) validation accuracy {100 * result.accuracy:.2f}% vs fp32 {100 * fp32.accuracy:.2f}%: "
        f"drop {drop:.2f} points {verdict} --max-accuracy-drop {config.max_accuracy_drop:.2f}"
        + (f"; {classes}" if classes else "") + f"{tried}; "
        f"agreement with fp32 {100 * result.agreement:.2f}%{agreement}; {len(attempts)} candidate(s) tried, none written",
        fp32.accuracy, result.accuracy, drop, result.agreement, tuple(excluded))


# --- per-node sensitivity ------------------------------------------------------------------


def node_sensitivity(prepared: Path, work: Path, config: QuantizeConfig, calibration: np.ndarray | None,
                     probe: np.ndarray, excluded: Sequence[str]) -> list[NodeSensitivity]:
    """Quantizable nodes, most sensitive first, measured on a static QDQ twin of the configured recipe.

    The twin is QDQ whatever the target format, because qdq_loss_debug reads Q/DQ pairs; for a
    dynamic recipe it is calibrated on `probe` (a static proxy of the same weights and types).
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        compute_weight_error,
        create_activation_matching,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )

    twin = work / "twin.qdq.onnx"
    twin_calibration = calibration if config.mode == "static" and calibration is not None else probe
    quantize_model(prepared, twin, config, twin_calibration, excluded, static_format="qdq")
    float_aug, twin_aug = work / "float.debug.onnx", work / "twin.debug.onnx"
    modify_model_output_intermediate_tensors(str(prepared), str(float_aug))
    modify_model_output_intermediate_tensors(str(twin), str(twin_aug))
    input_name = onnxfile.io_signature(onnx.load(str(prepared)))["inputs"][0]["name"]
    float_acts = collect_activations(str(float_aug), CalibrationReader(probe, input_name, config.calibration_batch))
    twin_acts = collect_activations(str(twin_aug), CalibrationReader(probe, input_name, config.calibration_batch))
    activation_sqnr = {name: err["qdq_err"] for name, err in
                       compute_activation_error(create_activation_matching(twin_acts, float_acts)).items()}
    weight_sqnr = compute_weight_error(create_weight_matching(str(prepared), str(twin)))
    quantized = _quantized_node_names(onnx.load(str(twin)))
    ranking = []
    for node in onnx.load(str(prepared)).graph.node:
        weights = [weight_sqnr[t] for t in node.input if t in weight_sqnr]
        # Only nodes with quantized weights (Conv, Gemm, MatMul) are candidates: keeping a
        # MaxPool or Reshape in fp32 removes no quantization noise, its neighbours' Q/DQ stay.
        if node.name not in quantized or node.name in excluded or not weights:
            continue
        activations = [activation_sqnr[t] for t in (*node.input, *node.output) if t in activation_sqnr]
        ranking.append(NodeSensitivity(node.name, node.op_type, float(min(weights + activations))))
    ranking.sort(key=lambda s: (s.sqnr_db, s.node))
    log.info("per-node sensitivity (SQNR dB, worst first): %s",
             ", ".join(f"{s.node}={s.sqnr_db:.1f}" for s in ranking))
    return ranking


def _quantized_node_names(qdq_model: onnx.ModelProto) -> set[str]:
    """Float nodes of a QDQ model that read at least one DequantizeLinear output."""
    dq_outputs = {out for node in qdq_model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return {node.name for node in qdq_model.graph.node
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_outputs for i in node.input)}


# --- structure -------------------------------------------------------------------------------


def conv_coverage(model: onnx.ModelProto) -> tuple[int, int]:
    """(quantized, total) Convs: a QLinearConv/ConvInteger, or a Conv whose data and weight inputs come from DequantizeLinear."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    quantized = total = 0
    for node in model.graph.node:
        if node.op_type in QOPERATOR_CONV:
            quantized += 1
            total += 1
        elif node.op_type == "Conv":
            total += 1
            if all(producers.get(name) == "DequantizeLinear" for name in node.input[:2]):
                quantized += 1
    return quantized, total


def structure_report(model: onnx.ModelProto, prepared: onnx.ModelProto, excluded: Sequence[str]) -> dict:
    quantized, total = conv_coverage(model)
    return {"op_histogram": onnxfile.op_histogram(model), "prepared_op_histogram": onnxfile.op_histogram(prepared),
            "quantized_convs": quantized, "convs": total, "fp32_nodes_kept": list(excluded)}


# --- speed -----------------------------------------------------------------------------------


def speed_check(models: dict[str, tuple[Path, dict]], x: np.ndarray, config: QuantizeConfig,
                other_engines: dict | None = None) -> dict:
    """p50 latency of each model at batch 1 and `config.speed_batch`, through the one timing harness.

    `models` maps a name ("fp32" first) to (path, runtime settings), run by ONNX Runtime.
    `other_engines` maps "<name>@<engine>" to a target of another engine (`engines.OpenVinoTarget`,
    already through its agreement check), timed in the same groups. Every batch size is one
    `time_interleaved` call over all of them (rounds interleaved, order reversed on odd rounds), then a
    final call over fp32 and the `FINALISTS` fastest. Every latency is stated as its ratio to fp32 (from the
    final for the finalists, else from the first call; the median of the per-round ratios, `paired_ratio`)
    times fp32's p50 in the final, so that all of one batch size share one fp32 baseline.
    Returns {"batch_1": {"fp32_ms": ..., "<name>_ms": ..., "<name>_ratio": ..., "finalists": [...]}, ...}.
    """
    base = next(iter(models))
    plan = speed_plan(config)
    result: dict = {"threads": config.threads, "rounds": config.speed_rounds, "seconds_per_round": config.speed_seconds}
    for batch in (1, config.speed_batch):
        threads = speed_threads(config, batch)
        # The first images, repeated to fill the batch (x may be lazy: read only what is used).
        inputs = np.ascontiguousarray(x[np.arange(batch) % len(x)], dtype=np.float32)
        slots = {name: runtime.session_slot(runtime.create_session(Path(path), settings, threads=threads), inputs)
                 for name, (path, settings) in models.items()}
        slots.update({key: target.open("cpu", batch, threads, None, inputs)
                      for key, target in (other_engines or {}).items()})
        time_interleaved(list(slots.values()), plan)
        ratios = {name: paired_ratio(slot, slots[base]) for name, slot in slots.items()}
        # The final: the fastest few again, head to head with fp32. With FINALISTS + 1 slots instead of all of
        # them, each round is over in a fraction of the time, so drifts of the host's load hit them alike, and
        # the choice among near-equal files is made on these numbers.
        finalists = sorted((name for name in slots if name != base), key=ratios.get)[:FINALISTS]
        final = {name: Slot(run=slots[name].run) for name in (base, *finalists)}
        time_interleaved(list(final.values()), plan)
        ratios.update({name: paired_ratio(slot, final[base]) for name, slot in final.items()})
        fp32_ms = summarize(final[base].latencies_ns, batch)["latency_ms"]["p50"]
        entry = {f"{name}_ms": round(ratios[name] * fp32_ms, 4) for name in slots}
        entry.update({f"{name}_ratio": round(ratios[name], 3) for name in slots if name != base})
        entry["runs"] = {name: len(slot.latencies_ns) + (len(final[name].latencies_ns) if name in final else 0)
                         for name, slot in slots.items()}
        entry["threads"] = threads
        entry["finalists"] = finalists
        result[f"batch_{batch}"] = entry
    return result


def speed_threads(config: QuantizeConfig, batch: int) -> int:
    """Intra-op threads of the speed check at `batch`: `config.threads`, else 1 at batch 1 and every usable core
    above. One image of a small CNN gains nothing from a second thread (the hand-off costs what it saves, and
    the pool's spinning takes a core from whatever runs next); a large batch splits across cores."""
    from pipeline.device_runner import usable_cores

    if config.threads is not None:
        return config.threads
    return 1 if batch == 1 else usable_cores()


FINALISTS = 3
"""Per batch size, the fastest models of the speed check's first call that are timed again against fp32."""


def speed_plan(config: QuantizeConfig) -> TimingPlan:
    """The harness plan of the export's speed check: `speed_rounds` rounds of `speed_seconds` per model."""
    return TimingPlan(warmup=2, warmup_seconds=max(config.speed_seconds, 0.1), duration=config.speed_seconds * config.speed_rounds,
                      rounds=config.speed_rounds, time_limit=max(20.0, 2 * config.speed_seconds * config.speed_rounds),
                      settle_seconds=SETTLE_SECONDS)


def speed_alias(speed: dict, name: str, alias: str) -> dict:
    """`speed` with `name`'s latencies and ratios (under every engine: `name`, `name@engine`) also under `alias`."""
    out = {}
    for key, entry in speed.items():
        if key.startswith("batch_"):
            entry = dict(entry)
            for field_name in list(entry):
                base, _, suffix = field_name.rpartition("_")
                if suffix in ("ms", "ratio") and (base == name or base.startswith(name + "@")):
                    entry[f"{alias}{base[len(name):]}_{suffix}"] = entry[field_name]
            entry["runs"] = {**entry.get("runs", {}), alias: entry.get("runs", {}).get(name)}
        out[key] = entry
    return out


def slower_batches(speed: dict, name: str, tolerance: float) -> list[tuple[str, float]]:
    """The batches at which `name` is slower than the baseline by more than `tolerance`, with the ratio."""
    return [(key, entry[f"{name}_ratio"]) for key, entry in speed.items()
            if key.startswith("batch_") and entry.get(f"{name}_ratio", 0.0) > 1.0 + tolerance]


# --- recipes searched, not fixed ---------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """An int8 recipe: changes to the configured `QuantizeConfig`, and why it is worth trying."""

    name: str
    overrides: dict
    why: str


# Which recipe is fastest depends on the host's int8 kernels and the model (tools/perf_lab/NOTES.md):
# none wins everywhere, so each export times them on its own host and ships the fastest that passes.
RECIPES = {r.name: r for r in (
    Recipe("default", {}, "the configured recipe (by default U8S8 QDQ per-tensor, QDQ propagation off)"),
    Recipe("ort-defaults", {"format": "qdq", "activation_type": "int8", "weight_type": "int8", "per_channel": False,
                            "reduce_range": False, "method": "minmax", "op_types": (), "nodes_to_exclude": (),
                            "keep_first_conv_fp32": False, "keep_last_layer_fp32": False, "pre_process": True,
                            "flatten_nhwc": False, "signed_input": False, "space_to_depth": False,
                            "extra_options": {}, "graph_optimization_level": "all", "disabled_optimizers": ()},
           "onnxruntime.quantization.quantize_static with its defaults after quant_pre_process (S8S8 QDQ): "
           "what a user gets without the pipeline, so the shipped int8 is never slower than it"),
    Recipe("per-channel", {"per_channel": True}, "per-channel weight scales (accuracy headroom; other kernels)"),
    Recipe("qoperator-u8s8", {"format": "qoperator", "activation_type": "uint8", "weight_type": "int8"},
           "QOperator format: QLinearConv/QGemm nodes instead of Q/DQ pairs around float ops"),
    Recipe("float-gemm-outputs", {"extra_options": {"OpTypesToExcludeOutputQuantization": ["Gemm"]}},
           "profiles: requantizing the Gemm outputs (the logits) costs more than it saves at batch 1"),
    Recipe("first-conv-fp32", {"keep_first_conv_fp32": True},
           "the first Conv has one input channel (a K = 25 GEMM the int8 kernels run poorly): in fp32 it was 1.25-1.3x "
           "faster on the pooled first block (issue 9); on the strided block it ties with the others, warm (issue 16)"),
    Recipe("nhwc-flatten", {"flatten_nhwc": True},
           "flatten the last feature map in NHWC order (fully connected weights permuted to match; `pipeline.layout`): "
           "OpenVINO and ORT keep int8 activations channels-last, and the reorder back to NCHW was ~10% of the "
           "int8 model's time at batch 256 on an AMX Xeon (issue 16)"),
    Recipe("nhwc-signed-input", {"flatten_nhwc": True, "signed_input": True},
           "nhwc-flatten, and the input quantized as symmetric int8 as NNCF does (zero point 0: the first Conv needs "
           "no zero-point correction); with both, OpenVINO ran 5-10% ahead of NNCF's own int8 on an AMX Xeon (issue 16)"),
    Recipe("space-to-depth", {"flatten_nhwc": True, "signed_input": True, "space_to_depth": True},
           "nhwc-signed-input, and the strided one-channel first Conv as SpaceToDepth + a 4-channel Conv (`pipeline.layout`): "
           "int8 kernels multiply channels in fours; ORT's int8 ran 1.38x faster at batch 256 on an AMX Xeon, OpenVINO slower"),
)}
PER_BATCH_MARGIN = 0.03
"""Another candidate ships too, for the batch sizes where it beats the shipped int8 by more than this (issue 16:
the int8 a batch size runs is within 3% of the fastest candidate tried there)."""
REFERENCE_RECIPE = "ort-defaults"


def recipe_config(config: QuantizeConfig, name: str) -> QuantizeConfig:
    """`config` with the recipe's changes (its variant and gate settings kept)."""
    import dataclasses

    return dataclasses.replace(config, **RECIPES[name].overrides, recipes=(name,))


def recipes_to_try(config: QuantizeConfig) -> tuple[str, ...]:
    """The recipes a static export builds: the configured ones, or all when the speed check can tell them apart."""
    if config.mode != "static":
        return ("default",)
    if config.recipes is not None:
        return tuple(config.recipes)
    return tuple(RECIPES) if config.speed_check else ("default",)


@dataclass(frozen=True)
class Candidate:
    """One recipe's int8 file through the validation gate (`result`), or why it did not pass (`error`)."""

    recipe: str
    config: QuantizeConfig
    path: Path
    result: QuantizeResult | None
    error: str | None = None
    numbers: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.result is not None


def build_candidates(fp32_path: Path, folder: Path, config: QuantizeConfig, calibration: np.ndarray | None,
                     probe: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, fp32_runtime: dict | None = None,
                     on_recipe=None, labels: Sequence[str] | None = None) -> list[Candidate]:
    """Every recipe of `recipes_to_try(config)` quantized and gated on the validation split, each file in `folder`.

    A recipe that fails its gate (or cannot be built) is a candidate with an error and its numbers;
    the search fails only when no candidate passes (the first candidate's error is raised).
    """
    candidates, seen = [], {}
    for name in recipes_to_try(config):
        recipe_cfg = recipe_config(config, name)
        key = repr({k: v for k, v in to_dict(recipe_cfg).items() if k != "recipes"})
        if key in seen:  # the configured recipe may already be one of the named ones
            log.info("int8 recipe %s is the same as %s: not built twice", name, seen[key])
            continue
        seen[key] = name
        if on_recipe is not None:
            on_recipe(name)
        path = Path(folder) / f"model.{config.artifact}.{name}.onnx"
        try:
            result = quantize_gated(fp32_path, path, recipe_cfg, calibration if recipe_cfg.mode == "static" else None,
                                    probe, x_val, y_val, fp32_runtime, labels)
            candidates.append(Candidate(name, recipe_cfg, path, result))
        except AccuracyGateError as exc:
            candidates.append(Candidate(name, recipe_cfg, path, None, str(exc), {
                "validation_accuracy": exc.accuracy, "fp32_validation_accuracy": exc.fp32_accuracy,
                "drop_points": round(exc.drop_points, 4), "agreement": exc.agreement, "excluded_nodes": list(exc.excluded)}))
        except QuantizeError as exc:
            candidates.append(Candidate(name, recipe_cfg, path, None, str(exc)))
    if not any(c.passed for c in candidates):
        failed = candidates[0]
        raise (AccuracyGateError(failed.error, **_gate_numbers(failed)) if failed.numbers else QuantizeError(failed.error))
    return candidates


def _gate_numbers(candidate: Candidate) -> dict:
    n = candidate.numbers
    return {"fp32_accuracy": n["fp32_validation_accuracy"], "accuracy": n["validation_accuracy"],
            "drop_points": n["drop_points"], "agreement": n["agreement"], "excluded": tuple(n["excluded_nodes"])}


def best_engine_ms(entry: dict, name: str) -> tuple[float, str]:
    """(p50 ms, engine) of `name`'s fastest engine in one speed-check entry ("<name>_ms" is ONNX Runtime)."""
    timed = {"onnxruntime": entry[f"{name}_ms"]} if f"{name}_ms" in entry else {}
    timed.update({key[len(name) + 1:-3]: value for key, value in entry.items()
                  if key.startswith(name + "@") and key.endswith("_ms")})
    engine = min(timed, key=timed.get)
    return timed[engine], engine


def choose_candidate(candidates: Sequence[Candidate], speed: dict | None, tolerance: float) -> tuple[Candidate, str]:
    """(the candidate to ship, why): the fastest passing one that is nowhere slower than ORT's defaults beyond noise.

    `speed` is one `speed_check` over "fp32" and every passing candidate by recipe name (one interleaved
    call per batch size; other engines under "<recipe>@<engine>"). A candidate's latency at a batch
    size is that of its fastest engine there (the manifest's deployments say which engine to run).
    Fastest = the lowest geometric mean over the batch sizes of that latency over fp32's. Eligible =
    within `1 + tolerance` of the `ort-defaults` candidate (also at its fastest engine) at every batch
    size, so by construction the shipped int8 is never slower than ORT's default recipe beyond noise
    (when `ort-defaults` passed its gate; otherwise every passing candidate is eligible). Among the eligible,
    those within `PER_BATCH_MARGIN` of the fastest candidate at some batch size come first: the shipped int8
    is then the file some deployment runs, and `per_batch_files` adds one for each batch size it loses.
    """
    passed = [c for c in candidates if c.passed]
    if speed is None or len(passed) == 1:
        return passed[0], "the only candidate" if len(passed) == 1 else "no speed check: the first passing recipe"
    batches = [k for k in speed if k.startswith("batch_")]

    def ms(c: Candidate, key: str) -> float:
        return best_engine_ms(speed[key], c.recipe)[0]

    reference = next((c for c in passed if c.recipe == REFERENCE_RECIPE), None)
    eligible = passed
    if reference is not None:
        eligible = [c for c in passed if all(ms(c, k) <= (1 + tolerance) * ms(reference, k) for k in batches)]
    fastest = {k: min(ms(c, k) for c in passed) for k in batches}
    deployed = [c for c in eligible if any(ms(c, k) <= (1 + PER_BATCH_MARGIN) * fastest[k] for k in batches)]
    eligible = deployed or eligible
    score = {c.recipe: float(np.exp(np.mean([np.log(ms(c, k) / speed[k]["fp32_ms"]) for k in batches]))) for c in eligible}
    chosen = min(eligible, key=lambda c: score[c.recipe])
    against = f"; within {100 * tolerance:.0f}% of {REFERENCE_RECIPE} at every batch" if reference is not None else ""
    engines_used = ", ".join(f"{k.replace('_', ' ')} on {best_engine_ms(speed[k], chosen.recipe)[1]}" for k in batches)
    return chosen, (f"{chosen.recipe}: the lowest geometric-mean latency ratio to fp32 ({score[chosen.recipe]:.3f}; "
                    f"{engines_used}) of {len(passed)} candidate(s) that passed the validation gate{against}")


def per_batch_files(candidates: Sequence[Candidate], speed: dict | None, shipped: Candidate,
                    margin: float = PER_BATCH_MARGIN) -> dict[str, list[str]]:
    """{recipe: [batch keys]}: passing candidates that ship too, each for the batch sizes it wins.

    At each batch size of `speed` the fastest passing candidate (at its fastest engine) is found; when it is
    not `shipped` and beats it (at its fastest engine) by more than `margin`, it ships as well, so that the
    deployment of that batch size can name it: the file a batch size runs is then never more than `margin`
    slower than the fastest candidate the speed check measured there. One recipe that wins several batch
    sizes ships once. The same holds on ONNX Runtime alone, the engine most devices have: the fastest
    candidate there ships too (key "batch_N@onnxruntime") when it beats the shipped int8 on ONNX Runtime by
    more than `margin` and is faster than fp32 there (the deployments' `onnxruntime_artifact`).
    """
    if speed is None:
        return {}
    passed = [c for c in candidates if c.passed]
    out: dict[str, list[str]] = {}
    for key in (k for k in speed if k.startswith("batch_")):
        timed = [c for c in passed if f"{c.recipe}_ms" in speed[key]]
        if shipped not in timed:
            continue
        best = min(timed, key=lambda c: best_engine_ms(speed[key], c.recipe)[0])
        if best is not shipped and best_engine_ms(speed[key], shipped.recipe)[0] > (1 + margin) * best_engine_ms(speed[key], best.recipe)[0]:
            out.setdefault(best.recipe, []).append(key)
        on_onnxruntime = {c.recipe: speed[key][f"{c.recipe}_ms"] for c in timed}
        best_there = min(on_onnxruntime, key=on_onnxruntime.get)
        if (best_there != shipped.recipe and key not in out.get(best_there, [])
                and on_onnxruntime[shipped.recipe] > (1 + margin) * on_onnxruntime[best_there]
                and on_onnxruntime[best_there] < speed[key].get("fp32_ms", float("inf"))):
            out.setdefault(best_there, []).append(f"{key}@onnxruntime")
    return out



def candidate_records(candidates: Sequence[Candidate], speed: dict | None, shipped: str, kept: bool,
                      engine_checks: dict | None = None, per_batch: Sequence[str] = ()) -> list[dict]:
    """The int8 record's `candidates`: every recipe with its validation numbers, latency ratios and, per other
    engine, its agreement check (`engine_checks`: (recipe, engine) -> check). With `kept`, a passing candidate
    that did not ship names its kept file; one shipped as a per-batch file (`per_batch`) has its own artifact."""
    out = []
    for c in candidates:
        row: dict = {"recipe": c.recipe, "why": RECIPES[c.recipe].why, "overrides": _plain(RECIPES[c.recipe].overrides),
                     "passed": c.passed, "shipped": c.recipe == shipped}
        checks = {engine: check for (recipe, engine), check in (engine_checks or {}).items() if recipe == c.recipe}
        if checks:
            row["engines"] = {engine: {k: v for k, v in check.items() if k != "reference"} for engine, check in checks.items()}
        if c.passed:
            row.update(validation_accuracy=c.result.accuracy, agreement=c.result.agreement,
                       drop_points=round(c.result.drop_points, 4), excluded_nodes=list(c.result.excluded))
        else:
            row.update(error=c.error, **c.numbers)
        if speed is not None and c.passed:
            row["latency"] = {}
            for key, entry in speed.items():
                if key.startswith("batch_") and f"{c.recipe}_ms" in entry:
                    best, engine = best_engine_ms(entry, c.recipe)
                    ref = best_engine_ms(entry, REFERENCE_RECIPE)[0] if f"{REFERENCE_RECIPE}_ms" in entry else None
                    row["latency"][key] = {"ms": best, "engine": engine, "ratio_to_fp32": round(best / entry["fp32_ms"], 4),
                                           **({"ratio_to_ort_defaults": round(best / ref, 4)} if ref else {}),
                                           "onnxruntime_ms": entry[f"{c.recipe}_ms"],
                                           **{k[len(c.recipe) + 1:-3] + "_ms": v for k, v in entry.items()
                                              if k.startswith(c.recipe + "@") and k.endswith("_ms")}}
        if kept and c.passed and c.recipe != shipped and c.recipe not in per_batch:
            row["file"] = c.path.name
        out.append(row)
    return out


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- fp16 ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fp16Result:
    path: Path
    config: Fp16Config
    fp32_accuracy: float
    accuracy: float
    agreement: float
    drop_points: float
    max_abs_diff: float
    relative_diff: float
    runtime: dict
    class_drops: tuple[dict, ...] = ()

    def verification(self) -> dict:
        return {"parity": {"passed": True, "max_abs_diff": self.max_abs_diff, "relative_diff": self.relative_diff,
                           "tolerance": self.config.tolerance, "provider": self.config.provider},
                "gate": {"passed": True, "split": "validation", "fp32_accuracy": self.fp32_accuracy, "accuracy": self.accuracy,
                         "drop_points": round(self.drop_points, 4), "max_accuracy_drop": self.config.max_accuracy_drop,
                         "max_class_recall_drop": self.config.max_class_recall_drop,
                         "class_min_support": self.config.class_min_support,
                         "class_recall_drops": list(self.class_drops), "agreement": self.agreement}}


def to_fp16(fp32_path: Path, out_path: Path, config: Fp16Config, x_val: np.ndarray, y_val: np.ndarray,
            fp32_runtime: dict | None = None, labels: Sequence[str] | None = None) -> Fp16Result:
    """fp16 weights and compute with onnxruntime's float16 converter; checked for parity and accuracy on the
    validation split (`x_val`, `y_val`), written only on a pass.

    The converter is `onnxruntime.transformers.float16` (the same code as onnxconverter-common's
    `float16.convert_float_to_float16`, shipped inside the onnxruntime wheel: no extra dependency).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnxfile.load_model(fp32_path)
    try:
        half = convert_float_to_float16(model, keep_io_types=config.keep_io_types,
                                        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(config.op_block_list))
        # keep_io_types appends its input Casts at the end of the node list; onnx's checker (and
        # so `onnxfile.load_model`) requires topological order, which ORT itself does not.
        OnnxModel(half).topological_sort()
    except Exception as exc:
        raise Fp16Error(f"fp16 conversion of {fp32_path} failed ({type(exc).__name__}): {_first_line(exc)}") from None
    settings = dict(artifacts.DEFAULT_RUNTIME)
    fp32, fp32_logits = score(fp32_path, fp32_runtime or {}, x_val, y_val, None, provider=config.provider)
    with tempfile.TemporaryDirectory(prefix="pipeline-fp16-") as tmp:
        candidate = Path(tmp) / "model.fp16.onnx"
        onnx.save_model(half, str(candidate), save_as_external_data=False)
        session = runtime.create_session(candidate, settings, provider=config.provider)
        wants_half = session.get_inputs()[0].type == "tensor(float16)"
        logits = runtime.run_batched(session, x_val.astype(np.float16) if wants_half else x_val).astype(np.float32)
        predictions = logits.argmax(1)
        accuracy = float(np.mean(predictions == y_val))
        agreement = float(np.mean(predictions == fp32.predictions))
        max_abs = float(np.max(np.abs(logits - fp32_logits)))
        relative = max_abs / max(float(np.max(np.abs(fp32_logits))), 1e-12)
        drop = 100.0 * (fp32.accuracy - accuracy)
        failures = []
        if not relative <= config.tolerance:
            failures.append(f"max abs logit diff {max_abs:.3g} is {relative:.3g} of the largest fp32 logit "
                            f"(tolerance {config.tolerance:g})")
        if drop > config.max_accuracy_drop + 1e-9:
            failures.append(f"validation accuracy {100 * accuracy:.2f}% vs fp32 {100 * fp32.accuracy:.2f}%: "
                            f"drop {drop:.2f} points exceeds {config.max_accuracy_drop:.2f}")
        class_drops = metrics.worst_recall_drop(y_val, fp32.predictions, predictions, labels, config.class_min_support)
        if not _class_gate_passes(class_drops, config.max_class_recall_drop):
            failures.append(_class_failure(class_drops, config.max_class_recall_drop))
        if failures:
            raise Fp16Error(f"fp16 model rejected, not written: {'; '.join(failures)}")
        artifacts.atomic_write_bytes(Path(out_path), candidate.read_bytes())
    return Fp16Result(Path(out_path), config, fp32.accuracy, accuracy, agreement, drop, max_abs, relative, settings,
                      tuple(class_drops))


def config_record(config: QuantizeConfig) -> dict:
    """The recipe as the manifest records it (every field, plus the artifact name)."""
    record = to_dict(config)
    record["artifact"] = config.artifact
    return record


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(exc).__name__
