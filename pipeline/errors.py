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
