"""Play a searched plan in the simulators: a few rounds in detail, and the whole run many times."""

from __future__ import annotations

from dataclasses import dataclass

from atoll.planner.candidates import Candidate
from atoll.planner.montecarlo import HorizonResult, time_to_train
from atoll.planner.search import HEAL_STATE_FACTOR
from atoll.planner.shape import ModelShape
from atoll.planner.simulate import Disturbances, SimResult, SimSite, SimSync, simulate
from atoll.planner.wan import codec_bytes
from atoll.sync.link_model import allgather_bytes, allgather_latency


@dataclass(frozen=True)
class Playback:
    sites: list[SimSite]
    window: SimResult
    """A few rounds, event by event (for the timeline)."""
    horizon: HorizonResult
    """The whole run, `trials` times."""


def sim_inputs(c: Candidate, shape: ModelShape, *, grad_bytes: int = 2) -> tuple[list[SimSite], SimSync, float]:
    """The simulators' view of candidate `c`: sites, sync and the heal download (bytes).

    The simulators step every site H times per round; a site that runs H_i steps of its own is
    played as H nominal steps of H_i / H of its step each (its round's time and tokens exactly)."""
    sites = [
        SimSite(
            name=sp.name,
            step_s=sp.estimate.seconds * c.steps_per_nominal(i),
            tokens_per_step=round(sp.estimate.tokens * c.steps_per_nominal(i)),
            devices=sp.estimate.devices_total,
            link=sp.link,
            failure_rate_per_s=sum(g.count / (g.device.mtbf_hours * 3600.0) for g in sp.estimate.groups),
        )
        for i, sp in enumerate(c.sites)
    ]
    s = c.sync
    if len(sites) > 1:
        payload = shape.num_params() * grad_bytes if s.strategy == "ddp" else codec_bytes(s.codec, shape)
        volume = allgather_bytes(payload, len(sites))
        latency = allgather_latency([sp.link for sp in c.sites if sp.link is not None])
    else:
        volume, latency = 0.0, 0.0
    sync = SimSync(
        strategy=s.strategy,
        inner_steps=s.inner_steps,
        payload_bytes=volume,
        latency_s=latency,
        fragments=s.fragments,
        overlap_steps=s.overlap_steps,
    )
    heal = HEAL_STATE_FACTOR * 4.0 * shape.num_params()
    return sites, sync, heal


def play(
    c: Candidate,
    shape: ModelShape,
    *,
    disturbances: Disturbances,
    rounds: int = 3,
    trials: int = 20,
    checkpoint_interval_s: float = 3600.0,
) -> Playback:
    """Simulate `rounds` rounds of `c` event by event, and the whole run `trials` times."""
    sites, sync, heal = sim_inputs(c, shape)
    steps = max(1, rounds * (sync.inner_steps if sync.strategy != "ddp" else 1))
    if len(sites) == 1 or sync.strategy == "ddp":
        steps = max(steps, 3)
    ckpt_steps = max(1, round(checkpoint_interval_s / max(c.wall_step_s, 1e-9)))
    import dataclasses

    dist = dataclasses.replace(disturbances, heal_bytes=heal, checkpoint_steps=ckpt_steps)
    window = simulate(sites, sync, num_steps=steps, disturbances=dist)
    heal_s = {sp.name: heal / sp.link.down_bytes_per_s for sp in c.sites if sp.link is not None}
    horizon = time_to_train(
        sites,
        strategy=c.sync.strategy,
        inner_steps=c.sync.inner_steps,
        sync_s=c.sync_s,
        total_steps=c.steps,
        sync_latency_s=c.sync_latency_s,
        fragments=c.sync.fragments,
        overlap_steps=c.sync.overlap_steps,
        disturbances=dist,
        heal_s=heal_s,
        checkpoint_interval_s=checkpoint_interval_s,
        trials=trials,
    )
    return Playback(sites=sites, window=window, horizon=horizon)
