"""Errors of the runtime layer."""


class RuntimeUnavailableError(RuntimeError):
    """A runtime that is unknown, not installed, or cannot run the requested precision on this machine."""
