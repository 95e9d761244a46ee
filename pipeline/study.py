"""The study stage: each regularizer at its best, over seeds and training-set sizes, with intervals.

The article behind this project claims that dropout (0.5, before the fully connected layers)
curbs overfitting, that it is an average over sub-networks (so Monte Carlo averaging of dropout
masks gives calibrated probabilities), that it compares well with L1/L2, and that it costs nothing
at inference. This stage measures each claim on the user's data:

1. **Tuning, on validation only.** At every training size, each tuned variant (`dropout`,
   `spatial_dropout`, `l2`, `l1`, `dropout_l2`) trains once per grid value (seed = the first seed)
   with early stopping on validation loss; the value of lowest best-validation loss is chosen.
   The tuning runs see splits whose test split is replaced by the validation split
   (`hide_test`), so the choice cannot read a test label. `dropout_l2` keeps the rate chosen for
   `dropout` and tunes the L2 on top.
2. **Final runs.** The chosen settings (and `none` and the untuned `dropout_article`) train once
   per seed; a chosen setting's tuning run is its first-seed run (same data, seed and config give
   the same model, so it is reused, not retrained). The test split is read here, once per model.
3. **Intervals.** Test accuracy per variant and its paired difference against `none` get 95%
   bootstrap intervals over seeds AND test images (`pipeline.intervals`), and a verdict:
   better, worse or not resolved.
4. **MC dropout as Bayesian averaging.** For every `dropout` model: the deterministic
   (weight-scaled) prediction, the same with a temperature fitted on validation
   (`pipeline.calibration`), and the mean of N sampled dropout masks (`pipeline.mc_model`) for each
   N in `mc_samples`: accuracy, NLL and ECE with intervals, paired against deterministic and
   temperature-scaled. The MC models of the largest size's first seed are exported and timed under
   ONNX Runtime at batch 1 and `latency_batch` with `pipeline.timing`, next to the deterministic model.
5. **Inference cost.** One model per variant (largest size, first seed) is exported in eval mode,
   audited for dropout/random ops and timed with `pipeline.timing`, all variants interleaved.

Writes `study.json` (atomic), `accuracy_vs_size.png`, `reliability.png`, `mc_latency.png`,
`curves.png` and the timed `onnx/*.onnx` files into the study folder.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline import artifacts, calibration, intervals
from pipeline.config import STUDY_TUNED, DataConfig, ModelConfig, StudyConfig, TrainConfig, to_dict
from pipeline.errors import RunFolderError

log = logging.getLogger(__name__)

STUDY_JSON = "study.json"
CURVES_PNG = "curves.png"
SIZES_PNG = "accuracy_vs_size.png"
RELIABILITY_PNG = "reliability.png"
MC_LATENCY_PNG = "mc_latency.png"
TABLES_NPZ = "tables.npz"
PARTIAL_JSON = "study.partial.json"
WORK_DIR = ".work"
ONNX_DIR = "onnx"
STUDY_SCHEMA = 2
BOOTSTRAP_SEED = 0  # one seed for every interval: paired statistics draw the same seeds and images


@dataclass(frozen=True)
class Setting:
    """One regularizer setting: what changes in the model and in training."""

    dropout: float = 0.0
    spatial_dropout: float = 0.0
    weight_decay: float = 0.0
    l1: float = 0.0

    def label(self) -> str:
        parts = [f"{name} {value:g}" for name, value in (("dropout", self.dropout), ("spatial dropout", self.spatial_dropout),
                                                          ("L2", self.weight_decay), ("L1", self.l1)) if value]
        return " + ".join(parts) or "none"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def candidates(variant: str, config: StudyConfig, train_size: int, dropout_rate: float | None = None) -> list[Setting]:
    """The settings tried for a tuned variant at one size; `dropout_l2` needs the rate chosen for `dropout`."""
    grid = config.grid(variant, train_size)
    if variant == "dropout":
        return [Setting(dropout=v) for v in grid]
    if variant == "spatial_dropout":
        return [Setting(spatial_dropout=v) for v in grid]
    if variant == "l2":
        return [Setting(weight_decay=v) for v in grid]
    if variant == "l1":
        return [Setting(l1=v) for v in grid]
    if variant == "dropout_l2":
        rate = dropout_rate if dropout_rate is not None else config.article_dropout
        return [Setting(dropout=rate, weight_decay=v) for v in grid]
    raise ValueError(f"{variant!r} is not a tuned variant")


def run_configs(setting: Setting, config: StudyConfig, seed: int, epochs: int) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs of one setting and seed (input shape still to be set from the data)."""
    model = ModelConfig(conv_channels=config.conv_channels, fc_units=config.fc_units, dropout=setting.dropout,
                        spatial_dropout=setting.spatial_dropout, batch_norm=False,
                        strided_first_conv=config.strided_first_conv)
    # Constant learning rate and early stopping: the run ends when validation loss stops improving,
    # so whether the budget was long enough is visible (best epoch < epochs run).
    training = TrainConfig(epochs=epochs, batch_size=config.batch_size, optimizer="adam", lr=config.lr,
                           schedule="none", weight_decay=setting.weight_decay, l1=setting.l1,
                           patience=config.patience, seed=seed, device="cpu", threads=config.threads)
    return model, training


