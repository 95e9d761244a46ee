"""Typed, frozen configuration for each stage.

Every field says what it means; `__post_init__` rejects bad values with a `ConfigError` (a ValueError, exit 2) whose
message names the field, so a bad option fails before any work starts. Library functions take
these objects, never the CLI's options. This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.timing import SETTLE_SECONDS, TimingPlan

DATASETS = ("digits", "idx", "folder", "npz")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "cosine", "step")
DEVICES = ("cpu", "cuda", "auto")
RESIZE_MODES = ("squash", "pad", "crop")  # = pipeline.images.RESIZE_MODES (this module imports nothing heavy)
BAD_IMAGE_POLICIES = ("fail", "skip")
AUGMENTATIONS = ("none", "photo")
CLASS_RECALL_DROP = 2.0  # points: default of the int8 and fp16 per-class gates
# Validation images a class needs to be gated: at 100 one image is 1 point of recall, so a 2-point gate
# fires at a net loss of 3 images; with fewer, single images (noise) would decide.
CLASS_MIN_SUPPORT = 100
BALANCING = ("none", "weights", "sampler")


def _refuse_unknown_fields(cls: type, data: dict, what: str) -> None:
    """A record with fields the config does not have was written by something else: refuse it."""
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} config fields: {sorted(unknown)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_class_gate(max_drop: float, min_support: int) -> None:
    _require(0.0 <= max_drop <= 100.0, f"max class recall drop must be in [0, 100] points, got {max_drop}")
    _require(min_support >= 1, f"class min support must be >= 1 image, got {min_support}")


def to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split."""

    dataset: str = "digits"
    """One of `digits` (scikit-learn's bundled 8x8 digits), `idx`, `folder`, `npz`."""
    data_dir: Path | None = None
    """Folder of IDX files or of class sub-folders, or the `.npz` file. Unused for `digits`."""
    image_size: tuple[int, int] | None = None
    """(H, W) every image is resized to (bilinear, any source). None keeps the stored size; for `folder`
    that needs every image to have the same size (else the error lists the sizes found)."""
    resize: str = "squash"
    """How an image of another aspect ratio reaches `image_size`: `squash` (stretch), `crop` (scale to cover,
    cut the centre) or `pad` (scale to fit, centre on black). Recorded in `Preprocess.resize` for the device."""
    on_bad_image: str = "fail"
    """`fail`: an unreadable image file stops the command, and the error names every one of them.
    `skip`: they are left out and listed in the run folder (`skipped_images.json`)."""
    cache_dir: Path | None = None
    """Folder of the decoded-image cache of `folder` sources. None: $PIPELINE_CACHE_DIR, else ~/.cache/pipeline."""
    channels: int | None = None
    """1 or 3 for `folder`; None decides from the images (grayscale if all are)."""
    test_fraction: float = 0.2
    """Share held out for test when the source has no test split of its own."""
    val_fraction: float = 0.1
    """Share of the training split held out for validation (early stopping, model choice)."""
    max_train_samples: int | None = None
    """Keep only this many training images (stratified), to study small-data overfitting."""
    seed: int = 0
    """Seed of the stratified splits; the same seed gives the same splits."""

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.dataset != "digits":
            _require(self.data_dir is not None, f"--data-dir is required for dataset {self.dataset!r}")
        # Relative paths are resolved now, so that a run made here can be exported from anywhere.
        for name in ("data_dir", "cache_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).expanduser().resolve())
        if self.image_size is not None:
            _require(len(self.image_size) == 2 and all(s >= 1 for s in self.image_size),
                     f"image size must be two positive integers, got {self.image_size}")
        _require(self.channels in (None, 1, 3), f"channels must be 1 or 3, got {self.channels}")
        _require(self.resize in RESIZE_MODES, f"unknown resize mode {self.resize!r}: choose one of {', '.join(RESIZE_MODES)}")
        _require(self.on_bad_image in BAD_IMAGE_POLICIES,
                 f"unknown bad-image policy {self.on_bad_image!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
        _require(0.0 < self.test_fraction < 1.0, f"test fraction must be in (0, 1), got {self.test_fraction}")
        _require(0.0 < self.val_fraction < 1.0, f"validation fraction must be in (0, 1), got {self.val_fraction}")
        _require(self.max_train_samples is None or self.max_train_samples >= 10,
                 f"max train samples must be at least 10, got {self.max_train_samples}")

    @classmethod
    def from_dict(cls, data: dict) -> DataConfig:
        """Rebuild from a checkpoint's or manifest's plain dict (strings back to paths, lists to tuples)."""
        _refuse_unknown_fields(cls, data, "data")
        return cls(**{**data, "data_dir": Path(data["data_dir"]) if data.get("data_dir") else None,
                      "cache_dir": Path(data["cache_dir"]) if data.get("cache_dir") else None,
                      "image_size": tuple(data["image_size"]) if data.get("image_size") else None})


# Smallest input side for which `strided_first_conv=None` strides the first conv (28x28 gains, 8x8 does not).
STRIDED_FIRST_CONV_MIN_SIZE = 16


@dataclass(frozen=True)
class ModelConfig:
    """The dropout CNN: conv blocks, then fully connected layers with dropout before each."""

    in_channels: int = 1
    """Image channels C of the C x H x W input."""
    height: int = 8
    """Input height H."""
    width: int = 8
    """Input width W."""
    num_classes: int = 10
    """Number of classes K."""
    conv_channels: tuple[int, ...] = (32, 64)
    """Output channels of each conv block (conv 3x3, optional BatchNorm, ReLU, 2x2 max pool)."""
    fc_units: tuple[int, ...] = (128,)
    """Hidden fully connected layers between the conv blocks and the classifier."""
    dropout: float = 0.5
    """Rate of the `nn.Dropout` before each fully connected layer; 0 disables it."""
    spatial_dropout: float = 0.0
    """Rate of `nn.Dropout2d` after each conv block; 0 disables it."""
    batch_norm: bool = False
    """BatchNorm after each conv (folded into the conv at export)."""
    strided_first_conv: bool | None = None
    """True: the first block halves the map with a 5x5 stride-2 conv instead of conv 3x3 + 2x2 max pool,
    so there is no full-resolution feature map to compute, store and pool, which int8 gains most from.
    On 28x28 MNIST accuracy was the same over 3 seeds. False: the classic pooled block.
    None: strided for inputs of at least 16x16 (`first_conv_is_strided`). On the 8x8 digits the pooled
    block averaged 0.46 points better and int8 gains nothing there (README, "Performance")."""

    def __post_init__(self) -> None:
        _require(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        _require(self.height >= 1 and self.width >= 1, f"input size must be positive, got {self.height}x{self.width}")
        _require(self.num_classes >= 2, f"need at least 2 classes, got {self.num_classes}")
        _require(len(self.conv_channels) >= 1 and all(c >= 1 for c in self.conv_channels),
                 f"conv channels must be one or more positive integers, got {self.conv_channels}")
        _require(all(u >= 1 for u in self.fc_units), f"fc units must be positive integers, got {self.fc_units}")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _require(0.0 <= self.spatial_dropout < 1.0, f"spatial dropout must be in [0, 1), got {self.spatial_dropout}")

    def first_conv_is_strided(self) -> bool:
        """`strided_first_conv`, with None resolved by the input size."""
        if self.strided_first_conv is not None:
            return self.strided_first_conv
        return min(self.height, self.width) >= STRIDED_FIRST_CONV_MIN_SIZE

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Rebuild from a checkpoint's plain dict (lists back to tuples)."""
        _refuse_unknown_fields(cls, data, "model")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        # Records written before the field existed all describe the max-pooled first block.
        values.setdefault("strided_first_conv", False)
        return cls(**values)


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained."""

    epochs: int = 40
    """Maximum epochs; early stopping may end sooner."""
    batch_size: int = 64
    """Images per optimizer step."""
    optimizer: str = "adam"
    """`adam` or `sgd` (with Nesterov momentum 0.9)."""
    lr: float = 2e-3
    """Initial learning rate."""
    schedule: str = "cosine"
    """Learning-rate schedule: `none`, `cosine` (to 0 over `epochs`), `step` (x0.1 every third of `epochs`)."""
    weight_decay: float = 0.0
    """L2 penalty coefficient (decoupled for Adam: AdamW), for comparison with dropout."""
    l1: float = 0.0
    """L1 penalty coefficient on the weights, added to the loss."""
    patience: int = 10
    """Stop after this many epochs without a better validation loss; 0 disables early stopping."""
    seed: int = 0
    """Seed of initialisation, shuffling and dropout masks."""
    device: str = "cpu"
    """`cpu`, `cuda`, or `auto` (cuda when available)."""
    threads: int | None = None
    """CPU threads for torch; None keeps torch's default (one per core)."""
    augment: str = "none"
    """`none`, or `photo`: per training batch, a random resized crop (60-100% of the area, aspect 3/4-4/3),
    a horizontal flip (p=0.5) and a small colour jitter (brightness and contrast x0.8-1.2). For photos;
    wrong for digits (a flipped 2 is no 2), so never on by default."""
    balance: str = "none"
    """For imbalanced folders: `none`; `weights` (cross-entropy weighted by n / (K * n_class)); or
    `sampler` (each epoch draws as many images as the split holds, with replacement, every class equally likely)."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        _require(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        _require(self.lr > 0, f"learning rate must be > 0, got {self.lr}")
        _require(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        _require(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")
        _require(self.l1 >= 0, f"l1 must be >= 0, got {self.l1}")
        _require(self.patience >= 0, f"patience must be >= 0, got {self.patience}")
        _require(self.device in DEVICES, f"unknown device {self.device!r}: choose one of {', '.join(DEVICES)}")
        _require(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _require(self.augment in AUGMENTATIONS, f"unknown augmentation {self.augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
        _require(self.balance in BALANCING, f"unknown balancing {self.balance!r}: choose one of {', '.join(BALANCING)}")


@dataclass(frozen=True)
class MCConfig:
    """Monte Carlo dropout export: `model.mc.onnx`, whose dropout stays active at inference."""

    samples: int = 32
    """Dropout samples N per input, fixed at export and drawn in one batched pass."""
    seed: int = 1
    """Seeds ONNX Runtime's random ops (`onnxruntime.set_seed`) and the noise images during
    verification, so the recorded numbers are reproducible. The shipped file holds no seed.
    Not 0: after `onnxruntime.set_seed(0)` (1.32) a Dropout kernel repeats one mask on every run."""
    opset: int = 18
    """ONNX opset of the export (the dynamo exporter gives 18 at least)."""
    max_accuracy_drop: float = 0.005
    """Verification fails when MC accuracy < deterministic accuracy - this (0.005 = 0.5 points)."""
    convergence_repeats: int = 16
    """The convergence study averages up to this many runs of the N-sample model (N x repeats samples)."""
    ood_samples: int = 1000
    """At most this many images per out-of-distribution set (and of the in-distribution test split)."""
    ood_data_dir: Path | None = None
    """An IDX folder or `.npz` file of another dataset, resized to the run's input, as one more
    out-of-distribution set (e.g. MNIST for a digits run); None skips it."""
    batch_size: int = 256
    """Images per ONNX Runtime call during verification and evaluation."""

    def __post_init__(self) -> None:
        _require(2 <= self.samples <= 4096, f"MC samples must be in [2, 4096], got {self.samples}")
        _require(self.seed >= 1, f"MC seed must be >= 1, got {self.seed}")
        _require(self.opset >= 18, f"MC opset must be >= 18 (the dynamo exporter's minimum), got {self.opset}")
        _require(0.0 <= self.max_accuracy_drop <= 1.0, f"max accuracy drop must be in [0, 1], got {self.max_accuracy_drop}")
        _require(self.convergence_repeats >= 2, f"convergence repeats must be >= 2, got {self.convergence_repeats}")
        _require(self.ood_samples >= 10, f"OOD samples must be >= 10, got {self.ood_samples}")
        _require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")


BENCH_PROVIDERS = ("cpu", "cuda", "tensorrt")
QUANT_RECIPES = ("default", "ort-defaults", "per-channel", "qoperator-u8s8", "float-gemm-outputs", "first-conv-fp32",
                 "nhwc-flatten", "nhwc-signed-input", "space-to-depth")  # quantize.RECIPES
BENCH_ENGINES = ("onnxruntime", "openvino", "openvino-bf16")  # pipeline.engines.ENGINES, without importing it
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class BenchConfig(TimingPlan):
    """How `bench` times ONNX Runtime sessions (and the PyTorch baseline). Every loop is bounded in time.

    It is a `pipeline.timing.TimingPlan` (warm-up, runs, duration, rounds, time limit per measurement)
    with what bench adds: providers, engines, batch sizes, threads, IO binding, the baseline.
    """

    providers: tuple[str, ...] = ("cpu",)
    """Execution providers to time, by short name: `cpu`, `cuda`, `tensorrt`. An unavailable one is reported, never timed."""
    engines: tuple[str, ...] = ("onnxruntime",)
    """Inference engines: `onnxruntime` (the default), `openvino` (f32 precision hint), `openvino-bf16`. One that
    is not installed is reported in one line; a pair that disagrees with ONNX Runtime fp32 is refused, never timed."""
    batch_sizes: tuple[int, ...] = (1, 16, 256)
    """Batch sizes to time; each is one measurement per artifact, provider and thread count."""
    threads: tuple[int, ...] | None = None
    """Intra-op thread counts to time; None chooses per batch size by a short interleaved probe of 1 thread vs all usable cores."""
    optimization_level: str | None = None
    """ORT graph optimization level for every session (`disable`, `basic`, `extended`, `all`); None applies each artifact's own `runtime`."""
    io_binding: bool = False
    """Bind inputs and outputs to the provider's device once (OrtValues) instead of copying per run."""
    require_provider: bool = False
    """Fail (DeviceError) instead of reporting a requested provider as unavailable."""
    baseline: bool = True
    """Also time the PyTorch model (eval + inference_mode) on the same inputs and threads, when a checkpoint is at hand."""
    seed: int = 0
    """Seed of the synthetic inputs (the same inputs for every artifact and the baseline)."""
    settle_seconds: float = SETTLE_SECONDS
    """Untimed runs at the start of each slot's round (`TimingPlan.settle_seconds`): bench interleaves sessions and
    engines, and the previous one's threads and cache footprint slowed the next one's first runs."""

    def __post_init__(self) -> None:
        _require(len(self.providers) >= 1, "at least one provider is required")
        for provider in self.providers:
            _require(provider in BENCH_PROVIDERS,
                     f"unknown provider {provider!r}: choose one of {', '.join(BENCH_PROVIDERS)}")
        _require(len(self.engines) >= 1 and all(e in BENCH_ENGINES for e in self.engines),
                 f"unknown engine in {', '.join(self.engines) or '(none)'}: choose from {', '.join(BENCH_ENGINES)}")
        _require(len(self.batch_sizes) >= 1 and all(b >= 1 for b in self.batch_sizes),
                 f"batch sizes must be one or more positive integers, got {self.batch_sizes}")
        _require(self.threads is None or (len(self.threads) >= 1 and all(t >= 1 for t in self.threads)),
                 f"threads must be positive integers, got {self.threads}")
        _require(self.optimization_level in (None, *OPTIMIZATION_LEVELS),
                 f"unknown optimization level {self.optimization_level!r}: choose one of {', '.join(OPTIMIZATION_LEVELS)}")
        try:
            super().__post_init__()  # the timing plan's own checks (warm-up, runs, duration, rounds, time limit)
        except ValueError as exc:  # timing.py imports nothing from the package, so its refusal is a plain ValueError
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class PredictConfig:
    """How `predict` opens a model and reports its answers."""

    variant: str | None = None
    """Artifact to run (fp32, int8, ...); None takes the manifest's `recommended`, else fp32."""
    top_k: int = 3
    """How many labels to report per input, most probable first."""
    threads: int | None = None
    """ONNX Runtime intra-op threads; None keeps the artifact's runtime setting (or ORT's default)."""
    invert: bool = False
    """Invert 8-bit inputs (dark ink on light paper -> the light-on-dark the model was trained on)."""
    assume: bool = False
    """For a bare .onnx without manifest or metadata: assume pixels / 255, mean 0, std 1, labels 0..K-1."""
    strict: bool = False
    """Fail (exit code of a data error) when any input is unreadable; by default they are listed and the rest classified."""

    def __post_init__(self) -> None:
        _require(self.top_k >= 1, f"top-k must be >= 1, got {self.top_k}")
        _require(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _require(self.variant is None or bool(self.variant.strip()), "variant must not be empty")


@dataclass(frozen=True)
class PackConfig:
    """What `pack` puts into a device bundle."""

    out: Path
    """The .tar.gz to write (atomically)."""
    variants: tuple[str, ...] = ()
    """Artifacts to ship; empty ships the manifest's `recommended` (else fp32) and every artifact its deployments name."""
    golden: int = 32
    """Test images in the bundle's golden set (PNG + tensors + every variant's answers); 0 ships none."""
    golden_seed: int = 0
    """Seed of the golden set's choice among the test images."""
    ort_format: bool = False
    """Also ship .ort files (ONNX Runtime's mobile format) and required_operators.config."""
    sign_key: Path | None = None
    """Ed25519 private key (PEM): sign SHA256SUMS into SIGNATURE (needs the `cryptography` package)."""

    def __post_init__(self) -> None:
        _require(str(self.out).endswith((".tar.gz", ".tgz")), f"bundle name must end in .tar.gz or .tgz, got {self.out}")
        _require(len(set(self.variants)) == len(self.variants), f"variant listed twice: {list(self.variants)}")
        _require(0 <= self.golden <= 1000, f"golden images must be in 0..1000, got {self.golden}")
        _require(not self.ort_format or self.golden > 0, "--ort-format checks each .ort on the golden set: golden must be > 0")


OPSET_RANGE = (17, 23)


@dataclass(frozen=True)
class ExportConfig:
    """How a checkpoint becomes the shipped fp32 `model.onnx`, and how hard it is checked."""

    opset: int = 18
    """ONNX opset of the exported file. Default 18: the opset torch's dynamo exporter emits natively
    (lower ones go through onnx's version converter) and one that ONNX Runtime >= 1.14 runs."""
    tolerance: float = 1e-4
    """Largest max-abs difference of logits allowed between ONNX Runtime and PyTorch eval() (and the reference evaluator)."""
    parity_batch_sizes: tuple[int, ...] = (1, 7, 256)
    """Batch sizes of real validation images the parity check runs (1, an odd one, a large one)."""
    determinism_repeats: int = 3
    """Runs of the same batch under ORT_DISABLE_ALL that must give bit-identical outputs."""
    reference_images: int = 8
    """Validation images run through onnx.reference.ReferenceEvaluator (slow pure-Python, so few)."""
    simplify_checks: int = 3
    """Random-input checks onnxsim runs on its own result (its `check_n`); its verdict must be True."""
    skip_simplify: bool = False
    """Ship the raw export without onnxsim (only when the user asks: a failing onnxsim otherwise stops the export)."""

    def __post_init__(self) -> None:
        low, high = OPSET_RANGE
        _require(low <= self.opset <= high, f"opset must be in {low}..{high}, got {self.opset}")
        _require(0 < self.tolerance < 1, f"tolerance must be in (0, 1), got {self.tolerance}")
        _require(len(self.parity_batch_sizes) >= 1 and all(b >= 1 for b in self.parity_batch_sizes),
                 f"parity batch sizes must be one or more positive integers, got {self.parity_batch_sizes}")
        _require(self.determinism_repeats >= 2, f"determinism repeats must be >= 2, got {self.determinism_repeats}")
        _require(self.reference_images >= 1, f"reference images must be >= 1, got {self.reference_images}")
        _require(self.simplify_checks >= 1, f"simplify checks must be >= 1 (onnxsim checks nothing with 0), got {self.simplify_checks}")


STUDY_VARIANTS = ("none", "dropout", "dropout_article", "spatial_dropout", "l2", "l1", "dropout_l2")
# Variants whose strength is chosen on the validation split from a grid; the others have nothing to tune.
STUDY_TUNED = ("dropout", "spatial_dropout", "l2", "l1", "dropout_l2")


@dataclass(frozen=True)
class StudyConfig:
    """The regularizer study: each regularizer at its best strength (chosen on validation), over seeds and sizes."""

    variants: tuple[str, ...] = STUDY_VARIANTS
    """Variants: `none`; `dropout` (nn.Dropout before each fully connected layer, rate tuned); `dropout_article`
    (the article's untuned 0.5); `spatial_dropout` (Dropout2d after each conv block, tuned); `l2` (tuned);
    `l1` (tuned); `dropout_l2` (the rate chosen for `dropout`, L2 tuned on top). `none` is always trained."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Training seeds of the final runs (initialisation, shuffling, dropout masks); the data splits stay the same.
    The first is also the seed of every tuning run, so the chosen setting's tuning run is its first final run."""
    train_sizes: tuple[int, ...] = (200, 1000, 7200)
    """Training-set sizes (stratified subsets, `DataConfig.max_train_samples`); a size above what the data has means all of it."""
    epochs: tuple[int, ...] = (60, 40, 15)
    """Epoch budget per training size (one value: the same for all); early stopping usually ends a run sooner."""
    patience: int = 5
    """Early stopping: a run ends after this many epochs without a better validation loss; the checkpoint
    is the epoch of best validation loss."""
    dropout_grid: tuple[float, ...] = (0.1, 0.25, 0.5, 0.7)
    """nn.Dropout rates tried for `dropout` (before each fully connected layer)."""
    spatial_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    """nn.Dropout2d rates tried for `spatial_dropout`."""
    l2_grid: tuple[float, ...] = (0.125, 0.5, 2.0, 8.0)
    """AdamW decoupled weight decays tried for `l2` and `dropout_l2` (log-spaced, x4; each step shrinks
    weights by lr x this, so it needs larger values than an L2 term in the loss)."""
    l1_grid: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3)
    """L1 coefficients (x sum of |weights| added to the loss) tried for `l1` (log-spaced, half decades)."""
    article_dropout: float = 0.5
    """Rate of the untuned `dropout_article` variant: the article's 0.5 before the fully connected layers."""
    thin_grid_from: int | None = None
    """At training sizes >= this, only every other grid value (1st, 3rd, ...) is tried, to save compute; None: the full grid."""
    batch_size: int = 32
    """Images per optimizer step (small: a small training set still gets enough steps to overfit)."""
    lr: float = 2e-3
    """AdamW learning rate, constant (no schedule: a cosine to 0 makes the last epoch the best one, which hides
    whether the budget was long enough), the same for every variant."""
    conv_channels: tuple[int, ...] = (16, 32)
    """Conv block widths of the one architecture every variant shares."""
    fc_units: tuple[int, ...] = (64,)
    """Hidden fully connected units of that architecture."""
    strided_first_conv: bool | None = None
    """First block: conv 5x5 stride 2, the classic conv 3x3 + max pool, or None: by input size (ModelConfig)."""
    threads: int | None = 1
    """torch CPU threads for training. 1 by default: for these small models on a loaded machine, two
    threads measured 6-25x slower per epoch than one (OpenMP threads waiting on each other); None keeps torch's default."""
    mc_samples: tuple[int, ...] = (1, 4, 16, 64)
    """MC dropout sample counts N compared with the deterministic (weight-scaled) model."""
    ece_bins: int = 15
    """Equal-width confidence bins of the expected calibration error and the reliability diagram."""
    bootstrap: int = 2000
    """Bootstrap resamples (over seeds and test images, paired) of every interval."""
    latency_runs: int = 300
    """Timed ONNX Runtime runs per timed model and batch (interleaved across them)."""
    latency_warmup: int = 20
    """Untimed runs per timed model before timing."""
    latency_seconds: float = 10.0
    """Upper bound on the timed runs of one model and batch."""
    latency_batch: int = 16
    """The second batch size the MC models are timed at (per-image cost when images come in batches)."""
    latency_threads: int = 1
    """ONNX Runtime intra-op threads for the latency measurement (fixed, so runs compare)."""
    opset: int = 18
    """ONNX opset of the exported models that are timed (18: what the dynamo exporter emits natively)."""

    def epochs_for(self, index: int) -> int:
        """The epoch budget of the `index`-th training size (sorted ascending)."""
        return self.epochs[index] if len(self.epochs) > 1 else self.epochs[0]

    def grid(self, variant: str, train_size: int) -> tuple[float, ...]:
        """The strengths tried for a tuned variant at one training size (thinned above `thin_grid_from`)."""
        values = {"dropout": self.dropout_grid, "spatial_dropout": self.spatial_grid, "l2": self.l2_grid,
                  "l1": self.l1_grid, "dropout_l2": self.l2_grid}[variant]
        if self.thin_grid_from is not None and train_size >= self.thin_grid_from:
            return values[::2]
        return values

    def __post_init__(self) -> None:
        _require(len(self.variants) >= 1, "at least one study variant is required")
        for name in self.variants:
            _require(name in STUDY_VARIANTS, f"unknown study variant {name!r}: choose from {', '.join(STUDY_VARIANTS)}")
        _require(len(set(self.variants)) == len(self.variants), f"variant listed twice: {list(self.variants)}")
        _require(len(self.seeds) >= 1, "at least one seed is required")
        _require(len(set(self.seeds)) == len(self.seeds), f"seed listed twice: {list(self.seeds)}")
        _require(all(s >= 0 for s in self.seeds), f"seeds must be >= 0, got {list(self.seeds)}")
        _require(len(self.train_sizes) >= 1, "at least one training-set size is required")
        _require(all(n >= 10 for n in self.train_sizes), f"training-set sizes must be >= 10, got {list(self.train_sizes)}")
        _require(len(set(self.train_sizes)) == len(self.train_sizes), f"training-set size listed twice: {list(self.train_sizes)}")
        _require(len(self.epochs) in (1, len(self.train_sizes)),
                 f"give one epoch budget or one per training size ({len(self.train_sizes)}), got {list(self.epochs)}")
        _require(all(e >= 1 for e in self.epochs), f"epochs must be >= 1, got {list(self.epochs)}")
        _require(self.patience >= 1, f"patience must be >= 1 (the study always stops early), got {self.patience}")
        for name, low, high in (("dropout_grid", 0.0, 1.0), ("spatial_grid", 0.0, 1.0)):
            values = getattr(self, name)
            _require(len(values) >= 1 and all(low < v < high for v in values),
                     f"{name.replace('_', ' ')} must be one or more rates in (0, 1), got {list(values)}")
        for name in ("l2_grid", "l1_grid"):
            values = getattr(self, name)
            _require(len(values) >= 1 and all(v > 0 for v in values),
                     f"{name.replace('_', ' ')} must be one or more values > 0, got {list(values)}")
        _require(0.0 < self.article_dropout < 1.0, f"article dropout must be in (0, 1), got {self.article_dropout}")
        _require(self.thin_grid_from is None or self.thin_grid_from >= 10,
                 f"thin grid from must be a training size >= 10, got {self.thin_grid_from}")
        _require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, f"learning rate must be > 0, got {self.lr}")
        _require(len(self.conv_channels) >= 1 and all(c >= 1 for c in self.conv_channels),
                 f"conv channels must be one or more positive integers, got {self.conv_channels}")
        _require(all(u >= 1 for u in self.fc_units), f"fc units must be positive integers, got {self.fc_units}")
        _require(len(self.mc_samples) >= 1 and all(1 <= n <= 4096 for n in self.mc_samples),
                 f"MC samples must be one or more counts in [1, 4096], got {list(self.mc_samples)}")
        _require(self.ece_bins >= 2, f"ECE bins must be >= 2, got {self.ece_bins}")
        _require(self.bootstrap >= 100, f"bootstrap resamples must be >= 100, got {self.bootstrap}")
        _require(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _require(self.latency_runs >= 1, f"latency runs must be >= 1, got {self.latency_runs}")
        _require(self.latency_warmup >= 0, f"latency warmup must be >= 0, got {self.latency_warmup}")
        _require(self.latency_seconds > 0, f"latency seconds must be > 0, got {self.latency_seconds}")
        _require(self.latency_batch >= 1, f"latency batch must be >= 1, got {self.latency_batch}")
        _require(self.latency_threads >= 1, f"latency threads must be >= 1, got {self.latency_threads}")
        _require(self.opset >= 18, f"study opset must be >= 18 (the dynamo exporter's minimum), got {self.opset}")


QUANT_MODES = ("static", "dynamic")
QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANT_TYPES = ("int8", "uint8")
QUANT_ORT_LEVELS = ("disable", "basic", "extended", "all")  # pipeline.runtime.LEVELS, without importing onnxruntime


@dataclass(frozen=True)
class QuantizeConfig:
    """How the fp32 ONNX model becomes int8 with onnxruntime.quantization, and the gate it must pass.

    Defaults were chosen by measurement on this CPU (README, "Quantization" and "Performance"): static
    QDQ, uint8 activations and int8 weights (U8S8: the x86 VNNI kernels' native pair), per-tensor
    weights, MinMax calibration on 256 training images, the first Conv kept in fp32 and ORT's
    QDQPropagationTransformer disabled for the session (the pair that makes int8 faster than fp32).
    """

    mode: str = "static"
    """`static` (activations calibrated on training images) or `dynamic` (activation ranges computed per batch at run time)."""
    format: str = "qdq"
    """Static models only: `qdq` (QuantizeLinear/DequantizeLinear pairs around float ops) or `qoperator` (QLinearConv, ...)."""
    method: str = "minmax"
    """Calibration: `minmax`, `entropy` (KL divergence) or `percentile` (see `percentile`)."""
    per_channel: bool = False
    """One weight scale per output channel instead of one per tensor (per-tensor by default: as fast and as
    accurate on the models measured, and the per-channel scales push a small model's file past 30% of fp32)."""
    activation_type: str = "uint8"
    """Activation type, `int8` or `uint8` (static models; dynamic ones are always uint8). uint8 by default:
    U8S8 is what ONNX Runtime's x86 int8 kernels run natively (S8S8 in QOperator format ran 5x slower than fp32)."""
    weight_type: str = "int8"
    """Weight type, `int8` or `uint8`."""
    reduce_range: bool = False
    """Quantize weights to 7 bits (for CPUs without VNNI, where 8-bit products can saturate)."""
    calibration_samples: int = 256
    """Training images the calibration sees, drawn with `seed` (stratification is not needed: they only set ranges)."""
    calibration_batch: int = 16
    """Images per calibration batch."""
    seed: int = 0
    """Seed of the calibration and sensitivity samples; the same seed gives the same file."""
    percentile: float = 99.999
    """Percentile of |activations| kept by the `percentile` method."""
    op_types: tuple[str, ...] = ()
    """Op types to quantize (e.g. Conv, Gemm); empty: every op type onnxruntime can quantize statically,
    and only MatMul dynamically (ConvInteger is slower than fp32 Conv on x86: Conv stays float)."""
    nodes_to_exclude: tuple[str, ...] = ()
    """Node names (of the pre-processed model) kept in fp32 from the start."""
    keep_first_conv_fp32: bool | None = None
    """Keep the first Conv in fp32 (True), quantize it (False), or None: decide by the graph, as measured
    (README, "Performance"). A first Conv that feeds a max pool stays fp32: in int8 its full-resolution output
    made the whole model about as slow as fp32, and keeping it fp32 pays off only with `disabled_optimizers` =
    QDQPropagationTransformer. A strided first Conv (the default from 16x16 up) is quantized: on the trained MNIST
    models int8 throughout was 1.12-1.17x faster at batch 256 than with that Conv in fp32 (0.92-0.98x at batch 1)."""
    keep_last_layer_fp32: bool = False
    """Keep the last Gemm/MatMul (the classifier) in fp32."""
    flatten_nhwc: bool = False
    """Flatten the last feature map in NHWC order before the first fully connected layer (a Transpose, and that
    layer's weights permuted to match: the same products; `pipeline.layout`). Engines that keep int8 activations
    channels-last then skip a reorder of the whole feature map (the `nhwc-flatten` recipes)."""
    space_to_depth: bool = False
    """Rewrite each strided Conv on at most 4 input channels (the first Conv of an image model) as
    SpaceToDepth + a stride-1 Conv on stride^2 times the channels (the same sums; `pipeline.layout`): int8
    kernels multiply channels in groups of four, and one channel leaves three of four lanes empty."""
    signed_input: bool = False
    """Quantize the graph input as symmetric int8 (zero point 0, as NNCF does) instead of as an activation of
    `activation_type`: a normalized image has negative values, and a zero zero point spares the first Conv its
    zero-point correction. Static QDQ only."""
    pre_process: bool = True
    """Run `onnxruntime.quantization.quant_pre_process` (shape inference, graph optimization) first."""
    extra_options: dict = dataclasses.field(default_factory=dict)
    """Passed to onnxruntime's `extra_options` as they are (e.g. {"ActivationSymmetric": True})."""
    graph_optimization_level: str = "all"
    """ORT graph optimization level every consumer of the int8 file must use (recorded in the artifact's `runtime`)."""
    disabled_optimizers: tuple[str, ...] = ("QDQPropagationTransformer",)
    """ORT optimizers to disable when running the int8 file, recorded in `runtime`. By default
    QDQPropagationTransformer: it would move an fp32 first Conv's QuantizeLinear above its MaxPool, which
    then runs on uint8 in NCHW layout and makes the whole model slower than fp32 (README, "Performance")."""
    max_accuracy_drop: float = 0.5
    """Largest test accuracy drop in percentage points (fp32 minus int8, both through ONNX Runtime) that may ship."""
    min_agreement: float | None = None
    """Smallest share of test images on which int8 and fp32 must predict the same class; None: recorded, not gated."""
    max_class_recall_drop: float = CLASS_RECALL_DROP
    """Largest drop of validation recall, in percentage points, that any one class (with at least
    `class_min_support` validation images) may suffer against fp32. The overall gate alone lets a
    variant ship that ruins a rare class: 2 points of a 5% class are 0.1 points overall."""
    class_min_support: int = CLASS_MIN_SUPPORT
    """Classes with fewer validation images are reported, not gated: one image is 1/n of their recall."""
    max_excluded_nodes: int = 1
    """When the gate fails, keep up to this many of the most sensitive nodes in fp32, one at a time; 0: fail at once.
    Small on purpose: with every weighted node in fp32 any calibration "passes", broken or not."""
    sensitivity_samples: int = 64
    """Training images (drawn with `seed`, apart from the calibration draw) on which per-node sensitivity is measured."""
    speed_check: bool = True
    """Time int8 against fp32 on this host (batch 1 and `speed_batch`) and record the ratios."""
    speed_batch: int = 256
    """The large batch of the speed check."""
    speed_seconds: float = 0.05
    """Seconds of timed runs per model, batch and round of the speed check (after 0.05 s of untimed settling runs)."""
    speed_rounds: int = 15
    """Rounds of the speed check, interleaved between fp32 and the candidates so that load drifts hit all alike.
    Many short rounds rank more steadily than few long ones on a shared host: 20 x 0.05 s gave a candidate's
    ratio to fp32 within 0.03 over three repeats, 5 x 0.2 s within 0.13 (README, issue 16)."""
    speed_tolerance: float = 0.05
    """int8 counts as slower than fp32 when its latency ratio exceeds 1 + this (timing noise on a shared CPU)."""
    threads: int | None = None
    """Intra-op threads for the speed check (every engine); None: 1 at batch 1, every usable core at the large
    batch (`quantize.speed_threads`). The deployments record the threads each batch size was measured with."""
    variant: str | None = None
    """Artifact name; None: `int8` for static, `int8_dynamic` for dynamic. The file is `model.<variant>.onnx`."""
    recipes: tuple[str, ...] | None = None
    """Static int8 recipes to build, gate on validation and time against each other (`quantize.RECIPES`); the
    fastest passing one ships. None: all of them when the speed check runs, else only `default` (this config)."""
    keep_candidates: bool = False
    """Keep the candidates that were not shipped as `model.<variant>.<recipe>.onnx` (not artifacts of the run)."""
    engines: tuple[str, ...] | None = None
    """Engines the speed check times the candidates under (each pair checked on validation images first);
    None: ONNX Runtime and OpenVINO where it is installed. The deployments name the fastest per batch size."""

    def __post_init__(self) -> None:
        _check_class_gate(self.max_class_recall_drop, self.class_min_support)
        _require(self.recipes is None or (len(self.recipes) >= 1 and all(r in QUANT_RECIPES for r in self.recipes)),
                 f"unknown int8 recipe in {', '.join(self.recipes or ()) or '(none)'}: choose from {', '.join(QUANT_RECIPES)}")
        _require(self.engines is None or (len(self.engines) >= 1 and all(e in BENCH_ENGINES for e in self.engines)),
                 f"unknown engine in {', '.join(self.engines or ()) or '(none)'}: choose from {', '.join(BENCH_ENGINES)}")
        _require(self.mode in QUANT_MODES, f"unknown quantization mode {self.mode!r}: choose one of {', '.join(QUANT_MODES)}")
        _require(self.format in QUANT_FORMATS, f"unknown quantization format {self.format!r}: choose one of {', '.join(QUANT_FORMATS)}")
        _require(self.method in CALIBRATION_METHODS,
                 f"unknown calibration method {self.method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
        for name in ("activation_type", "weight_type"):
            value = getattr(self, name)
            _require(value in QUANT_TYPES, f"unknown {name.replace('_', ' ')} {value!r}: choose one of {', '.join(QUANT_TYPES)}")
        _require(not self.signed_input or (self.mode == "static" and self.format == "qdq"),
                 "a signed input (signed_input) needs static QDQ quantization")
        _require(self.calibration_samples >= 1, f"calibration samples must be >= 1, got {self.calibration_samples}")
        _require(self.calibration_batch >= 1, f"calibration batch must be >= 1, got {self.calibration_batch}")
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _require(50.0 < self.percentile <= 100.0, f"percentile must be in (50, 100], got {self.percentile}")
        _require(self.graph_optimization_level in QUANT_ORT_LEVELS,
                 f"unknown graph optimization level {self.graph_optimization_level!r}: choose one of {', '.join(QUANT_ORT_LEVELS)}")
        _require(0.0 <= self.max_accuracy_drop <= 100.0, f"max accuracy drop must be in [0, 100] points, got {self.max_accuracy_drop}")
        _require(self.min_agreement is None or 0.0 <= self.min_agreement <= 1.0,
                 f"min agreement must be in [0, 1], got {self.min_agreement}")
        _require(self.max_excluded_nodes >= 0, f"max excluded nodes must be >= 0, got {self.max_excluded_nodes}")
        _require(self.sensitivity_samples >= 1, f"sensitivity samples must be >= 1, got {self.sensitivity_samples}")
        _require(self.speed_batch >= 2, f"speed batch must be >= 2, got {self.speed_batch}")
        _require(self.speed_seconds > 0, f"speed seconds must be > 0, got {self.speed_seconds}")
        _require(self.speed_rounds >= 1, f"speed rounds must be >= 1, got {self.speed_rounds}")
        _require(self.speed_tolerance >= 0, f"speed tolerance must be >= 0, got {self.speed_tolerance}")
        _require(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _require(self.variant is None or (self.variant.replace("_", "").isalnum() and self.variant not in ("fp32", "fp16")),
                 f"variant must be a name of letters, digits and '_' other than fp32/fp16, got {self.variant!r}")

    @property
    def artifact(self) -> str:
        """The artifact (variant) name this config writes."""
        return self.variant or ("int8" if self.mode == "static" else "int8_dynamic")


@dataclass(frozen=True)
class Fp16Config:
    """How the fp32 ONNX model becomes an fp16 one (for GPU targets), and the checks it must pass."""

    keep_io_types: bool = True
    """Keep float32 inputs and outputs (Casts inside), so the manifest's preprocessing and consumers stay as they are."""
    op_block_list: tuple[str, ...] = ()
    """Op types kept in fp32 (besides the converter's own default list)."""
    tolerance: float = 1e-2
    """Largest max-abs logit difference from fp32, relative to the largest fp32 logit magnitude."""
    max_accuracy_drop: float = 0.5
    """Largest test accuracy drop in percentage points against fp32 (both through ONNX Runtime)."""
    provider: str = "cpu"
    """Execution provider the checks run on: `cpu` (always there) or `cuda`."""
    max_class_recall_drop: float = CLASS_RECALL_DROP
    """As `QuantizeConfig.max_class_recall_drop`: the largest validation recall drop of any one class, in points."""
    class_min_support: int = CLASS_MIN_SUPPORT
    """As `QuantizeConfig.class_min_support`: classes with fewer validation images are reported, not gated."""

    def __post_init__(self) -> None:
        _check_class_gate(self.max_class_recall_drop, self.class_min_support)
        _require(0 < self.tolerance < 1, f"fp16 tolerance must be in (0, 1), got {self.tolerance}")
        _require(0.0 <= self.max_accuracy_drop <= 100.0, f"max accuracy drop must be in [0, 100] points, got {self.max_accuracy_drop}")
        _require(self.provider in ("cpu", "cuda"), f"fp16 checks run on cpu or cuda, got {self.provider!r}")
