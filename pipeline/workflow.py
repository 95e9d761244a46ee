"""Compositions of stages that more than one command needs, with their records.

`train_run` is the `train` stage plus the run folder around it: staging, metrics, curves and
the first manifest. The CLI's `train`, `run` and `study` all go through it.
"""

from __future__ import annotations

import functools
import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline import artifacts, deployments
from pipeline import manifest as schema
from pipeline.config import DataConfig, ModelConfig, TrainConfig, to_dict
from pipeline.errors import TrainingDivergedError


@dataclass(frozen=True)
class TrainRun:
    run_dir: Path
    metrics: dict
    manifest: dict


def default_run_dir(data_config: DataConfig) -> Path:
    """models/digits for the default, models/<data folder name> for the user's own data."""
    if data_config.dataset == "digits":
        return Path("models") / "digits"
    return Path("models") / Path(data_config.data_dir).stem.replace(".", "-")


def _in_distributed_session(fn: Callable) -> Callable:
    """Run `fn` inside torchrun's process group when started by torchrun (a no-op otherwise)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline import distributed

        with distributed.session():
            return fn(*args, **kwargs)

    return wrapper


@_in_distributed_session
def train_run(data_config: DataConfig, model_config: ModelConfig, train_config: TrainConfig, out: Path,
              force: bool = False, resume: bool = False,
              on_start: Callable[[dict], None] | None = None,
              on_epoch: Callable | None = None) -> TrainRun:
    """Load data, train in `<out>.partial/`, write metrics, curves and manifest, then move it to `out`.

    Bad data is found before any folder is made. An interruption leaves `<out>.partial/` with
    the state of the last completed epoch, which `resume=True` continues.

    Under torchrun every rank calls this and trains; only rank 0 touches the folder (the
    others wait for it and share its result or its error) and calls `on_start`/`on_epoch`.
    """
    from pipeline import data, distributed, train

    if resume:
        staging = distributed.on_main(artifacts.resume_run, out)
        saved_data, saved_model, saved_train = distributed.on_main(train.read_train_state_configs, staging)
        data_config = DataConfig.from_dict(saved_data)
        model_config = ModelConfig.from_dict(saved_model)
        train_config = TrainConfig(**saved_train)
        splits = data.load(data_config)
    else:
        splits = data.load(data_config)
        model_config = train.model_config_for(splits, model_config)
        train.resolve_device(train_config.device)  # fail on a missing GPU before making folders
        staging = distributed.on_main(artifacts.start_run, out, force)
    if on_start is not None and distributed.current().is_main:
        on_start({"source": splits.source, "sizes": splits.sizes(), "model": to_dict(model_config),
                  "epochs": train_config.epochs, "staging": str(staging)})

    try:
        result = train.train(splits, data_config, model_config, train_config, staging, resume=resume, on_epoch=on_epoch)
    except TrainingDivergedError:
        if not resume and distributed.current().is_main:  # nothing of a fresh diverged run is worth resuming
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return distributed.on_main(_write_run, splits, data_config, model_config, train_config, result, staging, out)


def _write_run(splits, data_config: DataConfig, model_config: ModelConfig, train_config: TrainConfig,
               result, staging: Path, out: Path) -> TrainRun:
    """Metrics, curves and manifest of a finished training, then the staging folder moved to `out`."""
    from pipeline.metrics import per_class
    from pipeline.model import DropoutCNN, count_parameters
    from pipeline.report import plot_confusion_matrix, plot_learning_curves

    history = [h.to_dict() for h in result.history]
    metrics = {"history": history, "epochs_run": len(history), "best_epoch": result.best_epoch,
               "stopped_early": result.stopped_early, "test_accuracy": result.test_accuracy,
               "test_loss": result.test_loss, "best_val_accuracy": max(h["val_accuracy"] for h in history),
               "train_seconds": result.train_seconds, "seconds_per_epoch": result.seconds_per_epoch,
               "images_per_second": len(splits.y_train) * len(history) / max(result.train_seconds, 1e-9),
               "device": result.device, "world_size": result.world_size,
               "replica_sha256": list(result.replica_digests),
               "test_per_class": per_class(splits.y_test, result.test_predictions, splits.labels)}
    artifacts.atomic_write_json(staging / artifacts.METRICS, metrics)
    plot_confusion_matrix(metrics["test_per_class"]["confusion_matrix"], list(splits.labels), staging / artifacts.CONFUSION,
                          f"{splits.source}: test split, accuracy {100 * result.test_accuracy:.2f}%")
    if splits.bad or splits.ignored:
        artifacts.atomic_write_json(staging / artifacts.SKIPPED_IMAGES, splits.skipped_record())
    plot_learning_curves(history, staging / artifacts.CURVES,
                         f"{splits.source}: dropout {model_config.dropout}, test accuracy {100 * result.test_accuracy:.2f}%")
    manifest = _new_manifest(
        splits.labels, splits.preprocess, _dataset_record(splits, data_config),
        schema.Model(to_dict(model_config), count_parameters(DropoutCNN(model_config))),
        schema.Training(checkpoint=artifacts.CHECKPOINT, checkpoint_sha256=artifacts.sha256_file(result.checkpoint),
                        config=to_dict(train_config), validation_accuracy=next(h["val_accuracy"] for h in history if h["epoch"] == result.best_epoch),
                        test_accuracy=result.test_accuracy, train_seconds=result.train_seconds,
                        seconds_per_epoch=result.seconds_per_epoch, epochs_run=len(history), best_epoch=result.best_epoch,
                        device=result.device, world_size=result.world_size))
    # The manifest is written last: its presence is what marks a finished run.
    artifacts.write_manifest(staging, manifest)
    artifacts.finish_run(staging, out)
    return TrainRun(Path(out), metrics, manifest)


def _dataset_record(splits, data_config: DataConfig) -> schema.Dataset:
    return schema.Dataset.from_dict(splits.record(data_config), "dataset")


def _new_manifest(labels, preprocess, dataset: schema.Dataset, model: schema.Model, training: schema.Training) -> dict:
    """The first manifest of a run folder: one definition for a trained run and an adopted checkpoint."""
    return schema.Manifest.new(labels=labels, preprocess=preprocess.to_dict(), dataset=dataset, model=model,
                               training=training, pipeline_version=artifacts.versions()["pipeline"],
                               created=artifacts.now_iso(), versions=artifacts.versions()).to_dict()


# --- export: checkpoint -> the shipped fp32 model.onnx, with its proof --------------------

FP32_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportRun:
    run_dir: Path
    model_path: Path
    record: dict
    """The manifest's artifacts["fp32"] record as written."""
    export: dict
    """The manifest's "export" section: histograms and node counts before/after simplification."""
    dropped: tuple[str, ...]
    """Artifact records derived from the previous fp32 model, removed because they no longer match it."""