def hide_test(splits):
    """The splits with the test split replaced by the validation split: what every tuning run sees."""
    return replace(splits, x_test=splits.x_val, y_test=splits.y_val)


@dataclass
class Run:
    """One trained model and how its training went (no test numbers)."""

    setting: Setting
    seed: int
    model: object
    best_epoch: int
    epochs_run: int
    budget: int
    stopped_early: bool
    best_val_loss: float
    best_val_accuracy: float
    seconds_per_epoch: float
    history: list[dict] = field(default_factory=list)

    def info(self) -> dict:
        return {"setting": self.setting.to_dict(), "seed": self.seed, "best_epoch": self.best_epoch,
                "epochs_run": self.epochs_run, "budget": self.budget, "stopped_early": self.stopped_early,
                "best_at_last_epoch": self.best_epoch == self.epochs_run,
                "val_loss": self.best_val_loss, "val_accuracy": self.best_val_accuracy,
                "seconds_per_epoch": self.seconds_per_epoch,
                "val_loss_curve": [h["val_loss"] for h in self.history]}


class Trainer:
    """Trains (setting, seed) runs at one size, each at most once: a repeated request returns the same run."""

    def __init__(self, splits, data_config: DataConfig, config: StudyConfig, epochs: int, work: Path,
                 emit: Callable[[dict], None]) -> None:
        self.splits = hide_test(splits)  # training never needs the test split
        self.data_config = replace(data_config, max_train_samples=len(splits.y_train))
        self.config, self.epochs, self.work, self.emit = config, epochs, work, emit
        self.runs: dict[tuple[Setting, int], Run] = {}

    def run(self, setting: Setting, seed: int, phase: str) -> Run:
        key = (setting, seed)
        if key not in self.runs:
            self.runs[key] = self._train(setting, seed)
            self.emit({"event": "trained", "phase": phase, "setting": setting.label(), "seed": seed,
                       "train_size": len(self.splits.y_train), "val_loss": self.runs[key].best_val_loss})
        return self.runs[key]

    def _train(self, setting: Setting, seed: int) -> Run:
        from pipeline import train

        model_base, train_config = run_configs(setting, self.config, seed, self.epochs)
        model_config = train.model_config_for(self.splits, model_base)
        run_dir = self.work / f"n{len(self.splits.y_train)}-s{seed}-{abs(hash(setting))}"
        run_dir.mkdir(parents=True)
        try:
            result = train.train(self.splits, self.data_config, model_config, train_config, run_dir)
            model, _ = train.load_checkpoint(result.checkpoint)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        best = result.history[result.best_epoch - 1]
        return Run(setting, seed, model, result.best_epoch, len(result.history), self.epochs, result.stopped_early,
                   best.val_loss, best.val_accuracy, result.seconds_per_epoch, [h.to_dict() for h in result.history])


