"""The study stage: the same CNN trained with each regularizer, over seeds and training-set sizes.

The claim behind dropout is that it curbs overfitting better than nothing and differently from
L1/L2 penalties, at some training cost and no inference cost. This stage measures that claim on
the user's data instead of asserting it:

- every variant (see `variants`) is trained with `train.train` on the SAME splits, once per
  seed and training-set size, so a comparison between variants is paired (same data, same
  initialisation seed); only the regularizer differs;
- runs are interleaved (size -> seed -> variant), so machine load drifts hit all variants alike;
- each checkpoint is evaluated in eval mode on the train, validation and test splits: the
  generalization gap is train minus test accuracy and validation minus train loss, both
  measured without dropout active;
- one model per variant is exported to ONNX and timed under ONNX Runtime, all variants in one
  interleaved loop; the graph is audited for dropout/random ops, which should be absent.

Every variant keeps `train.train`'s checkpoint choice (the epoch of best validation loss), so
early stopping by model choice applies to all of them alike, "none" included.
Writes `study.json` (atomic), `curves.png` and `accuracy_vs_size.png` into the study folder, and
the exported `onnx/<variant>.onnx` files the latencies were measured on.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline import artifacts
from pipeline.config import DataConfig, ModelConfig, StudyConfig, TrainConfig, to_dict
from pipeline.errors import RunFolderError

log = logging.getLogger(__name__)

STUDY_JSON = "study.json"
CURVES_PNG = "curves.png"
SIZES_PNG = "accuracy_vs_size.png"
WORK_DIR = ".work"
ONNX_DIR = "onnx"
STUDY_SCHEMA = 1


@dataclass(frozen=True)
class Variant:
    """One regularizer setting: what changes in the model and in training."""

    name: str
    label: str
    dropout: float = 0.0
    spatial_dropout: float = 0.0
    weight_decay: float = 0.0
    l1: float = 0.0

    def settings(self) -> dict:
        return {"dropout": self.dropout, "spatial_dropout": self.spatial_dropout,
                "weight_decay": self.weight_decay, "l1": self.l1}


@dataclass(frozen=True)
class StudyResult:
    path: Path
    """The study.json written."""
    report: dict
    """Its content."""


def variants(config: StudyConfig) -> tuple[Variant, ...]:
    """The variants the config asks for, in the config's order, with their rates filled in."""
    every = {
        "none": Variant("none", "none"),
        "dropout_low": Variant("dropout_low", f"dropout {config.dropout_low:g}", dropout=config.dropout_low),
        "dropout_high": Variant("dropout_high", f"dropout {config.dropout_high:g}", dropout=config.dropout_high),
        "spatial_dropout": Variant("spatial_dropout", f"spatial dropout {config.spatial_dropout:g}",
                                   spatial_dropout=config.spatial_dropout),
        "l2": Variant("l2", f"L2 {config.weight_decay:g}", weight_decay=config.weight_decay),
        "l1": Variant("l1", f"L1 {config.l1:g}", l1=config.l1),
        "dropout_l2": Variant("dropout_l2", f"dropout {config.dropout_high:g} + L2 {config.weight_decay:g}",
                              dropout=config.dropout_high, weight_decay=config.weight_decay),
    }
    return tuple(every[name] for name in config.variants)