def export_run(run_dir: Path, config, checkpoint: Path | None = None,
               on_step: Callable[[str], None] | None = None) -> ExportRun:
    """Export the run's checkpoint to `model.onnx` (see `_export`), all or nothing: the run folder changes only
    when every check passed and every file and record is written (`artifacts.staged_update`)."""
    run_dir = Path(run_dir)
    artifacts.read_manifest(run_dir)  # a finished run, before anything is locked or copied
    checkpoint = Path(checkpoint).absolute() if checkpoint is not None else None
    with artifacts.staged_update(run_dir) as stage:
        result = _export(stage, config, checkpoint, on_step, home=run_dir)
    return _published(result, stage, run_dir)


def _published(result, stage: Path, run_dir: Path):
    """A stage's result with the paths it wrote in its staging copy pointed at the published run folder."""
    import dataclasses

    def moved(value):
        if isinstance(value, Path) and value.is_relative_to(stage):
            return run_dir / value.relative_to(stage)
        return value

    return dataclasses.replace(result, **{f.name: moved(getattr(result, f.name)) for f in dataclasses.fields(result)})


def _export(run_dir: Path, config, checkpoint: Path | None, on_step: Callable[[str], None] | None, home: Path) -> ExportRun:
    """Export the run's checkpoint to `model.onnx`, proving on the way that dropout is gone.

    raw export -> audit + parity on the raw graph (before any optimizer could hide an active
    Dropout) -> onnxsim (its check consumed) -> audit + parity + ReferenceEvaluator on the
    simplified model -> ONNX Runtime test accuracy and disagreements with PyTorch -> model.onnx
    written atomically -> manifest artifacts["fp32"] and "export". Any failed check raises a
    typed error before anything is written. The raw export is kept in memory only: it is never
    a shippable file. `config` is an `ExportConfig`.
    """
    import time

    from pipeline import export, simplify, train, verify
    from pipeline.metrics import per_class
    from pipeline.onnxfile import load_model, op_histogram

    step = on_step or (lambda name: None)
    manifest = artifacts.read_manifest(run_dir)
    checkpoint = Path(checkpoint) if checkpoint is not None else run_dir / artifacts.CHECKPOINT
    step("load checkpoint and data")
    model, payload = train.load_checkpoint(checkpoint)
    _check_checkpoint_matches_run(manifest, payload, checkpoint)
    x_val, y_val, x_test, y_test = _preprocessed_splits(manifest, payload)
    input_shape = (model.config.in_channels, model.config.height, model.config.width)
    seconds = {}

    started = time.perf_counter()
    step("export to ONNX (raw)")
    raw = export.export_module(model.eval(), input_shape, config.opset)
    twin_raw = export.export_module(_dropout_free_twin(model).eval(), input_shape, config.opset)
    seconds["export"] = time.perf_counter() - started

    started = time.perf_counter()
    step("audit the raw export")
    raw_check = verify.verify_model(raw, model, x_val, config.tolerance, config.parity_batch_sizes,
                                    config.determinism_repeats, twin_histogram=op_histogram(twin_raw))
    verify.raise_for_failures(raw_check, "raw export")
    seconds["audit_raw"] = time.perf_counter() - started

    started = time.perf_counter()
    if config.skip_simplify:
        shipped, twin_shipped, simplify_report = raw, twin_raw, None
    else:
        step("simplify with onnxsim")
        shipped, simplify_report = simplify.simplify_model(raw, config.simplify_checks)
        twin_shipped, _ = simplify.simplify_model(twin_raw, config.simplify_checks)
    seconds["simplify"] = time.perf_counter() - started
    shipped.ir_version = export.lowest_ir_version(shipped)  # the opset, not the onnx library, decides the runtime

    started = time.perf_counter()
    step("verify the model to ship")
    final_check = verify.verify_model(shipped, model, x_val, config.tolerance, config.parity_batch_sizes,
                                      config.determinism_repeats, twin_histogram=op_histogram(twin_shipped),
                                      reference_images=config.reference_images, optimized_runtime=artifacts.DEFAULT_RUNTIME)
    verify.raise_for_failures(final_check, "simplified model" if simplify_report else "exported model")
    seconds["verify"] = time.perf_counter() - started

    step("test accuracy through ONNX Runtime")
    accuracy = _ort_vs_torch_accuracy(shipped, model, x_test, y_test, x_val, y_val)

    checkpoint_sha = artifacts.sha256_file(checkpoint)
    export.strip_node_metadata(shipped)
    export.set_metadata(shipped, {
        "labels": json.dumps(manifest["labels"]), "preprocess": json.dumps(manifest["preprocess"]),
        "source_checkpoint_sha256": checkpoint_sha, "pipeline_version": artifacts.versions()["pipeline"],
        "pipeline.variant": "fp32",
    })

    step("write model.onnx")
    target = run_dir / FP32_FILE
    try:
        with artifacts.atomic_path(target) as tmp:
            export.save(shipped, tmp)
            written = load_model(tmp)  # the checker and the one-file rule, on the bytes that ship
            sha256, size = artifacts.sha256_file(tmp), tmp.stat().st_size
    except OSError as exc:
        raise artifacts.RunFolderError(f"cannot write {target}: {exc.strerror or exc}") from None

    record = _fp32_record(written, sha256, size, accuracy, raw_check, final_check, simplify_report,
                          checkpoint, checkpoint_sha, config)
    record["test_per_class"] = per_class(y_test, accuracy["ort_predictions"], manifest["labels"])
    export_section = {
        "created": artifacts.now_iso(), "config": to_dict(config),
        "checkpoint": _relative(checkpoint, run_dir, home), "checkpoint_sha256": checkpoint_sha,
        "raw_export": "kept in memory only and never shipped; audited before simplification",
        "simplified": simplify_report is not None,
        "nodes": {"raw": len(raw.graph.node), "shipped": len(written.graph.node)},
        "op_histogram": {"raw": op_histogram(raw), "shipped": op_histogram(written)},
        "twin_op_histogram": {"raw": op_histogram(twin_raw), "shipped": op_histogram(twin_shipped)},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "versions": artifacts.versions(),
    }
    dropped: list[str] = []

    def change(m: dict) -> None:
        dropped.extend(_derived_from(m.get("artifacts", {}), "fp32"))
        for name in dropped:  # their files go with their records: they were made from the old model.onnx
            (run_dir / m["artifacts"].pop(name)["file"]).unlink(missing_ok=True)
        m.setdefault("artifacts", {})["fp32"] = record
        m["export"] = export_section
        m.pop("deployments", None)  # measured on the files just replaced
        if m.get("recommended") not in m["artifacts"]:
            m["recommended"] = "fp32"

    artifacts.update_manifest(run_dir, change)
    return ExportRun(run_dir, target, record, export_section, tuple(dropped))


