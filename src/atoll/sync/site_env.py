"""The environment that makes a rank part of a multi-site run: which site, how to reach the others.

A launcher (`atoll.sync.launch`, on loopback or in the lab's namespaces) writes it into each
rank's environment beside what torchrun sets for the site's own process group; the rank's
set-up reads it back with `SiteEnv.from_environ`. This is the one module that names the
variables, so that writer and readers cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from atoll.errors import AtollError

if TYPE_CHECKING:  # the transport imports torch; `atoll site` and the launchers need none of it
    from atoll.sync.transport import SiteInfo

SITE = "ATOLL_SITE"
SITE_INDEX = "ATOLL_SITE_INDEX"
NUM_SITES = "ATOLL_NUM_SITES"
SITE_ADDR = "ATOLL_SITE_ADDR"
TOPOLOGY = "ATOLL_TOPOLOGY"
WAN_MODE = "ATOLL_WAN_MODE"
LIGHTHOUSE = "TORCHFT_LIGHTHOUSE"  # torchft's own name: its Manager reads it too
DEFAULT_RANKS = "ATOLL_DEFAULT_RANKS"  # ranks of a topology's site that gives no `ranks` (the launcher's)


@dataclass(frozen=True)
class SiteEnv:
    """Where a rank's site sits in the run: written by the launcher, read by the rank."""

    site: str
    index: int
    num_sites: int
    topology: Path
    lighthouse: str
    address: str = "127.0.0.1"  # this site's address as the other sites reach it
    wan_mode: str = "emulated"  # how the WAN is modelled (see atoll.sync.transport.WAN_MODES)
    default_ranks: int | None = None  # ranks of the sites whose topology entry gives no `ranks`

    def to_environ(self) -> dict[str, str]:
        """The variables a launcher adds to a rank's environment."""
        extra = {DEFAULT_RANKS: str(self.default_ranks)} if self.default_ranks is not None else {}
        return {
            **extra,
            SITE: self.site,
            SITE_INDEX: str(self.index),
            NUM_SITES: str(self.num_sites),
            SITE_ADDR: self.address,
            TOPOLOGY: str(self.topology),
            WAN_MODE: self.wan_mode,
            LIGHTHOUSE: self.lighthouse,
        }

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SiteEnv | None:
        """This rank's site, or None when no multi-site launcher started it.

        Raises AtollError when the environment names a site but leaves out what a site needs
        (a rank started by hand with a partial environment).
        """
        environ = os.environ if environ is None else environ
        if SITE not in environ:
            return None
        missing = [k for k in (SITE_INDEX, NUM_SITES, TOPOLOGY, LIGHTHOUSE) if k not in environ]
        if missing:
            raise AtollError(
                f"{SITE} is set but {', '.join(missing)} is not: "
                "start sites with `atoll site` or `atoll train --topology`"
            )
        return cls(
            site=environ[SITE],
            index=int(environ[SITE_INDEX]),
            num_sites=int(environ[NUM_SITES]),
            topology=Path(environ[TOPOLOGY]),
            lighthouse=environ[LIGHTHOUSE],
            address=environ.get(SITE_ADDR, "127.0.0.1"),
            wan_mode=environ.get(WAN_MODE, "emulated"),
            default_ranks=int(environ[DEFAULT_RANKS]) if environ.get(DEFAULT_RANKS) else None,
        )

    def site_info(self, *, local_rank: int, local_world_size: int) -> SiteInfo:
        """This rank's place in the network, as the transport and the sync engine need it."""
        from atoll.sync.transport import SiteInfo

        return SiteInfo(
            name=self.site,
            index=self.index,
            num_sites=self.num_sites,
            local_rank=local_rank,
            local_world_size=local_world_size,
        )
