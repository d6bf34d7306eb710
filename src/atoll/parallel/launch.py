"""Start N local ranks of a site as child processes, the way torchrun would.

Used by `atoll train --nproc N`. Each child runs ``python -m atoll.train ARGS`` with RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. The launcher waits for
all of them; when one fails it stops the others and returns that child's exit code, so a user's
mistake found inside a rank (exit 2) stays exit 2.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def launch_local(
    module_args: list[str], *, nproc: int, module: str = "atoll.train", env: dict[str, str] | None = None
) -> int:
    """Run `nproc` ranks of ``python -m module module_args`` on this machine; blocks; returns an exit code."""
    base = dict(os.environ if env is None else env)
    base.setdefault("MASTER_ADDR", "127.0.0.1")
    base["MASTER_PORT"] = str(free_port(base["MASTER_ADDR"]))
    base["WORLD_SIZE"] = base["LOCAL_WORLD_SIZE"] = str(nproc)
    base["ATOLL_LAUNCHED"] = "1"  # the launcher, not rank 0, reports the outcome
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, *module_args], env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        )
        for rank in range(nproc)
    ]
    return wait_all(procs)


def wait_all(procs: list[subprocess.Popen[bytes]], *, tick: Callable[[], None] | None = None) -> int:
    """Wait for every process; on the first failure stop the rest. Returns 0 or the failed exit code.

    `tick` is called a few times a second while waiting (e.g. to redraw a progress display).
    """
    try:
        return _wait_all(procs, tick)
    except KeyboardInterrupt:
        stop_processes(procs)
        raise


def _wait_all(procs: list[subprocess.Popen[bytes]], tick: Callable[[], None] | None) -> int:
    while True:
        if tick is not None:
            tick()
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            stop_processes(procs)
            return int(failed[0])
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.25)


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
