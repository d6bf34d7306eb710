"""The project's error type for a user's mistake.

`AtollError` is raised anywhere a user's input (a config, a file, a flag) is wrong. Its message
names what is wrong and how to fix it, on one line. Only the command layer (`atoll.console.guarded`,
around every verb) turns it into an exit code (2; 3 for a `RunFailure`) and prints it; library
code never exits.
"""

from __future__ import annotations


class AtollError(ValueError):
    """A user-facing error: the message says what is wrong and how to fix it."""

    exit_code = 2  # a mistake in the input: a launcher stops the whole run rather than retry it


class RunFailure(AtollError):
    """The run could not do its job though its input was fine (training diverged, sites that do
    not agree at the end): exit code 3, which a launcher treats like a crashed site, not like a
    mistake in the shared config."""

    exit_code = 3
