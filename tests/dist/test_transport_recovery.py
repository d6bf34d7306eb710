"""A torchft process group that failed to configure is configured again at the next exchange.

Two sites' `TorchftTransport`s in threads of this process, with a real torchft Lighthouse, each
site's own TCPStore and gloo on loopback. West's first process-group configure fails (as one did
when the chaos benchmark's cut link came back: a rendezvous that timed out in the store). torchft
0.2.0 keeps the quorum's id anyway and reconfigures only for a new id, which the Lighthouse gives
only for new members or reported commit failures: without `report_failed_commit` every later
exchange of the same two sites failed with "process group not initialized".
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist

from atoll.sync.transport import SiteInfo, TorchftTransport, WanModel, start_lighthouse

pytest.importorskip("torchft")

TIMEOUT_SECONDS = 5.0
ATTEMPTS = 6  # exchanges a site tries before the test gives up on it


def transport(name: str, index: int, lighthouse: str, store: dist.TCPStore) -> TorchftTransport:
    return TorchftTransport(
        SiteInfo(name, index, 2, local_rank=0, local_world_size=1),
        lighthouse_addr=lighthouse,
        store_addr="127.0.0.1",
        store_port=store.port,
        hostname="127.0.0.1",
        wan=WanModel(None, mode="none"),
        timeout_seconds=TIMEOUT_SECONDS,
        min_sites=2,
    )


@pytest.mark.timeout(120)
def test_a_failed_process_group_configure_is_retried_at_the_next_exchange() -> None:
    torch.set_num_threads(1)
    lighthouse = start_lighthouse(bind="127.0.0.1:0", min_sites=2, join_timeout_seconds=10)
    stores = [dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) for _ in range(2)]
    sites = [transport(n, i, lighthouse.address(), stores[i]) for i, n in enumerate(("east", "west"))]
    configure, configured = sites[1]._pg.configure, []
    lock = threading.Lock()

    def failing_once(*args: object, **kwargs: object) -> None:
        with lock:
            configured.append(args[0])
            if len(configured) == 1:
                raise RuntimeError("injected: the rendezvous timed out in the store")
        configure(*args, **kwargs)

    sites[1]._pg.configure = failing_once  # type: ignore[method-assign]

    def run(i: int) -> list[list[tuple[int, bytes]]]:
        """Exchanges until two succeeded (at most ATTEMPTS); what each success gathered."""
        done: list[list[tuple[int, bytes]]] = []
        for k in range(ATTEMPTS):
            envelope = torch.full((8,), 10 * i + k, dtype=torch.uint8)
            got = sites[i].exchange(envelope, torch.full((3,), i, dtype=torch.uint8))
            if got is not None:
                done.append([(int(e[0]) // 10, bytes(b.tolist())) for e, b in got.items])
            if len(done) == 2:
                break
        return done

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            east, west = pool.map(run, range(2))
    finally:
        for site in sites:
            site.close()
        lighthouse.shutdown()
    # The sites fail apart in time (west at once, east after its rendezvous timed out), so their
    # exchanges pair up again only through the Lighthouse; then every one succeeds, on both.
    assert east == west == [[(0, bytes([0] * 3)), (1, bytes([1] * 3))]] * 2, (east, west)
    assert len(configured) >= 2 and len(set(configured)) == len(configured)  # new quorum ids, new prefixes
    assert all(1 <= s.counter.failed <= ATTEMPTS - 2 for s in sites)
