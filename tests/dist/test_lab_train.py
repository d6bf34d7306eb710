"""`atoll lab run`: two sites in their own network namespaces train one model, and the lab goes away.

Root only (namespaces and tc); without it the test skips and says why. Every address used is
inside 10.213.0.0/16, in namespaces the lab creates for this run.
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from atoll.lab.netns import IFACE_PREFIX, NETNS_PREFIX, STATE_DIR, lab_available
from atoll.report.metrics import read_metrics
from tests.conftest import run_atoll, tiny_config

TIMEOUT = 420  # seconds; the cores are shared with other jobs


def lines_of(*cmd: str) -> list[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()


def test_lab_run_trains_two_sites_in_namespaces_and_leaves_nothing_behind(tmp_path: Path, tiny_data: Path) -> None:
    available, reason = lab_available()
    if not available:
        pytest.skip(f"the netns lab cannot be built here: {reason}")
    topology = tmp_path / "lab.yaml"
    topology.write_text(
        yaml.safe_dump(
            {
                "name": "lab-test",
                "sites": [
                    {"name": s, "devices": [{"kind": "cpu", "count": 1, "per_node": 1}]} for s in ("east", "west")
                ],
                "links": [{"site": s, "uplink_mbps": 20.0, "latency_ms": 2.0} for s in ("east", "west")],
                "lighthouse": {"site": "east"},
            }
        ),
        encoding="utf-8",
    )
    cfg = tiny_config(
        tmp_path,
        tiny_data,
        train={"steps": 4, "checkpoint_every": 0, "eval_every": 0},
        sync={"strategy": "diloco", "inner_steps": 2},
    )

    proc = run_atoll("lab", "run", "--topology", str(topology), str(cfg), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = re.search(r"lab (\w+): east (10\.213\.\d+\.\d+), west (10\.213\.\d+\.\d+)", proc.stderr)
    assert found, f"the lab's run id and site addresses are not in the output:\n{proc.stderr[-3000:]}"
    rid = found.group(1)

    finals = {}
    for site in ("east", "west"):
        records = read_metrics(tmp_path / "runs" / "t" / "sites" / site)
        final = [r for r in records if "sync_applied" in r]
        assert len(final) == 1, site
        assert final[0]["sync_applied"] == [[2, 2], [4, 4]], site
        finals[site] = final[0]["theta_digest"]
        # Two rounds and the closing digest check (a header-only exchange at the last step).
        assert [r["wan_exchanges"] for r in records if "loss" in r][-1] == 3
        assert math.isfinite(final[0]["params_checksum"])
    assert finals["east"] == finals["west"] and len(finals["east"]) == 64

    # Nothing of this lab is left: namespaces, interfaces, its ownership record.
    assert not [n for n in lines_of("ip", "netns", "list") if n.startswith(f"{NETNS_PREFIX}{rid}-")]
    assert not [line for line in lines_of("ip", "-o", "link", "show") if f" {IFACE_PREFIX}{rid}" in line]
    assert not (STATE_DIR / f"{rid}.json").exists()
