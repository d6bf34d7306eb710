"""Integrity of the cross-site sync, with sites simulated in threads (see test_sync_engine.py):
failed exchanges roll back every piece of state, sites that differ heal from the run's θ, and
contributions that do not authenticate are refused.

Expected parameters are computed by hand (torch.optim.SGD on the averages), bit for bit.
"""

from __future__ import annotations

import io
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from atoll.config.schema import SyncSection
from atoll.errors import AtollError
from atoll.sync.codec_specs import CODEC_NAMES
from atoll.sync.digest import theta_digest
from tests.unit.test_sync_engine import (
    DILOCO,
    Hub,
    ReferenceOuter,
    Site,
    assert_equal,
    drift,
    make_sites,
    make_sync,
    params_of,
    run_steps,
    small_model,
    weighted_avg_by_hand,
)

LOSSY = [name for name in CODEC_NAMES if name != "none"]
OPTIONS = {"int8": {"block_size": 4}, "int4": {"block_size": 4}, "topk": {"topk_fraction": 0.2}, "lowrank": {"rank": 1}}


def theta_of(site: Site) -> list[torch.Tensor]:
    return [t.clone() for t in site.sync.units[0].outer.params]  # type: ignore[union-attr]


def round_momentum(ref: ReferenceOuter) -> None:
    """What every site does before a heal: its momentum rounded to bfloat16."""
    for t in ref.theta:
        buf = ref.opt.state[t]["momentum_buffer"]
        buf.copy_(buf.bfloat16().float())


# ---------------------------------------------------------------------------- rollback


@pytest.mark.parametrize("codec", LOSSY)
def test_a_failed_exchange_rolls_back_the_residuals_so_nothing_counts_twice(codec: str) -> None:
    """H=2 with the first exchange failing must equal H=4 (one exchange at step 4), bit for bit:
    the failed Δ is carried once by the restored anchor, and the codec's residual is the one it
    had before the failed encode."""
    cfg = SyncSection(strategy="diloco", inner_steps=2, codec=codec, **OPTIONS.get(codec, {}))
    failed = make_sites(cfg, Hub(2, fail={0}), inner_steps=2)
    run_steps(failed, range(1, 5), tokens=lambda s, step: 1 + s)
    once = make_sites(cfg.model_copy(update={"inner_steps": 4}), Hub(2), inner_steps=4)
    run_steps(once, range(1, 5), tokens=lambda s, step: 1 + s)

    for a, b in zip(failed, once, strict=True):
        assert a.transport.weights == [2.0 * (1 + a.index), 4.0 * (1 + a.index)]
        assert a.sync.applied_log == [(4, 4)] and b.sync.applied_log == [(4, 4)]
        assert_equal(a.after[4], b.after[4], f"{codec}: site {a.index} after step 4")
        residuals = [(a.sync.codec.residual(n), b.sync.codec.residual(n)) for n in a.sync.params]  # type: ignore[union-attr]
        assert all(torch.equal(x, y) for x, y in residuals), f"{codec}: residuals differ"
        # The codec is lossy here: a residual carried twice would have shown.
        assert any(float(x.abs().max()) > 0 for x, _ in residuals), codec


def test_without_error_feedback_a_failed_exchange_still_carries_the_update_once() -> None:
    cfg = SyncSection(strategy="diloco", inner_steps=2, codec="int8", block_size=4, error_feedback=False)
    failed = make_sites(cfg, Hub(2, fail={0}), inner_steps=2)
    run_steps(failed, range(1, 5), tokens=lambda s, step: 1)
    once = make_sites(cfg.model_copy(update={"inner_steps": 4}), Hub(2), inner_steps=4)
    run_steps(once, range(1, 5), tokens=lambda s, step: 1)
    for a, b in zip(failed, once, strict=True):
        assert_equal(a.after[4], b.after[4], f"site {a.index} after step 4")


# ---------------------------------------------------------------------------- agreement and healing


def test_a_forced_disagreement_heals_from_the_majority() -> None:
    hub = Hub(3)
    sites = make_sites(DILOCO, hub, inner_steps=2)

    def corrupt(site: Site, step: int) -> None:
        if site.index == 2 and step == 2:  # a bit of site 2's θ flips after the first round
            with torch.no_grad():
                site.sync.units[0].outer.params[0][0, 0] += 1e-3  # type: ignore[union-attr]

    run_steps(sites, range(1, 7), tokens=lambda s, step: 1, finish_at=6, on_step=corrupt)

    ref = ReferenceOuter(params_of(small_model()))
    ref.step(weighted_avg_by_hand(ref.theta, [s.before_sync[2] for s in sites], [2.0] * 3))
    round_momentum(ref)  # round 2 heals site 2: its update is left out, every momentum rounded
    ref.step(weighted_avg_by_hand(ref.theta, [s.before_sync[4] for s in sites[:2]], [2.0] * 2))
    for site in sites:
        assert_equal(site.after[4], ref.theta, f"site {site.index} after the heal at step 4")
        assert site.sync.disagreements == 1
    assert [s.sync.heals for s in sites] == [0, 0, 1]
    assert [s.sync.heals_served for s in sites] == [1, 0, 0]
    digests = {s.sync.final_metrics()["theta_digest"] for s in sites}
    assert len(digests) == 1
    numel = sum(p.numel() for p in small_model().parameters())
    # θ in float32 and the momentum in bfloat16, and a 32-byte tag: 1.5x the model's bytes.
    assert sites[2].sync.heal_bytes == 4 * numel + 2 * numel + 32
    assert sites[0].sync.heal_bytes == sites[2].sync.heal_bytes
    assert sites[1].sync.heal_bytes == 0


