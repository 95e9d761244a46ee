"""Monte Carlo dropout export: `model.mc.onnx`, proof that its dropout is still active, and
what its uncertainty is worth.

Dropout trains an ensemble of thinned networks; the deterministic export keeps only their
weight-scaled mean. `model.mc.onnx` keeps the ensemble: N dropout masks (fixed at export) per
input, drawn in one batched pass from RandomUniformLike ops (see `pipeline.mc_model`), with
three outputs:

    probs        (batch, K) mean class probabilities over the N samples
    entropy      (batch,)   predictive entropy of `probs`, nats, 0 .. ln K (total uncertainty)
    mutual_info  (batch,)   mutual information between prediction and masks (BALD), nats,
                            0 .. entropy (the model's own, epistemic, uncertainty)

Stages here: `export_mc` (checkpoint -> file), `verify_mc` (random ops survive ONNX Runtime at
every optimization level and onnxsim, outputs vary between runs, accuracy gate, convergence
to the deterministic model as N grows), `evaluate_uncertainty` (AUROC against
out-of-distribution inputs, rejection curve) and `plot_uncertainty`. They do not write the
manifest: `workflow.mc_export_run` composes them.

torch is imported only inside the functions that build or run the torch model, so `run_mc` and
the constants are usable from torch-free consumers (predict, bench).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import artifacts
from pipeline.config import DataConfig, MCConfig
from pipeline.errors import DataError, PipelineError
from pipeline.predict import softmax

log = logging.getLogger(__name__)

MC_FILE = "model.mc.onnx"
PLOT_FILE = "mc_uncertainty.png"
INPUT_NAME = "input"
OUTPUT_NAMES = ("probs", "entropy", "mutual_info")
OUTPUT_MEANINGS = {
    "probs": "mean class probabilities over the N dropout samples (batch, K); argmax is the prediction",
    "entropy": "predictive entropy of probs in nats (batch,), 0 .. ln K: total uncertainty",
    "mutual_info": "mutual information between prediction and dropout mask (BALD) in nats (batch,), "
                   "0 .. entropy: the model's own (epistemic) uncertainty",
}
# Ops whose output changes from run to run. An MC model must keep them; a deterministic one must not have them.
RANDOM_OPS = frozenset({"RandomUniformLike", "RandomUniform", "RandomNormalLike", "RandomNormal", "Bernoulli", "Multinomial"})
# Fine steps at first: a good model's few errors are gone after rejecting a few percent.
REJECT_FRACTIONS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


class MCVerificationError(PipelineError):
    """An MC dropout model whose randomness, accuracy or outputs are not what was promised."""

    exit_code = 9


# --- running the MC model (torch-free) ---------------------------------------------------


def run_mc(session, x: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """All outputs of an MC model over preprocessed `x`, in batches: {"probs", "entropy", "mutual_info"}."""
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    chunks = [session.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return {n: np.concatenate([c[k] for c in chunks]) for k, n in enumerate(names)}


def random_ops(model) -> dict[str, int]:
    """Count of random-number ops in an ONNX graph, by op type (the main graph, where the exporter puts them)."""
    counts = Counter(node.op_type for node in model.graph.node if node.op_type in RANDOM_OPS)
    return dict(sorted(counts.items()))


def entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of class probabilities."""
    p = np.clip(probs.astype(np.float64), 1e-30, 1.0)
    return -(probs * np.log(p)).sum(axis=1)


# --- export ------------------------------------------------------------------------------


