"""A stand-in for a site's training ranks, for the launcher's tests: ``python -m tests.dist.flaky_site``.

Started by `atoll site --worker tests.dist.flaky_site` like `atoll.train`'s ranks, it does what
FLAKY_PLAN says for its site (ATOLL_SITE) on each attempt: ``west=1,0;east=wait`` makes west exit 1
on its first attempt and 0 on its second, and east wait until west has started for the last time
in the plan (or FLAKY_WAIT_SECONDS), then write east.finished and exit 0. Attempts are counted
with files in FLAKY_DIR.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> int:
    site = os.environ["ATOLL_SITE"]
    state = Path(os.environ["FLAKY_DIR"])
    plan = dict(item.split("=") for item in os.environ["FLAKY_PLAN"].split(";"))
    attempt = len(list(state.glob(f"{site}.attempt*")))
    (state / f"{site}.attempt{attempt}").write_text(str(os.getpid()))
    if plan[site] == "wait":
        others = {s: len(p.split(",")) for s, p in plan.items() if p != "wait"}
        deadline = time.monotonic() + float(os.environ.get("FLAKY_WAIT_SECONDS", "60"))
        while time.monotonic() < deadline:
            if all((state / f"{s}.attempt{n - 1}").exists() for s, n in others.items()):
                break
            time.sleep(0.05)
        time.sleep(1.0)  # outlive the others' last attempt
        (state / f"{site}.finished").write_text("")
        return 0
    return int(plan[site].split(",")[attempt])


if __name__ == "__main__":
    sys.exit(main())
