"""The error types the CLI turns into one line and exit code 1.

Modelled on NNCF's small hierarchy (``ValidationError``, ``UnsupportedBackendError``): every message says
what failed, the offending value, and what to do about it. Anything that is not a ``CompressError`` is a bug
and is shown with its traceback.
"""

from __future__ import annotations

from calibration.errors import DatasetError
from compress.deploy.runner import BundleError
from export.errors import ExportError
from runtimes.errors import RuntimeUnavailableError

__all__ = [
    "BundleError",
    "CheckpointError",
    "CompressError",
    "ConfigError",
    "DatasetError",
    "ExportError",
    "InputError",
    "RuntimeUnavailableError",
    "USER_ERRORS",
]


class CompressError(Exception):
    """A problem the user can fix: bad input, a missing dependency, a budget nobody meets."""


class InputError(CompressError):
    """A path, dataset, checkpoint or option that cannot be used as given."""


class CheckpointError(InputError):
    """A checkpoint that is unreadable, of an unknown layout, or disagrees with the hyper-parameters."""


class ConfigError(InputError):
    """A recipe or ``--set`` override that names an unknown key or an invalid value."""


# The leaf packages (calibration/, export/, runtimes/) import nothing of compress/, so each defines its own
# error; these are the types the CLI reports as one line.
# The bundle runner (compress/deploy/runner.py) travels alone to devices, so its error stands alone too.
USER_ERRORS: tuple[type[Exception], ...] = (CompressError, DatasetError, ExportError, RuntimeUnavailableError,
                                            BundleError)
