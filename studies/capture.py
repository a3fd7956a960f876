"""What a Runtime call hands its engine: the feeds each session call receives, for studies that time or profile
the engine alone on exactly those inputs."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def session_calls(session_class, method: str = "run"):
    """Inside the block, every call of session_class.<method> is recorded as (session, feeds) in the list yielded."""
    calls = []
    original = getattr(session_class, method)

    def spy(self, feeds, bank_key=None):
        calls.append((self, dict(feeds)))
        return original(self, feeds, bank_key)

    setattr(session_class, method, spy)
    try:
        yield calls
    finally:
        setattr(session_class, method, original)
