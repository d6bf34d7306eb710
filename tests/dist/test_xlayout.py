"""Sites of different layouts and sizes exchange through the real CLI, torchft and gloo on loopback.

Each scenario is ``atoll train CONFIG --topology T`` whose topology gives some sites their own
``ranks`` and ``parallel`` (DDP or FSDP2 inside the site). The sites must end with the same θ
(their final `theta_digest`, over full tensors in canonical order), the mixed pair with the θ of
an all-DDP run of the same seeds (FSDP2's reduce-scatter sums gradients in another order, so
within float tolerance), and a pair of FSDP2 sites (shard to shard) with the WAN bytes of a DDP
pair (every element crosses once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from atoll.model import Transformer
from atoll.report.metrics import read_metrics
from atoll.rundir.layout import read_model_json
from tests.conftest import REPO, tiny_config

pytestmark = pytest.mark.timeout(900)  # the first test waits for the runs it reads (two at a time)
TEST_SECRET = "xlayout-test-secret-0123456789ab"
TIMEOUT = 480
SYNC = {"strategy": "diloco", "inner_steps": 2}
STEPS = 4

# name -> {site: (ranks, parallel overrides)}; `None` ranks: the launcher's --ranks-per-site (2)
SCENARIOS: dict[str, dict[str, tuple[int | None, dict[str, Any]]]] = {
    "mixed": {"west": (None, {}), "east": (None, {"shard": "fsdp"})},
    "ddp-pair": {"west": (None, {}), "east": (None, {})},
    "fsdp-pair": {"west": (None, {"shard": "fsdp"}), "east": (None, {"shard": "fsdp"})},
    "sizes": {"west": (2, {"shard": "fsdp"}), "east": (1, {})},
    "mixed-heal": {"west": (None, {}), "east": (None, {"shard": "fsdp"})},  # west's θ is perturbed: it heals
    "tp-vs-pp": {"west": (None, {"tp": 2}), "east": (None, {"pp": 2})},  # DTensor shards against stages
}
FAULTS = {"mixed-heal": "west:perturb:2"}  # tests/dist/faulty_site.py


def write_topology(tmp_path: Path, sites: dict[str, tuple[int | None, dict[str, Any]]]) -> Path:
    entries = []
    for name, (ranks, parallel) in sites.items():
        count = ranks or 2  # a site of fewer ranks has fewer devices: the sites then differ, and balance their rounds
        entry: dict[str, Any] = {"name": name, "devices": [{"kind": "cpu", "count": count, "per_node": count}]}
        if ranks is not None:
            entry["ranks"] = ranks
        if parallel:
            entry["parallel"] = parallel
        entries.append(entry)
    topology = {
        "name": "xlayout",
        "sites": entries,
        "links": [{"site": s, "uplink_mbps": 1000.0} for s in sites],
        "lighthouse": {"site": next(iter(sites))},
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(topology), encoding="utf-8")
    return path


def launch(tmp_path: Path, data: Path, name: str) -> subprocess.CompletedProcess[str]:
    cfg = tiny_config(tmp_path, data, train={"steps": STEPS, "checkpoint_every": 0, "eval_every": 0}, sync=SYNC)
    topology = write_topology(tmp_path, SCENARIOS[name])
    args = [sys.executable, "-m", "atoll.cli", "train", str(cfg), "--topology", str(topology)]
    args += ["--wan", "none", "--ranks-per-site", "2"]
    env = dict(os.environ, ATOLL_NO_PROGRESS="1", PYTHONPATH=str(REPO / "src"), ATOLL_RUN_SECRET=TEST_SECRET)
    if name in FAULTS:
        (tmp_path / "barrier").mkdir()
        args += ["--worker", "tests.dist.faulty_site"]
        env.update(
            PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "src")]),
            ATOLL_TEST_FAULT=FAULTS[name],
            ATOLL_TEST_BARRIER=str(tmp_path / "barrier"),
        )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
            err += f"\n[test] timed out after {TIMEOUT} s"
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


class Runs:
    def __init__(self, names: list[str], factory: pytest.TempPathFactory, data: Path) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="xlayout")
        self._dirs = {n: factory.mktemp(n) for n in names}
        self._futures = {n: self._pool.submit(launch, self._dirs[n], data, n) for n in names}

    def sites(self, name: str) -> dict[str, Path]:
        proc = self._futures[name].result()
        assert proc.returncode == 0, proc.stderr[-6000:]
        return {s: self._dirs[name] / "runs" / "t" / "sites" / s for s in SCENARIOS[name]}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Any:
    started = Runs(list(SCENARIOS), tmp_path_factory, tiny_data)
    yield started
    started.close()


def final_record(run_dir: Path) -> dict[str, Any]:
    (record,) = [r for r in read_metrics(run_dir) if "sync_applied" in r]
    return record


def digests(dirs: dict[str, Path]) -> dict[str, str]:
    return {s: final_record(d)["theta_digest"] for s, d in dirs.items()}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from atoll.train.checkpoint import latest_checkpoint, load_model_weights

    model = Transformer(read_model_json(run_dir))
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None  # the end of the run (a balanced site may have run more steps than STEPS)
    load_model_weights(ckpt.path, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def site_bytes(run_dir: Path) -> int:
    """WAN bytes the site sent (the sum over its ranks, as the loop logs it)."""
    return int(final_record(run_dir)["wan_bytes_sent"])


def test_a_ddp_site_and_an_fsdp_site_end_with_the_same_theta_as_an_all_ddp_run(runs: Runs) -> None:
    mixed, ddp = runs.sites("mixed"), runs.sites("ddp-pair")
    found = digests(mixed)
    assert len(set(found.values())) == 1, found
    for d in mixed.values():
        assert final_record(d)["sync_applied"] == [[2, 2], [4, 4]]
        assert final_record(d)["wan_failed"] == 0 and final_record(d)["sync_rejected"] == 0
    # Both sites hold the one θ; the checkpoint of the FSDP2 site (sharded) reads back to it too.
    west, east, reference = final_weights(mixed["west"]), final_weights(mixed["east"]), final_weights(ddp["west"])
    for key, value in west.items():
        assert torch.equal(value, east[key]), key
        # FSDP2 reduces gradients in another order than DDP: the same θ up to float rounding.
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5)


def test_sites_of_different_sizes_end_with_the_same_digest(runs: Runs) -> None:
    dirs = runs.sites("sizes")  # west: 2 FSDP2 ranks (one idle), east: 1 rank; one lane each
    found = digests(dirs)
    assert len(set(found.values())) == 1, found
    # The sites' devices differ, so their rounds are balanced by measured speed (west's idle rank
    # follows the paces its lane saw): the same rounds everywhere, each site its own steps.
    rounds = {s: final_record(d)["sync_rounds"] for s, d in dirs.items()}
    assert len(rounds["west"]) == len(rounds["east"]) == STEPS // SYNC["inner_steps"], rounds
    assert all(steps >= 1 for r in rounds.values() for _, steps, _ in r), rounds
    west, east = final_weights(dirs["west"]), final_weights(dirs["east"])
    assert all(torch.equal(v, east[k]) for k, v in west.items())


def test_an_fsdp_pair_exchanges_shard_to_shard_with_the_bytes_of_a_ddp_pair(runs: Runs) -> None:
    fsdp, ddp = runs.sites("fsdp-pair"), runs.sites("ddp-pair")
    assert len(set(digests(fsdp).values())) == 1
    assert len(set(digests(ddp).values())) == 1
    for site in ("west", "east"):
        # Two lanes each, every element once: the payloads and envelopes of a DDP pair.
        assert site_bytes(fsdp[site]) == site_bytes(ddp[site]) > 0, site
    # The digest is over full tensors: layout-independent, so close runs show it is the same kind of value.
    for d in fsdp.values():
        assert final_record(d)["sync_applied"] == [[2, 2], [4, 4]]


def test_a_site_heals_from_a_site_of_another_layout(runs: Runs) -> None:
    dirs = runs.sites("mixed-heal")  # west (DDP) has its θ changed after step 2: it heals from east (FSDP2)
    east, west = final_record(dirs["east"]), final_record(dirs["west"])
    assert east["theta_digest"] == west["theta_digest"]
    # The tie between two θ goes to the first site in the quorum's order (east): west heals.
    assert west["heals"] >= 1 and east["heals_served"] == west["heals"]
    assert west["sync_disagreements"] >= 1
    # Both lanes' shares changed (each perturbed its first tensor): each heals its share, cut alike
    # on both sites whatever their layout. θ float32 + momentum bfloat16 + a tag per lane, summed.
    numel = read_model_json(dirs["west"]).num_params()
    assert west["heal_bytes"] == west["heals"] * (6 * numel + 2 * 32)
    assert [a for a, _ in west["sync_applied"]][-1] == STEPS


def test_a_tensor_parallel_site_and_a_pipeline_site_end_with_the_same_theta(runs: Runs) -> None:
    dirs = runs.sites("tp-vs-pp")  # west: each rank half of every matrix; east: each rank half of the layers
    found = digests(dirs)
    assert len(set(found.values())) == 1, found
    for d in dirs.values():
        assert final_record(d)["sync_applied"] == [[2, 2], [4, 4]]
        assert final_record(d)["wan_failed"] == 0 and final_record(d)["sync_rejected"] == 0
    # Each site's checkpoint, written in its own layout, reads back whole to the same θ.
    west, east = final_weights(dirs["west"]), final_weights(dirs["east"])
    assert all(torch.equal(v, east[k]) for k, v in west.items())