def export_mc(checkpoint: Path, out: Path, config: MCConfig, metadata: dict[str, str] | None = None) -> Path:
    """Write the MC dropout model of a checkpoint to `out` atomically: one self-contained ONNX file,
    dynamic batch, input `input`, outputs `probs`, `entropy`, `mutual_info`."""
    import torch

    from pipeline import artifacts, export, onnxfile, train
    from pipeline.mc_model import MCDropoutModel

    model, _ = train.load_checkpoint(checkpoint)
    try:
        mc = MCDropoutModel(model, config.samples)
    except ValueError as exc:
        raise MCVerificationError(f"{checkpoint}: {exc} (train with --dropout > 0 or --spatial-dropout > 0)") from None
    cfg = model.config
    # Batch >= 2: with a batch of 1 the exporter may specialise the batch dimension.
    example = torch.zeros(export.EXAMPLE_BATCH, cfg.in_channels, cfg.height, cfg.width)
    batch = torch.export.Dim("batch", min=1)
    try:
        with export._quiet_exporter():
            program = torch.onnx.export(mc, (example,), dynamo=True, external_data=False, opset_version=config.opset,
                                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                        dynamic_shapes=({0: batch},), verbose=False)
    except Exception as exc:  # the exporter raises many types (TorchExportError, ConversionError, ...)
        first = " ".join(str(exc).split())[:300]
        raise export.ExportError(f"torch.onnx.export of the MC dropout model failed ({type(exc).__name__}): {first}") from None
    proto = program.model_proto
    export._check_export(proto, config.opset)  # opset written, one file, dynamic batch
    export.strip_node_metadata(proto)
    export.set_metadata(proto, {**(metadata or {}), "pipeline.variant": "mc", "pipeline.mc.samples": str(config.samples),
                                "pipeline.mc.outputs": json.dumps(OUTPUT_MEANINGS)})
    with artifacts.atomic_path(Path(out)) as tmp:
        export.save(proto, tmp)
        onnxfile.load_model(tmp)  # checker + self-contained, on the bytes that ship
    return Path(out)


# --- the reference: test split and the deterministic model -------------------------------


@dataclass(frozen=True)
class Reference:
    """The run's test split and the deterministic (eval-mode) model's view of it."""

    raw: np.ndarray
    """Raw test pixels (N, C, H, W), in the source's range."""
    x: np.ndarray
    """Preprocessed test inputs."""
    y: np.ndarray
    x_val: np.ndarray
    """Preprocessed validation inputs: the MC accuracy gate reads these, never the test split."""
    y_val: np.ndarray
    labels: tuple[str, ...]
    preprocess: object
    deterministic: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    """Preprocessed inputs -> softmax of the checkpoint's model in eval mode."""
    dropout_layers: tuple[dict, ...] = ()

    @property
    def deterministic_probs(self) -> np.ndarray:
        return self.deterministic(self.x)


