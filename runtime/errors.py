"""Errors a request can cause (kept apart so every runtime module can raise them without import cycles)."""


class InputError(ValueError):
    """A request that cannot be run as given; the message says which argument and why."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says what is missing and what to install."""
