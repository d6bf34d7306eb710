"""``python -m atoll.finetune FINETUNE.yaml [--section.key=value ...] [--resume]``: one rank of a stage.

What `atoll finetune --nproc N`, the multi-site launcher or torchrun start, e.g.
``torchrun --nproc-per-node 2 -m atoll.finetune examples/finetune/networking.yaml``.
"""

from atoll.finetune.commands import worker_main

if __name__ == "__main__":
    raise SystemExit(worker_main())