def test_a_site_restarted_from_an_older_checkpoint_takes_the_runs_theta_and_ends_with_the_others() -> None:
    """Site 1 restarts from its step-2 checkpoint while site 0 is at step 4: its exchanges then
    meet site 0's two steps late. It heals at its first exchange, and when site 0 finishes it
    learns the end from site 0's final check and ends on the same θ."""
    hub = Hub(2)
    sites = make_sites(DILOCO, hub, inner_steps=2)
    saved: dict[str, bytes] = {}

    def save(site: Site, step: int) -> None:
        if site.index == 1 and step == 2:
            buf = io.BytesIO()
            torch.save({"model": site.model.state_dict(), "sync": site.sync.state_dict()}, buf)
            saved["ckpt"] = buf.getvalue()

    run_steps(sites, range(1, 5), tokens=lambda s, step: 1, on_step=save)  # rounds at steps 2 and 4
    state = torch.load(io.BytesIO(saved["ckpt"]), weights_only=False)
    model = small_model()
    model.load_state_dict(state["model"])
    restarted = Site(1, model, make_sync(model, hub, 1, DILOCO, inner_steps=2))
    restarted.sync.load_state_dict(state["sync"])
    assert restarted.sync.units[0].round == 1 and sites[0].sync.units[0].round == 2

    def run(site: Site, steps: range) -> None:
        try:
            for step in steps:
                drift(site.model, site=site.index, step=step)
                site.sync.after_step(step, tokens=1)
                site.after[step] = params_of(site.model)
            site.sync.finish(steps[-1])
            site.after[-1] = params_of(site.model)
        except BaseException:
            hub.barrier.abort()
            raise

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(run, sites[0], range(5, 9)), pool.submit(run, restarted, range(3, 9))]
        for f in futures:
            f.result()

    east, west = sites[0].sync, restarted.sync
    assert west.heals == 1 and east.heals_served == 1 and east.heals == 0
    assert_equal(restarted.after[4], sites[0].after[6], "the restarted site after its heal")
    assert west.units[0].final and not east.units[0].final  # west learned the end from east's check
    assert_equal(restarted.after[-1], sites[0].after[-1], "the end")
    assert west.final_metrics()["theta_digest"] == east.final_metrics()["theta_digest"]
    assert west.metrics()["sync_round"] == east.metrics()["sync_round"] == 4
    assert west.applied_log == [(4, 4), (6, 6), (8, 8)]  # healed and applied; applied; the end (nothing)


def test_finish_fails_loudly_when_the_sites_agreement_cannot_be_confirmed() -> None:
    hub = Hub(2, fail={1, 2, 3})  # the round at step 2 works; every final check fails
    sites = make_sites(DILOCO, hub, inner_steps=2)
    with pytest.raises(AtollError, match="could not confirm at the end"):
        run_steps(sites, range(1, 3), tokens=lambda s, step: 1, finish_at=2)


def test_the_final_digest_is_sha256_of_the_parameters() -> None:
    sites = make_sites(DILOCO, Hub(2), inner_steps=2)
    run_steps(sites, range(1, 3), tokens=lambda s, step: 1, finish_at=2)
    for site in sites:
        final = site.sync.final_metrics()
        assert final["theta_digest"] == theta_digest(site.model.parameters()).hex()
        assert final["sync_site_events"] == []


# ---------------------------------------------------------------------------- authenticity


def run_catching(sites: list[Site], steps: range) -> list[AtollError | None]:
    """`run_steps` with one token a step, but a site's `AtollError` is caught in its own thread and
    returned (per site), without breaking the hub's barrier: a site with the wrong secret raises
    after its last exchange, which the others finished too."""

    def one_site(site: Site) -> AtollError | None:
        try:
            for step in steps:
                drift(site.model, site=site.index, step=step)
                site.before_sync[step] = params_of(site.model)
                site.sync.after_step(step, tokens=1)
                site.after[step] = params_of(site.model)
        except AtollError as exc:
            return exc
        return None

    with ThreadPoolExecutor(max_workers=len(sites)) as pool:
        return [f.result() for f in [pool.submit(one_site, site) for site in sites]]


