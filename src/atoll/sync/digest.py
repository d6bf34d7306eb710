"""Exact fingerprints of parameters, to prove that sites hold the same θ.

`theta_digest` is SHA-256 over the tensors' float32 bytes, in the order given: two sites agree
only if every bit agrees (a float sum, `engine.checksum`, can hide differences that cancel). The
sync engine compares digests after every applied round and at the end of a run; the final
record of each site's metrics carries its digest (`theta_digest`, hex), and `check_site_digests`
reads them back (`atoll.rundir.load.check_site_digests`) before a multi-site run is exported
or served.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from atoll.rundir.layout import FINAL_DIGEST_KEY

__all__ = ["FINAL_DIGEST_KEY", "theta_digest"]


def theta_digest(tensors: Iterable[torch.Tensor]) -> bytes:
    """SHA-256 of the tensors' float32 values (native byte order), one after the other."""
    h = hashlib.sha256()
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().to(torch.float32).contiguous().reshape(-1).cpu()
            h.update(memoryview(flat.numpy()).cast("B"))
    return h.digest()
