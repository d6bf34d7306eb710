"""What every verb of the `atoll` command shares: the error guard, logging set-up, exit codes.

The command layer alone uses this module: `atoll.cli`, each package's `commands` module and the
``python -m atoll.train`` / ``python -m atoll.finetune`` worker entries. Library code raises
`AtollError` and logs through `logging.getLogger(__name__)`; it is here, once per process, that an
error becomes one line on stderr and an exit code, and that log records get a handler.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.logging import RichHandler

from atoll.errors import AtollError

EXIT_OK = 0
EXIT_USER_ERROR = 2  # a user's mistake (`AtollError`), as argparse exits for a bad flag
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

NO_PROGRESS_ENV = "ATOLL_NO_PROGRESS"

_PATH_ADVICE = "check that the path is right and that you can create and write files there (e.g. --run.dir=runs)"

Handler = Callable[[argparse.Namespace, list[str]], int]
"""A verb's implementation: parsed arguments and the unparsed rest (config overrides) -> exit code."""


def setup_logging(*, rank: int = 0, verbose: bool = False) -> None:
    """Send log records to stderr through rich; call once per process, before any work.

    Rank 0 logs at INFO, other ranks only warnings (prefixed with their rank, so that lines from
    several processes on one terminal can be told apart); `verbose` means DEBUG on every rank.
    """
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False, markup=False)
    fmt = "%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("atoll").setLevel(level)
    logging.getLogger("torchft").setLevel(logging.ERROR)  # per-quorum chatter and CUDA-only warnings


def fail(message: str, *, code: int = EXIT_USER_ERROR) -> int:
    """Print `message` as the command's one-line error on stderr; returns `code`."""
    print(f"atoll: error: {message}", file=sys.stderr)
    return code


def guarded(fn: Handler) -> Handler:
    """`fn` with a user's mistake turned into an exit code instead of a traceback.

    `AtollError` becomes one line on stderr and `EXIT_USER_ERROR`, and so does a file-system
    error about a path (a run directory that cannot be created, a full disk); Ctrl-C becomes a note that the
    last complete checkpoint is kept and `EXIT_INTERRUPTED`. Anything else is a bug in atoll and
    propagates with its traceback.
    """

    def run(args: argparse.Namespace, extra: list[str]) -> int:
        try:
            return fn(args, extra)
        except AtollError as exc:
            return fail(str(exc), code=exc.exit_code)
        except OSError as exc:
            if exc.filename is None:  # not about a path the user gave: a bug, with its traceback
                raise
            return fail(f"{exc.filename}: {exc.strerror or exc}: {_PATH_ADVICE}")
        except KeyboardInterrupt:
            print("atoll: interrupted; the last complete checkpoint is kept", file=sys.stderr)
            return EXIT_INTERRUPTED

    return run


def want_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress: not when the verb got ``--no-progress`` or ATOLL_NO_PROGRESS is set."""
    return not getattr(args, "no_progress", False) and os.environ.get(NO_PROGRESS_ENV, "") in ("", "0")


def launched_rank() -> int:
    """This process's rank as a launcher (torchrun, `atoll.parallel.launch`) set it; 0 when started alone."""
    return int(os.environ.get("RANK", "0"))
