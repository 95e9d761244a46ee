"""`pipeline study`: options -> DataConfig, StudyConfig -> study.run_study -> progress and tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.options import (
    IMAGE_SIZE_HELP,
    CacheDir,
    OnBadImage,
    Resize,
    StridedFirstConv,
    console,
    image_size,
    int_list,
)
from pipeline.config import STUDY_VARIANTS, DataConfig, StudyConfig
from pipeline.errors import ConfigError

# --quick: the whole study on 2 CPU cores in under 3 minutes (bundled digits): two grid values per regularizer.
QUICK = {"seeds": (0, 1), "train_sizes": (100, 300), "epochs": (20,), "patience": 3,
         "dropout_grid": (0.25, 0.5), "spatial_grid": (0.1, 0.2), "l2_grid": (0.5, 8.0), "l1_grid": (1e-4, 1e-3),
         "mc_samples": (1, 4, 16), "bootstrap": 500, "latency_runs": 60, "latency_seconds": 1.0}


def float_list(text: str, what: str) -> tuple[float, ...]:
    """'0.1,0.5' -> (0.1, 0.5)."""
    try:
        return tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def study(
    out: Annotated[Optional[Path], typer.Option(
        help="Study folder to write. Default: studies/digits, or studies/<data folder name>.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a study already in --out.")] = False,
    dataset: Annotated[str, typer.Option(help="digits, idx, folder or npz (as for `pipeline train`).")] = "digits",
    data_dir: Annotated[Optional[Path], typer.Option(help="The IDX folder, image folder or .npz file.")] = None,
    image_size_text: Annotated[Optional[str], typer.Option(
        "--image-size", help=IMAGE_SIZE_HELP)] = None,
    resize: Resize = "squash",
    on_bad_image: OnBadImage = "fail",
    cache_dir: CacheDir = None,
    quick: Annotated[bool, typer.Option(
        help="A small profile (2 seeds, sizes 100,300, 2 grid values each, 20 epochs): under 3 minutes on 2 cores.")] = False,
    seeds: Annotated[Optional[str], typer.Option(help="Final-run seeds, comma-separated (default 0,1,2,3,4; --quick 0,1).")] = None,
    epochs: Annotated[Optional[str], typer.Option(
        help="Epoch budget, one value or one per training size (default 60,40,15; --quick 20).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early-stopping patience in epochs (default 5; --quick 3).")] = None,
    train_sizes: Annotated[Optional[str], typer.Option(
        help="Training-set sizes, comma-separated (default 200,1000,7200; --quick 100,300).")] = None,
    variants: Annotated[Optional[str], typer.Option(
        help=f"Variants to train, comma-separated, from {','.join(STUDY_VARIANTS)} (default: all).")] = None,
    dropout_grid: Annotated[Optional[str], typer.Option(help="Dropout rates tried (default 0.1,0.25,0.5,0.7).")] = None,
    spatial_grid: Annotated[Optional[str], typer.Option(help="Dropout2d rates tried (default 0.05,0.1,0.2,0.3).")] = None,
    l2_grid: Annotated[Optional[str], typer.Option(help="AdamW weight decays tried (default 0.125,0.5,2,8).")] = None,
    l1_grid: Annotated[Optional[str], typer.Option(help="L1 coefficients tried (default 3e-5,1e-4,3e-4,1e-3).")] = None,
    thin_grid_from: Annotated[Optional[int], typer.Option(
        help="At training sizes >= this, try only every other grid value (to save compute).")] = None,
    mc_samples: Annotated[Optional[str], typer.Option(help="MC dropout sample counts (default 1,4,16,64).")] = None,
    conv_channels: Annotated[Optional[str], typer.Option(help="Conv block widths (default 16,32).")] = None,
    fc_units: Annotated[Optional[str], typer.Option(help="Hidden fully connected units (default 64).")] = None,
    strided_first_conv: StridedFirstConv = None,
    threads: Annotated[int, typer.Option(
        help="CPU threads for torch training (1 is fastest for these small models on a busy machine).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the data splits, the same for every run.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Also print study.json to stdout.")] = False,
) -> None:
    """Each regularizer at its best: none, dropout, the article's dropout 0.5, spatial dropout, L2, L1, dropout + L2.

    At every training size, each regularizer's strength is chosen from a small grid on the VALIDATION
    split (early stopping on validation loss); the chosen settings then train once per seed and are
    measured once on the test split: accuracy with 95% bootstrap intervals (over seeds and test
    images), the paired difference against none and a verdict. For the dropout model: deterministic
    vs temperature-scaled vs MC-averaged predictions (accuracy, NLL, ECE) and the ONNX Runtime latency
    of each N. Writes study.json and plots into --out.
    """
    from pipeline.study import run_study

    values = dict(QUICK) if quick else {}
    parsed = {"seeds": (seeds, int_list), "train_sizes": (train_sizes, int_list), "epochs": (epochs, int_list),
              "conv_channels": (conv_channels, int_list), "fc_units": (fc_units, int_list),
              "mc_samples": (mc_samples, int_list), "dropout_grid": (dropout_grid, float_list),
              "spatial_grid": (spatial_grid, float_list), "l2_grid": (l2_grid, float_list),
              "l1_grid": (l1_grid, float_list)}
    for name, (text, parse) in parsed.items():
        if text is not None:
            values[name] = parse(text, "--" + name.replace("_", "-"))
    if variants is not None:
        values["variants"] = tuple(v.strip() for v in variants.split(",") if v.strip())
    if patience is not None:
        values["patience"] = patience
    config = StudyConfig(**values, thin_grid_from=thin_grid_from, threads=threads, strided_first_conv=strided_first_conv)
    data_config = DataConfig(dataset=dataset, data_dir=data_dir, image_size=image_size(image_size_text), resize=resize,
                             on_bad_image=on_bad_image, cache_dir=cache_dir, seed=seed)
    folder = out or _default_out(data_config)

    with StudyProgress() as progress:
        result = run_study(data_config, config, folder, force=force, on_event=progress.event)
    _print_tables(result.report)
    console.print(f"{folder}: {result.path.name} and plots ({result.report['seconds']:.0f} s)")
    if as_json:
        typer.echo(json.dumps(result.report, indent=2))


def _default_out(data_config: DataConfig) -> Path:
    if data_config.dataset == "digits":
        return Path("studies") / "digits"
    return Path("studies") / Path(data_config.data_dir).stem.replace(".", "-")


class StudyProgress:
    """A rich progress bar over every training (tuning and final), then the exports and the latency loops."""

    def __enter__(self) -> StudyProgress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]study"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=console)
        self.progress.__enter__()
        self.task = None
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            console.print(f"{event['source']}: training sizes {', '.join(map(str, event['sizes']))} / "
                          f"{event['val']} validation / {event['test']} test images; at most {event['total']} trainings")
            self.task = self.progress.add_task("", total=event["total"])
        elif kind == "trained":
            self.progress.advance(self.task)
            self.progress.update(self.task, description=f"n={event['train_size']} {event['phase']} {event['setting']} "
                                                        f"seed {event['seed']}: val loss {event['val_loss']:.3f}")
        elif kind in ("exported", "timed"):
            self.progress.update(self.task, description=f"{'export' if kind == 'exported' else 'latency'} {event['variant']}")


def _ci(stat: dict, scale: float = 100.0, digits: int = 1, sign: str = "") -> str:
    return (f"{scale * stat['value']:{sign}.{digits}f} [{scale * stat['low']:{sign}.{digits}f}, "
            f"{scale * stat['high']:{sign}.{digits}f}]")


def _print_tables(report: dict) -> None:
    from rich.table import Table

    seeds = len(report["config"]["seeds"])
    for block in report["by_size"]:
        table = Table(title=f"{block['train_size']} training images, {report['dataset']['sizes']['test']} test images, "
                            f"{seeds} seeds (95% bootstrap intervals over seeds and images)")
        for column in ("variant", "chosen on validation", "test acc %", "vs none (pts)", "verdict", "gap pts",
                       "best epoch / run", "best = last"):
            table.add_column(column, justify="left" if column in ("variant", "chosen on validation", "verdict") else "right")
        for name, row in block["variants"].items():
            versus = row.get("vs_none")
            table.add_row(name, row["label"], _ci(row["test_accuracy"]), _ci(versus, sign="+") if versus else "",
                          versus["verdict"] if versus else "", f"{100 * row['accuracy_gap']:.1f}",
                          f"{row['best_epoch']:.1f} / {row['epochs_run']:.1f}",
                          f"{row['best_at_last_epoch']}/{len(row['runs'])}")
        console.print(table)
        if "mc" in block:
            mc = block["mc"]
            table = Table(title=f"{mc['label']} at {block['train_size']} images: deterministic vs temperature vs MC")
            for column in ("method", "accuracy %", "NLL", "ECE %", "NLL vs temperature", "ECE vs temperature"):
                table.add_column(column, justify="left" if column == "method" else "right")
            for method, row in mc["methods"].items():
                versus = row.get("vs_temperature")
                table.add_row(method, _ci(row["accuracy"], digits=2), _ci(row["nll"], 1.0, 3), _ci(row["ece"], digits=2),
                              f"{versus['nll']['verdict']}" if versus else "", f"{versus['ece']['verdict']}" if versus else "")
            console.print(table)
    budget = report["budget"]
    console.print(f"best epoch = last epoch run in {budget['best_at_last_epoch']} of {budget['runs']} trainings; "
                  f"{budget['stopped_early']} stopped early")
    table = Table(title="exported ONNX, batch 1, ONNX Runtime CPU (timed interleaved)")
    for column in ("variant", "p50 ms", "x none", "p90 ms", "dropout/random ops", "bytes"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, record in report["inference"].items():
        latency = record["latency"]["latency_ms"]
        ratio = record["p50_vs_none"]
        table.add_row(name, f"{latency['p50']:.4f}", f"{ratio:.2f}" if ratio else "", f"{latency['p90']:.4f}",
                      str(record["onnx"]["random_ops"]), f"{record['onnx']['bytes']:,}")
    console.print(table)
    timings = report["mc_latency"].get("timings", {})
    if timings:
        table = Table(title="MC dropout model vs deterministic, ONNX Runtime CPU p50 ms per call")
        for column in ("model", "batch", "p50 ms", "p90 ms"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for name, timing in timings.items():
            table.add_row(name.split("@")[0], str(timing["batch"]), f"{timing['latency_ms']['p50']:.4f}",
                          f"{timing['latency_ms']['p90']:.4f}")
        console.print(table)
