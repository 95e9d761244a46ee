"""Compositions of stages that more than one command needs, with their records.

`train_run` is the `train` stage plus the run folder around it: staging, metrics, curves and
the first manifest. The CLI's `train`, `run` and `study` all go through it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline import artifacts
from pipeline.config import DataConfig, ModelConfig, TrainConfig, to_dict


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
        data_config = DataConfig(**{**saved_data, "data_dir": saved_data["data_dir"],
                                    "image_size": tuple(saved_data["image_size"]) if saved_data["image_size"] else None})
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

    result = train.train(splits, data_config, model_config, train_config, staging, resume=resume, on_epoch=on_epoch)
    return distributed.on_main(_write_run, splits, data_config, model_config, train_config, result, staging, out)


def _write_run(splits, data_config: DataConfig, model_config: ModelConfig, train_config: TrainConfig,
               result, staging: Path, out: Path) -> TrainRun:
    """Metrics, curves and manifest of a finished training, then the staging folder moved to `out`."""
    from pipeline.model import DropoutCNN, count_parameters
    from pipeline.report import plot_learning_curves

    history = [h.to_dict() for h in result.history]
    metrics = {"history": history, "epochs_run": len(history), "best_epoch": result.best_epoch,
               "stopped_early": result.stopped_early, "test_accuracy": result.test_accuracy,
               "test_loss": result.test_loss, "best_val_accuracy": max(h["val_accuracy"] for h in history),
               "train_seconds": result.train_seconds, "seconds_per_epoch": result.seconds_per_epoch,
               "images_per_second": len(splits.y_train) * len(history) / max(result.train_seconds, 1e-9),
               "device": result.device, "world_size": result.world_size,
               "replica_sha256": list(result.replica_digests)}
    artifacts.atomic_write_json(staging / artifacts.METRICS, metrics)
    plot_learning_curves(history, staging / artifacts.CURVES,
                         f"{splits.source}: dropout {model_config.dropout}, test accuracy {100 * result.test_accuracy:.2f}%")
    manifest = {
        "schema": artifacts.MANIFEST_SCHEMA,
        "pipeline_version": artifacts.versions()["pipeline"],
        "created": artifacts.now_iso(),
        "labels": list(splits.labels),
        "preprocess": splits.preprocess.to_dict(),
        "dataset": {"source": splits.source, "fingerprint": splits.fingerprint, "sizes": splits.sizes(),
                    "config": to_dict(data_config)},
        "model": {"config": to_dict(model_config), "parameters": count_parameters(DropoutCNN(model_config))},
        "training": {"checkpoint": artifacts.CHECKPOINT,
                     "checkpoint_sha256": artifacts.sha256_file(result.checkpoint),
                     "config": to_dict(train_config), "test_accuracy": result.test_accuracy,
                     "train_seconds": result.train_seconds, "seconds_per_epoch": result.seconds_per_epoch,
                     "epochs_run": len(history), "best_epoch": result.best_epoch, "device": result.device,
                     "world_size": result.world_size},
        "artifacts": {},
        "runtime": {},
        "versions": artifacts.versions(),
    }
    # The manifest is written last: its presence is what marks a finished run.
    artifacts.write_manifest(staging, manifest)
    artifacts.finish_run(staging, out)
    return TrainRun(Path(out), metrics, manifest)

