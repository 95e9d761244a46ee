"""The manifest's schema: one typed definition of `manifest.json`, the device contract of a run folder.

Stages fill these records (`Manifest.new` for training, `Artifact` for every shipped file,
`Deployment` for per-batch recommendations); `artifacts.read_manifest` and `update_manifest`
check every manifest read or written against them, so a reader never meets a field it does not
know and a stage cannot write one. Stage-specific detail (verification numbers, quantization
recipe, latencies) stays a documented free-form dict inside its typed record.

The split rule is written into every manifest (`SPLIT_RULE`): training data trains, validation data
makes every choice, the test split is measured once per shipped artifact after every choice.
Schema 1 (before validation and test accuracy were recorded apart) is read and upgraded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from pipeline.errors import RunFolderError

SCHEMA = 2
READABLE_SCHEMAS = (1, 2)
SPLIT_RULE = {
    "train": "fits the weights",
    "validation": "makes every choice: the epoch, int8 node exclusions and recipe, fp16 and MC acceptance",
    "test": "measured once per shipped artifact, after every choice is made; never feeds back",
}


class ManifestError(RunFolderError):
    """A manifest that does not follow the schema (unknown field, wrong type, missing field)."""


class _Record:
    """from_dict/to_dict for the dataclasses below: unknown fields and wrong types are refused."""

    @classmethod
    def from_dict(cls, data: object, where: str = "manifest"):
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)} (schema {SCHEMA})")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ManifestError(f"{where}: missing field {f.name!r}")
                continue
            values[f.name] = _typed(data[f.name], hints[f.name], f"{where}.{f.name}")
        return cls(**values)

    def to_dict(self) -> dict:
        result = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue  # optional and absent: not written (a required field is written even when None)
            result[f.name] = _plain(value)
        return result


def _plain(value):
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _typed(value, hint, where: str):
    """`value` checked against `hint` (and built into records where the hint names one)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(value, inner, where)
    if isinstance(hint, type) and issubclass(hint, _Record):
        return hint.from_dict(value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: expected an object, got {type(value).__name__}")
        return {key: _typed(item, args[1], f"{where}.{key}") for key, item in value.items()} if args else value
    if origin is list:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, got {type(value).__name__}")
        return [_typed(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)] if args else value
    expected = {float: (int, float), int: (int,), str: (str,), bool: (bool,), dict: (dict,), list: (list,)}.get(hint)
    if hint is typing.Any or expected is None:
        return value
    if not isinstance(value, expected) or (hint is not bool and isinstance(value, bool)):
        raise ManifestError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value


@dataclass
class Dataset(_Record):
    """Where the run's data came from and how it was split."""

    source: str | None = None
    fingerprint: str | None = None
    """sha256 over the decoded pixels, labels and split: later stages refuse other data."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Images per split: train, val, test."""
    config: dict = field(default_factory=dict)
    """The `DataConfig` that reads it again."""
    skipped_images: int | None = None
    """Image folders: unreadable files left out (`--on-bad-image skip`), listed in skipped_images.json."""
    ignored_files: int | None = None
    """Image folders: files not read as images (not an image, outside a class folder), listed there too."""
    cache: dict | None = None
    """Image folders: the decoded cache entry read ({"fingerprint", "path", "images"}); `fingerprint` is of its content."""


@dataclass
class Model(_Record):
    config: dict
    """The `ModelConfig` of the checkpoint."""
    parameters: int | None = None


@dataclass
class Training(_Record):
    """How the checkpoint was made (or where it was adopted from)."""

    checkpoint: str
    checkpoint_sha256: str | None = None
    config: dict | None = None
    """The `TrainConfig` (None for an adopted checkpoint that did not record one)."""
    validation_accuracy: float | None = None
    """At the chosen epoch (the epoch of best validation loss)."""
    test_accuracy: float | None = None
    """Measured once, on the chosen epoch's weights."""
    train_seconds: float | None = None
    seconds_per_epoch: float | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    device: str | None = None
    world_size: int | None = None
    adopted_from: str | None = None


@dataclass
class Artifact(_Record):
    """One shipped file: what it is, how to run it, what it measured, and on which split."""

    file: str
    kind: str
    """fp32, int8, fp16 or mc."""
    parent: str | None
    """The artifact it was derived from (int8 and fp16 from fp32); None (written) for exports of the checkpoint."""
    sha256: str
    bytes: int | None = None
    opset: int | None = None
    ir_version: int | None = None
    input: dict | None = None
    output: dict | None = None
    runtime: dict = field(default_factory=dict)
    """ONNX Runtime session settings every consumer must apply."""
    validation_accuracy: float | None = None
    """Accuracy on the validation split: the number its acceptance was decided on."""
    test_accuracy: float | None = None
    """Accuracy on the test split, measured once after every choice; it chose nothing."""
    chosen_on: str | None = None
    """The split every choice about this artifact read (always "validation")."""
    agreement: float | None = None
    """Top-1 agreement with the parent on the validation split."""
    test_agreement: float | None = None
    test_per_class: dict | None = None
    """Precision, recall, f1 and support per class on the test split, and the confusion matrix (`metrics.per_class`)."""
    size_ratio: float | None = None
    created: str | None = None
    verification: dict | None = None
    quantization: dict | None = None
    latency: dict | None = None
    target: str | None = None
    fp16: dict | None = None
    outputs: list | None = None
    samples: int | None = None
    randomness: str | None = None
    evaluation: dict | None = None
    config: dict | None = None
    seconds: dict | None = None


@dataclass
class Deployment(_Record):
    """What to run at one batch size on the host that measured it: an artifact on an engine."""

    batch: int
    artifact: str
    engine: str = "onnxruntime"
    provider: str = "cpu"
    threads: int | None = None
    p50_ms: float | None = None
    ratio_to_fp32: float | None = None
    host: dict | None = None
    measured: str | None = None
    created: str | None = None
    onnxruntime_artifact: str | None = None
    """When `engine` is not ONNX Runtime: the artifact that measured fastest on ONNX Runtime at this batch size,
    which readers run where `engine` is not installed (most edge devices have ONNX Runtime only)."""


@dataclass
class Manifest(_Record):
    """`manifest.json`: written last by `train`, changed only by stages publishing all or nothing."""

    schema: int
    pipeline_version: str | None = None
    created: str | None = None
    updated: str | None = None
    labels: list[str] = field(default_factory=list)
    preprocess: dict = field(default_factory=dict)
    dataset: Dataset | None = None
    model: Model | None = None
    training: Training | None = None
    split_rule: dict[str, str] | None = None
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    export: dict | None = None
    """Op histograms and node counts of the raw and shipped graphs (the export stage's record)."""
    recommended: str | None = None
    recommended_reason: str | None = None
    variants: list | None = None
    deployments: list[Deployment] | None = None

    @classmethod
    def new(cls, *, labels, preprocess: dict, dataset: Dataset, model: Model, training: Training,
            pipeline_version: str, created: str, versions: dict) -> Manifest:
        """The first manifest of a run folder, as `train` (or adopting a checkpoint) writes it."""
        return cls(schema=SCHEMA, pipeline_version=pipeline_version, created=created, labels=[str(x) for x in labels],
                   preprocess=preprocess, dataset=dataset, model=model, training=training, split_rule=dict(SPLIT_RULE),
                   versions=versions)


def validate(data: object, where: str = "manifest") -> Manifest:
    """The typed manifest of `data`, or `ManifestError` naming the first field that breaks the schema."""
    if not isinstance(data, dict) or data.get("schema") not in READABLE_SCHEMAS:
        raise ManifestError(f"{where}: not a pipeline manifest of schema {' or '.join(map(str, READABLE_SCHEMAS))}")
    return Manifest.from_dict(data, where)
