"""``python -m atoll.train CONFIG.yaml [--section.key=value ...] [--resume]``: one rank of a site.

This is what `torchrun` starts, e.g. ``torchrun --nproc-per-node 2 -m atoll.train cfg.yaml``.
"""

from atoll.train.commands import worker_main

if __name__ == "__main__":
    raise SystemExit(worker_main())
