"""``python -m tests.dist.faulty_site ARGS``: atoll.train's worker with one deterministic fault.

Run by the multi-site launcher in place of atoll.train (``atoll train --topology T --worker
tests.dist.faulty_site``). ``ATOLL_TEST_FAULT=SITE:KIND:N`` picks the site and the fault; other
sites run the plain worker:

- ``round:N``: the rank dies (SIGKILL-like ``os._exit``) right after inner step N, mid-round;
- ``exchange:N``: the rank dies inside its N-th exchange, after the envelopes were gathered and
  before its payload goes out, so that its peers are blocked in the payload all-gather;
- ``perturb:N``: after inner step N the site's θ is changed by 1e-3 in one element (a forced
  disagreement), and it trains on;
- ``nan:N``: the site's training loss is NaN at inner steps N, N+1 and N+2 (two micro-batches a
  step), so its guard skips them and then takes the sites' shared θ (a rollback with peers);
- ``pause:N``: after inner step N the rank stops itself (SIGSTOP: its torchft Manager stops
  heartbeating too, as a site cut off between exchanges looks to the Lighthouse) and a helper
  continues it ``ATOLL_TEST_PAUSE_SECONDS`` later.

Every site first waits, once its sync is built (its torchft Manager heartbeating), until every
site got there (``ATOLL_TEST_BARRIER``, a directory, and ``ATOLL_NUM_SITES``): with
`sync.min_sites` 1 the Lighthouse does not wait for a site it has never heard of, and on a busy
machine one site can start seconds after the other has finished a tiny run.

A dying rank runs as a child of this wrapper, which exits 0 afterwards: the launcher stops every
site when one fails, and these tests are about the sites that go on. The child writes
``ATOLL_TEST_MARKER`` just before it dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DIED = 77


def _die() -> None:
    marker = os.environ.get("ATOLL_TEST_MARKER")
    if marker:
        Path(marker).write_text("died\n", encoding="utf-8")
    os._exit(DIED)


def _pause(seconds: float) -> None:
    import signal

    marker = os.environ.get("ATOLL_TEST_MARKER")
    if marker:
        Path(marker).write_text("paused\n", encoding="utf-8")
    subprocess.Popen(["/bin/sh", "-c", f"sleep {seconds}; kill -CONT {os.getpid()}"], start_new_session=True)
    os.kill(os.getpid(), signal.SIGSTOP)


def _start_barrier() -> None:
    import time

    from atoll.sync.engine import CrossSiteSync

    init = CrossSiteSync.__init__

    def patched_init(self: CrossSiteSync, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        folder = Path(os.environ["ATOLL_TEST_BARRIER"])
        (folder / self.site_name).write_text("up\n", encoding="utf-8")
        deadline = time.monotonic() + 300
        while len(list(folder.iterdir())) < int(os.environ["ATOLL_NUM_SITES"]):
            if time.monotonic() > deadline:
                raise TimeoutError("the other sites never started")
            time.sleep(0.05)

    CrossSiteSync.__init__ = patched_init  # type: ignore[method-assign]


def _install(kind: str, n: int) -> None:
    import torch

    from atoll.sync.engine import CrossSiteSync
    from atoll.sync.transport import TorchftTransport

    after_step = CrossSiteSync.after_step

    def patched_after_step(self: CrossSiteSync, step: int, *, tokens: int, seconds: float | None = None) -> None:
        after_step(self, step, tokens=tokens, seconds=seconds)
        if step == n and kind == "round":
            _die()
        if step == n and kind == "pause":
            _pause(float(os.environ["ATOLL_TEST_PAUSE_SECONDS"]))
        if step == n and kind == "perturb":
            with torch.no_grad():
                self.units[0].outer.params[0].view(-1)[0] += 1e-3  # type: ignore[union-attr]

    CrossSiteSync.after_step = patched_after_step  # type: ignore[method-assign]
    if kind == "nan":
        import atoll.train.trainer as trainer

        real_loss = trainer.token_loss_sum
        calls = {"n": 0}

        def nan_loss(model: torch.nn.Module, chunk: torch.Tensor, **kw: object) -> tuple[torch.Tensor, int]:
            value, count = real_loss(model, chunk, **kw)  # type: ignore[arg-type]
            if model.training:
                calls["n"] += 1
                if 2 * (n - 1) < calls["n"] <= 2 * (n + 2):
                    value = value * float("nan")
            return value, count

        trainer.token_loss_sum = nan_loss  # type: ignore[assignment]
    if kind == "exchange":
        exchange, allgather = TorchftTransport.exchange, TorchftTransport._allgather
        seen = {"exchanges": 0, "gathers": 0}

        def patched_exchange(self: TorchftTransport, envelope: torch.Tensor, body: torch.Tensor) -> object:
            seen["exchanges"] += 1
            seen["gathers"] = 0
            return exchange(self, envelope, body)

        def patched_allgather(self: TorchftTransport, buf: torch.Tensor, num: int) -> list[torch.Tensor]:
            seen["gathers"] += 1
            if seen["exchanges"] == n and seen["gathers"] == 2:
                _die()
            return allgather(self, buf, num)

        TorchftTransport.exchange = patched_exchange  # type: ignore[assignment,method-assign]
        TorchftTransport._allgather = patched_allgather  # type: ignore[method-assign]


def main() -> int:
    from atoll.train.commands import worker_main

    site, kind, n = (os.environ.get("ATOLL_TEST_FAULT") or "::0").split(":")
    if os.environ.get("ATOLL_SITE") != site:
        _start_barrier()
        return worker_main()
    if kind in ("perturb", "nan", "pause") or os.environ.get("ATOLL_TEST_CHILD"):
        _start_barrier()
        _install(kind, int(n))
        return worker_main()
    child = subprocess.run(
        [sys.executable, "-m", "tests.dist.faulty_site", *sys.argv[1:]], env=dict(os.environ, ATOLL_TEST_CHILD="1")
    )
    return 0 if child.returncode == DIED else child.returncode


if __name__ == "__main__":
    raise SystemExit(main())
