"""Start N local ranks of a site as child processes, the way torchrun would, and the process
helpers every atoll launcher shares.

Used by `atoll train --nproc N` and by `atoll site` (one data center's entry point). Each child
runs ``python -m MODULE ARGS`` with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR
and MASTER_PORT set, and dies with its launcher (a launcher killed with SIGKILL leaves no rank
behind holding the site's store). The launcher waits for all of them; when one fails it stops the
others and returns that child's exit status, so a user's mistake found inside a rank (exit 2)
stays exit 2, and a rank killed by signal N is reported as a shell would, 128 + N.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N for a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    """A child's return code in words: ``exited with status 1`` or ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def die_with_parent() -> None:
    """In a forked child (``Popen(preexec_fn=...)``): ask Linux to SIGKILL it when its parent dies.

    Without it, ranks outlive a launcher killed with SIGKILL and keep the site's store and ports.
    A no-op where prctl is unavailable (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def start_ranks(
    module_args: list[str], *, nproc: int, module: str, env: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    """Start `nproc` ranks of ``python -m module module_args``; returns at once.

    `env` must name MASTER_ADDR and MASTER_PORT; each rank gets RANK and LOCAL_RANK on top, and
    WORLD_SIZE / LOCAL_WORLD_SIZE = `nproc`.
    """
    base = dict(env, WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    return [
        subprocess.Popen(
            [sys.executable, "-m", module, *module_args],
            env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
            preexec_fn=die_with_parent,  # only a prctl call between fork and exec
        )
        for rank in range(nproc)
    ]


def launch_local(
    module_args: list[str], *, nproc: int, module: str = "atoll.train", env: dict[str, str] | None = None
) -> int:
    """Run `nproc` ranks of ``python -m module module_args`` on this machine; blocks; returns an exit status."""
    base = dict(os.environ if env is None else env)
    base.setdefault("MASTER_ADDR", "127.0.0.1")
    base["MASTER_PORT"] = str(free_port(base["MASTER_ADDR"]))
    base["ATOLL_LAUNCHED"] = "1"  # the launcher, not rank 0, reports the outcome
    return wait_all(start_ranks(module_args, nproc=nproc, module=module, env=base))


@dataclass(frozen=True)
class RankFailure:
    """The first rank of a group that failed: its index and its raw return code."""

    rank: int
    returncode: int

    def __str__(self) -> str:
        return f"rank {self.rank} {describe_exit(self.returncode)}"


def wait_all(procs: list[subprocess.Popen[bytes]], *, tick: Callable[[], None] | None = None) -> int:
    """Wait for every process; on the first failure stop the rest. Returns 0 or the failed exit status.

    `tick` is called a few times a second while waiting (e.g. to redraw a progress display).
    """
    failure = wait_ranks(procs, tick=tick)
    return 0 if failure is None else exit_status(failure.returncode)


def wait_ranks(procs: list[subprocess.Popen[bytes]], *, tick: Callable[[], None] | None = None) -> RankFailure | None:
    """Wait for every process; on the first failure stop the rest and return which one it was.

    None when all exited 0. Ctrl-C (or any exception, e.g. a SIGTERM handler's SystemExit) stops
    them all and propagates.
    """
    try:
        while True:
            if tick is not None:
                tick()
            codes = [p.poll() for p in procs]
            for rank, code in enumerate(codes):
                if code not in (None, 0):
                    stop_processes(procs)
                    return RankFailure(rank, int(code))
            if all(c == 0 for c in codes):
                return None
            time.sleep(0.25)
    except BaseException:
        stop_processes(procs)
        raise


def stop_processes(procs: list[subprocess.Popen[bytes]], *, grace_seconds: float = 10.0) -> None:
    """SIGTERM every process still running, wait up to `grace_seconds` in all, then SIGKILL the rest.

    Blocks until every process has exited; processes that already ended are left alone.
    """
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