def _relative(path: Path, run_dir: Path, home: Path) -> str:
    """`path` relative to the run folder (its staging copy `run_dir` or its real place `home`), else as given."""
    for folder in (run_dir, home):
        try:
            return str(Path(path).resolve().relative_to(Path(folder).resolve()))
        except ValueError:
            continue
    return str(path)


def _check_checkpoint_matches_run(manifest: dict, payload: dict, checkpoint: Path) -> None:
    """A checkpoint from another run (other labels, preprocessing, architecture or data) must not be shipped under this one."""
    from pipeline.errors import CheckpointError

    mismatched = [what for what, ours, theirs in (
        ("labels", manifest.get("labels"), payload.get("labels")),
        ("preprocess", manifest.get("preprocess"), payload.get("preprocess")),
        ("model config", manifest.get("model", {}).get("config"), payload.get("model_config")),
        ("data fingerprint", manifest.get("dataset", {}).get("fingerprint"), payload.get("data_fingerprint")),
    ) if json.dumps(ours, sort_keys=True) != json.dumps(theirs, sort_keys=True)]
    if mismatched:
        raise CheckpointError(f"{checkpoint}: does not belong to this run: its {', '.join(mismatched)} differ from the manifest's")


def _preprocessed_splits(manifest: dict, payload: dict):
    """(validation inputs and labels, test inputs and labels), preprocessed as the manifest says; the data must be what the model saw."""
    from pipeline import data

    splits = data.load_trained_on(DataConfig.from_dict(payload["data_config"]), payload.get("data_fingerprint"),
                                  "the checkpoint")
    preprocess = data.Preprocess.from_dict(manifest["preprocess"])
    return preprocess.apply(splits.x_val), splits.y_val, preprocess.apply(splits.x_test), splits.y_test


def _dropout_free_twin(model):
    """The same architecture with dropout 0: its graph is what an inference graph must look like."""
    from pipeline.model import DropoutCNN

    twin_config = ModelConfig(**{**to_dict(model.config), "conv_channels": model.config.conv_channels,
                                 "fc_units": model.config.fc_units, "dropout": 0.0, "spatial_dropout": 0.0})
    return DropoutCNN(twin_config)


def _ort_vs_torch_accuracy(proto, model, x_test, y_test, x_val, y_val) -> dict:
    """Test accuracy through ONNX Runtime and PyTorch, their disagreements, and ONNX Runtime's validation accuracy."""
    import numpy as np

    from pipeline.runtime import create_session, run_batched
    from pipeline.train import predictions

    session = create_session(proto.SerializeToString(), runtime=artifacts.DEFAULT_RUNTIME)
    ort_pred = run_batched(session, x_test).argmax(1)
    torch_pred = predictions(model, x_test)
    return {"ort": float(np.mean(ort_pred == y_test)), "torch": float(np.mean(torch_pred == y_test)),
            "differing_predictions": int(np.sum(ort_pred != torch_pred)), "test_images": int(len(y_test)),
            "ort_predictions": ort_pred,
            "validation": float(np.mean(run_batched(session, x_val).argmax(1) == y_val))}