def variant_configs(variant: Variant, config: StudyConfig, seed: int) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs of one variant and seed (input shape still to be set from the data)."""
    model = ModelConfig(conv_channels=config.conv_channels, fc_units=config.fc_units, dropout=variant.dropout,
                        spatial_dropout=variant.spatial_dropout, batch_norm=False,
                        strided_first_conv=config.strided_first_conv)
    # patience 0: a fixed epoch budget, so curves and seconds per epoch compare like with like.
    training = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, optimizer="adam", lr=config.lr,
                           schedule="cosine", weight_decay=variant.weight_decay, l1=variant.l1, patience=0,
                           seed=seed, device="cpu", threads=config.threads)
    return model, training


def run_study(data_config: DataConfig, config: StudyConfig, out: Path, force: bool = False,
              on_event: Callable[[dict], None] | None = None) -> StudyResult:
    """Train every variant x seed x training-set size, export and time one model per variant, write the report.

    `on_event` receives progress dicts: {"event": "start", "total": n, ...}, {"event": "trained", ...},
    {"event": "epoch", ...}, {"event": "exported", ...}, {"event": "timed", ...}.
    """
    out = Path(out)
    _prepare_out(out, force)
    emit = on_event or (lambda _event: None)
    chosen = variants(config)
    work = out / WORK_DIR
    started = time.perf_counter()

    size_splits = _load_sizes(data_config, config)
    total = len(size_splits) * len(config.seeds) * len(chosen)
    first = next(iter(size_splits.values()))
    emit({"event": "start", "total": total, "variants": len(chosen), "source": first.source,
          "sizes": list(size_splits), "val": len(first.y_val), "test": len(first.y_test), "epochs": config.epochs})

    runs: list[dict] = []
    last_models: dict[str, object] = {}
    try:
        _warm_up(first, data_config, config, work)
        for size, splits in size_splits.items():
            for index, seed in enumerate(config.seeds):
                # Rotate the order per seed, so no variant always trains first (cold caches) or last.
                for variant in chosen[index % len(chosen):] + chosen[:index % len(chosen)]:
                    record, model = _train_one(splits, data_config, variant, config, seed, work, emit)
                    record["train_size"] = size
                    runs.append(record)
                    # The largest size is last: its models are the ones exported and timed.
                    if seed == config.seeds[0]:
                        last_models[variant.name] = model
                    emit({"event": "trained", **{k: record[k] for k in ("variant", "seed", "test_accuracy")},
                          "train_size": size})
        exports = _export_all(last_models, first.preprocess, out / ONNX_DIR, config.opset, emit)
        latency = _time_all({name: out / record["file"] for name, record in exports.items()}, config,
                            first.preprocess, emit)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = _report(data_config, config, chosen, size_splits, runs, exports, latency,
                     time.perf_counter() - started)
    _plot_curves(report, out / CURVES_PNG)
    _plot_sizes(report, out / SIZES_PNG)
    path = out / STUDY_JSON
    artifacts.atomic_write_json(path, report)
    return StudyResult(path, report)


# --- training -----------------------------------------------------------------------------


def _prepare_out(out: Path, force: bool) -> None:
    if (out / STUDY_JSON).exists() and not force:
        raise RunFolderError(f"{out} already holds a study: choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create {out}: {exc.strerror}") from None
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)


def _load_sizes(data_config: DataConfig, config: StudyConfig) -> dict:
    """{actual training-set size: splits}, smallest first; sizes above what the data has collapse to 'all'."""
    from pipeline import data

    by_size: dict[int, object] = {}
    for requested in sorted(config.train_sizes):
        splits = data.load(replace(data_config, max_train_samples=requested))
        actual = len(splits.y_train)
        if actual in by_size:
            log.info("training size %d gives the same %d images as a smaller request; skipped", requested, actual)
            continue
        by_size[actual] = splits
    return by_size


def _warm_up(splits, data_config: DataConfig, config: StudyConfig, work: Path) -> None:
    """One untimed epoch first: the first training in a process pays one-off costs (allocator, kernels)."""
    from pipeline import train

    model_base, train_config = variant_configs(Variant("warm-up", "warm-up"), config, seed=0)
    run_dir = work / "warm-up"
    run_dir.mkdir(parents=True)
    train.train(splits, data_config, train.model_config_for(splits, model_base), replace(train_config, epochs=1), run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)


def _train_one(splits, data_config: DataConfig, variant: Variant, config: StudyConfig, seed: int,
               work: Path, emit: Callable[[dict], None]) -> tuple[dict, object]:
    from pipeline import train
    from pipeline.model import count_parameters

    model_base, train_config = variant_configs(variant, config, seed)
    model_config = train.model_config_for(splits, model_base)
    run_dir = work / f"{variant.name}-s{seed}-n{len(splits.y_train)}"
    run_dir.mkdir(parents=True)

    def on_epoch(epoch) -> None:
        emit({"event": "epoch", "variant": variant.name, "seed": seed, "epoch": epoch.epoch, "epochs": config.epochs})

    result = train.train(splits, replace(data_config, max_train_samples=len(splits.y_train)), model_config,
                         train_config, run_dir, on_epoch=on_epoch)
    model, _ = train.load_checkpoint(result.checkpoint)
    data = train.feeds(splits, train.resolve_device("cpu"))
    measured = {name: train.evaluate(model, data[name]) for name in ("train", "val", "test")}
    shutil.rmtree(run_dir, ignore_errors=True)
    record = {
        "variant": variant.name, "seed": seed,
        "train_accuracy": measured["train"][1], "train_loss": measured["train"][0],
        "val_accuracy": measured["val"][1], "val_loss": measured["val"][0],
        "test_accuracy": measured["test"][1], "test_loss": measured["test"][0],
        "accuracy_gap": measured["train"][1] - measured["test"][1],
        "loss_gap": measured["val"][0] - measured["train"][0],
        "best_epoch": result.best_epoch, "seconds_per_epoch": result.seconds_per_epoch,
        "parameters": count_parameters(model),
        "history": [h.to_dict() for h in result.history],
    }
    return record, model


# --- ONNX export and latency ------------------------------------------------------------------


def _export_all(models: dict, preprocess, folder: Path, opset: int, emit: Callable[[dict], None]) -> dict:
    """{variant: {"file", "sha256", "bytes", "ops", "random_ops", "audit"}}; every model exported in eval mode."""
    from pipeline import export, onnxfile, verify

    folder.mkdir(parents=True, exist_ok=True)
    shape = (preprocess.channels, *preprocess.size)
    exports = {}
    for name, model in models.items():
        path = folder / f"{name}.onnx"
        proto = export.export_module(model.eval(), shape, opset)
        export.strip_node_metadata(proto)
        with artifacts.atomic_path(path) as tmp:
            export.save(proto, tmp)
        proto = onnxfile.load_model(path)
        ops = onnxfile.op_histogram(proto)
        exports[name] = {"file": str(path.relative_to(folder.parent)), "sha256": artifacts.sha256_file(path),
                         "bytes": path.stat().st_size, "ops": ops, "random_ops": count_random_ops(ops),
                         "audit": verify.audit_graph(proto).to_dict()}
        emit({"event": "exported", "variant": name})
    return exports


def count_random_ops(ops: dict[str, int]) -> int:
    """Dropout nodes (active or not) and random ops in an op histogram: all should be gone after an eval() export."""
    from pipeline.verify import RANDOM_OPS

    return sum(count for op, count in ops.items() if op == "Dropout" or op in RANDOM_OPS)


def _time_all(paths: dict[str, Path], config: StudyConfig, preprocess, emit: Callable[[dict], None]) -> dict:
    """Batch-1 latency of every exported model, in one `time_interleaved` call so load noise hits all alike."""
    import numpy as np

    from pipeline.runtime import create_session, session_slot
    from pipeline.timing import TimingPlan, summarize, time_interleaved

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, preprocess.channels, *preprocess.size)).astype(np.float32)
    slots = {name: session_slot(create_session(path, runtime=artifacts.DEFAULT_RUNTIME, threads=config.latency_threads), x)
             for name, path in paths.items()}
    # `latency_seconds` bounds the whole loop: each slot gets its share as the harness's time limit.
    plan = TimingPlan(warmup=config.latency_warmup, runs=config.latency_runs, rounds=min(10, config.latency_runs),
                      time_limit=config.latency_seconds / max(len(slots), 1))
    time_interleaved(list(slots.values()), plan)
    result = {}
    for name, slot in slots.items():
        stats = summarize(slot.latencies_ns, 1)["latency_ms"]
        result[name] = {"p50_us": 1e3 * stats["p50"], "p90_us": 1e3 * stats["p90"],
                        "runs": len(slot.latencies_ns), "batch": 1, "threads": config.latency_threads,
                        "provider": slot.info["session_providers"][0]}
        emit({"event": "timed", "variant": name})
    return result


# --- the report ----------------------------------------------------------------------------


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _report(data_config: DataConfig, config: StudyConfig, chosen: tuple[Variant, ...], size_splits: dict,
            runs: list[dict], exports: dict, latency: dict, seconds: float) -> dict:
    first = next(iter(size_splits.values()))
    baseline_latency = latency.get("none", {}).get("p50_us")
    sizes = []
    for size in size_splits:
        at_size = [r for r in runs if r["train_size"] == size]
        none_by_seed = {r["seed"]: r for r in at_size if r["variant"] == "none"}
        rows = {}
        for variant in chosen:
            own = [r for r in at_size if r["variant"] == variant.name]
            row = {
                "label": variant.label,
                "test_accuracy": _mean_std([r["test_accuracy"] for r in own]),
                "train_accuracy": _mean_std([r["train_accuracy"] for r in own]),
                "accuracy_gap": _mean_std([r["accuracy_gap"] for r in own]),
                "loss_gap": _mean_std([r["loss_gap"] for r in own]),
                "best_epoch": _mean_std([float(r["best_epoch"]) for r in own]),
                "seconds_per_epoch": _mean_std([r["seconds_per_epoch"] for r in own]),
                "parameters": own[0]["parameters"],
            }
            if none_by_seed and variant.name != "none":
                # Paired by seed: same data, same initialisation seed, only the regularizer differs.
                diffs = [r["test_accuracy"] - none_by_seed[r["seed"]]["test_accuracy"] for r in own]
                row["test_accuracy_vs_none"] = {**_mean_std(diffs), "wins": sum(d > 0 for d in diffs),
                                                "ties": sum(d == 0 for d in diffs)}
                base = statistics.fmean(none_by_seed[r["seed"]]["seconds_per_epoch"] for r in own)
                row["seconds_per_epoch_vs_none"] = row["seconds_per_epoch"]["mean"] / base
            rows[variant.name] = row
        sizes.append({"train_size": size, "variants": rows,
                      "runs": [{k: v for k, v in r.items() if k != "history"} for r in at_size]})
    curves = _mean_curves(runs, chosen)
    variants_out = {}
    for variant in chosen:
        parameters = next(r["parameters"] for r in runs if r["variant"] == variant.name)
        record = {"label": variant.label, "settings": variant.settings(), "parameters": parameters,
                  "onnx": exports[variant.name], "latency": latency[variant.name]}
        if baseline_latency:
            record["latency"]["p50_vs_none"] = latency[variant.name]["p50_us"] / baseline_latency
        variants_out[variant.name] = record
    return {
        "schema": STUDY_SCHEMA,
        "created": artifacts.now_iso(),
        "dataset": {"source": first.source, "config": to_dict(data_config),
                    "sizes": {"train": list(size_splits), "val": len(first.y_val), "test": len(first.y_test)}},
        "config": to_dict(config),
        "seconds": seconds,
        "variants": variants_out,
        "by_size": sizes,
        "curves": curves,
        "versions": artifacts.versions(),
    }


def _mean_curves(runs: list[dict], chosen: tuple[Variant, ...]) -> list[dict]:
    """Per size and variant, the per-epoch mean over seeds of train loss (regularizer active) and validation metrics."""
    result = []
    for size in sorted({r["train_size"] for r in runs}):
        per_variant = {}
        for variant in chosen:
            histories = [r["history"] for r in runs if r["train_size"] == size and r["variant"] == variant.name]
            epochs = min(len(h) for h in histories)
            per_variant[variant.name] = {
                key: [statistics.fmean(h[e][key] for h in histories) for e in range(epochs)]
                for key in ("train_loss", "val_loss", "val_accuracy")
            }
        result.append({"train_size": size, "variants": per_variant})
    return result


# --- plots ---------------------------------------------------------------------------------


def _plot_curves(report: dict, path: Path) -> None:
    """Learning curves of every variant overlaid (mean over seeds); one row per training-set size."""
    from pipeline.report import _pyplot, save_figure

    plt = _pyplot()
    curves = report["curves"]
    fig, axes = plt.subplots(len(curves), 3, figsize=(15, 4.2 * len(curves)), squeeze=False)
    panels = (("train_loss", "train loss (regularizer active)", 1.0), ("val_loss", "validation loss", 1.0),
              ("val_accuracy", "validation accuracy (%)", 100.0))
    for row, block in zip(axes, curves, strict=True):
        for ax, (key, title, scale) in zip(row, panels, strict=True):
            for name, values in block["variants"].items():
                series = [scale * v for v in values[key]]
                ax.plot(range(1, len(series) + 1), series, label=report["variants"][name]["label"])
            ax.set(xlabel="epoch", title=title)
            ax.grid(alpha=0.3)
        row[0].set_ylabel(f"{block['train_size']} training images", fontweight="bold")
    axes[0][0].legend(fontsize="small")
    seeds = len(report["config"]["seeds"])
    fig.suptitle(f"{report['dataset']['source']}: mean over {seeds} seed{'s' if seeds > 1 else ''}")
    fig.tight_layout()
    save_figure(fig, path)


def _plot_sizes(report: dict, path: Path) -> None:
    """Test accuracy (mean +- std over seeds) against training-set size, one line per variant."""
    from pipeline.report import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [block["train_size"] for block in report["by_size"]]
    for name, variant in report["variants"].items():
        means = [100 * b["variants"][name]["test_accuracy"]["mean"] for b in report["by_size"]]
        stds = [100 * b["variants"][name]["test_accuracy"]["std"] for b in report["by_size"]]
        ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=variant["label"])
    if len(sizes) > 1:
        ax.set_xscale("log")
    ax.set(xlabel="training images", ylabel="test accuracy (%)",
           title=f"{report['dataset']['sizes']['test']} test images; bars: std over {len(report['config']['seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)
