"""The errors a prompt bank (core/bank.py) and a runtime's overlay on it (core/overlay.py) give, worded once."""

from __future__ import annotations

LISTED_IN_ERRORS = 10  # an unknown-task error lists the served tasks up to this many, else counts them


class UnknownTaskError(LookupError):
    """A request named a task the bank does not hold."""

    def __str__(self) -> str:  # LookupError would print the repr of the message
        return str(self.args[0])


def served(count: int, names) -> str:
    """What a deployment serves, for an error: the names (names(), read only then) while they are few, else their
    count (a bank of per-user prompts would otherwise put every name into every error)."""
    if count <= LISTED_IN_ERRORS:
        return f"this deployment serves: {', '.join(names()) or 'none'}"
    return f"this deployment serves {count:,} tasks (`promptmux tasks DIR list` or GET /v1/models lists them)"


def unknown_task(name: str, count: int, names) -> UnknownTaskError:
    """The error for a task a bank does not hold: its name, and what the bank serves (served())."""
    return UnknownTaskError(f"unknown task {name!r}; {served(count, names)}")


def unknown_cursor(after: str) -> UnknownTaskError:
    return UnknownTaskError(f"unknown task {after!r} as the page cursor `after`; pass the last name of the previous "
                            "page, or no cursor for the first page")


def already_in_bank(names: list[str]) -> ValueError:
    return ValueError(f"task(s) {', '.join(names)} already in the bank; remove them first or pass replace=True")