def validation_score(run: Run) -> float:
    """What a setting is chosen by: its run's best validation loss (the early-stopping checkpoint's)."""
    return run.best_val_loss


def tune(trainer: Trainer, config: StudyConfig,
         score: Callable[[Run], float] = validation_score) -> tuple[dict[str, Setting], list[dict]]:
    """Choose each tuned variant's setting: the candidate of lowest `score` (tests pass another score as a negative control).

    Returns ({variant: chosen setting}, one record per candidate with the score it was chosen by).
    """
    size = len(trainer.splits.y_train)
    chosen: dict[str, Setting] = {}
    records: list[dict] = []
    for variant in STUDY_TUNED:
        if variant not in config.variants and not (variant == "dropout" and "dropout_l2" in config.variants):
            continue
        rate = chosen["dropout"].dropout if "dropout" in chosen else None
        scored = []
        for setting in candidates(variant, config, size, rate):
            run = trainer.run(setting, config.seeds[0], phase="tune")
            scored.append((score(run), setting))
            records.append({"variant": variant, **run.info(), "score": scored[-1][0], "chosen": False})
        best_score, best = min(scored, key=lambda pair: pair[0])
        chosen[variant] = best
        for record in records:
            if record["variant"] == variant and record["setting"] == best.to_dict():
                record["chosen"] = True
    return chosen, records


# --- the study -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyResult:
    path: Path
    """The study.json written."""
    report: dict
    """Its content."""


def variant_settings(chosen: dict[str, Setting], config: StudyConfig) -> dict[str, Setting]:
    """{variant: setting} of the final runs, in the config's order (`none` first, always present)."""
    fixed = {"none": Setting(), "dropout_article": Setting(dropout=config.article_dropout)}
    names = ["none", *(v for v in config.variants if v != "none")]
    return {name: fixed[name] if name in fixed else chosen[name] for name in names}


def run_study(data_config: DataConfig, config: StudyConfig, out: Path, force: bool = False,
              on_event: Callable[[dict], None] | None = None) -> StudyResult:
    """Tune, train the final runs, evaluate once on test, export and time; write the report.

    `on_event` receives progress dicts: {"event": "start", ...}, {"event": "size", ...}, {"event": "trained", ...},
    {"event": "exported", ...}, {"event": "timed", ...}.
    """
    out = Path(out)
    _prepare_out(out, force)
    emit = on_event or (lambda _event: None)
    work = out / WORK_DIR
    started = time.perf_counter()
    size_splits = _load_sizes(data_config, config)
    first = next(iter(size_splits.values()))
    emit({"event": "start", "total": _count_runs(config, list(size_splits)), "source": first.source,
          "sizes": list(size_splits), "val": len(first.y_val), "test": len(first.y_test)})

    blocks, last, per_image = [], None, {}
    try:
        for index, (size, splits) in enumerate(size_splits.items()):
            epochs = config.epochs_for(index)
            emit({"event": "size", "train_size": size, "epochs": epochs})
            trainer = Trainer(splits, data_config, config, epochs, work, emit)
            chosen, tuning = tune(trainer, config)
            settings = variant_settings(chosen, config)
            runs = _final_runs(trainer, settings, config)
            block, saved = _evaluate_size(splits, settings, runs, tuning, epochs, config)
            blocks.append(block)
            per_image.update(saved)
            # A long study stopped later (time limit, Ctrl-C) still leaves every finished size behind.
            artifacts.atomic_write_json(out / PARTIAL_JSON, _report(data_config, config, first, blocks, {}, {}, {},
                                                                    time.perf_counter() - started))
            last = (splits, settings, runs)
        exports, latency, mc_latency = _export_and_time(last, config, out / ONNX_DIR, emit)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = _report(data_config, config, first, blocks, exports, latency, mc_latency, time.perf_counter() - started)
    _plot_sizes(report, out / SIZES_PNG)
    _plot_reliability(report, out / RELIABILITY_PNG)
    _plot_mc_latency(report, out / MC_LATENCY_PNG)
    _plot_curves(report, out / CURVES_PNG)
    # The per-image tables every interval was computed from (seeds x test images), so they can be recomputed.
    with artifacts.atomic_path(out / TABLES_NPZ) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **per_image)
    path = out / STUDY_JSON
    artifacts.atomic_write_json(path, report)
    (out / PARTIAL_JSON).unlink(missing_ok=True)
    return StudyResult(path, report)


