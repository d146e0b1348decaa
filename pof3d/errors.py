"""Errors a user can cause: CLIs turn them into one line and exit code 2."""


class Pof3dError(Exception):
    """Base class for errors caused by input (config, data, files), not by bugs."""


class ConfigError(Pof3dError):
    """A preset name, override path or value that does not fit the config schema."""


class DataError(Pof3dError):
    """A data file or shard that is unreadable, malformed or inconsistent."""


class CheckpointError(Pof3dError):
    """A checkpoint directory that is missing, incomplete or of another format."""


class TrainingError(Pof3dError):
    """Training cannot go on (e.g. a non-finite loss); names the phase and step."""
