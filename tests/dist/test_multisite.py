"""Several sites on loopback through the real CLI, torchft Lighthouse and gloo: every strategy.

Each test runs ``atoll train CONFIG --topology T`` (tiny model, a few steps; the WAN model off
except where it is what is tested) and reads every site's RUN/sites/<site>/metrics.jsonl: the
parameter checksums logged after each step, the byte counters, and the final record's
`sync_applied` ([apply_step, sent_step], ...). Expected byte counts are computed here from the
model's shapes (the run's model.json) and the codec formulas, not from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from atoll.model import Transformer
from atoll.report.metrics import read_metrics
from atoll.rundir.layout import read_model_json
from atoll.sync.envelope import ENVELOPE_BYTES
from tests.conftest import REPO, tiny_config

HEADER_BYTES = 8 + ENVELOPE_BYTES  # the body length and the sealed envelope beside every payload
CHECK_BYTES = HEADER_BYTES  # finish's agreement check, per unit and rank: an envelope, no payload
TEST_SECRET = "multisite-test-secret-0123456789"  # the launcher will make one per run; until then, the tests'
TIMEOUT = 420  # seconds for a whole multi-site run; the cores are shared with other jobs


# ---------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Scenario:
    """One multi-site run: `atoll train CONFIG --topology T --wan WAN FLAGS`."""

    sites: tuple[str, ...]
    sync: dict[str, Any]
    steps: int = 6
    wan: str = "none"
    flags: tuple[str, ...] = ()
    mbps: float = 1000.0
    latency_ms: float = 0.0
    slowdown: dict[str, float] = field(default_factory=dict)
    placed: bool = False  # the data's manifest places half of the train shards on each site


SCENARIOS: dict[str, Scenario] = {
    "diloco": Scenario(
        ("east", "west"), {"strategy": "diloco", "inner_steps": 2, "chunk_kib": 16}
    ),  # many pipelined chunks
    "diloco-2-ranks": Scenario(
        ("east", "west"), {"strategy": "diloco", "inner_steps": 2}, flags=("--ranks-per-site", "2")
    ),
    "delayed": Scenario(("east", "west"), {"strategy": "delayed", "inner_steps": 2}),
    "streaming": Scenario(
        ("east", "west"), {"strategy": "streaming", "inner_steps": 4, "fragments": 2, "overlap_steps": 1}, steps=8
    ),
    "int8-emulated": Scenario(
        ("east", "west"),
        {"strategy": "diloco", "inner_steps": 2, "codec": "int8", "block_size": 128},
        steps=4,
        wan="emulated",
        mbps=2.0,
        latency_ms=5.0,
    ),
    "ddp-3-sites": Scenario(("east", "west", "south"), {"strategy": "ddp", "chunk_kib": 16}, steps=3),
    "heterogeneous": Scenario(
        ("east", "west"),
        {"strategy": "diloco", "inner_steps": 2, "site_inner_steps": {"east": 2, "west": 4}},
        steps=4,
        slowdown={"east": 2.0},
    ),
    "balanced": Scenario(  # no counts and no budget: the sites differ, so atoll balances them
        ("east", "west"),
        {"strategy": "diloco", "inner_steps": 4},
        steps=12,
        slowdown={"east": 3.0},
        flags=("--ranks-per-site", "2"),
    ),
    "budget": Scenario(
        ("east", "west"),
        {"strategy": "delayed", "inner_steps": 2, "round_seconds": 0.6},
        steps=6,
        slowdown={"east": 2.0},
    ),
    "unknown-site": Scenario(("east", "west"), {"site_inner_steps": {"north": 3}}),
    "one-site": Scenario(("east",), {}),
    "placed-data": Scenario(("east", "west"), {"strategy": "diloco", "inner_steps": 2}, steps=4, placed=True),
    "unplaced-site": Scenario(("east", "north"), {"strategy": "diloco", "inner_steps": 2}, steps=4, placed=True),
}
MAX_CONCURRENT = 3  # runs at once: keeps both cores busy while a run waits on imports or peers


def uses(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Tag a test with the scenario it reads, so the `runs` fixture starts only those."""

    def tag(fn: Callable[..., None]) -> Callable[..., None]:
        fn.scenario = name  # type: ignore[attr-defined]
        return fn

    return tag


