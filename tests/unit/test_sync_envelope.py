"""The pure parts of the sync's integrity: envelopes and their tags, the plan every site reaches
from them, membership events, heal buffers, and the θ digests that export checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atoll.errors import AtollError
from atoll.rundir.load import check_site_digests
from atoll.sync.agreement import Membership, plan_exchange
from atoll.sync.digest import theta_digest
from atoll.sync.envelope import ENVELOPE_BYTES, KIND_CHECK, Header, Refused, Sealer
from atoll.sync.heal import heal_bytes, pack_heal, unpack_heal
from atoll.sync.outer import OuterOptimizer

SECRET = b"sixteen bytes at least, surely"


def header(
    site: str = "east", *, round: int = 3, digest: bytes = b"a" * 32, body_bytes: int = 5, **kw: object
) -> Header:
    return Header(site, "10.213.0.2", 0, round, 7.5, body_bytes, digest, **kw)  # type: ignore[arg-type]


def body(n: int = 5) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8)


# ---------------------------------------------------------------------------- envelopes


def test_an_envelope_round_trips_and_the_transport_may_pad_the_body() -> None:
    sealer = Sealer(SECRET)
    env = sealer.seal(header(), body())
    assert env.numel() == ENVELOPE_BYTES == 188
    opened, payload = sealer.open(env, torch.cat([body(), torch.zeros(3, dtype=torch.uint8)]))
    assert opened == header() and torch.equal(payload, body())
    stepped = header(step=4096)  # where the sender is: a site healing forward moves there
    assert sealer.open(sealer.seal(stepped, body()), body())[0].step == 4096


def test_an_envelope_sealed_with_another_secret_is_refused_naming_the_claimed_site() -> None:
    env = Sealer(b"somebody else's secret value").seal(header("mallory"), body())
    with pytest.raises(Refused, match="'mallory' at 10.213.0.2.*secret") as info:
        Sealer(SECRET).open(env, body())
    assert info.value.claimed_address == "10.213.0.2"


@pytest.mark.parametrize("where", ["body", "round", "weight", "step", "tag"])
def test_one_flipped_bit_anywhere_is_refused(where: str) -> None:
    sealer = Sealer(SECRET)
    env, data = sealer.seal(header(), body()), body()
    offset = {"round": 12, "weight": 20, "step": 36, "tag": ENVELOPE_BYTES - 1}
    if where == "body":
        data[2] ^= 1
    else:
        env[offset[where]] ^= 1
    with pytest.raises(Refused):
        sealer.open(env, data)


def test_a_truncated_body_or_a_foreign_envelope_is_refused() -> None:
    sealer = Sealer(SECRET)
    with pytest.raises(Refused, match="announces 5 payload bytes, 4 arrived"):
        sealer.open(sealer.seal(header(), body()), body(4))
    with pytest.raises(Refused, match="not an atoll envelope"):
        sealer.open(torch.zeros(ENVELOPE_BYTES, dtype=torch.uint8), body())
    with pytest.raises(AtollError, match="longer than 32 bytes"):
        sealer.seal(header("x" * 33), body())


# ---------------------------------------------------------------------------- plans


def test_the_plan_takes_the_highest_round_then_the_majority_digest() -> None:
    a, b = b"a" * 32, b"b" * 32
    plan = plan_exchange([header("s0", digest=b), header("s1", digest=a), header("s2", digest=a), None])
    assert plan is not None
    assert (plan.reference_digest, plan.in_sync, plan.heal, plan.source) == (a, [1, 2], [0], 1)
    # A site that went on while the others restarted from an older checkpoint holds the run's θ.
    behind = plan_exchange([header("s0", round=5), header("s1", round=4, digest=b), header("s2", round=4, digest=b)])
    assert behind is not None and (behind.reference_round, behind.in_sync, behind.heal) == (5, [0], [1, 2])
    # A tie goes to the first site in the quorum's order.
    tie = plan_exchange([header("s0", digest=b), header("s1", digest=a)])
    assert tie is not None and (tie.reference_digest, tie.heal) == (b, [1])
    assert plan_exchange([None, None]) is None


def test_a_finished_site_in_sync_ends_the_run_for_the_others() -> None:
    plan = plan_exchange([header("s0", kind=KIND_CHECK, body_bytes=0), header("s1")])
    assert plan is not None and plan.finished and plan.heal == []
    stale = plan_exchange([header("s0", kind=KIND_CHECK, body_bytes=0, round=2), header("s1", round=3)])
    assert stale is not None and not stale.finished and stale.heal == [0]


def test_membership_states_who_dropped_and_how_many_rounds_it_missed() -> None:
    m = Membership()
    assert m.observe(["east", "west"], step=2, round=1) == []
    (dropped,) = m.observe(["east"], step=4, round=2)
    assert (dropped["event"], dropped["site"], dropped["step"], dropped["round"]) == ("dropped", "west", 4, 2)
    assert m.summary(round=5)[0]["rounds_missed"] == 3  # still away
    (back,) = m.observe(["east", "west"], step=10, round=6)
    assert (back["event"], back["site"], back["rounds_missed"]) == ("rejoined", "west", 4)
    assert [e["event"] for e in m.summary(round=7)] == ["dropped", "rejoined"]
    assert "rounds_missed" not in m.summary(round=7)[0]


# ---------------------------------------------------------------------------- heals


def outer_with_momentum() -> OuterOptimizer:
    g = torch.Generator().manual_seed(0)
    outer = OuterOptimizer([torch.randn(4, 3, generator=g), torch.randn(5, generator=g)])
    outer.step([torch.randn(4, 3, generator=g), torch.randn(5, generator=g)])
    outer.round_momentum(torch.bfloat16)
    return outer


def test_a_heal_carries_theta_exactly_and_the_momentum_in_bfloat16() -> None:
    sealer, source = Sealer(SECRET), outer_with_momentum()
    digest = theta_digest(source.params)
    buf = pack_heal(source, sealer, unit=0, round=7, with_momentum=True)
    assert buf.numel() == heal_bytes(17, with_momentum=True) == 17 * 6 + 32
    got = unpack_heal(buf, outer_with_momentum(), sealer, unit=0, round=7, digest=digest, with_momentum=True)
    assert got is not None
    theta, momentum = got
    assert all(torch.equal(a, b) for a, b in zip(theta, source.params, strict=True))
    assert momentum is not None and all(torch.equal(a, b) for a, b in zip(momentum, source.momentum(), strict=True))  # type: ignore[arg-type]
    assert heal_bytes(17, with_momentum=False) == 17 * 4 + 32


def test_a_heal_that_does_not_match_the_announced_digest_or_round_installs_nothing() -> None:
    sealer, source = Sealer(SECRET), outer_with_momentum()
    buf = pack_heal(source, sealer, unit=0, round=7, with_momentum=True)
    kw = {"unit": 0, "with_momentum": True}
    assert unpack_heal(buf, source, sealer, round=7, digest=b"x" * 32, **kw) is None  # type: ignore[arg-type]
    assert unpack_heal(buf, source, sealer, round=8, digest=theta_digest(source.params), **kw) is None  # type: ignore[arg-type]
    buf[0] ^= 1
    assert unpack_heal(buf, source, sealer, round=7, digest=theta_digest(source.params), **kw) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- digests


def test_the_digest_sees_what_a_float_sum_does_not() -> None:
    a = [torch.tensor([1.0, -1.0]), torch.tensor([0.0])]
    b = [torch.tensor([-1.0, 1.0]), torch.tensor([-0.0])]  # same sum, other bits
    assert theta_digest(a) != theta_digest(b)
    assert theta_digest(a) == theta_digest([t.clone() for t in a])


def write_site(run: Path, site: str, digest: str | None) -> None:
    d = run / "sites" / site
    d.mkdir(parents=True)
    (d / "model.json").write_text("{}", encoding="utf-8")
    records = [{"step": 1, "loss": 2.0}]
    if digest is not None:
        records.append({"step": 2, "theta_digest": digest})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_check_site_digests_returns_the_shared_digest_or_says_which_sites_differ(tmp_path: Path) -> None:
    write_site(tmp_path / "same", "east", "ab" * 32)
    write_site(tmp_path / "same", "west", "ab" * 32)
    assert check_site_digests(tmp_path / "same") == "ab" * 32
    write_site(tmp_path / "differ", "east", "ab" * 32)
    write_site(tmp_path / "differ", "west", "cd" * 32)
    with pytest.raises(AtollError, match="different parameters.*east.*west"):
        check_site_digests(tmp_path / "differ")
    write_site(tmp_path / "unfinished", "east", "ab" * 32)
    write_site(tmp_path / "unfinished", "west", None)
    with pytest.raises(AtollError, match="west .*no final θ digest"):
        check_site_digests(tmp_path / "unfinished")
    # What the launcher asks when every site exited 0: the sites that recorded a digest agree.
    assert check_site_digests(tmp_path / "unfinished", require_all=False) == "ab" * 32
    with pytest.raises(AtollError, match="different parameters"):
        check_site_digests(tmp_path / "differ", require_all=False)
    with pytest.raises(AtollError, match="not a multi-site run"):
        check_site_digests(tmp_path)