def _fp32_record(written, sha256: str, size: int, accuracy: dict, raw_check, final_check, simplify_report,
                 checkpoint: Path, checkpoint_sha: str, config) -> dict:
    from pipeline.onnxfile import io_signature, opset

    signature = io_signature(written)
    return schema.Artifact(
        file=FP32_FILE, kind="fp32", parent=None, sha256=sha256, bytes=size,
        opset=opset(written), ir_version=written.ir_version,
        input=signature["inputs"][0], output=signature["outputs"][0],
        validation_accuracy=accuracy["validation"], test_accuracy=accuracy["ort"], chosen_on="validation",
        runtime=dict(artifacts.DEFAULT_RUNTIME),
        verification={
            "passed": True, "tolerance": config.tolerance,
            "torch_test_accuracy": accuracy["torch"], "ort_test_accuracy": accuracy["ort"],
            "differing_predictions": accuracy["differing_predictions"], "test_images": accuracy["test_images"],
            "max_abs_diff": max(v for v in (raw_check.max_abs_diff, final_check.max_abs_diff) if v is not None),
            "raw": raw_check.to_dict(), "shipped": final_check.to_dict(),
            "simplify": simplify_report.to_dict() if simplify_report else {"skipped": True},
            "source_checkpoint_sha256": checkpoint_sha,
        },
    ).to_dict()


def _derived_from(records: dict, root: str) -> list[str]:
    """Names of the artifact records whose parent chain reaches `root`."""
    def reaches(name: str, seen: frozenset = frozenset()) -> bool:
        parent = records.get(name, {}).get("parent")
        if parent is None or parent in seen:
            return False
        return parent == root or reaches(parent, seen | {name})

    return [name for name in records if name != root and reaches(name)]


def adopt_checkpoint(checkpoint: Path, out: Path, force: bool = False) -> Path:
    """A new run folder around a checkpoint from elsewhere, ready for `export_run`; returns `out`.

    The checkpoint must load into its recorded architecture and its training data must still be
    readable with the same fingerprint (the export checks accuracy on its test split). The folder
    is built in `<out>.partial/` and renamed into place only when complete.
    """
    import shutil

    from pipeline import data, train
    from pipeline.model import count_parameters

    checkpoint = Path(checkpoint)
    model, payload = train.load_checkpoint(checkpoint)
    data_config = DataConfig.from_dict(payload["data_config"])
    splits = data.load_trained_on(data_config, payload.get("data_fingerprint"), str(checkpoint))
    preprocess = data.Preprocess.from_dict(payload["preprocess"])
    val_accuracy, test_accuracy = (float((train.predictions(model, preprocess.apply(x)) == y).mean())
                                   for x, y in ((splits.x_val, splits.y_val), (splits.x_test, splits.y_test)))
    staging = artifacts.start_run(out, force)
    try:
        shutil.copyfile(checkpoint, staging / artifacts.CHECKPOINT)
        manifest = _new_manifest(
            payload["labels"], preprocess, _dataset_record(splits, data_config),
            schema.Model(payload["model_config"], count_parameters(model)),
            schema.Training(checkpoint=artifacts.CHECKPOINT,
                            checkpoint_sha256=artifacts.sha256_file(staging / artifacts.CHECKPOINT),
                            adopted_from=str(checkpoint), config=payload.get("train_config"),
                            validation_accuracy=val_accuracy, test_accuracy=test_accuracy, best_epoch=payload.get("epoch")))
        artifacts.write_manifest(staging, manifest)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise artifacts.RunFolderError(f"cannot write {staging}: {exc.strerror or exc}") from None
    artifacts.finish_run(staging, out)
    return Path(out)


# --- quantize: int8 (and fp16) variants of the exported fp32 model --------------------------


@dataclass(frozen=True)
class QuantizeRun:
    run_dir: Path
    variant: str
    """The int8 artifact written (`int8`, `int8_dynamic`, ...)."""
    record: dict
    """Its manifest record as written."""
    fp16_record: dict | None
    recommended: str
    recommended_reason: str
    variants: list
    """The manifest's "variants" table: one row per artifact (size, accuracy, agreement, latency ratios)."""
    warnings: tuple[str, ...]
    """Loud ones for the terminal (int8 slower than fp32 on this host, ...)."""


def quantize_run(run_dir: Path, config, fp16_config=None, calibration=None,
                 on_step: Callable[[str], None] | None = None) -> QuantizeRun:
    """int8 (and fp16) variants of the run's fp32 artifact (see `_quantize`), all or nothing: the files and
    their records appear together, after the gates and the speed check, or not at all."""
    run_dir = Path(run_dir)
    artifacts.read_manifest(run_dir)
    with artifacts.staged_update(run_dir) as stage:
        result = _quantize(stage, config, fp16_config, calibration, on_step)
    return _published(result, stage, run_dir)


