"""Sites that die or disagree, on loopback through the real CLI, torchft Lighthouse and gloo.

Each scenario runs ``atoll train CONFIG --topology T --worker tests.dist.faulty_site`` with one
deterministic fault on site west (see faulty_site.py): killed mid-round, killed mid-exchange, or
its θ changed after a round. `sync.min_sites` is 1, so east goes on alone; the assertions read
every site's RUN/sites/<site>/metrics.jsonl.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from atoll.report.metrics import read_metrics
from atoll.rundir.layout import read_model_json
from atoll.rundir.load import check_site_digests
from tests.conftest import REPO, tiny_config
from tests.dist.test_multisite import TEST_SECRET, Scenario, final_record, per_step, write_topology

TIMEOUT_SECONDS = 20.0  # sync.timeout_seconds: one exchange's timeout
HEARTBEAT_SECONDS = 10.0  # the Lighthouse forgets a site that stopped heartbeating after this long
FAULTS = {
    "mid-round": "west:round:3",
    "mid-exchange": "west:exchange:2",
    "disagreement": "west:perturb:2",
    "diverged": "west:nan:3",
    "paused": "west:pause:3",
}
STEPS = 8
# The paused site is away longer than the Lighthouse's heartbeat timeout, between exchanges; both
# sites' steps are emulated 20x slower (alike: same split, same θ) and the run has 24 steps, so the
# survivor, which goes on alone, is still training when the paused site comes back.
PAUSE_SECONDS = HEARTBEAT_SECONDS + 3
PAUSED_STEPS, PAUSED_SLOWDOWN = 24, 20.0


def run(tmp_path: Path, data: Path, fault: str) -> subprocess.CompletedProcess[str]:
    sync = {"strategy": "diloco", "inner_steps": 2, "min_sites": 1, "timeout_seconds": TIMEOUT_SECONDS}
    paused = ":pause:" in fault
    train = {"steps": PAUSED_STEPS if paused else STEPS, "checkpoint_every": 0, "eval_every": 0}
    cfg = tiny_config(tmp_path, data, train=train, sync=sync)
    slowdown = dict.fromkeys(("east", "west"), PAUSED_SLOWDOWN) if paused else {}
    topology = write_topology(tmp_path, Scenario(("east", "west"), sync, slowdown=slowdown))
    args = [sys.executable, "-m", "atoll.cli", "train", str(cfg), "--topology", str(topology), "--wan", "none"]
    env = dict(
        os.environ,
        ATOLL_NO_PROGRESS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "src")]),
        ATOLL_RUN_SECRET=TEST_SECRET,
        ATOLL_TEST_FAULT=fault,
        ATOLL_TEST_MARKER=str(tmp_path / "west-died"),
        ATOLL_TEST_BARRIER=str(tmp_path / "barrier"),
        ATOLL_TEST_PAUSE_SECONDS=str(PAUSE_SECONDS),
    )
    (tmp_path / "barrier").mkdir()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [*args, "--worker", "tests.dist.faulty_site"], capture_output=True, text=True, env=env, cwd=REPO, timeout=420
    )


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[dict[str, Future[Any]]]:
    dirs = {name: tmp_path_factory.mktemp(name) for name in FAULTS}
    with ThreadPoolExecutor(max_workers=len(FAULTS)) as pool:
        yield {name: pool.submit(lambda n=name: (run(dirs[n], tiny_data, FAULTS[n]), dirs[n])) for name in FAULTS}


def sites_of(faults: dict[str, Future[Any]], name: str) -> tuple[dict[str, Path], Path]:
    proc, tmp = faults[name].result()
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp / "runs" / "t"
    return {s: run_dir / "sites" / s for s in ("east", "west")}, tmp


def assert_survivor_finished_alone(east: Path, tmp: Path) -> dict[str, Any]:
    assert (tmp / "west-died").exists(), "the fault did not fire"
    final = final_record(east)
    assert max(per_step(east, "loss")) == STEPS
    assert len(final["theta_digest"]) == 64
    (dropped,) = [e for e in final["sync_site_events"] if e["event"] == "dropped"]
    assert dropped["site"] == "west" and dropped["rounds_missed"] >= 1
    # After the loss the survivor waits at most one exchange timeout (and the Lighthouse's
    # heartbeat timeout, to form a quorum without the lost site) before its next round.
    slowest = max(per_step(east, "step_seconds").values())
    assert slowest < TIMEOUT_SECONDS + HEARTBEAT_SECONDS + 5, slowest
    return final


def test_a_site_killed_mid_round_leaves_the_others_to_finish(faults: dict[str, Future[Any]]) -> None:
    dirs, tmp = sites_of(faults, "mid-round")
    final = assert_survivor_finished_alone(dirs["east"], tmp)
    assert final["sync_applied"][-1] == [STEPS, STEPS]
    assert not any("theta_digest" in r for r in read_metrics(dirs["west"]))  # west never finished
    # Before its final agreement the survivor waited one exchange timeout for west (atoll.sync.finish),
    # then ended without it. rich wraps log lines at the terminal's width: match without whitespace.
    log = "".join(faults["mid-round"].result()[0].stderr.split())
    assert "siteeast:waitingupto20sforwest" in log and "siteeast:endswithout['west']" in log, log[-3000:]


def test_a_site_killed_mid_exchange_fails_that_round_only(faults: dict[str, Future[Any]]) -> None:
    dirs, tmp = sites_of(faults, "mid-exchange")
    final = assert_survivor_finished_alone(dirs["east"], tmp)
    assert final["wan_failed"] >= 1  # the exchange west died in
    assert [4, 4] not in final["sync_applied"]  # that round was rolled back, carried by the next
    assert final["sync_applied"][-1] == [STEPS, STEPS]


def test_a_forced_disagreement_heals_over_the_wan_and_the_sites_end_equal(faults: dict[str, Future[Any]]) -> None:
    dirs, _ = sites_of(faults, "disagreement")
    east, west = final_record(dirs["east"]), final_record(dirs["west"])
    assert east["theta_digest"] == west["theta_digest"]
    assert check_site_digests(dirs["east"].parent.parent) == east["theta_digest"]
    assert west["heals"] >= 1 and east["heals_served"] == west["heals"]
    assert east["sync_disagreements"] >= 1 and west["sync_disagreements"] >= 1
    numel = read_model_json(dirs["west"]).num_params()
    model_bytes = 4 * numel
    # θ in float32, the outer momentum in bfloat16, a 32-byte tag: 1.5x the model and 32 bytes.
    assert west["heal_bytes"] == west["heals"] * (model_bytes + 2 * numel + 32)
    stall = per_step(dirs["east"], "step_seconds")
    print(
        f"\nheal: {west['heal_bytes']} bytes = {west['heal_bytes'] / model_bytes:.4f} x the model's "
        f"{model_bytes}; heal_seconds west {west['heal_seconds']:.3f}, east (source) {east['heal_seconds']:.3f}; "
        f"east step_seconds by step { ({k: round(v, 3) for k, v in stall.items()}) }"
    )


def test_a_diverged_site_takes_the_shared_theta_and_stays_in_step(faults: dict[str, Future[Any]]) -> None:
    dirs, _ = sites_of(faults, "diverged")
    west = read_metrics(dirs["west"])
    events = [(r["guard"], r["step"]) for r in west if "guard" in r]
    assert events == [("skipped", 3), ("skipped", 4), ("rollback", 5), ("rolled_back", 5)]  # the step stays
    east_final, west_final = final_record(dirs["east"]), final_record(dirs["west"])
    assert east_final["theta_digest"] == west_final["theta_digest"]
    assert west_final["sync_applied"] == east_final["sync_applied"] and west_final["sync_applied"][-1] == [STEPS, STEPS]
    assert not any("guard" in r for r in read_metrics(dirs["east"]))


def test_a_site_away_between_exchanges_rejoins_heals_and_the_sites_end_equal(faults: dict[str, Future[Any]]) -> None:
    """West stops (SIGSTOP, torchft's heartbeats included) after step 3, mid-round, for longer than
    the Lighthouse's heartbeat timeout: east drops it and goes on alone; back, west meets east at
    east's next exchange, heals from it and both end with the same θ (the chaos benchmark's link
    cut between exchanges, on loopback)."""
    dirs, tmp = sites_of(faults, "paused")
    assert (tmp / "west-died").read_text() == "paused\n", "the fault did not fire"
    east, west = final_record(dirs["east"]), final_record(dirs["west"])
    assert east["theta_digest"] == west["theta_digest"] == check_site_digests(dirs["east"].parent.parent)
    assert max(per_step(dirs["west"], "loss")) == PAUSED_STEPS
    dropped, rejoined = east["sync_site_events"]
    assert (dropped["event"], dropped["site"], rejoined["event"], rejoined["site"]) == (
        "dropped",
        "west",
        "rejoined",
        "west",
    )
    assert rejoined["rounds_missed"] >= 1 and rejoined["step"] < PAUSED_STEPS
    assert west["heals"] >= 1 and east["heals_served"] == west["heals"]
    # Healed, west moved to east's step instead of running the rounds it missed alone at the end.
    (jump,) = [r for r in read_metrics(dirs["west"]) if "healed_forward_from" in r]
    assert (
        jump["healed_forward_steps"] >= 2 and jump["step"] == jump["healed_forward_from"] + jump["healed_forward_steps"]
    )
    assert jump["step"] in per_step(dirs["east"], "loss"), "west jumped to a step east did not reach"
    assert len(per_step(dirs["west"], "loss")) == PAUSED_STEPS - jump["healed_forward_steps"]
    # East waited for west at most until the Lighthouse gave up on west's heartbeats (plus its own
    # emulated step, and the load of a shared machine).
    slowest = max(per_step(dirs["east"], "step_seconds").values())
    assert slowest < HEARTBEAT_SECONDS + 10, slowest
