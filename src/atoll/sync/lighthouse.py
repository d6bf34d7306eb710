"""A run's membership service: torchft's Lighthouse, as `atoll lighthouse` serves it.

The Lighthouse (torchft's Rust `LighthouseServer`) forms the quorums of a multi-site run: every
site's rank 0 reports to it, and it tells the sites who takes part in each exchange. It carries
no model data. It cannot check the run's secret: the sites authenticate each other's payloads
(`atoll.sync.auth`), so a stranger that reaches the Lighthouse can at worst disturb quorums, never
get an update applied. This module holds what the verb and the launchers share: the address
forms, the line the verb prints when it is ready (the launchers read it), and the secret file.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from atoll.errors import AtollError
from atoll.sync.auth import new_secret, read_secret_file

DEFAULT_PORT = 29410
READY_PREFIX = "atoll lighthouse serving at "  # first line of `atoll lighthouse`'s stdout, then the URL
_WILDCARDS = ("", "0.0.0.0", "::", "[::]", "*")


def split_host_port(address: str, *, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``http://HOST:PORT``, ``[V6]:PORT``) as (host, port); AtollError if malformed."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise AtollError(f"{what} {address!r} must be HOST:PORT (e.g. 10.0.0.5:{DEFAULT_PORT})")
    return host.strip("[]"), int(port)


def lighthouse_url(address: str) -> str:
    """The URL torchft's Manager dials for a Lighthouse at ``HOST:PORT`` (a URL is kept as it is)."""
    if "://" in address:
        return address
    host, port = split_host_port(address, what="the lighthouse address")
    return f"http://{_url_host(host)}:{port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def advertised_url(server_address: str, *, bind: str, advertise: str | None) -> str:
    """The URL sites must use: the port the server got, on `advertise`, else the bind host, else
    this machine's host name (when bound to every interface)."""
    _, port = split_host_port(server_address, what="the Lighthouse's own address")
    host, _ = split_host_port(bind, what="--bind")
    if advertise:
        host = advertise
    elif host in _WILDCARDS:
        host = socket.gethostname()
    return f"http://{_url_host(host)}:{port}"


def ready_line(url: str, *, min_sites: int) -> str:
    """What `atoll lighthouse` prints first on stdout once it listens (the launchers parse it)."""
    return f"{READY_PREFIX}{url} (a quorum needs {min_sites} site{'s' if min_sites != 1 else ''})"


def parse_ready_line(line: str) -> str | None:
    """The URL in `ready_line`'s output, or None for any other line."""
    if not line.startswith(READY_PREFIX):
        return None
    return line[len(READY_PREFIX) :].split(" ", 1)[0]


def ensure_secret_file(path: Path) -> bool:
    """Make sure `path` holds a run secret: write a fresh one (mode 0600) when the file does not
    exist, else check the one there. Returns whether it was created; AtollError when unusable."""
    if path.exists():
        read_secret_file(path)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise AtollError(f"cannot create the run's secret file {path} ({exc.strerror or exc})") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(new_secret() + "\n")
    return True
