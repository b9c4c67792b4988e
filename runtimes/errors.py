"""Errors of the runtime layer."""


class RuntimeUnavailableError(RuntimeError):
    """A runtime that is unknown, not installed, or cannot run the requested precision on this machine."""


class RuntimeNotInstalledError(RuntimeUnavailableError):
    """The runtime's package does not import here: installing it is the fix (and the only case where it is)."""