def _quantize(run_dir: Path, config, fp16_config, calibration, on_step: Callable[[str], None] | None) -> QuantizeRun:
    """Build `model.<variant>.onnx` (int8) from the run's fp32 artifact, gated on validation accuracy, and record it.

    fp32 file (sha256 checked against the manifest) -> calibration sample of the training split
    -> one int8 candidate per recipe (`quantize.recipes_to_try`), each through `quantize.quantize_gated`
    on the validation split -> optional fp16 variant, gated on the validation split -> one speed check
    of fp32, every passing candidate and fp16 on this host -> the fastest candidate never slower than
    ORT's default recipe ships as `model.<variant>.onnx` (`quantize.choose_candidate`) -> test accuracy
    of each shipped file, measured once after every choice -> manifest records (the int8 record lists
    every candidate), the "variants" table, `recommended` (int8 only when it is not slower than fp32
    here) and `deployments` per measured batch size. `config` is a
    `QuantizeConfig`, `fp16_config` an `Fp16Config` or None. `calibration` overrides the
    calibration images (preprocessed N x C x H x W float32), e.g. a user's representative set.
    Imports no torch.
    """
    import numpy as np

    from pipeline import data, quantize
    from pipeline.metrics import per_class

    step = on_step or (lambda name: None)
    manifest = artifacts.read_manifest(run_dir)
    fp32 = manifest.get("artifacts", {}).get("fp32")
    if not fp32:
        raise artifacts.RunFolderError(f"{run_dir}: no fp32 artifact in the manifest: run "
                                       f"`pipeline export --run {shlex.quote(str(run_dir))}` first")
    fp32_path = run_dir / fp32["file"]
    if not fp32_path.is_file() or artifacts.sha256_file(fp32_path) != fp32.get("sha256"):
        raise artifacts.RunFolderError(f"{fp32_path}: missing or not the file the manifest records (sha256 differs): "
                                       f"re-run `pipeline export --run {shlex.quote(str(run_dir))}`")
    fp32_runtime = fp32.get("runtime") or dict(artifacts.DEFAULT_RUNTIME)

    step("load data")
    splits = data.load_trained_on(DataConfig.from_dict(manifest["dataset"]["config"]),
                                  manifest["dataset"].get("fingerprint"), str(run_dir))
    preprocess = data.Preprocess.from_dict(manifest["preprocess"])
    x_train, x_val, x_test = (preprocess.apply(x) for x in (splits.x_train, splits.x_val, splits.x_test))
    if calibration is None:
        calibration = quantize.sample_images(x_train, config.calibration_samples, config.seed)
        calibration_source = f"training split, {len(calibration)} of {len(x_train)} images, seed {config.seed}"
    else:
        calibration = np.ascontiguousarray(calibration, dtype=np.float32)
        calibration_source = f"given by the caller, {len(calibration)} images"
    probe = quantize.sample_images(x_train, config.sensitivity_samples, config.seed + 1)

    variant = config.artifact
    target = run_dir / f"model.{variant}.onnx"
    # Recipes searched, not fixed: every candidate is gated on the validation split; the passing ones are
    # timed against each other (and fp32, fp16) in one speed check and the fastest ships as `target`.
    candidates = quantize.build_candidates(
        fp32_path, run_dir, config, calibration if config.mode == "static" else None, probe, x_val, splits.y_val,
        fp32_runtime, on_recipe=lambda name: step(f"int8 candidate {name}: quantize and gate on validation"),
        labels=manifest["labels"])
    passed = [c for c in candidates if c.passed]
    warnings: list[str] = []
    models = {"fp32": (fp32_path, fp32_runtime), **{c.recipe: (c.path, c.result.runtime) for c in passed}}

    fp16_result = None
    if fp16_config is not None:
        step("fp16 variant")
        fp16_result = quantize.to_fp16(fp32_path, run_dir / "model.fp16.onnx", fp16_config, x_val, splits.y_val,
                                       fp32_runtime, labels=manifest["labels"])
        models["fp16"] = (fp16_result.path, fp16_result.runtime)

    speed, other_engines, engine_checks = None, {}, {}
    if config.speed_check:
        step("candidates under the other installed engines: agreement with ONNX Runtime fp32 on validation images")
        other_engines, engine_checks = _other_engine_pairs(passed, config, x_val, fp32_path, fp32_runtime, fp32)
        step(f"speed check: fp32 and {len(models) - 1 + len(other_engines)} candidate pair(s), interleaved, on this host")
        speed = quantize.speed_check(models, x_val, config, other_engines)  # timing only: no label is read
    chosen, choice_reason = quantize.choose_candidate(candidates, speed, config.speed_tolerance)
    result = chosen.result
    chosen.path.replace(target)  # the shipped int8 is the chosen candidate's bytes, under the artifact's name
    # A candidate that beats the shipped one by more than 3% at some batch size ships too, as `<variant>-<recipe>`,
    # and that batch size's deployment names it (one file cannot be the fastest at every batch size on every host).
    per_batch = quantize.per_batch_files(candidates, speed, chosen)
    extras = {f"{variant}-{c.recipe}": c for c in passed if c.recipe in per_batch}
    for name, c in extras.items():
        c.path.replace(run_dir / f"model.{name}.onnx")
    for c in candidates:
        if c is not chosen and c.recipe not in per_batch and not (config.keep_candidates and c.passed):
            c.path.unlink(missing_ok=True)
    if speed is not None:
        speed = quantize.speed_alias(speed, chosen.recipe, variant)
        for name, c in extras.items():
            speed = quantize.speed_alias(speed, c.recipe, name)
        slower = quantize.slower_batches(speed, variant, config.speed_tolerance)
        if slower:
            warnings.append(f"{variant} is SLOWER than fp32 on this host: "
                            + ", ".join(f"{ratio:.2f}x the fp32 latency at {key.replace('_', ' ')}" for key, ratio in slower)
                            + f" (threads {config.threads or '1 at batch 1, all cores above'}); fp32 stays recommended")
    shipped = {"fp32": models["fp32"], variant: (target, result.runtime),
               **{name: (run_dir / f"model.{name}.onnx", c.result.runtime) for name, c in extras.items()}}
    if fp16_result is not None:
        shipped["fp16"] = models["fp16"]
    models = shipped

    # Every choice is made: measure the test split once per shipped file. Nothing below feeds back.
    step("test accuracy of the shipped files (once, after every choice)")
    fp32_test = quantize.score(fp32_path, fp32_runtime, x_test, splits.y_test, None)[0]
    tested = {name: quantize.score(path, settings, x_test, splits.y_test, fp32_test.predictions)[0]
              for name, (path, settings) in models.items() if name != "fp32"}
    calibrated = {"calibration_source": calibration_source, "calibration_images": int(len(calibration))}
    record = _int8_record(variant, chosen, target, fp32, tested[variant], speed, calibrated, recipe_choice=choice_reason,
                          candidates=quantize.candidate_records(candidates, speed, chosen.recipe, config.keep_candidates,
                                                                engine_checks, tuple(per_batch)))
    records = {variant: record}
    for name, c in extras.items():
        batches = [key.replace("_", " ").replace("@", " on ") for key in per_batch[c.recipe]]
        records[name] = _int8_record(name, c, shipped[name][0], fp32, tested[name], speed, calibrated, shipped_for=batches,
                                     recipe_choice=f"{c.recipe}: more than {100 * quantize.PER_BATCH_MARGIN:.0f}% faster "
                                                   f"than the shipped int8 at {', '.join(batches)} in the export's speed "
                                                   "check (the int8 record lists every candidate)")
    if fp16_result is not None:
        fp16_record = _derived_record(fp16_result.path, "fp16", "fp32", fp32, fp16_result.accuracy, fp16_result.agreement,
                                      fp16_result.runtime, tested["fp16"])
        fp16_record["target"] = "gpu (checked on " + fp16_result.config.provider + ")"
        fp16_record["fp16"] = to_dict(fp16_result.config)
        fp16_record["verification"] = fp16_result.verification()
        fp16_record["latency"] = _latency_for(speed, "fp16")
        records["fp16"] = fp16_record
    new_deployments = []
    for name, entry in records.items():
        entry["test_per_class"] = per_class(splits.y_test, tested[name].predictions, manifest["labels"])
    if speed is not None:
        for entry in records.values():
            entry["latency"]["host"] = deployments.host()
        new_deployments = deployments.from_speed_check(speed, ("fp32", variant, *extras), artifacts.now_iso())
    # The per-batch files of an earlier quantization of this variant are replaced, not left beside the new ones.
    stale = [name for name in _per_batch_names(manifest, variant) if name not in records]
    for name in stale:
        (run_dir / manifest["artifacts"][name]["file"]).unlink(missing_ok=True)

    outcome: dict = {}

    def change(m: dict) -> None:
        for name in stale:
            m["artifacts"].pop(name, None)
        m.setdefault("artifacts", {}).update(records)
        # Measurements of the files just replaced are stale: the export's speed check starts the list again.
        kept = [d for d in m.pop("deployments", None) or [] if d["artifact"] not in records and d["artifact"] not in stale]
        if kept or new_deployments:
            m["deployments"] = deployments.merged(kept, new_deployments)
        m["recommended"], m["recommended_reason"] = _recommend(m["artifacts"], config.speed_tolerance)
        m["variants"] = _variants_table(m["artifacts"])
        outcome.update(recommended=m["recommended"], reason=m["recommended_reason"], variants=m["variants"])

    artifacts.update_manifest(run_dir, change)
    return QuantizeRun(run_dir, variant, record, records.get("fp16"), outcome["recommended"], outcome["reason"],
                       outcome["variants"], tuple(warnings))


