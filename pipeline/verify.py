"""Proof that an exported model has no dropout left at inference: graph audits and numbers.

Two kinds of evidence, both needed, because each misses cases the other catches:
- the graph: no Dropout node that could run in training mode, no random op, no BatchNormalization
  in training mode, and the same op histogram as the architecture exported with dropout 0;
- the numbers: ONNX Runtime with every optimization off (`ORT_DISABLE_ALL`, so no optimizer can
  quietly delete an active Dropout) gives bit-identical outputs on repeated runs and matches
  PyTorch in eval() on real images at several batch sizes; a second consumer
  (`onnx.reference.ReferenceEvaluator`) agrees with ONNX Runtime.
Audits must run on the RAW export first: ORT's default optimizer and simplifiers delete an active
Dropout node, and nn.Dropout2d in train mode exports as random ops with no Dropout node at all.

`verify_model` collects every failure into a `Verification`; `raise_for_failures` turns them into
one typed error naming the nodes and carrying the numbers. The graph audit imports onnx only
(`inspect` uses it); the numeric checks import onnxruntime and torch inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.errors import PipelineError

RANDOM_OPS = frozenset({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial"})
STANDARD_DOMAINS = ("", "ai.onnx")


class VerificationError(PipelineError):
    """A verification that failed; carries the offending node names and the numbers."""

    exit_code = 9

    def __init__(self, message: str, nodes: tuple[str, ...] = (), max_abs_diff: float | None = None,
                 tolerance: float | None = None, verification: Verification | None = None) -> None:
        super().__init__(message)
        self.nodes = tuple(nodes)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        self.verification = verification


class DropoutAuditError(VerificationError):
    """Dropout (or randomness) would be active at inference: in the graph, the numbers, or both."""


class ParityError(VerificationError):
    """The ONNX model's outputs differ from PyTorch eval() (or between runtimes) beyond the tolerance."""


# --- the graph ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One node that could make inference random."""

    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.reason}"


@dataclass(frozen=True)
class GraphAudit:
    findings: tuple[Finding, ...]
    inert_dropouts: tuple[str, ...]
    """Dropout nodes that are provably identity (no training_mode input, or a constant false one)."""

    @property
    def passed(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"passed": self.passed, "findings": [str(f) for f in self.findings],
                "inert_dropouts": list(self.inert_dropouts)}


def audit_graph(model: onnx.ModelProto) -> GraphAudit:
    """Every node (main graph, subgraphs, local functions) that could make inference random."""
    findings: list[Finding] = []
    inert: list[str] = []
    for graph_nodes, constants in _graphs(model):
        for node in graph_nodes:
            name = _node_label(node)
            if node.domain in STANDARD_DOMAINS and node.op_type in RANDOM_OPS:
                findings.append(Finding(name, node.op_type, "random op"))
            elif node.domain in STANDARD_DOMAINS and node.op_type == "Dropout":
                reason = _dropout_training(node, constants)
                if reason is None:
                    inert.append(name)
                else:
                    findings.append(Finding(name, node.op_type, reason))
            elif node.domain in STANDARD_DOMAINS and node.op_type == "BatchNormalization":
                training = any(a.name == "training_mode" and a.i for a in node.attribute)
                if training or len([o for o in node.output if o]) > 1:
                    reason = "BatchNormalization in training mode (updates running statistics)"
                    findings.append(Finding(name, node.op_type, reason))
            elif node.domain not in STANDARD_DOMAINS and ("Dropout" in node.op_type or "Random" in node.op_type):
                findings.append(Finding(name, f"{node.domain}.{node.op_type}", "custom-domain dropout/random op"))
    return GraphAudit(tuple(findings), tuple(inert))


def _graphs(model: onnx.ModelProto):
    """(nodes, constant values) of the main graph, every subgraph, and every local function."""
    def walk(graph: onnx.GraphProto, inherited: dict):
        constants = {**inherited, **_constants(graph.initializer, graph.node)}
        yield graph.node, constants
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g, constants)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        yield from walk(sub, constants)

    yield from walk(model.graph, {})
    for function in model.functions:
        yield function.node, _constants((), function.node)


