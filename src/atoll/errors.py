"""The project's error type for a user's mistake.

`AtollError` is raised anywhere a user's input (a config, a file, a flag) is wrong. Its message
names what is wrong and how to fix it, on one line. Only the command layer (`atoll.console.guarded`,
around every verb) turns it into an exit code (2) and prints it; library code never exits.
"""

from __future__ import annotations


class AtollError(ValueError):
    """A user-facing error: the message says what is wrong and how to fix it."""