def _int8_record(name: str, candidate, path: Path, fp32: dict, test, speed: dict | None, calibrated: dict,
                 **choice) -> dict:
    """The record of a shipped int8 candidate under artifact `name`: validation numbers (they chose), test numbers
    (`test`, measured once), its recipe and calibration, and `choice` (why it ships: `recipe_choice`, and
    `candidates` for the main int8 or `shipped_for` for a per-batch file)."""
    from pipeline import quantize

    result = candidate.result
    record = _derived_record(path, "int8", "fp32", fp32, result.accuracy, result.agreement, result.runtime, test)
    record["quantization"] = {**quantize.config_record(candidate.config), **calibrated,
                              "excluded_nodes": list(result.excluded), "recipe": candidate.recipe, **choice}
    record["verification"] = {"gate": result.gate_dict(), "structure": result.structure, "size_ratio": record["size_ratio"]}
    record["latency"] = _latency_for(speed, name)
    return record


def _per_batch_names(manifest: dict, variant: str) -> list[str]:
    """The artifacts a quantization of `variant` shipped for some batch sizes only (`<variant>-<recipe>`)."""
    return [name for name, record in (manifest.get("artifacts") or {}).items()
            if name.startswith(variant + "-") and "shipped_for" in (record.get("quantization") or {})]


