"""How a rank of a site joins its run's cross-site sync: the transport to the other sites and the engine.

Pre-training and fine-tuning both build their sync here (through `atoll.train.loop.build_sync`).
"""

from __future__ import annotations

import os

from torch import nn

from atoll.config.schema import SyncSection
from atoll.errors import AtollError
from atoll.sync.auth import SECRET_ENV, SECRET_FILE_ENV, load_secret
from atoll.sync.engine import CrossSiteSync
from atoll.sync.lanes import LanePlan
from atoll.sync.pacing import Pacer
from atoll.sync.site_env import SiteEnv


def sync_for_site(
    model: nn.Module,
    cfg: SyncSection,
    site_env: SiteEnv,
    *,
    local_rank: int,
    local_world_size: int,
    pacer: Pacer | None = None,
) -> CrossSiteSync:
    """The cross-site sync of one rank of a site that a multi-site launcher started.

    `site_env` names the topology, the Lighthouse, this site's address in the lab and how the
    WAN is modelled; MASTER_ADDR/MASTER_PORT name the site's own store (torchft's replica-group
    store). `model` holds the parameters to synchronize (the trainable ones, under their base
    names); `pacer` ends its rounds (default: the site's fixed H). Pre-training and fine-tuning
    both build their sync here. The lanes come from the topology (`Topology.lane_plan`): a rank
    past them joins no cross-site group and only lends its blocks to the lanes.
    """
    from atoll.config.topology import load_topology
    from atoll.sync.transport import ByteCounter, TorchftTransport, WanModel, chunk_bytes_for

    secret = load_secret()
    if secret is None:
        raise AtollError(
            f"a multi-site run needs a join secret: set {SECRET_ENV} (at least 16 bytes, e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) or "
            f"{SECRET_FILE_ENV} (a file holding it) to the same value on every site"
        )
    topology = load_topology(site_env.topology)
    declared = topology.site(site_env.site).ranks
    if declared is not None and declared != local_world_size:
        raise AtollError(
            f"site {site_env.site} runs {local_world_size} rank(s) but its topology entry says ranks: {declared}; "
            f"start it with {declared} (--nproc) or change the topology"
        )
    mode, num_lanes = topology.lane_plan(default_ranks=site_env.default_ranks or local_world_size)
    site = site_env.site_info(local_rank=local_rank, local_world_size=num_lanes)
    if local_rank >= num_lanes:
        transport: TorchftTransport | IdleTransport = IdleTransport(ByteCounter())
    else:
        transport = TorchftTransport(
            site,
            lighthouse_addr=site_env.lighthouse,
            store_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            store_port=int(os.environ["MASTER_PORT"]),
            hostname=site_env.address,
            wan=WanModel(topology, mode=site_env.wan_mode),
            timeout_seconds=cfg.timeout_seconds,
            min_sites=cfg.min_sites or site.num_sites,
            chunk_bytes=cfg.chunk_kib * 1024 if cfg.chunk_kib else chunk_bytes_for(topology),
        )
    sync = CrossSiteSync(
        model,
        cfg.model_copy(update={"min_sites": cfg.min_sites or site.num_sites}),  # refused sites do not count
        transport=transport,
        site_name=site.name,
        local_rank=local_rank,
        local_world_size=local_world_size,
        inner_steps=cfg.inner_steps_for(site.name),
        secret=secret,
        address=site_env.address,
        pacer=pacer,
        lanes=LanePlan(mode, num_lanes),  # type: ignore[arg-type]
    )
    # Only refusals of the topology's own sites tell a site its secret may be wrong.
    sync.membership.secret.members = frozenset(s.name for s in topology.sites)
    return sync


class IdleTransport:
    """The transport of a rank past the site's lanes: it never exchanges across sites."""

    def __init__(self, counter: object) -> None:
        self.counter = counter

    def exchange(self, envelope: object, body: object) -> None:
        raise AssertionError("a rank past the lanes exchanges nothing across sites")

    def transfer(self, tensor: object, **kwargs: object) -> None:
        raise AssertionError("a rank past the lanes exchanges nothing across sites")

    def close(self) -> None:
        pass