def _constants(initializers, nodes) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in initializers}
    for node in nodes:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_int", "value_float"):
                    values[node.output[0]] = np.asarray(attr.i if attr.name == "value_int" else attr.f)
    return values


def _dropout_training(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> str | None:
    """Why this Dropout could run in training mode, or None if it is provably the identity.

    Opset >= 12 Dropout takes `training_mode` as its third input; absent means inference.
    """
    if len(node.input) < 3 or not node.input[2]:
        return None
    source = node.input[2]
    if source not in constants:
        return f"training_mode comes from {source!r}, decided at run time"
    value = constants[source]
    if value.size == 1 and not bool(value.reshape(-1)[0]):
        return None
    return "training_mode is true: active dropout"


def _node_label(node: onnx.NodeProto) -> str:
    """The node's name, with the PyTorch module it came from when the exporter recorded it."""
    scope = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    modules = [s.strip(" '\"") for s in scope.strip("[]").split(",") if s.strip(" '\"")]
    name = node.name or f"<unnamed {node.op_type}>"
    return f"{name} [{modules[-2]}]" if len(modules) >= 2 else name


def histogram_difference(ours: dict[str, int], twin: dict[str, int]) -> dict[str, list[int]]:
    """{op: [count here, count in the dropout-0 twin]} for every op whose counts differ."""
    return {op: [ours.get(op, 0), twin.get(op, 0)] for op in sorted(set(ours) | set(twin))
            if ours.get(op, 0) != twin.get(op, 0)}


# --- the numbers ---------------------------------------------------------------------------


@dataclass
class Verification:
    """Everything checked on one model; `failures()` lists what is wrong, in words with numbers."""

    tolerance: float
    graph: GraphAudit
    histogram: dict[str, int]
    twin_histogram: dict[str, int] | None = None
    deterministic: bool | None = None
    determinism_max_abs_diff: float | None = None
    parity: dict[int, float] = field(default_factory=dict)
    """Batch size -> max abs diff of logits, ORT_DISABLE_ALL vs PyTorch eval()."""
    parity_optimized: float | None = None
    """Max abs diff vs PyTorch with ORT at the shipped optimization level, on the largest batch."""
    reference_max_abs_diff: float | None = None
    """onnx.reference.ReferenceEvaluator vs ONNX Runtime."""

    @property
    def histogram_diff(self) -> dict[str, list[int]]:
        return histogram_difference(self.histogram, self.twin_histogram) if self.twin_histogram is not None else {}

    @property
    def max_abs_diff(self) -> float | None:
        values = [*self.parity.values(), *([self.parity_optimized] if self.parity_optimized is not None else [])]
        return max(values) if values else None

    def dropout_failures(self) -> list[str]:
        problems = [f"graph: {f}" for f in self.graph.findings]
        if self.histogram_diff:
            extra = ", ".join(f"{op} {n} vs {t}" for op, (n, t) in self.histogram_diff.items())
            problems.append(f"op histogram differs from the same architecture exported with dropout 0: {extra}")
        if self.deterministic is False:
            problems.append(f"repeated runs under ORT_DISABLE_ALL differ by up to {self.determinism_max_abs_diff:.3g} "
                            "(expected bit-identical): something random runs at inference")
        return problems

    def parity_failures(self) -> list[str]:
        problems = [f"batch {b}: max abs diff {d:.3g} > tolerance {self.tolerance:g} vs PyTorch eval()"
                    for b, d in self.parity.items() if not d <= self.tolerance]
        if self.parity_optimized is not None and not self.parity_optimized <= self.tolerance:
            problems.append(f"with ORT optimizations on: max abs diff {self.parity_optimized:.3g} > tolerance {self.tolerance:g}")
        if self.reference_max_abs_diff is not None and not self.reference_max_abs_diff <= self.tolerance:
            problems.append(f"onnx ReferenceEvaluator vs ONNX Runtime: max abs diff {self.reference_max_abs_diff:.3g} "
                            f"> tolerance {self.tolerance:g}")
        return problems

    def failures(self) -> list[str]:
        return self.dropout_failures() + self.parity_failures()

    def to_dict(self) -> dict:
        return {"passed": not self.failures(), "failures": self.failures(), "tolerance": self.tolerance,
                "graph": self.graph.to_dict(), "histogram": self.histogram, "twin_histogram": self.twin_histogram,
                "histogram_diff": self.histogram_diff, "deterministic": self.deterministic,
                "determinism_max_abs_diff": self.determinism_max_abs_diff,
                "parity_max_abs_diff": {str(b): d for b, d in self.parity.items()},
                "parity_optimized_max_abs_diff": self.parity_optimized, "max_abs_diff": self.max_abs_diff,
                "reference_max_abs_diff": self.reference_max_abs_diff}


def verify_model(model: onnx.ModelProto, torch_model, images: np.ndarray, tolerance: float,
                 batch_sizes: tuple[int, ...] = (1, 7, 256), repeats: int = 3,
                 twin_histogram: dict[str, int] | None = None, reference_images: int = 0,
                 optimized_runtime: dict | None = None) -> Verification:
    """Run every check on `model` against `torch_model` in eval() on preprocessed `images`; never raises for a failed check.

    `images` are real (validation) inputs; they are cycled to reach batch sizes larger than their count.
    `reference_images` > 0 also runs that many through `onnx.reference.ReferenceEvaluator`.
    `optimized_runtime` (the manifest's runtime record) adds a parity check at the shipped ORT settings.
    """
    from pipeline.onnxfile import op_histogram
    from pipeline.runtime import create_session

    result = Verification(tolerance=tolerance, graph=audit_graph(model), histogram=op_histogram(model),
                          twin_histogram=twin_histogram)
    data = model.SerializeToString()
    plain = create_session(data, level="disable")  # no optimizer may hide an active Dropout
    name = plain.get_inputs()[0].name
    largest = _cycle(images, max(batch_sizes))

    runs = [plain.run(None, {name: largest})[0] for _ in range(repeats)]
    result.deterministic = all(np.array_equal(runs[0], r) for r in runs[1:])
    result.determinism_max_abs_diff = max(float(np.max(np.abs(runs[0] - r))) for r in runs[1:])

    expected = torch_logits(torch_model, largest)
    for batch in batch_sizes:
        got = plain.run(None, {name: largest[:batch]})[0]
        result.parity[batch] = _max_abs_diff(got, expected[:batch])
    if optimized_runtime is not None:
        optimized = create_session(data, runtime=optimized_runtime)
        result.parity_optimized = _max_abs_diff(optimized.run(None, {name: largest})[0], expected)
    if reference_images:
        from onnx.reference import ReferenceEvaluator

        subset = largest[:reference_images]
        reference = ReferenceEvaluator(model).run(None, {name: subset})[0]
        result.reference_max_abs_diff = _max_abs_diff(reference, plain.run(None, {name: subset})[0])
    return result


def torch_logits(torch_model, x: np.ndarray) -> np.ndarray:
    """PyTorch's logits in eval() (the model's mode is restored afterwards)."""
    import torch

    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.inference_mode():
            return torch_model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    finally:
        torch_model.train(was_training)


def _cycle(images: np.ndarray, count: int) -> np.ndarray:
    # Indexing, not np.take: `images` may be lazy (`data.LazyImages`), read only where indexed.
    return np.ascontiguousarray(images[np.arange(count) % len(images)], dtype=np.float32)


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.max(diff)) if np.all(np.isfinite(diff)) else float("inf")


def raise_for_failures(verification: Verification, what: str) -> None:
    """One typed error for every failure of `verification` (of the model called `what`)."""
    dropout, parity = verification.dropout_failures(), verification.parity_failures()
    if not dropout and not parity:
        return
    nodes = tuple(f.node for f in verification.graph.findings)
    numbers = (f"max abs diff {verification.max_abs_diff:.3g}, tolerance {verification.tolerance:g}"
               if verification.max_abs_diff is not None else f"tolerance {verification.tolerance:g}")
    kind = DropoutAuditError if dropout else ParityError
    headline = "dropout audit failed" if dropout else "parity check failed"
    message = f"{what}: {headline} ({numbers}): " + "; ".join(dropout + parity)
    raise kind(message, nodes=nodes, max_abs_diff=verification.max_abs_diff, tolerance=verification.tolerance,
               verification=verification)