def _count_runs(config: StudyConfig, sizes: list[int]) -> int:
    """An upper bound on the trainings (reused runs make it smaller): tuning grids plus final runs."""
    total = 0
    for size in sizes:
        tuned = [v for v in STUDY_TUNED if v in config.variants]
        total += 1 + sum(len(config.grid(v, size)) for v in tuned)
        total += len(config.variants) * (len(config.seeds) - 1) + len(config.variants)
    return total


def _final_runs(trainer: Trainer, settings: dict[str, Setting], config: StudyConfig) -> dict[str, list[Run]]:
    """Every variant once per seed, interleaved (seed -> variant, order rotated per seed) so load drifts hit all alike."""
    names = list(settings)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for index, seed in enumerate(config.seeds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            runs[name].append(trainer.run(settings[name], seed, phase="final"))
    return runs


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


# --- evaluation: the one place the test split is read ------------------------------------------


def _logits(model, feed) -> np.ndarray:
    import torch

    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x) for x, _ in feed.batches(torch.arange(len(feed)))]).numpy().astype(np.float64)


def _mc_probs(model, feed, samples: int, seed: int) -> np.ndarray:
    """Mean class probabilities over `samples` dropout masks (the MC model that is exported), seeded."""
    import torch

    from pipeline.mc_model import MCDropoutModel

    torch.manual_seed(seed)
    mc = MCDropoutModel(model, samples)
    step = max(1, 65536 // samples)
    with torch.inference_mode():
        return torch.cat([mc(x)[0] for x, _ in feed.batches(torch.arange(len(feed)), step)]).numpy().astype(np.float64)


def _table(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    return {"correct": (probs.argmax(axis=1) == labels).astype(np.float64),
            "nll": calibration.nll(probs, labels), "confidence": probs.max(axis=1)}


def _evaluate_size(splits, settings: dict[str, Setting], runs: dict[str, list[Run]], tuning: list[dict], epochs: int,
                   config: StudyConfig) -> tuple[dict, dict]:
    """Test numbers of every final run, intervals and verdicts; the MC block for the `dropout` models."""
    from pipeline import train
    from pipeline.predict import softmax

    data = train.feeds(splits, train.resolve_device("cpu"))
    y_test = splits.y_test
    tables: dict[str, dict[str, np.ndarray]] = {}
    per_run: dict[str, list[dict]] = {}
    mc_tables: dict[str, list[dict]] = {}
    temperatures = []
    for name, variant_runs in runs.items():
        rows = []
        for run in variant_runs:
            logits = _logits(run.model, data["test"])
            rows.append(_table(softmax(logits), y_test))
            train_loss, train_accuracy = train.evaluate(run.model, data["train"])
            per_run.setdefault(name, []).append({**run.info(), "train_accuracy": train_accuracy, "train_loss": train_loss,
                                                 "test_accuracy": float(rows[-1]["correct"].mean()),
                                                 "test_nll": float(rows[-1]["nll"].mean())})
            if name == "dropout":
                # Temperature from the VALIDATION logits; the test split only measures it.
                t = calibration.fit_temperature(_logits(run.model, data["val"]), splits.y_val)
                temperatures.append(t)
                mc_tables.setdefault("deterministic", []).append(rows[-1])
                mc_tables.setdefault("temperature", []).append(_table(softmax(logits / t), y_test))
                for n in config.mc_samples:
                    mc_tables.setdefault(f"mc{n}", []).append(
                        _table(_mc_probs(run.model, data["test"], n, seed=1000 + run.seed), y_test))
        tables[name] = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
    saved = {f"n{len(splits.y_train)}/{name}/{key}": value for name, table in tables.items()
             for key, value in table.items()}
    block = {"train_size": len(splits.y_train), "epochs": epochs,
             "chosen": {name: s.to_dict() for name, s in settings.items()},
             "labels": {name: s.label() for name, s in settings.items()},
             "tuning": tuning, "variants": _variant_rows(tables, per_run, settings, config, len(splits.y_train)),
             "comparisons": comparisons({name: t["correct"] for name, t in tables.items()},
                                        {name: s.label() for name, s in settings.items()}, len(splits.y_train), config)}
    if mc_tables:
        stacked = {m: {key: np.stack([r[key] for r in rows]) for key in rows[0]} for m, rows in mc_tables.items()}
        block["mc"] = mc_block(stacked, temperatures, settings["dropout"], config)
        saved.update({f"n{len(splits.y_train)}/dropout.{m}/{key}": value for m, table in stacked.items()
                      for key, value in table.items()})
    return block, saved


# Head-to-head comparisons beyond "vs none": the article's FAQ (dropout vs L1/L2) and whether L2 adds to dropout.
PAIRS = (("dropout", "l2"), ("dropout", "l1"), ("dropout_article", "l2"), ("dropout_article", "l1"),
         ("dropout_l2", "dropout"))


def comparisons(correct: dict[str, np.ndarray], labels: dict[str, str], size: int, config: StudyConfig) -> list[dict]:
    """Paired test-accuracy differences of PAIRS present in `correct` ({variant: seeds x images 0/1}), with verdicts."""
    found = []
    for a, b in PAIRS:
        if a in correct and b in correct:
            versus = _versus(correct[a], correct[b], config)
            found.append({"variant": a, "baseline": b, **versus,
                          "sentence": f"{labels[a]} vs {labels[b]} at {size} training images: {100 * versus['value']:+.2f} "
                                      f"points (95% CI {100 * versus['low']:+.2f} to {100 * versus['high']:+.2f}): "
                                      f"{versus['verdict']}"})
    return found


def _interval(table: np.ndarray, config: StudyConfig) -> dict:
    return intervals.mean_interval(table, config.bootstrap, BOOTSTRAP_SEED).to_dict()


def _versus(table: np.ndarray, baseline: np.ndarray, config: StudyConfig, higher_is_better: bool = True) -> dict:
    diff = intervals.paired_difference(table, baseline, config.bootstrap, BOOTSTRAP_SEED)
    return {**diff.to_dict(), "verdict": intervals.verdict(diff, higher_is_better)}


def _variant_rows(tables: dict, per_run: dict, settings: dict[str, Setting], config: StudyConfig, size: int) -> dict:
    rows = {}
    for name, table in tables.items():
        own = per_run[name]
        row = {"label": settings[name].label(), "setting": settings[name].to_dict(),
               "test_accuracy": _interval(table["correct"], config),
               "test_accuracy_by_seed": [r["test_accuracy"] for r in own],
               "test_nll": _interval(table["nll"], config),
               "train_accuracy": statistics.fmean(r["train_accuracy"] for r in own),
               "accuracy_gap": statistics.fmean(r["train_accuracy"] - r["test_accuracy"] for r in own),
               "best_epoch": statistics.fmean(r["best_epoch"] for r in own),
               "epochs_run": statistics.fmean(r["epochs_run"] for r in own),
               "best_at_last_epoch": sum(r["best_at_last_epoch"] for r in own),
               "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in own),
               "runs": own}
        if name != "none":
            versus = _versus(table["correct"], tables["none"]["correct"], config)
            row["vs_none"] = versus
            row["sentence"] = (f"{row['label']} vs none at {size} training images: {100 * versus['value']:+.2f} points "
                               f"(95% CI {100 * versus['low']:+.2f} to {100 * versus['high']:+.2f}): {versus['verdict']}")
        rows[name] = row
    return rows


def _ece_interval(table: dict, config: StudyConfig) -> intervals.Interval:
    conf, correct, bins = table["confidence"], table["correct"], config.ece_bins
    interval = intervals.bootstrap(lambda r, c: calibration.ece_from(conf[r][:, c], correct[r][:, c], bins),
                                   *conf.shape, config.bootstrap, BOOTSTRAP_SEED, centred=True)
    # ECE cannot be negative: the centred interval's lower end is clipped at 0.
    return replace(interval, low=max(interval.low, 0.0))


def _ece_difference(table: dict, baseline: dict, config: StudyConfig) -> dict:
    bins = config.ece_bins

    def diff(r, c):
        return (calibration.ece_from(table["confidence"][r][:, c], table["correct"][r][:, c], bins)
                - calibration.ece_from(baseline["confidence"][r][:, c], baseline["correct"][r][:, c], bins))

    interval = intervals.bootstrap(diff, *table["correct"].shape, config.bootstrap, BOOTSTRAP_SEED, centred=True)
    return {**interval.to_dict(), "verdict": intervals.verdict(interval, higher_is_better=False)}


def mc_block(tables: dict, temperatures: list[float], setting: Setting, config: StudyConfig) -> dict:
    """Deterministic vs temperature-scaled vs MC-N: accuracy, NLL, ECE with intervals, each paired against the first two."""
    methods = {}
    for method, table in tables.items():
        row = {"accuracy": _interval(table["correct"], config), "nll": _interval(table["nll"], config),
               "ece": _ece_interval(table, config).to_dict()}
        for base in ("deterministic", "temperature"):
            if method == base or (method, base) == ("deterministic", "temperature"):
                continue
            row[f"vs_{base}"] = {"accuracy": _versus(table["correct"], tables[base]["correct"], config),
                                 "nll": _versus(table["nll"], tables[base]["nll"], config, higher_is_better=False),
                                 "ece": _ece_difference(table, tables[base], config)}
        methods[method] = row
    largest = max(config.mc_samples)
    shown = "mc16" if 16 in config.mc_samples else f"mc{largest}"
    reliability = {m: calibration.reliability(tables[m]["confidence"], tables[m]["correct"], config.ece_bins)
                   for m in ("deterministic", "temperature", shown)}
    return {"setting": setting.to_dict(), "label": setting.label(), "temperatures": temperatures,
            "methods": methods, "reliability": reliability, "reliability_mc": shown}


# --- ONNX export and latency ---------------------------------------------------------------------


def count_random_ops(ops: dict[str, int]) -> int:
    """Dropout nodes (active or not) and random ops in an op histogram: all should be gone after an eval() export."""
    from pipeline.verify import RANDOM_OPS

    return sum(count for op, count in ops.items() if op == "Dropout" or op in RANDOM_OPS)


def _save_onnx(module, shape: tuple, path: Path, opset: int) -> dict:
    from pipeline import export, onnxfile, verify

    proto = export.export_module(module, shape, opset)
    export.strip_node_metadata(proto)
    with artifacts.atomic_path(path) as tmp:
        export.save(proto, tmp)
    proto = onnxfile.load_model(path)
    ops = onnxfile.op_histogram(proto)
    return {"file": f"{ONNX_DIR}/{path.name}", "sha256": artifacts.sha256_file(path), "bytes": path.stat().st_size,
            "ops": ops, "random_ops": count_random_ops(ops), "audit": verify.audit_graph(proto).to_dict()}


def _probs_only(mc):
    """The MC model with only its `probs` output (the entropy and mutual information of a (B, K) tensor are left out)."""
    from torch import nn

    class ProbsOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mc = mc

        def forward(self, x):
            return self.mc(x)[0]

    return ProbsOnly().eval()


def _export_and_time(last, config: StudyConfig, folder: Path, emit: Callable[[dict], None]) -> tuple[dict, dict, dict]:
    """Export the largest size's first-seed model of every variant (eval mode) and, for `dropout`, its MC models;
    time all of them with the one timing harness (deterministic models at batch 1, interleaved; MC models and the
    deterministic dropout model at batch 1 and `latency_batch`, interleaved)."""
    from pipeline.mc_model import MCDropoutModel

    splits, settings, runs = last
    folder.mkdir(parents=True, exist_ok=True)
    shape = (splits.preprocess.channels, *splits.preprocess.size)
    exports, mc_files = {}, {}
    for name in settings:
        exports[name] = _save_onnx(runs[name][0].model.eval(), shape, folder / f"{name}.onnx", config.opset)
        emit({"event": "exported", "variant": name})
    if "dropout" in runs:
        for n in config.mc_samples:
            mc_files[n] = _save_onnx(_probs_only(MCDropoutModel(runs["dropout"][0].model, n)), shape,
                                     folder / f"dropout.mc{n}.onnx", config.opset)
            emit({"event": "exported", "variant": f"dropout MC N={n}"})
    latency = _time_group({name: (folder.parent / record["file"], 1) for name, record in exports.items()}, config, shape)
    emit({"event": "timed", "variant": "deterministic models"})
    mc_latency = {}
    if mc_files:
        group = {}
        for batch in sorted({1, config.latency_batch}):
            group[f"deterministic@{batch}"] = (folder.parent / exports["dropout"]["file"], batch)
            for n, record in mc_files.items():
                group[f"mc{n}@{batch}"] = (folder.parent / record["file"], batch)
        mc_latency = {"models": {f"mc{n}": record for n, record in mc_files.items()},
                      "timings": _time_group(group, config, shape)}
        emit({"event": "timed", "variant": "MC models"})
    return exports, latency, mc_latency


def _time_group(models: dict[str, tuple[Path, int]], config: StudyConfig, shape: tuple) -> dict:
    """{name: timing summary} of ONNX models at their batch sizes, timed interleaved with `pipeline.timing`."""
    from pipeline.runtime import create_session, session_slot
    from pipeline.timing import TimingPlan, summarize, time_interleaved

    rng = np.random.default_rng(0)
    slots = {}
    for name, (path, batch) in models.items():
        session = create_session(path, runtime=artifacts.DEFAULT_RUNTIME, threads=config.latency_threads)
        slots[name] = session_slot(session, rng.standard_normal((batch, *shape)).astype(np.float32), batch=batch,
                                   provider=session.get_providers()[0], threads=config.latency_threads)
    plan = TimingPlan(warmup=config.latency_warmup, runs=config.latency_runs, rounds=10, time_limit=config.latency_seconds)
    time_interleaved(list(slots.values()), plan)
    return {name: {**{k: v for k, v in slot.info.items() if k != "session_providers"},
                   **summarize(slot.latencies_ns, slot.info["batch"])} for name, slot in slots.items()}


# --- the report ----------------------------------------------------------------------------------


def _report(data_config: DataConfig, config: StudyConfig, first, blocks: list[dict], exports: dict, latency: dict,
            mc_latency: dict, seconds: float) -> dict:
    # Every distinct training (a chosen setting's tuning run is also its first final run: counted once).
    distinct = {(b["train_size"], repr(r["setting"]), r["seed"]): r for b in blocks
                for r in [*b["tuning"], *(r for v in b["variants"].values() for r in v["runs"])]}
    all_runs = list(distinct.values())
    base = latency["none"]["latency_ms"]["p50"] if "none" in latency else None
    inference = {}
    for name, record in exports.items():
        timing = latency[name]
        inference[name] = {"label": blocks[-1]["labels"][name], "onnx": record, "latency": timing,
                           "p50_vs_none": timing["latency_ms"]["p50"] / base if base else None}
    return {
        "schema": STUDY_SCHEMA,
        "created": artifacts.now_iso(),
        "dataset": {"source": first.source, "config": to_dict(data_config),
                    "sizes": {"train": [b["train_size"] for b in blocks], "val": len(first.y_val),
                              "test": len(first.y_test)}},
        "config": to_dict(config),
        "seconds": seconds,
        "budget": {"runs": len(all_runs), "best_at_last_epoch": sum(r["best_at_last_epoch"] for r in all_runs),
                   "stopped_early": sum(r["stopped_early"] for r in all_runs)},
        "by_size": blocks,
        "inference": inference,
        "mc_latency": mc_latency,
        "versions": artifacts.versions(),
    }


# --- plots ---------------------------------------------------------------------------------------


def _plot_sizes(report: dict, path: Path) -> None:
    """Test accuracy with its 95% interval against training-set size, one line per variant."""
    from pipeline.report import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    sizes = [b["train_size"] for b in report["by_size"]]
    names = list(report["by_size"][0]["variants"])
    for offset, name in enumerate(names):
        stats = [b["variants"][name]["test_accuracy"] for b in report["by_size"]]
        mid = np.array([100 * s["value"] for s in stats])
        err = np.array([[100 * (s["value"] - s["low"]) for s in stats], [100 * (s["high"] - s["value"]) for s in stats]])
        # A small multiplicative shift per variant, so the intervals do not hide each other.
        xs = [x * (1 + 0.025 * (offset - len(names) / 2)) for x in sizes]
        ax.errorbar(xs, mid, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    seeds = len(report["config"]["seeds"])
    ax.set(xlabel="training images", ylabel="test accuracy (%)",
           title=f"{report['dataset']['sizes']['test']} test images x {seeds} seeds; bars: 95% bootstrap interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def _plot_reliability(report: dict, path: Path) -> None:
    """Reliability diagram at the largest size: accuracy against confidence per bin, deterministic / temperature / MC."""
    from pipeline.report import _pyplot, save_figure

    block = report["by_size"][-1]
    if "mc" not in block:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for method, bins in block["mc"]["reliability"].items():
        filled = [b for b in bins if b["count"]]
        ece = block["mc"]["methods"][method]["ece"]
        ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], marker="o",
                label=f"{method} (ECE {100 * ece['value']:.2f}%)")
    ax.set(xlabel="confidence (top probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{block['mc']['label']}, {block['train_size']} training images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def _plot_mc_latency(report: dict, path: Path) -> None:
    """ONNX Runtime p50 latency of the MC model against N, per batch, with the deterministic model as a line."""
    from pipeline.report import _pyplot, save_figure

    timings = report["mc_latency"].get("timings")
    if not timings:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    samples = report["config"]["mc_samples"]
    for batch in sorted({t["batch"] for t in timings.values()}):
        ys = [timings[f"mc{n}@{batch}"]["latency_ms"]["p50"] for n in samples]
        line = ax.plot(samples, ys, marker="o", label=f"MC, batch {batch}")[0]
        ax.axhline(timings[f"deterministic@{batch}"]["latency_ms"]["p50"], color=line.get_color(), linestyle="--",
                   label=f"deterministic, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="MC samples N", ylabel="p50 latency per call (ms)", title="ONNX Runtime CPU, 1 thread")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def _plot_curves(report: dict, path: Path) -> None:
    """Validation loss per epoch of every variant's first-seed run, one panel per training size."""
    from pipeline.report import _pyplot, save_figure

    plt = _pyplot()
    blocks = report["by_size"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
    for ax, block in zip(axes[0], blocks, strict=True):
        for name, row in block["variants"].items():
            curve = row["runs"][0]["val_loss_curve"]
            ax.plot(range(1, len(curve) + 1), curve, label=name)
        ax.set(xlabel="epoch", ylabel="validation loss", title=f"{block['train_size']} training images")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
