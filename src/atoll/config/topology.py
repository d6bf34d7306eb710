"""The topology file: sites, their devices, their WAN links, where the Lighthouse runs.

    name: two-sites
    sites:
      - name: beijing
        devices: [{kind: a800, count: 80, per_node: 8}]
      - name: shanghai
        devices: [{kind: a800, count: 80, per_node: 8}]
        ranks: 4                    # optional: the processes this site runs (default: the launcher's)
        parallel: {shard: fsdp}     # optional: parallel.* settings of this site's ranks only
    links:
      - {site: beijing, uplink_mbps: 1000, latency_ms: 15}
      - {site: shanghai, uplink_mbps: 1000, latency_ms: 15}
    lighthouse: {site: beijing}

Each site reaches the others through its own uplink (a star through the WAN): traffic from site
A to site B is limited by min(A's uplink, B's downlink) and delayed by both latencies. Device
kinds name entries of the hardware catalog (`atoll.hardware`), which users can extend. Sites
may run different numbers of ranks and different layouts inside (`ranks`, `parallel`): the
cross-site exchange then re-splits parameters to whole tensors (`Topology.lane_plan`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from atoll.config.load import read_yaml, validate
from atoll.config.schema import ParallelSection, Section, SyncSection
from atoll.errors import AtollError

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


class DeviceGroup(Section):
    kind: str = Field(description="Hardware catalog key, e.g. a100-80g, a800, h20, ascend-910b, cpu.")
    count: int = Field(gt=0, description="Number of devices of this kind in the site.")
    per_node: int = Field(8, gt=0, description="Devices per node (sets the intra-node / inter-node split).")
    slowdown: float = Field(
        1.0, ge=1.0, description="Lab only: emulate a chip this many times slower (compute, then sleep)."
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from atoll.hardware import get_device  # the catalog may be extended by the user

        get_device(kind)
        return kind


class SiteSpec(Section):
    name: str = Field(description="Short identifier: lowercase letters, digits and dashes.")
    devices: list[DeviceGroup] = Field(min_length=1)
    ranks: int | None = Field(
        None, gt=0, description="Processes this site runs (default: the launcher's --ranks-per-site, or --nproc)."
    )
    parallel: dict[str, Any] = Field(
        default_factory=dict,
        description="parallel.* settings for this site's ranks only, e.g. {shard: fsdp}; the config's elsewhere.",
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                f"site name {name!r} must be lowercase letters, digits and dashes (at most 31, starting with a letter)"
            )
        return name

    @model_validator(mode="after")
    def _known_parallel(self) -> SiteSpec:
        known = sorted(ParallelSection.model_fields)
        for key in self.parallel:
            if key not in known:
                raise ValueError(
                    f"site {self.name}: parallel.{key} is not a parallel setting; use one of {', '.join(known)}"
                )
        try:
            ParallelSection.model_validate(self.parallel)
        except ValueError as exc:
            first = str(exc).splitlines()[1:3]
            raise ValueError(f"site {self.name}: parallel {self.parallel} is not valid ({' '.join(first)})") from None
        return self

    def parallel_overrides(self) -> list[str]:
        """This site's `parallel` as command-line overrides (``--parallel.KEY=VALUE``, JSON values)."""
        return [f"--parallel.{k}={json.dumps(v)}" for k, v in sorted(self.parallel.items())]

    @property
    def num_devices(self) -> int:
        return sum(d.count for d in self.devices)

    def rank_devices(self, world_size: int) -> list[DeviceGroup]:
        """The device group each of the site's `world_size` ranks stands for: the groups' devices
        in order (rank r takes device r), repeated when there are more ranks than devices."""
        flat = [group for group in self.devices for _ in range(group.count)]
        return [flat[r % len(flat)] for r in range(world_size)]

    @property
    def backend(self) -> str:
        """The collective library the site's devices share (from the catalog). Raises `AtollError`
        when they do not share one: brands that cannot must be separate sites."""
        from atoll.hardware import get_device

        backends = sorted({get_device(d.kind).backend for d in self.devices})
        if len(backends) > 1:
            raise AtollError(
                f"site {self.name} mixes devices of different collective backends ({', '.join(backends)}); "
                "they cannot share one process group: split it into one site per backend in the topology"
            )
        return backends[0]

    def signature(self) -> list[tuple[str, int, float]]:
        """What the site computes with, to compare sites: (kind, count, slowdown) per group, sorted."""
        return sorted((d.kind, d.count, d.slowdown) for d in self.devices)


class LinkSpec(Section):
    site: str = Field(description="The site this uplink belongs to.")
    uplink_mbps: float = Field(gt=0, description="Bandwidth from the site to the WAN, Mbit/s.")
    downlink_mbps: float | None = Field(
        None, gt=0, description="Bandwidth from the WAN to the site (default: the uplink's)."
    )
    latency_ms: float = Field(0.0, ge=0, description="One-way latency from the site to the WAN core, ms.")

    @property
    def down_mbps(self) -> float:
        return self.downlink_mbps if self.downlink_mbps is not None else self.uplink_mbps


