"""A run's join secret, and the authentication tags its sites put on what they exchange.

A multi-site run has one secret, shared out of band (a file each data center keeps, or an
environment variable), never in a config that is committed. From it every site derives the same
keys; an exchanged payload carries an HMAC-SHA256 tag over its header and bytes, so a site that
does not hold the secret cannot get an update applied, and an update altered in transit is
rejected like a poisoned one. This protects membership and integrity, not confidentiality: the
bytes themselves cross the WAN in the clear (run the WAN tier inside a VPN or IPsec for that).

Where the secret comes from, first found wins:

- ``ATOLL_RUN_SECRET``: the secret itself;
- ``ATOLL_RUN_SECRET_FILE``: a file holding it (surrounding whitespace ignored).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from atoll.errors import AtollError

SECRET_ENV = "ATOLL_RUN_SECRET"
SECRET_FILE_ENV = "ATOLL_RUN_SECRET_FILE"
TAG_BYTES = 32  # HMAC-SHA256
MIN_SECRET_BYTES = 16


def new_secret() -> str:
    """A fresh random secret (256 bits, URL-safe text): what `atoll lighthouse` makes by default."""
    return secrets.token_urlsafe(32)


def read_secret_file(path: Path) -> bytes:
    """The secret held in `path`. Raises AtollError naming the file when it is unusable."""
    try:
        text = path.read_bytes().strip()
    except OSError as exc:
        raise AtollError(
            f"cannot read the run's secret file {path} ({exc.strerror or exc}): "
            "copy the file the lighthouse wrote to this machine, or set " + SECRET_ENV
        ) from None
    return _checked(text, f"the secret file {path}")


def load_secret(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The run's secret from the environment, or None when neither variable is set."""
    environ = os.environ if environ is None else environ
    if environ.get(SECRET_ENV):
        return _checked(environ[SECRET_ENV].strip().encode(), SECRET_ENV)
    if environ.get(SECRET_FILE_ENV):
        return read_secret_file(Path(environ[SECRET_FILE_ENV]))
    return None


def _checked(secret: bytes, where: str) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise AtollError(
            f"{where} holds a secret of {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
            "(`atoll lighthouse` writes a 256-bit one)"
        )
    return secret


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key for one purpose (e.g. "update-tag", "join"), so that one key never serves two."""
    return hmac.new(secret, b"atoll/v1/" + purpose.encode(), hashlib.sha256).digest()


def tag(key: bytes, *parts: bytes | memoryview) -> bytes:
    """HMAC-SHA256 of the concatenated parts."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def verify(key: bytes, expected: bytes, *parts: bytes | memoryview) -> bool:
    """Whether `expected` is the tag of the parts (compared in constant time)."""
    return hmac.compare_digest(tag(key, *parts), expected)
