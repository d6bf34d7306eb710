"""``python -m atoll.sync.lighthouse --bind HOST:PORT --min-sites N``: a torchft Lighthouse process.

The multi-site launcher starts one, inside the lighthouse site's network namespace in the lab.
It prints its address on the first line of stdout and serves until it is terminated.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from atoll.sync.transport import start_lighthouse


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m atoll.sync.lighthouse")
    parser.add_argument("--bind", default="[::]:0", help="HOST:PORT to listen on")
    parser.add_argument("--min-sites", type=int, required=True, help="sites needed for a quorum")
    args = parser.parse_args()
    server = start_lighthouse(bind=args.bind, min_sites=args.min_sites)
    print(server.address(), flush=True)  # type: ignore[attr-defined]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()  # type: ignore[attr-defined]
    sys.exit(0)


if __name__ == "__main__":
    main()
