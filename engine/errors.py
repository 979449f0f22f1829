"""User-facing error types.

Anything raised as a :class:`NuDiffError` carries a message meant for a person (it names the file or
value at fault); the CLI prints it without a traceback and the studio shows it in the UI.
"""


class NuDiffError(Exception):
    """Base class for errors whose message is shown to the user as-is."""


class DataError(NuDiffError):
    """A labeled-tile folder, image or label file is missing, unreadable or inconsistent."""


class CheckpointError(NuDiffError):
    """A checkpoint is missing, corrupt, or of the wrong kind / size for the requested use."""


class TrainingError(NuDiffError):
    """Training cannot start or had to stop (NaN loss, another job running, ...)."""