def _other_engine_pairs(passed, config, x_val, fp32_path: Path, fp32_runtime: dict, fp32_record: dict) -> tuple[dict, dict]:
    """({"<recipe>@<engine>": target}, {(recipe, engine): check}): every passing candidate under each other engine
    (config.engines, or OpenVINO where installed) that agrees with ONNX Runtime fp32 on the validation images."""
    from pipeline import engines, runtime

    names = [e for e in (config.engines or (engines.ONNXRUNTIME, "openvino")) if e != engines.ONNXRUNTIME]
    names = [e for e in names if engines.available(e)[0]]
    if not names or not passed:
        return {}, {}
    logits = runtime.run_batched(runtime.create_session(fp32_path, fp32_runtime), x_val)
    tolerance = float((fp32_record.get("verification") or {}).get("tolerance") or 1e-4)
    reference = engines.Reference(x_val, logits, tolerance, f"validation split, {len(x_val)} images, ONNX Runtime fp32")
    pairs, checks = {}, {}
    for engine in names:
        for c in passed:
            target = engines.OpenVinoTarget(name=c.recipe, path=c.path, kind="int8", input_shape=tuple(x_val.shape[1:]),
                                            engine=engine)
            checks[(c.recipe, engine)] = engines.checked(target, reference)
            if checks[(c.recipe, engine)]["passed"]:
                pairs[f"{c.recipe}@{engine}"] = target
    return pairs, checks


def _derived_record(path: Path, kind: str, parent: str, parent_record: dict, val_accuracy: float, val_agreement: float,
                    runtime_settings: dict, test) -> dict:
    """A derived artifact's record: validation numbers (they chose) apart from test numbers (`test`, a
    `quantize.Score` measured once after every choice)."""
    from pipeline.onnxfile import io_signature, load_model, opset

    model = load_model(path)  # the checker and the one-file rule, on the bytes that ship
    signature = io_signature(model)
    size = path.stat().st_size
    return schema.Artifact(
        file=path.name, kind=kind, parent=parent, sha256=artifacts.sha256_file(path), bytes=size,
        size_ratio=round(size / parent_record["bytes"], 4), opset=opset(model), ir_version=model.ir_version,
        input=signature["inputs"][0], output=signature["outputs"][0],
        validation_accuracy=val_accuracy, agreement=val_agreement,
        test_accuracy=test.accuracy, test_agreement=test.agreement, chosen_on="validation",
        runtime=dict(runtime_settings), created=artifacts.now_iso()).to_dict()


def _latency_for(speed: dict | None, name: str) -> dict:
    """{"batch_1": {"fp32_ms", "ms", "ratio"}, ...}: the variant's latencies against fp32 from one interleaved run."""
    if speed is None:
        return {"checked": False}
    result: dict = {"checked": True, "threads": speed["threads"]}
    for key, entry in speed.items():
        if key.startswith("batch_") and f"{name}_ms" in entry:
            result[key] = {"fp32_ms": entry["fp32_ms"], "ms": entry[f"{name}_ms"], "ratio": entry[f"{name}_ratio"],
                           **({"threads": entry["threads"]} if "threads" in entry else {})}
    return result


def _recommend(records: dict, tolerance: float) -> tuple[str, str]:
    """`int8` (the default recipe) if it is not slower than fp32 at any measured batch, else the fastest other
    int8 variant that is not; else fp32, with the reason. Ratios of different variants come from separate
    speed checks, so the default recipe is preferred rather than ranked by noise."""
    if "fp32" not in records:
        return next(iter(records)), "no fp32 artifact"
    timed, reasons = [], []
    for name, record in records.items():
        if record.get("kind") != "int8":
            continue
        latency = record.get("latency", {})
        ratios = {k: v["ratio"] for k, v in latency.items() if k.startswith("batch_")}
        if not latency.get("checked") or not ratios:
            reasons.append(f"{name}: speed not checked on this host")
        elif max(ratios.values()) > 1.0 + tolerance:
            worst = max(ratios, key=ratios.get)
            reasons.append(f"{name}: {ratios[worst]:.2f}x the fp32 latency at {worst.replace('_', ' ')}")
        else:
            timed.append((max(ratios.values()), name, ratios))
    if timed:
        _, _, name, ratios = min((n != "int8", worst, n, r) for worst, n, r in timed)
        return name, f"{name} passed its accuracy gate and is not slower than fp32 on this host (latency ratios " + \
            ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in ratios.items()) + ")"
    if not reasons:
        return "fp32", "no int8 artifact"
    return "fp32", "no int8 variant was as fast as fp32 in the export's speed check on this host: " + "; ".join(reasons)


def _variants_table(records: dict) -> list[dict]:
    """One row per artifact: what a user compares before choosing a file to ship."""
    fp32_bytes = records.get("fp32", {}).get("bytes")
    rows = []
    for name, record in records.items():
        latency = record.get("latency", {})
        rows.append({
            "variant": name, "kind": record.get("kind"), "file": record.get("file"), "bytes": record.get("bytes"),
            "size_ratio": round(record["bytes"] / fp32_bytes, 4) if fp32_bytes and record.get("bytes") else None,
            "test_accuracy": record.get("test_accuracy"),
            "agreement": 1.0 if name == "fp32" else record.get("agreement"),
            "latency_ratio": {k: v["ratio"] for k, v in latency.items() if k.startswith("batch_")} or None,
        })
    return rows


# --- MC dropout: model.mc.onnx, dropout active at inference, with uncertainty outputs -------


@dataclass(frozen=True)
class MCRun:
    run_dir: Path
    model_path: Path
    plot_path: Path
    record: dict
    """The manifest's artifacts["mc"] record as written."""


def mc_export_run(run_dir: Path, config, on_step: Callable[[str], None] | None = None) -> MCRun:
    """`model.mc.onnx` and its record (see `_mc_export`), all or nothing."""
    run_dir = Path(run_dir)
    artifacts.read_manifest(run_dir)
    with artifacts.staged_update(run_dir) as stage:
        result = _mc_export(stage, config, on_step)
    return _published(result, stage, run_dir)


