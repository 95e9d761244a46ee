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

# --quick: the whole study on 2 CPU cores in well under 3 minutes (bundled digits).
QUICK = {"seeds": (0, 1), "train_sizes": (100, 300), "epochs": 30, "conv_channels": (16, 32), "fc_units": (64,),
         "latency_runs": 200, "latency_seconds": 10.0}


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
        help="A small profile (2 seeds, sizes 100,300, 30 epochs, narrow CNN): under 3 minutes on 2 cores.")] = False,
    seeds: Annotated[Optional[str], typer.Option(help="Training seeds, comma-separated (default 0,1,2; --quick 0,1).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per run, fixed (default 30; --quick 30).")] = None,
    train_sizes: Annotated[Optional[str], typer.Option(
        help="Training-set sizes, comma-separated (default 200,1000; --quick 100,300).")] = None,
    variants: Annotated[Optional[str], typer.Option(
        help=f"Variants to train, comma-separated, from {','.join(STUDY_VARIANTS)} (default: all).")] = None,
    conv_channels: Annotated[Optional[str], typer.Option(help="Conv block widths (default 32,64; --quick 16,32).")] = None,
    fc_units: Annotated[Optional[str], typer.Option(help="Hidden fully connected units (default 128; --quick 64).")] = None,
    strided_first_conv: StridedFirstConv = None,
    weight_decay: Annotated[float, typer.Option(
        help="L2 coefficient of the l2 and dropout_l2 variants (AdamW decoupled).")] = StudyConfig.weight_decay,
    l1: Annotated[float, typer.Option(help="L1 coefficient of the l1 variant.")] = StudyConfig.l1,
    spatial_dropout: Annotated[float, typer.Option(
        help="Dropout2d rate of the spatial_dropout variant.")] = StudyConfig.spatial_dropout,
    threads: Annotated[int, typer.Option(
        help="CPU threads for torch training (1 is fastest for these small models on a busy machine).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the data splits, the same for every run.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Also print study.json to stdout.")] = False,
) -> None:
    """Compare regularizers on one architecture: none, dropout 0.25 / 0.5, spatial dropout, L2, L1, dropout + L2.

    Every variant trains on the same splits for each seed and training-set size. Reports test accuracy
    (mean and std over seeds), the generalization gap (train - test accuracy and validation - train
    loss, both in eval mode), seconds per epoch, and the batch-1 ONNX Runtime latency of each
    variant's exported model. Writes study.json, curves.png and accuracy_vs_size.png into --out.
    """
    from pipeline.study import run_study

    profile = QUICK if quick else {}
    values = dict(profile)
    if seeds is not None:
        values["seeds"] = int_list(seeds, "--seeds")
    if epochs is not None:
        values["epochs"] = epochs
    if train_sizes is not None:
        values["train_sizes"] = int_list(train_sizes, "--train-sizes")
    if variants is not None:
        values["variants"] = tuple(v.strip() for v in variants.split(",") if v.strip())
    if conv_channels is not None:
        values["conv_channels"] = int_list(conv_channels, "--conv-channels")
    if fc_units is not None:
        values["fc_units"] = int_list(fc_units, "--fc-units")
    config = StudyConfig(**values, weight_decay=weight_decay, l1=l1, spatial_dropout=spatial_dropout, threads=threads,
                         strided_first_conv=strided_first_conv)
    data_config = DataConfig(dataset=dataset, data_dir=data_dir, image_size=image_size(image_size_text), resize=resize,
                             on_bad_image=on_bad_image, cache_dir=cache_dir, seed=seed)
    folder = out or _default_out(data_config)

    with StudyProgress() as progress:
        result = run_study(data_config, config, folder, force=force, on_event=progress.event)
    _print_tables(result.report)
    console.print(f"{folder}: {result.path.name}, curves.png, accuracy_vs_size.png ({result.report['seconds']:.0f} s)")
    if as_json:
        typer.echo(json.dumps(result.report, indent=2))


def _default_out(data_config: DataConfig) -> Path:
    if data_config.dataset == "digits":
        return Path("studies") / "digits"
    return Path("studies") / Path(data_config.data_dir).stem.replace(".", "-")


class StudyProgress:
    """A rich progress bar over every training run, then the exports and the latency loop."""

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
                          f"{event['val']} validation / {event['test']} test images; "
                          f"{event['total']} runs of {event['epochs']} epochs")
            # Each run counts 1, each export 1, each variant's latency 1.
            self.task = self.progress.add_task("", total=event["total"] + 2 * event["variants"])
        elif kind == "epoch":
            self.progress.update(self.task, description=f"{event['variant']} seed {event['seed']} "
                                                        f"epoch {event['epoch']}/{event['epochs']}")
        elif kind == "trained":
            self.progress.advance(self.task)
            self.progress.update(self.task, description=f"{event['variant']} seed {event['seed']} n={event['train_size']}: "
                                                        f"test {100 * event['test_accuracy']:.1f}%")
        elif kind in ("exported", "timed"):
            self.progress.advance(self.task)
            self.progress.update(self.task, description=f"{'export' if kind == 'exported' else 'latency'} {event['variant']}")


def _pm(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _print_tables(report: dict) -> None:
    from rich.table import Table

    seeds = len(report["config"]["seeds"])
    for block in report["by_size"]:
        table = Table(title=f"{block['train_size']} training images, {report['dataset']['sizes']['test']} test images, "
                            f"{seeds} seed{'s' if seeds > 1 else ''} (mean ± std)")
        for column in ("variant", "test acc %", "vs none (wins)", "train acc %", "gap acc pts", "gap loss",
                       "best epoch", "s/epoch (x none)"):
            table.add_column(column, justify="left" if column == "variant" else "right")
        for row in block["variants"].values():
            versus = row.get("test_accuracy_vs_none")
            versus_text = (f"{100 * versus['mean']:+.1f} ({versus['wins']}/{versus['n']})" if versus else "")
            ratio = row.get("seconds_per_epoch_vs_none")
            table.add_row(row["label"], _pm(row["test_accuracy"]), versus_text, _pm(row["train_accuracy"]),
                          _pm(row["accuracy_gap"]), _pm(row["loss_gap"], 1.0, 3), f"{row['best_epoch']['mean']:.1f}",
                          f"{row['seconds_per_epoch']['mean']:.2f}" + (f" ({ratio:.2f})" if ratio else ""))
        console.print(table)
    table = Table(title="exported ONNX, batch 1, ONNX Runtime CPU (timed interleaved)")
    for column in ("variant", "p50 µs", "x none", "p90 µs", "parameters", "dropout/random ops", "bytes"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant in report["variants"].values():
        latency = variant["latency"]
        ratio = latency.get("p50_vs_none")
        table.add_row(variant["label"], f"{latency['p50_us']:.1f}", f"{ratio:.2f}" if ratio else "",
                      f"{latency['p90_us']:.1f}", f"{variant['parameters']:,}",
                      str(variant["onnx"]["random_ops"]), f"{variant['onnx']['bytes']:,}")
    console.print(table)
