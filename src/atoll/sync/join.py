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
    both build their sync here.
    """
    from atoll.config.topology import load_topology
    from atoll.sync.transport import TorchftTransport, WanModel, chunk_bytes_for

    secret = load_secret()
    if secret is None:
        raise AtollError(
            f"a multi-site run needs a join secret: set {SECRET_ENV} (at least 16 bytes, e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) or "
            f"{SECRET_FILE_ENV} (a file holding it) to the same value on every site"
        )
    topology = load_topology(site_env.topology)
    site = site_env.site_info(local_rank=local_rank, local_world_size=local_world_size)
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
    return CrossSiteSync(
        model,
        cfg.model_copy(update={"min_sites": cfg.min_sites or site.num_sites}),  # refused sites do not count
        transport=transport,
        site_name=site.name,
        local_rank=site.local_rank,
        local_world_size=site.local_world_size,
        inner_steps=cfg.inner_steps_for(site.name),
        secret=secret,
        address=site_env.address,
        pacer=pacer,
    )
