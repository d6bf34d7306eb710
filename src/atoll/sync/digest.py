"""Exact fingerprints of parameters, to prove that sites hold the same θ.

`theta_digest` is SHA-256 over the tensors' float32 bytes, in the order given: two sites agree
only if every bit agrees (a float sum, `engine.checksum`, can hide differences that cancel). The
sync engine compares digests after every applied round and at the end of a run; the final
record of each site's metrics carries its digest (`theta_digest`, hex), and `check_site_digests`
reads them back before a multi-site run is exported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

from atoll.errors import AtollError
from atoll.report.metrics import read_metrics
from atoll.rundir.layout import site_dirs

FINAL_DIGEST_KEY = "theta_digest"


def theta_digest(tensors: Iterable[torch.Tensor]) -> bytes:
    """SHA-256 of the tensors' float32 values (native byte order), one after the other."""
    h = hashlib.sha256()
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().to(torch.float32).contiguous().reshape(-1).cpu()
            h.update(memoryview(flat.numpy()).cast("B"))
    return h.digest()


def check_site_digests(run_dir: Path) -> str:
    """The θ digest (hex) every site of the multi-site run `run_dir` ended with.

    Reads the last `theta_digest` of each `sites/NAME/metrics.jsonl`. Raises `AtollError` naming
    the sites when a site has none (it did not finish) or the sites differ (do not export: the
    run did not end with one model).
    """
    dirs = site_dirs(run_dir)
    if not dirs:
        raise AtollError(f"{run_dir} has no sites/ directory: not a multi-site run")
    finals: dict[str, str | None] = {}
    for d in dirs:
        values = [r[FINAL_DIGEST_KEY] for r in read_metrics(d) if FINAL_DIGEST_KEY in r]
        finals[d.name] = values[-1] if values else None
    missing = sorted(s for s, v in finals.items() if v is None)
    if missing:
        raise AtollError(
            f"site(s) {', '.join(missing)} of {run_dir} recorded no final θ digest: the run did not finish "
            "there; resume it (atoll train ... --resume) before exporting"
        )
    distinct = sorted(set(finals.values()), key=str)
    if len(distinct) > 1:
        groups = "; ".join(f"{v[:12]}…: {', '.join(sorted(s for s in finals if finals[s] == v))}" for v in distinct)  # type: ignore[index]
        raise AtollError(f"the sites of {run_dir} ended with different parameters ({groups}); do not export this run")
    return str(distinct[0])