class LighthouseSpec(Section):
    site: str | None = Field(None, description="Run the Lighthouse inside this site (local and lab runs).")
    address: str | None = Field(
        None, description="host:port of a Lighthouse that is already running (real deployments)."
    )

    @model_validator(mode="after")
    def _one_of(self) -> LighthouseSpec:
        if self.address is not None and ":" not in self.address:
            raise ValueError(f"lighthouse.address {self.address!r} must be host:port")
        return self


class Topology(Section):
    name: str
    description: str = ""
    sites: list[SiteSpec] = Field(min_length=1)
    links: list[LinkSpec] = Field(default_factory=list)
    lighthouse: LighthouseSpec = Field(default_factory=LighthouseSpec)

    @model_validator(mode="after")
    def _consistent(self) -> Topology:
        names = [s.name for s in self.sites]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"site names must be unique; repeated: {', '.join(dup)}")
        linked = [link.site for link in self.links]
        for site in linked:
            if site not in names:
                raise ValueError(f"links: site {site!r} is not one of the sites ({', '.join(names)})")
        twice = sorted({n for n in linked if linked.count(n) > 1})
        if twice:
            raise ValueError(f"links: each site has one uplink entry; repeated: {', '.join(twice)}")
        if len(self.sites) > 1:
            missing = [n for n in names if n not in linked]
            if missing:
                raise ValueError(
                    f"links: sites without an uplink: {', '.join(missing)} (add `- {{site: {missing[0]}, "
                    "uplink_mbps: ...}`)"
                )
        if self.lighthouse.site is not None and self.lighthouse.site not in names:
            raise ValueError(f"lighthouse.site {self.lighthouse.site!r} is not one of the sites ({', '.join(names)})")
        return self

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def sites_differ(self) -> bool:
        """Whether some sites compute with other devices (kinds, counts or emulated slowdowns)."""
        return len({str(s.signature()) for s in self.sites}) > 1

    def lane_plan(self, *, default_ranks: int) -> tuple[str, int]:
        """How the sites cut the cross-site exchange (`atoll.sync.lanes`), the same answer on every
        site: ("shard", R) when every site runs R ranks with the same `parallel` settings (each rank
        exchanges the blocks it holds), else ("canonical", fewest ranks of any site) (whole
        parameters, re-split inside each site). `default_ranks`: a site's ranks when it gives none."""
        ranks = [s.ranks or default_ranks for s in self.sites]
        layouts = {json.dumps(s.parallel, sort_keys=True) for s in self.sites}
        if len(set(ranks)) == 1 and len(layouts) == 1:
            return "shard", ranks[0]
        return "canonical", min(ranks)

    def link(self, site: str) -> LinkSpec | None:
        for link in self.links:
            if link.site == site:
                return link
        return None

    def path_mbps(self, src: str, dst: str) -> float:
        """Bandwidth from `src` to `dst`: the narrower of src's uplink and dst's downlink."""
        a, b = self.link(src), self.link(dst)
        if a is None or b is None:
            raise KeyError(f"no link for {src if a is None else dst}")
        return min(a.uplink_mbps, b.down_mbps)

    def path_latency_ms(self, src: str, dst: str) -> float:
        a, b = self.link(src), self.link(dst)
        return (a.latency_ms if a else 0.0) + (b.latency_ms if b else 0.0)


def load_topology(path: Path) -> Topology:
    """Read and validate a topology YAML; raises AtollError naming the problem."""
    return validate(Topology, read_yaml(Path(path)), source=f"topology {path}")


def check_sites(topology: Topology, *, sync: SyncSection, parallel: ParallelSection, topology_path: Path | str) -> None:
    """Check a run config against the topology its sites will train on: where the two meet.

    Called by the multi-site verbs (`atoll train --topology`, `atoll lab run`) before they
    launch anything. Raises `AtollError` naming the key and the fix: a site whose devices need
    different collective libraries, or `sync.site_inner_steps` naming a site `topology_path` lacks.
    Sites may shard differently inside (`parallel` per site): the exchange does not depend on it.
    """
    names = [s.name for s in topology.sites]
    if sync.strategy == "ddp" and _inner_steps_differ(topology, parallel):
        raise AtollError(
            f"sync.strategy=ddp needs the same intra-site layout at every site of {topology_path} (the sites' own "
            "`parallel` or `ranks` differ): their inner steps (gradient clipping sums the norm per layout) would "
            "drift apart with no θ to bring them back; use diloco, delayed or streaming"
        )
    for site in topology.sites:
        _ = site.backend  # raises for a site mixing collective backends, as the planner does
    for name in sync.site_inner_steps:
        if name not in names:
            raise AtollError(f"sync.site_inner_steps names {name!r}, which is not a site of {topology_path}")


def _inner_steps_differ(topology: Topology, parallel: ParallelSection) -> bool:
    """Whether some sites' inner steps may round differently: other parallel settings, or FSDP2
    over sites of different sizes (both change the order in which a step's sums are taken)."""
    effective = [{**parallel.model_dump(mode="json"), **s.parallel} for s in topology.sites]
    if len({json.dumps(e, sort_keys=True) for e in effective}) > 1:
        return True
    sizes = {s.ranks for s in topology.sites if s.ranks is not None}
    return effective[0]["shard"] != "ddp" and len(sizes) > 1