def write_topology(tmp_path: Path, sc: Scenario) -> Path:
    """A loopback topology: one CPU per site, the same link everywhere."""
    topology = {
        "name": "test",
        "sites": [
            {"name": s, "devices": [{"kind": "cpu", "count": 1, "per_node": 1, "slowdown": sc.slowdown.get(s, 1.0)}]}
            for s in sc.sites
        ],
        "links": [{"site": s, "uplink_mbps": sc.mbps, "latency_ms": sc.latency_ms} for s in sc.sites],
        "lighthouse": {"site": sc.sites[0]},
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(topology), encoding="utf-8")
    return path


def place_on_sites(data: Path, out: Path, sites: tuple[str, ...]) -> Path:
    """A copy of the prepared data whose manifest gives the train shards to `sites` in turn
    (what `atoll data prepare` writes for a by-share placement)."""
    shutil.copytree(data, out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    files = [s["file"] for s in manifest["splits"]["train"]["shards"]]
    manifest["placement"] = "by_share"
    manifest["sites"] = {site: {"train": files[i :: len(sites)]} for i, site in enumerate(sites)}
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


def launch(tmp_path: Path, data: Path, sc: Scenario) -> subprocess.CompletedProcess[str]:
    """Run the CLI like `run_atoll`, but stop it with Ctrl-C on a timeout, so that the launcher
    takes its Lighthouse and ranks down with it instead of leaving them to wait on the cores."""
    if sc.placed:
        data = place_on_sites(data, tmp_path / "data", ("east", "west"))
    cfg = tiny_config(tmp_path, data, train={"steps": sc.steps, "checkpoint_every": 0, "eval_every": 0}, sync=sc.sync)
    topology = write_topology(tmp_path, sc)
    args = [
        sys.executable,
        "-m",
        "atoll.cli",
        "train",
        str(cfg),
        "--topology",
        str(topology),
        "--wan",
        sc.wan,
        *sc.flags,
    ]
    env = dict(os.environ, ATOLL_NO_PROGRESS="1", PYTHONPATH=str(REPO / "src"), ATOLL_RUN_SECRET=TEST_SECRET)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            err += f"\n[test] timed out after {TIMEOUT} s and was interrupted"
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


class Runs:
    """The scenarios this session's tests use, run a few at a time in the background."""

    def __init__(self, names: list[str], factory: pytest.TempPathFactory, data: Path) -> None:
        self._pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENT, thread_name_prefix="multisite")
        self._dirs = {name: factory.mktemp(name) for name in names}
        self._futures = {name: self._pool.submit(launch, self._dirs[name], data, SCENARIOS[name]) for name in names}

    def result(self, name: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        return self._futures[name].result(), self._dirs[name]

    def sites(self, name: str) -> dict[str, Path]:
        """Each site's run directory of a run that must have succeeded."""
        proc, tmp = self.result(name)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return {s: tmp / "runs" / "t" / "sites" / s for s in SCENARIOS[name].sites}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # runs already started finish on their own


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[Runs]:
    here = request.module.__name__
    names = [getattr(item.function, "scenario", None) for item in request.session.items if item.module.__name__ == here]  # type: ignore[attr-defined]
    wanted = [n for n in SCENARIOS if n in names]
    started = Runs(wanted, tmp_path_factory, tiny_data)
    yield started
    started.close()


# ---------------------------------------------------------------------------- metrics


def per_step(run_dir: Path, key: str) -> dict[int, Any]:
    """`key` from the per-step records (those with a training loss), by step."""
    return {r["step"]: r[key] for r in read_metrics(run_dir) if "loss" in r and key in r}


def final_record(run_dir: Path) -> dict[str, Any]:
    records = [r for r in read_metrics(run_dir) if "sync_applied" in r]
    assert len(records) == 1, f"{run_dir}: expected one final sync record, got {len(records)}"
    return records[0]


def final_val_loss(run_dir: Path) -> float:
    values = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    assert values, f"{run_dir}: no validation loss"
    return float(values[-1])


def param_shapes(run_dir: Path) -> dict[str, tuple[int, ...]]:
    """The model's parameter names and shapes, rebuilt from the run's model.json."""
    model = Transformer(read_model_json(run_dir))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def num_params(run_dir: Path) -> int:
    count = read_model_json(run_dir).num_params()
    assert count == sum(math.prod(s) for s in param_shapes(run_dir).values())
    return count


def fp32_payload(numels: list[int]) -> int:
    """Bytes of one exchange with codec none (fp32 values), header included."""
    return 4 * sum(numels) + HEADER_BYTES


def owners_by_size(shapes: dict[str, tuple[int, ...]], num_ranks: int) -> dict[str, int]:
    """Largest parameter first to the least loaded rank (ties: name, then rank): the split the
    sharded exchange promises, computed independently of atoll.sync.fragments."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    load = [0] * num_ranks
    owner = {}
    for n in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(num_ranks), key=lambda r: (load[r], r))
        owner[n] = r
        load[r] += sizes[n]
    return owner


def assert_identical_at(dirs: dict[str, Path], steps: list[int]) -> None:
    checksums = {s: per_step(d, "params_checksum") for s, d in dirs.items()}
    for step in steps:
        values = {s: c[step] for s, c in checksums.items()}
        assert len(set(values.values())) == 1, f"step {step}: sites differ {values}"


def assert_differ_at(dirs: dict[str, Path], steps: list[int]) -> None:
    checksums = {s: per_step(d, "params_checksum") for s, d in dirs.items()}
    for step in steps:
        values = {s: c[step] for s, c in checksums.items()}
        assert len(set(values.values())) == len(values), (
            f"step {step}: sites should have diverged (own data), got {values}"
        )


def assert_end_identical(dirs: dict[str, Path]) -> None:
    finals = {s: final_record(d)["params_checksum"] for s, d in dirs.items()}
    assert len(set(finals.values())) == 1, f"sites end with different parameters: {finals}"
    assert all(math.isfinite(v) for v in finals.values())


# ---------------------------------------------------------------------------- diloco


@uses("diloco")
def test_diloco_two_sites_identical_after_every_sync_and_bytes_equal_payloads(runs: Runs) -> None:
    dirs = runs.sites("diloco")  # H=2, 6 steps
    assert_identical_at(dirs, [2, 4, 6])
    assert_differ_at(dirs, [1, 3, 5])  # each site trains on its own data between syncs
    assert_end_identical(dirs)
    val = {s: final_val_loss(d) for s, d in dirs.items()}
    assert val["east"] == val["west"]

    payload = fp32_payload([num_params(dirs["east"])])  # the whole model, fp32, one rank
    for site, d in dirs.items():
        assert sorted(per_step(d, "wan_bytes_sent")) == list(range(1, 7))
        for step, sent in per_step(d, "wan_bytes_sent").items():
            syncs = step // 2
            checks = int(step == 6)  # the run's end: every site shows its θ digest
            assert sent == syncs * (2 - 1) * payload + checks * CHECK_BYTES, (site, step)
            assert per_step(d, "wan_bytes_received")[step] == sent
            assert per_step(d, "wan_exchanges")[step] == syncs + checks
        assert final_record(d)["sync_applied"] == [[2, 2], [4, 4], [6, 6]]
        assert per_step(d, "wan_failed")[6] == 0
        assert per_step(d, "sync_rejected")[6] == 0
        # The exchange states a live view reads between logged steps: each round sent, then applied.
        states = [(r["step"], r["exchange"], r["exchange_round"]) for r in read_metrics(d) if "exchange" in r]
        assert states == [(k, what, k // 2) for k in (2, 4, 6) for what in ("sending", "applied")], site


@uses("diloco-2-ranks")
def test_diloco_two_ranks_per_site_exchange_each_byte_once(runs: Runs) -> None:
    dirs = runs.sites("diloco-2-ranks")  # H=2, 6 steps, --ranks-per-site 2
    assert_identical_at(dirs, [2, 4, 6])
    assert_differ_at(dirs, [1, 3, 5])
    assert_end_identical(dirs)
    assert final_val_loss(dirs["east"]) == final_val_loss(dirs["west"])

    shapes = param_shapes(dirs["east"])
    owner = owners_by_size(shapes, 2)
    numels = {r: [math.prod(s) for n, s in shapes.items() if owner[n] == r] for r in (0, 1)}
    assert numels[0] and numels[1]
    full = fp32_payload([num_params(dirs["east"])])
    for site, d in dirs.items():
        # Each rank's own counter is in its share of the final checkpoint (rank{r}.pt).
        ckpt = d / "checkpoints" / "step_00000006"
        counters = {r: torch.load(ckpt / f"rank{r}.pt", weights_only=False)["state"]["sync"]["counter"] for r in (0, 1)}
        for r, counter in counters.items():
            # Local rank r sends only the parameters it owns (to rank r of the other site).
            assert counter["wan_exchanges"] == 3 + 1, (site, r)  # three rounds and the final check
            assert counter["wan_bytes_sent"] == 3 * fp32_payload(numels[r]) + CHECK_BYTES, (site, r)
            assert counter["wan_bytes_sent"] < 3 * full
        # Together the two ranks carry one full model per sync: no byte crosses twice.
        payload_bytes = sum(c["wan_bytes_sent"] - c["wan_exchanges"] * HEADER_BYTES for c in counters.values())
        assert payload_bytes == 3 * 4 * num_params(d)
        # The site's metrics report its traffic: the sum over its ranks.
        for step, sent in per_step(d, "wan_bytes_sent").items():
            checks = 2 * CHECK_BYTES if step == 6 else 0
            assert sent == (step // 2) * (fp32_payload(numels[0]) + fp32_payload(numels[1])) + checks, (site, step)


# ---------------------------------------------------------------------------- delayed and streaming


@uses("delayed")
def test_delayed_applies_each_round_one_round_late(runs: Runs) -> None:
    dirs = runs.sites("delayed")  # H=2, 6 steps
    for site, d in dirs.items():
        applied = final_record(d)["sync_applied"]
        # Rounds sent at 2 and 4 land H=2 steps later; the one sent at 6 is flushed by finish.
        assert applied == [[4, 2], [6, 4], [6, 6]], site
        assert all(a - s == 2 for a, s in applied[:-1])
        assert per_step(d, "wan_exchanges")[6] == 3 + 1  # and the final check
    # Until the flush every site keeps its own progress made while the exchange was in flight.
    assert_differ_at(dirs, [2, 4])
    assert_identical_at(dirs, [6])
    assert_end_identical(dirs)
    assert final_val_loss(dirs["east"]) == final_val_loss(dirs["west"])


@uses("streaming")
def test_streaming_applies_every_fragment_tau_steps_after_its_send(runs: Runs) -> None:
    dirs = runs.sites("streaming")  # H=4, 2 fragments, tau=1, 8 steps
    tau = 1
    # Two fragments of one decoder layer each, offsets 0 and H/2: fragment 1 is sent after
    # steps 2 and 6, fragment 0 after 4 and 8; finish (step 8) flushes fragment 0's exchange
    # in flight and syncs fragment 1 once more.
    shapes = param_shapes(dirs["east"])
    first = [math.prod(s) for n, s in shapes.items() if n.startswith(("embed.", "layers.0."))]
    second = [math.prod(s) for n, s in shapes.items() if not n.startswith(("embed.", "layers.0."))]
    for site, d in dirs.items():
        applied = final_record(d)["sync_applied"]
        assert applied == [[3, 2], [5, 4], [7, 6], [8, 8], [8, 8]], site
        assert all(a - s == tau for a, s in applied[:3])
        # An exchange is counted when it completes, in the background: by its apply at the latest.
        sent = per_step(d, "wan_bytes_sent")
        assert sent[1] == 0
        assert sent[3] == fp32_payload(second)
        assert sent[5] == fp32_payload(second) + fp32_payload(first)
        assert sent[8] == 2 * fp32_payload(first) + 3 * fp32_payload(second) + 2 * CHECK_BYTES
    assert_end_identical(dirs)
    assert final_val_loss(dirs["east"]) == final_val_loss(dirs["west"])


@uses("diloco")
def test_export_of_a_multisite_run_takes_the_shared_weights(runs: Runs, tmp_path: Path) -> None:
    from atoll.export import export_run
    from atoll.model.hf import load_hf_model
    from atoll.train.checkpoint import latest_checkpoint, load_model_weights

    dirs = runs.sites("diloco")
    run_dir = dirs["east"].parent.parent  # RUN, holding sites/east and sites/west
    export_run(run_dir, tmp_path / "hf")
    _, exported = load_hf_model(tmp_path / "hf")
    for d in dirs.values():  # every site ends with the weights that were exported
        model = Transformer(read_model_json(d))
        ckpt = latest_checkpoint(d)
        assert ckpt is not None and ckpt.step == 6
        load_model_weights(ckpt.path, model)
        ours = model.state_dict()
        assert all(torch.equal(exported[k], ours[k]) for k in ours)
    # `atoll serve RUN` and `atoll generate RUN` load the run the same way: the shared weights.
    from atoll.rundir.load import load_stage

    served, tokenizer = load_stage(run_dir)
    assert tokenizer.encode("the site") and all(torch.equal(served.state_dict()[k], exported[k]) for k in exported)


@uses("placed-data")
def test_each_site_trains_on_the_shards_the_data_placed_on_it(runs: Runs) -> None:
    dirs = runs.sites("placed-data")
    manifest = json.loads((dirs["east"].parents[3] / "data" / "manifest.json").read_text(encoding="utf-8"))
    tokens = {s["file"]: s["num_tokens"] for s in manifest["splits"]["train"]["shards"]}
    seen = {}
    for site, d in dirs.items():
        (record,) = [r for r in read_metrics(d) if "train_shards" in r]
        assert record["train_shards"] == manifest["sites"][site]["train"]
        assert record["train_tokens"] == sum(tokens[f] for f in record["train_shards"])
        seen[site] = set(record["train_shards"])
    assert seen["east"] and seen["west"] and not seen["east"] & seen["west"]
    assert_end_identical(dirs)


@uses("unplaced-site")
def test_a_site_the_data_does_not_place_stops_the_run_with_the_fix(runs: Runs) -> None:
    proc, _ = runs.result("unplaced-site")
    assert proc.returncode != 0
    assert "site 'north' has no data in this manifest" in proc.stderr and "placement" in proc.stderr


# ---------------------------------------------------------------------------- codec and WAN model


@uses("int8-emulated")
def test_int8_over_an_emulated_slow_link_counts_codec_bytes_and_takes_their_time(runs: Runs) -> None:
    sc = SCENARIOS["int8-emulated"]  # H=2, 4 steps, 2 Mbit/s, 5 ms
    dirs = runs.sites("int8-emulated")
    # int8, blockwise absmax with fp32 scales: n code bytes + 4 per block of 128, per tensor.
    numels = [math.prod(s) for s in param_shapes(dirs["east"]).values()]
    payload = sum(n + 4 * math.ceil(n / 128) for n in numels) + HEADER_BYTES
    assert payload < fp32_payload(numels) / 3.5
    floor = payload * 8 / (sc.mbps * 1e6) + 2 * sc.latency_ms / 1000  # seconds one exchange must take
    for site, d in dirs.items():
        sent, seconds = per_step(d, "wan_bytes_sent"), per_step(d, "wan_seconds")
        assert sent[2] == payload and sent[4] == 2 * payload + CHECK_BYTES, site
        assert seconds[2] >= floor, (site, seconds[2], floor)
        assert seconds[4] - seconds[2] >= floor, (site, seconds[4] - seconds[2], floor)
        assert 0 < per_step(d, "compute_utilization")[4] <= 1
    assert_identical_at(dirs, [2, 4])
    assert_end_identical(dirs)


# ---------------------------------------------------------------------------- ddp


@uses("ddp-3-sites")
def test_ddp_three_sites_identical_after_every_step(runs: Runs) -> None:
    dirs = runs.sites("ddp-3-sites")  # 3 steps
    assert_identical_at(dirs, [1, 2, 3])
    assert_end_identical(dirs)
    payload = fp32_payload([num_params(dirs["east"])])  # the gradients, fp32
    for site, d in dirs.items():
        for step, sent in per_step(d, "wan_bytes_sent").items():
            assert sent == step * (3 - 1) * payload, (site, step)
        assert final_record(d)["sync_applied"] == []
    assert len({final_val_loss(d) for d in dirs.values()}) == 1


# ---------------------------------------------------------------------------- heterogeneous sites


@uses("heterogeneous")
def test_sites_with_different_inner_steps_and_a_slow_site_finish_the_same_rounds(runs: Runs) -> None:
    dirs = runs.sites("heterogeneous")  # H east 2, west 4; 4 steps of H=2: 2 rounds; east 2x slower
    rounds = 2
    east, west = dirs["east"], dirs["west"]
    assert max(per_step(east, "loss")) == 2 * rounds
    assert max(per_step(west, "loss")) == 4 * rounds
    assert final_record(east)["sync_applied"] == [[2, 2], [4, 4]]
    assert final_record(west)["sync_applied"] == [[4, 4], [8, 8]]
    for d in dirs.values():
        assert per_step(d, "wan_exchanges")[max(per_step(d, "loss"))] == rounds + 1  # and the final check
    # Round r ends after east's step 2r and west's step 4r, with the same parameters.
    ce, cw = per_step(east, "params_checksum"), per_step(west, "params_checksum")
    assert ce[2] == cw[4] and ce[4] == cw[8]
    assert_end_identical(dirs)
    assert final_val_loss(east) == final_val_loss(west)


def round_ends(run_dir: Path) -> list[int]:
    """The steps at which this site's rounds ended (from the final record's [round, steps, s])."""
    ends, step = [], 0
    for _, steps, _ in final_record(run_dir)["sync_rounds"]:
        step += steps
        ends.append(step)
    return ends


@uses("balanced")
def test_sites_of_different_speeds_balance_their_rounds_by_measurement(runs: Runs) -> None:
    dirs = runs.sites("balanced")  # H=4, 12 steps: 3 rounds of 2 x 4 steps; east 3x slower; 2 ranks each
    east, west = (final_record(dirs[s])["sync_rounds"] for s in ("east", "west"))
    assert len(east) == len(west) == 3  # the same rounds everywhere
    assert east[0][1] == 2 and west[0][1] == 6  # the first round follows the catalog (slowdowns 3 and 1)
    for (_, e, _), (_, w, _) in zip(east, west):
        # The round's work (2 x H) shared by speed; a site slowed down by the machine's other jobs
        # may stop early at the straggler deadline, never later.
        assert e + w <= 8 and e < w
    assert any(e + w == 8 for (_, e, _), (_, w, _) in zip(east, west))
    ce, cw = per_step(dirs["east"], "params_checksum"), per_step(dirs["west"], "params_checksum")
    for a, b in zip(round_ends(dirs["east"]), round_ends(dirs["west"])):
        assert ce[a] == cw[b]  # each round ends with the same parameters on both sites
    assert_end_identical(dirs)
    assert final_val_loss(dirs["east"]) == final_val_loss(dirs["west"])


@uses("budget")
def test_wall_clock_rounds_run_what_fits_in_the_budget(runs: Runs) -> None:
    dirs = runs.sites("budget")  # 3 rounds of 0.6 s of compute; east 2x slower; delayed exchange
    east, west = (final_record(dirs[s])["sync_rounds"] for s in ("east", "west"))
    assert len(east) == len(west) == 3
    for rounds in (east, west):
        for _, steps, seconds in rounds:
            assert steps >= 1 and (steps == 1 or seconds <= 0.6 * 1.5)  # what fits, measured
    assert sum(w for _, w, _ in west) > sum(e for _, e, _ in east)  # the faster site fits more steps
    assert_end_identical(dirs)


# ---------------------------------------------------------------------------- user mistakes


@uses("unknown-site")
def test_unknown_site_in_site_inner_steps_is_one_line_and_exit_2(runs: Runs) -> None:
    assert_rejected(runs, "unknown-site", "sync.site_inner_steps names 'north'")


@uses("one-site")
def test_one_site_topology_is_one_line_and_exit_2(runs: Runs) -> None:
    assert_rejected(runs, "one-site", "has one site")


def assert_rejected(runs: Runs, name: str, expected: str) -> None:
    proc, tmp = runs.result(name)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("atoll: error:") and expected in lines[0], lines[0]
    assert not (tmp / "runs").exists(), "nothing may be written for a rejected run"