def _mc_export(run_dir: Path, config, on_step: Callable[[str], None] | None) -> MCRun:
    """Export the run's checkpoint as `model.mc.onnx` (Monte Carlo dropout), verify and evaluate it.

    export (masks from random ops) -> verification (random ops survive every ORT level and onnxsim,
    runs differ, accuracy gate, convergence) -> usefulness (OOD AUROC, rejection curve) -> the file
    takes its name only when every check passed -> plot -> manifest artifacts["mc"]. The fp32
    `model.onnx`, if exported, is checked untouched and still passing its dropout audit. `config`
    is an `MCConfig`.
    """
    import time

    from pipeline import mc, verify
    from pipeline.onnxfile import io_signature, load_model, opset

    step = on_step or (lambda name: None)
    manifest = artifacts.read_manifest(run_dir)
    checkpoint = run_dir / manifest["training"]["checkpoint"]
    step("load checkpoint and data")
    reference = mc.load_reference(run_dir, manifest)
    fp32_before = _fp32_state(run_dir, manifest)
    seconds = {}
    target = run_dir / mc.MC_FILE
    checkpoint_sha = artifacts.sha256_file(checkpoint)
    metadata = {"labels": json.dumps(manifest["labels"]), "preprocess": json.dumps(manifest["preprocess"]),
                "source_checkpoint_sha256": checkpoint_sha, "pipeline_version": artifacts.versions()["pipeline"]}
    try:
        with artifacts.atomic_path(target) as tmp:
            started = time.perf_counter()
            step(f"export the MC dropout model ({config.samples} samples)")
            mc.export_mc(checkpoint, tmp, config, metadata)
            seconds["export"] = time.perf_counter() - started
            started = time.perf_counter()
            step("verify: random ops, ORT levels, onnxsim, accuracy, convergence")
            verification = mc.verify_mc(tmp, reference, config, artifacts.DEFAULT_RUNTIME)
            seconds["verify"] = time.perf_counter() - started
            started = time.perf_counter()
            step("evaluate: out-of-distribution AUROC, rejection curve")
            evaluation = mc.evaluate_uncertainty(tmp, reference, config, artifacts.DEFAULT_RUNTIME, verification.test_outputs)
            seconds["evaluate"] = time.perf_counter() - started
            written = load_model(tmp)
            sha256, size = artifacts.sha256_file(tmp), tmp.stat().st_size
    except OSError as exc:
        raise artifacts.RunFolderError(f"cannot write {target}: {exc.strerror or exc}") from None

    step("plot and record")
    plot = run_dir / mc.PLOT_FILE
    accuracy = verification.record["accuracy"]
    mc.plot_uncertainty(evaluation, plot, f"MC dropout, N={config.samples}: test accuracy {100 * accuracy['mc']:.2f}% "
                                          f"(deterministic {100 * accuracy['deterministic']:.2f}%)")
    fp32_after = _fp32_state(run_dir, manifest)
    if fp32_before != fp32_after or (fp32_after and not fp32_after["audit_passed"]):
        raise mc.MCVerificationError(f"{run_dir / FP32_FILE}: changed or no longer passes its dropout audit "
                                     f"during the MC export (before {fp32_before}, after {fp32_after})")
    mc_audit = verify.audit_graph(written)
    signature = io_signature(written)
    record = schema.Artifact(
        file=mc.MC_FILE, kind="mc", parent=None, sha256=sha256, bytes=size,
        opset=opset(written), ir_version=written.ir_version,
        input=signature["inputs"][0], output=signature["outputs"][0],
        outputs=[{**value, "meaning": mc.OUTPUT_MEANINGS[value["name"]]} for value in signature["outputs"]],
        samples=config.samples,
        validation_accuracy=verification.record["gate"]["mc"], test_accuracy=accuracy["mc"], chosen_on="validation",
        runtime=dict(artifacts.DEFAULT_RUNTIME),
        randomness=("dropout masks come from RandomUniformLike ops: every run draws new masks. "
                    "Call onnxruntime.set_seed(s) before creating a session to make a process reproducible."),
        verification={"passed": True, **verification.record,
                      "fp32_untouched": fp32_after or {"exported": False},
                      "deterministic_audit_on_mc": {"passed": mc_audit.passed, "findings": len(mc_audit.findings),
                                                    "note": "expected to fail: this model is random on purpose"},
                      "source_checkpoint_sha256": checkpoint_sha},
        evaluation={**evaluation.record, "plot": mc.PLOT_FILE},
        config=to_dict(config),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        created=artifacts.now_iso(),
    ).to_dict()
    artifacts.update_manifest(run_dir, lambda m: m.setdefault("artifacts", {}).__setitem__("mc", record))
    return MCRun(run_dir, target, plot, record)


def _fp32_state(run_dir: Path, manifest: dict) -> dict | None:
    """sha256 of model.onnx (recorded and on disk) and whether it passes the dropout audit; None if not exported."""
    from pipeline import verify
    from pipeline.onnxfile import load_model

    record = manifest.get("artifacts", {}).get("fp32")
    path = Path(run_dir) / FP32_FILE
    if record is None or not path.is_file():
        return None
    return {"sha256": artifacts.sha256_file(path), "matches_manifest": artifacts.sha256_file(path) == record.get("sha256"),
            "audit_passed": verify.audit_graph(load_model(path)).passed}
