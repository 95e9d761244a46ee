"""`pipeline train`: options -> DataConfig, ModelConfig, TrainConfig -> workflow.train_run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.options import (
    IMAGE_SIZE_HELP,
    CacheDir,
    DecodeEta,
    OnBadImage,
    Resize,
    StridedFirstConv,
    console,
    image_size,
    int_list,
)
from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.errors import ConfigError, Interrupted

# Options that may come with --resume: they change how the run is shown, not what it computes.
RESUME_ALLOWS = ("resume", "quiet")


def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="digits (bundled 8x8 handwriting), idx (folder of IDX files), "
                                              "folder (one sub-folder of PNG/JPEG per class), npz (x_train, y_train, x_test, y_test).")] = "digits",
    data_dir: Annotated[Optional[Path], typer.Option(help="The IDX folder, image folder or .npz file.")] = None,
    image_size_text: Annotated[Optional[str], typer.Option("--image-size", help=IMAGE_SIZE_HELP)] = None,
    channels: Annotated[Optional[int], typer.Option(help="1 or 3 channels for folder images; default: 1 if all are grayscale.")] = None,
    resize: Resize = "squash",
    on_bad_image: OnBadImage = "fail",
    cache_dir: CacheDir = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder to write. Default: models/digits, or models/<data folder name>.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing run folder (the old one stays until the new run completes).")] = False,
    resume: Annotated[Optional[Path], typer.Option(
        help="Continue the interrupted run RUN (or RUN.partial, the folder on disk) from its last completed epoch, "
             "with its saved settings; options that would change the run (--epochs, --lr, ...) are refused.")] = None,
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 40,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    lr: Annotated[float, typer.Option(help="Initial learning rate.")] = 2e-3,
    schedule: Annotated[str, typer.Option(help="Learning-rate schedule: none, cosine or step.")] = "cosine",
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay, for comparison with dropout.")] = 0.0,
    l1: Annotated[float, typer.Option(help="L1 penalty on the weights.")] = 0.0,
    dropout: Annotated[float, typer.Option(help="Dropout rate before each fully connected layer (0 disables).")] = 0.5,
    spatial_dropout: Annotated[float, typer.Option(help="Dropout2d rate after each conv block (0 disables).")] = 0.0,
    conv_channels: Annotated[str, typer.Option(help="Output channels of the conv blocks, comma-separated.")] = "32,64",
    fc_units: Annotated[str, typer.Option(help="Hidden fully connected units, comma-separated ('' for none).")] = "128",
    batch_norm: Annotated[bool, typer.Option(help="BatchNorm after each conv.")] = False,
    strided_first_conv: StridedFirstConv = None,
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without a better validation loss (0 disables).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of splits, initialisation, shuffling and dropout masks.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: one per core).")] = None,
    test_fraction: Annotated[float, typer.Option(help="Test share when the data has no test split.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Validation share of the training split.")] = 0.1,
    max_train_samples: Annotated[Optional[int], typer.Option(help="Keep only this many training images (stratified).")] = None,
    augment: Annotated[str, typer.Option(help="photo: random resized crop, horizontal flip and small colour jitter per "
                                              "batch (for photos; never for digits); none.")] = "none",
    balance: Annotated[str, typer.Option(help="Imbalanced classes: none, weights (loss weighted by n / (K * n_class)) "
                                              "or sampler (every class equally likely per draw).")] = "none",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; print only the result line.")] = False,
) -> None:
    """Train the dropout CNN and write a run folder (checkpoint, metrics, curves, manifest).

    The test split is held out: it is never used for training or for choosing the epoch.
    An interrupted run can be continued with --resume.
    Under `torchrun --nproc_per_node N -m pipeline train ...` the N processes train one model
    with DistributedDataParallel; only rank 0 writes the run folder and shows progress.
    """
    from pipeline import artifacts, data, distributed
    from pipeline.workflow import default_run_dir, train_run

    if resume is not None:
        _refuse_changes_on_resume(ctx)

    data_config = DataConfig(dataset=dataset, data_dir=data_dir, image_size=image_size(image_size_text),
                             channels=channels, resize=resize, on_bad_image=on_bad_image, cache_dir=cache_dir,
                             test_fraction=test_fraction, val_fraction=val_fraction,
                             max_train_samples=max_train_samples, seed=seed)
    model_config = ModelConfig(conv_channels=int_list(conv_channels, "--conv-channels"),
                               fc_units=int_list(fc_units, "--fc-units"), dropout=dropout,
                               spatial_dropout=spatial_dropout, batch_norm=batch_norm, strided_first_conv=strided_first_conv)
    train_config = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, schedule=schedule,
                               weight_decay=weight_decay, l1=l1, patience=patience, seed=seed, device=device,
                               threads=threads, augment=augment, balance=balance)
    run_dir = artifacts.final_dir(resume) if resume is not None else (out or default_run_dir(data_config))

    try:
        with distributed.session() as world, EpochProgress(quiet or not world.is_main) as progress, \
                data.reading(on_progress=DecodeEta(progress.decode)):
            result = train_run(data_config, model_config, train_config, run_dir, force=force, resume=resume is not None,
                               on_start=progress.start, on_epoch=progress.epoch)
    except KeyboardInterrupt:
        raise Interrupted(artifacts.after_interrupted_training(run_dir)) from None
    if not world.is_main:
        return
    metrics = result.metrics
    typer.echo(f"{run_dir}: test accuracy {100 * metrics['test_accuracy']:.2f}% "
               f"(best epoch {metrics['best_epoch']}/{metrics['epochs_run']}, "
               f"{metrics['train_seconds']:.1f} s, {metrics['seconds_per_epoch']:.2f} s/epoch)")


def _refuse_changes_on_resume(ctx: typer.Context) -> None:
    """--resume continues the run exactly as it was configured: an option that would change it is an error,
    never silently ignored (a resumed cosine schedule cannot take a new --epochs, for one)."""
    def given_by_user(name: str) -> bool:
        source = ctx.get_parameter_source(name)  # click's ParameterSource (vendored by typer): compared by name
        return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")

    given = [p for p in ctx.command.params if p.name not in RESUME_ALLOWS and given_by_user(p.name)]
    if given:
        names = ", ".join(p.opts[0] for p in given)
        raise ConfigError(f"--resume continues the run with its saved settings; {names} would change it "
                          "(start a new run with --out, or drop them)")


class EpochProgress:
    """A rich progress bar over epochs with the latest loss and accuracies; silent when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = None
        self.task = None
        self.decoding = None

    def __enter__(self) -> EpochProgress:
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("[bold]{task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.description}"), console=console)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start(self, info: dict) -> None:
        if self.progress is None:
            return
        sizes = info["sizes"]
        console.print(f"{info['source']}: {sizes['train']} train / {sizes['val']} validation / {sizes['test']} test images")
        self.task = self.progress.add_task("", total=info["epochs"], name="train")

    def decode(self, text: str, done: int, total: int) -> None:
        """Decoding an image folder into the cache (before training starts), with rate and ETA."""
        if self.progress is None:
            return
        if self.decoding is None:
            self.decoding = self.progress.add_task(text, total=total, name="data")
        # Hidden once done: the bar has said what it had to, and a bad-file error after it stays one line.
        self.progress.update(self.decoding, description=text, completed=done, total=total, visible=done < total)

    def epoch(self, result) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, completed=result.epoch,
                             description=f"loss {result.train_loss:.3f}  train {100 * result.train_accuracy:.1f}%  "
                                         f"val {100 * result.val_accuracy:.1f}%  ({result.seconds:.1f} s)")