def test_a_site_with_the_wrong_secret_is_refused_logged_with_its_address_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub(3)
    sites = []
    for s in range(3):
        model = small_model()
        secret = b"an intruder's guess at the secret" if s == 2 else None
        kwargs = {"secret": secret} if secret else {}
        sites.append(Site(s, model, make_sync(model, hub, s, DILOCO, inner_steps=2, **kwargs)))
    # The intruder authenticates nobody in two exchanges in a row: it stops, naming the fix.
    with caplog.at_level(logging.WARNING, logger="atoll.sync.engine"):
        errors = run_catching(sites, range(1, 5))
    assert errors[:2] == [None, None]
    error = errors[2]
    assert re.match(r"site s2: no other site's .* set ATOLL_RUN_SECRET or ATOLL_RUN_SECRET_FILE", str(error))
    assert "\n" not in str(error)

    ref = ReferenceOuter(params_of(small_model()))
    for step in (2, 4):  # sites 0 and 1 never apply site 2's update, and finish their rounds
        ref.step(weighted_avg_by_hand(ref.theta, [s.before_sync[step] for s in sites[:2]], [2.0, 2.0]))
        for site in sites[:2]:
            assert_equal(site.after[step], ref.theta, f"site {site.index} after step {step}")
    assert 4 not in sites[2].after
    assert [s.sync.refused for s in sites] == [2, 2, 4]
    assert all(s.sync.rejected == s.sync.refused for s in sites)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("'s2' at 10.0.0.3" in m and "secret" in m for m in refusals), refusals


def test_a_refused_site_does_not_count_toward_min_sites() -> None:
    """min_sites 3 with two honest sites and an intruder: the quorum has 3 members, but only two
    contributions authenticate, so no round is applied (each rolls back) until the intruder leaves."""
    hub = Hub(3)
    cfg = DILOCO.model_copy(update={"min_sites": 3})
    sites = []
    for s in range(3):
        model = small_model()
        kwargs = {"secret": b"an intruder's guess at the secret"} if s == 2 else {}
        sites.append(Site(s, model, make_sync(model, hub, s, cfg, inner_steps=2, **kwargs)))
    errors = run_catching(sites, range(1, 5))
    assert errors[:2] == [None, None] and "join secret is not the run's" in str(errors[2])
    for site in sites[:2]:
        assert site.sync.rounds_applied == 0 and site.sync.refused == 2 and site.sync.units[0].round == 0
        assert_equal(theta_of(site), params_of(small_model()), f"site {site.index}'s θ")
        assert site.sync.membership.secret.trusted  # the honest sites authenticated each other


def test_two_sites_that_never_authenticated_each_other_both_stop() -> None:
    """The refusal is symmetric: with no third site and no history, neither can tell whose secret is
    the run's, so both stop with the fix (a real run's sites have authenticated each other)."""
    hub = Hub(2)
    a, b = small_model(), small_model()
    sites = [
        Site(0, a, make_sync(a, hub, 0, DILOCO, inner_steps=2)),
        Site(1, b, make_sync(b, hub, 1, DILOCO, inner_steps=2, secret=b"an intruder's guess at the secret")),
    ]
    errors = run_catching(sites, range(1, 5))
    assert all("join secret is not the run's" in str(e) for e in errors)
    assert [s.sync.membership.secret.refused_in_a_row for s in sites] == [2, 2]
    assert 4 not in sites[0].after and 4 not in sites[1].after


def test_a_payload_altered_in_transit_is_refused_then_the_sites_heal() -> None:
    hub = Hub(2, tamper={0: 1})  # the first round: site 1's payload reaches site 0 altered
    sites = make_sites(DILOCO, hub, inner_steps=2)
    run_steps(sites, range(1, 5), tokens=lambda s, step: 1)

    ref = ReferenceOuter(params_of(small_model()))
    ref.step(weighted_avg_by_hand(ref.theta, [sites[0].before_sync[2]], [2.0]))  # site 0 alone
    assert_equal(sites[0].after[2], ref.theta, "site 0 after refusing the altered update")
    assert sites[0].sync.refused == 1 and sites[1].sync.refused == 0
    # Site 1 applied both updates, so the sites now hold different θ at the same round: the tie
    # goes to the first site in the quorum's order, and site 1 heals from it.
    assert not torch.equal(sites[1].after[2][0], sites[0].after[2][0])
    assert [s.sync.heals for s in sites] == [0, 1]
    assert [s.sync.disagreements for s in sites] == [1, 1]
    assert_equal(sites[1].after[4], sites[0].after[4], "after the heal at step 4")


def test_a_multisite_rank_without_a_secret_stops_with_how_to_set_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    from pathlib import Path

    from atoll.sync.join import sync_for_site
    from atoll.sync.site_env import SiteEnv

    monkeypatch.delenv("ATOLL_RUN_SECRET", raising=False)
    monkeypatch.delenv("ATOLL_RUN_SECRET_FILE", raising=False)
    env = SiteEnv(site="east", index=0, num_sites=2, topology=Path("unused.yaml"), lighthouse="http://127.0.0.1:1")
    with pytest.raises(AtollError, match="needs a join secret: set ATOLL_RUN_SECRET"):
        sync_for_site(small_model(), DILOCO, env, local_rank=0, local_world_size=1)
