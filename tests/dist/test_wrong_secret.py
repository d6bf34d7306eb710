"""A site started with the wrong join secret is refused, then leaves; the run's two sites go on.

Deployed as data centers run it, on loopback: `atoll lighthouse` (which writes the run's secret),
`atoll site` for east and west with that secret, and a third `atoll site` ("mallory", in its own
three-site topology) pointed at the same Lighthouse with another secret. Every process is the
real CLI (torchft Lighthouse, gloo, the trainer).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import yaml

from atoll.report.metrics import read_metrics
from atoll.sync.lighthouse import parse_ready_line
from tests.conftest import tiny_config
from tests.dist.test_deploy import atoll, finish

STEPS = 12


def topology(path: Path, sites: tuple[str, ...]) -> Path:
    topo = {
        "name": "wrong-secret-test",
        "sites": [{"name": s, "devices": [{"kind": "cpu", "count": 1, "per_node": 1}]} for s in sites],
        "links": [{"site": s, "uplink_mbps": 1000.0, "latency_ms": 0.0} for s in sites],
    }
    path.write_text(yaml.safe_dump(topo), encoding="utf-8")
    return path


def test_a_site_with_the_wrong_secret_is_refused_then_leaves_and_the_run_goes_on(
    tmp_path: Path, tiny_data: Path
) -> None:
    run_topology = topology(tmp_path / "topology.yaml", ("east", "west"))
    own_topology = topology(tmp_path / "mallory-topology.yaml", ("east", "west", "mallory"))
    sync = {"strategy": "diloco", "inner_steps": 2, "min_sites": 2, "timeout_seconds": 30}
    cfg = tiny_config(tmp_path, tiny_data, train={"steps": STEPS, "checkpoint_every": 0, "eval_every": 0}, sync=sync)
    secret = tmp_path / "dc" / "run.secret"
    lighthouse = atoll(
        "lighthouse", "--bind", "127.0.0.1:0", "--min-sites", "2", "--secret-file", str(secret),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert lighthouse.stdout is not None
        url = parse_ready_line(lighthouse.stdout.readline().strip())
        assert url is not None
        common = [str(cfg), "--lighthouse", url.removeprefix("http://"), "--no-progress"]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        wrong = tmp_path / "wrong.secret"
        wrong.write_text("not-the-run's-secret-0123456789\n", encoding="utf-8")
        wrong.chmod(0o600)
        sites = {
            name: atoll(
                "site", *common, "--topology", str(run_topology), "--site", name, "--secret-file", str(secret), **pipes
            )
            for name in ("east", "west")
        }
        sites["mallory"] = atoll(
            "site", *common, "--topology", str(own_topology), "--site", "mallory", "--secret-file", str(wrong),
            f"--run.dir={tmp_path / 'mallory-runs'}", **pipes,
        )  # fmt: skip
        outputs = {name: finish(proc) for name, proc in sites.items()}
    finally:
        lighthouse.send_signal(signal.SIGTERM)
        lighthouse.communicate(timeout=30)
    for name in ("east", "west"):
        assert sites[name].returncode == 0, outputs[name][1][-4000:]
    # Which of the run's sites meet mallory in a quorum depends on when each process comes up (a
    # site may finish its 12 steps before mallory's first exchange): at least one refuses it, and
    # logs the address it claims. rich wraps log lines at the terminal's width: match without spaces.
    refused_by = [
        name
        for name in ("east", "west")
        if "refusedacontributionclaimingsite'mallory'at127.0.0.1" in "".join(outputs[name][1].split())
    ]
    assert refused_by, outputs["east"][1][-2000:] + outputs["west"][1][-2000:]
    # Mallory leaves with one line naming the fix, exit 2 (a mistake in how it was started).
    assert sites["mallory"].returncode == 2, outputs["mallory"][1][-4000:]
    errors = [line for line in outputs["mallory"][1].splitlines() if line.startswith("atoll: error:")]
    assert len(errors) == 1, outputs["mallory"][1][-4000:]
    assert "site mallory: no other site's contribution authenticated" in errors[0], errors
    assert "ATOLL_RUN_SECRET or ATOLL_RUN_SECRET_FILE" in errors[0]
    dirs = {name: tmp_path / "runs" / "t" / "sites" / name for name in ("east", "west")}
    finals = {name: [r for r in read_metrics(d) if "theta_digest" in r][-1] for name, d in dirs.items()}
    assert finals["east"]["theta_digest"] == finals["west"]["theta_digest"]
    # mallory was in the quorums of the sites that logged it, and each counted its refusals
    assert {name for name, f in finals.items() if f["sync_refused"] >= 1} == set(refused_by)
    # Both end at the same round. A site that came up late (while the other tried its first
    # rounds with mallory alone, which failed: min_sites 2) joins at the other's round and keeps its
    # own step count, so the last exchange may pair different steps: the one finishing first ends
    # on its last step's exchange.
    assert finals["east"]["sync_round"] == finals["west"]["sync_round"] >= 1
    assert max(f["sync_applied"][-1][0] for f in finals.values()) == STEPS
    assert all(e["site"] != "mallory" for f in finals.values() for e in f["sync_site_events"])
