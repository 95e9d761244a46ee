"""Typed errors. Every failure a user can cause ends as one of these, and the CLI prints
its message as one line with a non-zero exit code; a traceback only with `--debug`.

Messages carry the numbers and names a user needs to act: the path, the node, the diff.
"""


class PipelineError(Exception):
    """Base of every expected failure. `exit_code` is what the CLI exits with."""

    exit_code = 1


class DataError(PipelineError):
    """A dataset that cannot be read or is not what it claims to be."""

    exit_code = 3


class RunFolderError(PipelineError):
    """A run folder that is missing, incomplete, or would be overwritten."""

    exit_code = 4


class CheckpointError(PipelineError):
    """A checkpoint that is missing, corrupt, or of another architecture."""

    exit_code = 5


class DeviceError(PipelineError):
    """A requested device or execution provider that this machine does not have."""

    exit_code = 6


class ModelIntegrityError(PipelineError):
    """A model file whose sha256 differs from its manifest record: tampered, truncated or replaced.

    One type for every reader (predict, pack, bench), so the same fault has the same exit code.
    """

    exit_code = 8


class ConfigError(PipelineError, ValueError):
    """An invalid option or config value (`--epochs 0`, an unknown provider): the only exit 2.

    A ValueError too, so config validation reads as Python's own convention; any other ValueError
    reaching the CLI is a bug (exit 70), not a bad option.
    """

    exit_code = 2


class Interrupted(PipelineError):
    """Ctrl-C, with what is true of the files afterwards and the command that continues."""

    exit_code = 130


class TrainingDivergedError(PipelineError):
    """Training whose loss became NaN or infinite: no weights of it can be accepted."""

    exit_code = 18
