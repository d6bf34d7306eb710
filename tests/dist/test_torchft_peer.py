"""bench/torchft_peer.py: torchft's own DiLoCo on two loopback sites, started by atoll's launcher."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from atoll.config.topology import load_topology
from atoll.model import ModelConfig
from atoll.report.metrics import read_metrics
from atoll.sync.launch import LoopbackHost, launch_sites
from tests.conftest import REPO, tiny_config

pytest.importorskip("torchft")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["diloco", "streaming"])
def test_two_sites_end_identical_with_falling_loss(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    topo = tmp_path / "topology.yaml"
    topo.write_text(
        yaml.safe_dump(
            {
                "name": "peer-test",
                "sites": [
                    {"name": n, "devices": [{"kind": "cpu", "count": 1, "per_node": 1}]} for n in ("east", "west")
                ],
                "links": [{"site": n, "uplink_mbps": 1000, "latency_ms": 1} for n in ("east", "west")],
                "lighthouse": {"site": "east"},
            }
        ),
        encoding="utf-8",
    )
    cfg = tiny_config(
        tmp_path,
        tiny_data,
        train={"steps": 8, "log_every": 2, "eval_every": 0, "checkpoint_every": 0},
        # streaming: the tiny model's 2 layers in 2 fragments, one synced every 2 steps, tau 1.
        sync={"strategy": strategy, "inner_steps": 4, "fragments": 2, "overlap_steps": 1, "timeout_seconds": 120},
    )
    # bench/ is not a package: `-m bench.torchft_peer` finds it as a namespace package from the repo root.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "src")]))
    monkeypatch.setenv("ATOLL_NO_PROGRESS", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    code = launch_sites(
        [str(cfg), "--no-progress"],  # as `atoll train --worker` passes it
        topology=load_topology(topo),
        topology_path=topo,
        ranks_per_site=1,
        wan_mode="emulated",
        host=LoopbackHost(),
        module="bench.torchft_peer",
    )
    assert code == 0

    finals, vals = [], []
    for site in ("east", "west"):
        records = read_metrics(tmp_path / "runs" / "t" / "sites" / site)
        losses = [r["loss"] for r in records if "loss" in r]
        assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
        assert losses[-1] < losses[0]
        last = [r for r in records if "wall_seconds" in r][-1]
        assert 0 < last["compute_utilization"] <= 1 and last["tokens_seen"] == 8 * 4 * 32
        n_params = ModelConfig(
            **json.loads((tmp_path / "runs" / "t" / "sites" / site / "model.json").read_text())
        ).num_params()
        # Two rounds, each one fp32 allreduce of the whole model (streaming: of its two fragments in
        # turn, every parameter once per round): (M-1) x model bytes per round.
        assert last["wan_bytes_sent"] == 2 * 4 * n_params
        vals += [r["val_loss"] for r in records if "val_loss" in r]
        finals.append(records[-1])
    # A commit per allreduce: per round (diloco) or per fragment's turn (streaming, 2 per round).
    assert finals[0]["torchft_commits"] == finals[1]["torchft_commits"] == (2 if strategy == "diloco" else 4)
    if strategy == "diloco":
        assert finals[0]["params_sha256"] == finals[1]["params_sha256"]  # bitwise-identical parameters
        assert len(vals) == 2 and vals[0] == vals[1]
    else:  # fragment 0 trained locally after its last sync at step 6: the sites differ there
        assert len(vals) == 2 and finals[0]["params_sha256"] != finals[1]["params_sha256"]