def load_reference(run_dir: Path, manifest: dict) -> Reference:
    """Reload the run's data (checked against the manifest's fingerprint) and its checkpoint."""
    import torch

    from pipeline import data, train
    from pipeline.mc_model import dropout_layers

    splits = data.load_trained_on(DataConfig.from_dict(manifest["dataset"]["config"]),
                                  manifest["dataset"]["fingerprint"], str(run_dir))
    model, _ = train.load_checkpoint(Path(run_dir) / manifest["training"]["checkpoint"])

    def deterministic(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = [model(torch.from_numpy(x[i:i + 1024])).numpy() for i in range(0, len(x), 1024)]
        return softmax(np.concatenate(logits).astype(np.float64))

    return Reference(raw=splits.x_test, x=splits.preprocess.apply(splits.x_test), y=splits.y_test,
                     x_val=splits.preprocess.apply(splits.x_val), y_val=splits.y_val,
                     labels=splits.labels, preprocess=splits.preprocess, deterministic=deterministic,
                     dropout_layers=tuple(dropout_layers(model)))


# --- verification ------------------------------------------------------------------------


def _session(model: Path | bytes, runtime_settings: dict | None, config: MCConfig, level: str | None = None,
             optimized_path: Path | None = None):
    """A CPU session, seeded: `onnxruntime.set_seed` fixes the process-wide seed that random ops start from
    when a session is created, so the numbers recorded here are reproducible (runs within a session still differ)."""
    import onnxruntime as ort

    from pipeline import runtime

    ort.set_seed(config.seed)
    if optimized_path is None:
        return runtime.create_session(model if isinstance(model, bytes) else Path(model), runtime_settings, level=level)
    options = runtime.session_options(runtime_settings, level=level)
    options.optimized_model_filepath = str(optimized_path)
    disabled = list((runtime_settings or {}).get("disabled_optimizers", []))
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def _two_runs_differ(session, x: np.ndarray) -> float:
    """Max abs difference of `probs` between two runs on the same input."""
    name = session.get_inputs()[0].name
    first = session.run(None, {name: x})[0]
    second = session.run(None, {name: x})[0]
    return float(np.max(np.abs(first - second)))


def _check_levels(path: Path, x: np.ndarray, expected: dict, runtime_settings: dict, config: MCConfig,
                  failures: list[str]) -> dict:
    """At every ONNX Runtime optimization level: the random ops in the graph ORT really runs, and
    whether two runs differ."""
    import onnx

    from pipeline import runtime

    levels = {}
    with tempfile.TemporaryDirectory(prefix="mc-levels-") as folder:
        for level in runtime.LEVELS:
            optimized = Path(folder) / f"{level}.onnx"
            session = _session(path, runtime_settings, config, level=level, optimized_path=optimized)
            kept = random_ops(onnx.load(str(optimized), load_external_data=False))
            diff = _two_runs_differ(session, x)
            levels[level] = {"random_ops": kept, "max_abs_diff_between_runs": diff}
            if kept != expected:
                failures.append(f"ORT level {level!r} left random ops {kept}, expected {expected}")
            if diff <= 0.0:
                failures.append(f"ORT level {level!r}: two runs gave identical outputs (dropout is not active)")
    return levels


def _check_onnxsim(path: Path, x: np.ndarray, expected: dict, runtime_settings: dict, config: MCConfig,
                   failures: list[str]) -> dict:
    import onnx

    from pipeline.simplify import SimplifyError, simplify_model

    # simplify_model runs onnxsim's own check (check_n >= 1; onnxsim.simplify's default of 0 checks
    # nothing) and refuses a failed one; onnxsim pins unseeded random ops for its comparison.
    try:
        simplified, report = simplify_model(onnx.load(str(path)))
    except SimplifyError as exc:
        failures.append(f"onnxsim on the MC model: {exc}")
        return {"check": False}
    kept = random_ops(simplified)
    session = _session(simplified.SerializeToString(), runtime_settings, config, level="all")
    diff = _two_runs_differ(session, x)
    if kept != expected:
        failures.append(f"onnxsim left random ops {kept}, expected {expected}")
    if diff <= 0.0:
        failures.append("after onnxsim two runs at level 'all' gave identical outputs")
    return {"check": report.check_passed, "check_n": report.check_n, "random_ops": kept, "nodes": report.nodes_after,
            "max_abs_diff_between_runs": diff}


def _check_outputs(out: dict[str, np.ndarray], num_classes: int, failures: list[str]) -> dict:
    """Probabilities sum to 1; 0 <= mutual_info <= entropy <= ln K."""
    tol = 1e-4
    sums = np.abs(out["probs"].sum(axis=1) - 1.0).max()
    ent, mi = out["entropy"], out["mutual_info"]
    bounds = {"max_abs_probs_sum_error": float(sums), "entropy_min": float(ent.min()), "entropy_max": float(ent.max()),
              "mutual_info_min": float(mi.min()), "max_mutual_info_minus_entropy": float((mi - ent).max()),
              "ln_k": math.log(num_classes)}
    if sums > tol:
        failures.append(f"probs rows sum to 1 +- {sums:.2e} (tolerance {tol})")
    if ent.min() < -tol or ent.max() > math.log(num_classes) + tol:
        failures.append(f"entropy outside [0, ln {num_classes}]: {ent.min():.4f} .. {ent.max():.4f}")
    if mi.min() < -tol or (mi - ent).max() > tol:
        failures.append(f"mutual information outside [0, entropy]: min {mi.min():.4f}, max excess {(mi - ent).max():.4f}")
    return bounds


def _total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows of the total-variation distance (half the L1 distance) between distributions."""
    return float(0.5 * np.abs(p - q).sum(axis=1).mean())


def convergence(session, x: np.ndarray, deterministic_probs: np.ndarray, samples: int, repeats: int,
                batch: int) -> list[dict]:
    """How the MC mean approaches the deterministic softmax as the number of samples grows.

    Averaging k runs of the N-sample model is an estimate with N*k samples. For k = 1, 2, 4, ...:
    the distance to the deterministic (weight-scaled) softmax, which falls and then levels off at the
    gap between the mean of the ensemble and the weight-scaling approximation; and the distance
    between two independent estimates of that size, the sampling noise, which falls as 1/sqrt(N*k).
    """
    det_pred = deterministic_probs.argmax(axis=1)
    sums = [np.zeros_like(deterministic_probs), np.zeros_like(deterministic_probs)]
    rows, k = [], 0
    checkpoints = {2 ** i for i in range(int(math.log2(repeats)) + 1)} | {repeats}
    while k < repeats:
        k += 1
        for stream in sums:
            stream += run_mc(session, x, batch)["probs"]
        if k in checkpoints:
            a, b = sums[0] / k, sums[1] / k
            rows.append({"samples": samples * k,
                         "tv_to_deterministic": _total_variation(a, deterministic_probs),
                         "max_abs_diff_to_deterministic": float(np.abs(a - deterministic_probs).max()),
                         "argmax_agreement": float((a.argmax(axis=1) == det_pred).mean()),
                         "tv_between_independent_estimates": _total_variation(a, b)})
    return rows


@dataclass(frozen=True)
class MCVerification:
    record: dict
    """JSON-ready numbers of every check."""
    test_outputs: dict[str, np.ndarray] = field(repr=False)
    """The MC model's outputs on the test split (reused by the evaluation)."""

    @property
    def test_accuracy(self) -> float:
        return self.record["accuracy"]["mc"]


def verify_mc(path: Path, reference: Reference, config: MCConfig, runtime_settings: dict | None = None) -> MCVerification:
    """Prove that `path` is a working MC dropout model; `MCVerificationError` with every failure otherwise."""
    from pipeline import onnxfile

    runtime_settings = runtime_settings or artifacts.DEFAULT_RUNTIME
    failures: list[str] = []
    model = onnxfile.load_model(path)
    graph_random = random_ops(model)
    expected_count = len(reference.dropout_layers)
    if sum(graph_random.values()) != expected_count:
        failures.append(f"the graph has random ops {graph_random} but the model has {expected_count} dropout layers")
    probe = reference.x[:min(len(reference.x), 8)]
    levels = _check_levels(path, probe, graph_random, runtime_settings, config, failures)
    simplified = _check_onnxsim(path, probe, graph_random, runtime_settings, config, failures)

    session = _session(path, runtime_settings, config)
    # The gate reads the validation split; the test split is measured after it, once, and chooses nothing.
    val_out = run_mc(session, reference.x_val, config.batch_size)
    bounds = _check_outputs(val_out, len(reference.labels), failures)
    val_mc_acc = float((val_out["probs"].argmax(axis=1) == reference.y_val).mean())
    val_det_acc = float((reference.deterministic(reference.x_val).argmax(axis=1) == reference.y_val).mean())
    if val_mc_acc < val_det_acc - config.max_accuracy_drop - 1e-12:
        failures.append(f"MC validation accuracy {100 * val_mc_acc:.2f}% is more than {100 * config.max_accuracy_drop:.2f} "
                        f"points below the deterministic {100 * val_det_acc:.2f}%")
    out = run_mc(session, reference.x, config.batch_size)
    det_probs = reference.deterministic_probs
    mc_acc = float((out["probs"].argmax(axis=1) == reference.y).mean())
    det_acc = float((det_probs.argmax(axis=1) == reference.y).mean())

    subset = slice(0, min(len(reference.x), config.ood_samples))
    steps = convergence(session, reference.x[subset], det_probs[subset], config.samples, config.convergence_repeats,
                        config.batch_size)
    if steps[-1]["tv_between_independent_estimates"] >= steps[0]["tv_between_independent_estimates"]:
        first, last = steps[0], steps[-1]
        failures.append(f"sampling noise does not fall with more samples: {first['tv_between_independent_estimates']:.4f} "
                        f"at N={first['samples']}, {last['tv_between_independent_estimates']:.4f} at N={last['samples']}")
    record = {"random_ops": graph_random, "dropout_layers": list(reference.dropout_layers),
              "ort_levels": levels, "onnxsim": simplified, "outputs": bounds,
              "accuracy": {"mc": mc_acc, "deterministic": det_acc, "difference_points": 100 * (mc_acc - det_acc),
                           "test_images": len(reference.y)},
              "gate": {"split": "validation", "mc": val_mc_acc, "deterministic": val_det_acc,
                       "difference_points": 100 * (val_mc_acc - val_det_acc),
                       "max_drop_points": 100 * config.max_accuracy_drop, "validation_images": len(reference.y_val)},
              "convergence": steps, "seed": config.seed}
    if failures:
        raise MCVerificationError(f"{path}: MC dropout verification failed: " + "; ".join(failures))
    return MCVerification(record, out)


# --- usefulness: out-of-distribution detection and rejection ----------------------------


def ood_sets(raw: np.ndarray, preprocess, config: MCConfig) -> dict[str, tuple[np.ndarray, str]]:
    """Out-of-distribution raw images built from the test split (and another dataset if configured):
    name -> (raw images, description)."""
    rng = np.random.default_rng(config.seed)
    raw = raw[:config.ood_samples]
    top = 1.0 / preprocess.scale  # the nominal pixel range is [0, 1/scale]: 0-16 for digits, 0-255 for 8-bit
    square = raw.shape[2] == raw.shape[3]
    sets = {
        "uniform_noise": (rng.uniform(0.0, top, size=raw.shape).astype(np.float32),
                          f"uniform noise in the pixel range [0, {top:g}]"),
        "inverted": ((top - raw).astype(np.float32), "test images with pixels inverted (max - x)"),
        "rotated": (np.ascontiguousarray(np.rot90(raw, 1, axes=(2, 3)) if square else raw[:, :, ::-1, ::-1]),
                    "test images rotated by 90 degrees" if square else "test images rotated by 180 degrees"),
    }
    if config.ood_data_dir is not None:
        sets["other_dataset"] = _other_dataset(config.ood_data_dir, preprocess, config.ood_samples)
    return sets


def _other_dataset(path: Path, preprocess, limit: int) -> tuple[np.ndarray, str]:
    """Another dataset's test images resized (area average) to the run's input and mapped to its pixel range."""
    from PIL import Image

    from pipeline import data

    source = data.load(DataConfig(dataset="npz" if Path(path).suffix == ".npz" else "idx", data_dir=Path(path)))
    other = source.x_test[:limit]
    height, width = preprocess.size
    resized = np.empty((len(other), other.shape[1], height, width), dtype=np.float32)
    for i, image in enumerate(other):
        for c, plane in enumerate(image):
            resized[i, c] = np.asarray(Image.fromarray(plane.astype(np.float32), mode="F")
                                       .resize((width, height), Image.Resampling.BOX))
    resized *= source.preprocess.scale / preprocess.scale
    if resized.shape[1] != preprocess.channels:
        if resized.shape[1] != 1:
            raise DataError(f"{path}: {resized.shape[1]}-channel images cannot feed a {preprocess.channels}-channel model")
        resized = np.repeat(resized, preprocess.channels, axis=1)
    return resized, f"{source.source}, resized to {height}x{width}"


def _auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of a score that should be higher for out-of-distribution inputs (0.5 = chance)."""
    from sklearn.metrics import roc_auc_score

    labels = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
    return float(roc_auc_score(labels, np.concatenate([in_scores, out_scores])))


def rejection_curve(uncertainty: np.ndarray, correct: np.ndarray, fractions=REJECT_FRACTIONS) -> list[float]:
    """Accuracy on the inputs kept when the most uncertain fraction r of them is rejected, for each r."""
    order = np.argsort(uncertainty, kind="stable")  # most certain first
    ranked = correct[order].astype(np.float64)
    accuracies = []
    for r in fractions:
        kept = max(1, int(round(len(ranked) * (1.0 - r))))
        accuracies.append(float(ranked[:kept].mean()))
    return accuracies


@dataclass(frozen=True)
class MCEvaluation:
    record: dict
    """JSON-ready: per OOD set AUROCs and mean uncertainties, the rejection curve."""
    scores: dict[str, dict[str, np.ndarray]] = field(repr=False)
    """Per set ("test" and each OOD set): mc_entropy, mc_mutual_info, deterministic_entropy arrays (for plots)."""


def evaluate_uncertainty(path: Path, reference: Reference, config: MCConfig, runtime_settings: dict | None = None,
                         test_outputs: dict[str, np.ndarray] | None = None) -> MCEvaluation:
    """AUROC of the MC uncertainty (and of the deterministic softmax entropy, the baseline) for the test
    split against each out-of-distribution set, and the rejection curve on the test split."""
    session = _session(path, runtime_settings, config)
    out = test_outputs if test_outputs is not None else run_mc(session, reference.x, config.batch_size)
    det_probs = reference.deterministic_probs
    limit = config.ood_samples

    def scores_of(mc_out: dict, det: np.ndarray) -> dict[str, np.ndarray]:
        return {"mc_entropy": mc_out["entropy"].astype(np.float64), "mc_mutual_info": mc_out["mutual_info"].astype(np.float64),
                "deterministic_entropy": entropy(det)}

    scores = {"test": {k: v[:limit] for k, v in scores_of(out, det_probs).items()}}
    record: dict = {"in_distribution": {"images": len(scores["test"]["mc_entropy"]),
                                        **{f"mean_{k}": float(v.mean()) for k, v in scores["test"].items()}},
                    "ood": {}}
    for name, (raw, description) in ood_sets(reference.raw, reference.preprocess, config).items():
        x = reference.preprocess.apply(raw)
        scores[name] = scores_of(run_mc(session, x, config.batch_size), reference.deterministic(x))
        record["ood"][name] = {
            "description": description, "images": len(x),
            **{f"mean_{k}": float(v.mean()) for k, v in scores[name].items()},
            "auroc": {k: _auroc(scores["test"][k], v) for k, v in scores[name].items()},
        }

    correct_mc = out["probs"].argmax(axis=1) == reference.y
    correct_det = det_probs.argmax(axis=1) == reference.y
    record["rejection"] = {
        "fractions": list(REJECT_FRACTIONS),
        "mc_entropy": rejection_curve(out["entropy"], correct_mc),
        "mc_mutual_info": rejection_curve(out["mutual_info"], correct_mc),
        "deterministic_max_prob": rejection_curve(-det_probs.max(axis=1), correct_det),
        "test_images": len(reference.y),
    }
    return MCEvaluation(record, scores)


def plot_uncertainty(evaluation: MCEvaluation, path: Path, title: str) -> Path:
    """Rejection curves (left) and the MC entropy of the test split against each OOD set (right)."""
    from pipeline.report import _pyplot, save_figure

    plt = _pyplot()
    record = evaluation.record
    fig, (reject_ax, hist_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    rejection = record["rejection"]
    fractions = [100 * f for f in rejection["fractions"]]
    for key, label in (("mc_entropy", "MC predictive entropy"), ("mc_mutual_info", "MC mutual information"),
                       ("deterministic_max_prob", "deterministic max softmax")):
        reject_ax.plot(fractions, [100 * a for a in rejection[key]], marker="o", markersize=3, label=label)
    reject_ax.set(xlabel="most uncertain test images rejected (%)", ylabel="accuracy on the rest (%)",
                  title=f"rejection curve ({rejection['test_images']} test images)")
    test_entropy = evaluation.scores["test"]["mc_entropy"]
    top = max(float(np.max(s["mc_entropy"])) for s in evaluation.scores.values())
    bins = np.linspace(0.0, max(top, 1e-3), 40)
    hist_ax.hist(test_entropy, bins=bins, alpha=0.6, density=True, label="test (in distribution)")
    for name, info in record["ood"].items():
        hist_ax.hist(evaluation.scores[name]["mc_entropy"], bins=bins, density=True, histtype="step", linewidth=1.5,
                     label=f"{name} (AUROC {info['auroc']['mc_entropy']:.3f})")
    hist_ax.set(xlabel="MC predictive entropy (nats)", ylabel="density", title="in vs out of distribution")
    for ax in (reject_ax, hist_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)
    return Path(path)
