"""User-facing errors: anything the user can fix (bad path, wrong file, bad option).

The CLI prints these as one line and exits with code 2; every other exception is a bug
and keeps its traceback.
"""


class SdcliError(Exception):
    """A mistake in the user's input, with a message that names the problem and the fix."""

    exit_code = 2


class ModelLoadError(SdcliError):
    """A model file or folder that cannot be loaded as asked."""
