"""A fine-tuning stage across data centers that share no disk: `atoll lighthouse` and one
`atoll site --finetune` per site, each with its own run directory (as on its own machine), on
loopback. Each site prepares the stage it reads (config, model, tokenizer, data) itself, the two
train together, and end with the same adapters. Real processes throughout (torchft, gloo).
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from atoll.config import RunConfig, load_config
from atoll.report.metrics import read_metrics
from atoll.rundir.lineage import read_lineage
from atoll.sync.lighthouse import parse_ready_line
from tests.conftest import tiny_config
from tests.dist.test_deploy import atoll, finish, write_topology
from tests.e2e.test_finetune_cli import domain_docs, ft_config


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    from atoll.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("parent")
    run_training(load_config(RunConfig, tiny_config(tmp, tiny_data)))
    return tmp / "runs" / "t"


def test_each_site_prepares_the_stage_on_its_own_machine(parent: Path, tmp_path: Path) -> None:
    data = domain_docs(tmp_path / "domain")
    cfg = ft_config(tmp_path, parent, data, name="sites", sync={"strategy": "diloco", "inner_steps": 3})
    topology = write_topology(tmp_path / "topology.yaml")
    secret = tmp_path / "run.secret"
    lighthouse = atoll(
        "lighthouse", "--bind", "127.0.0.1:0", "--topology", str(topology), "--secret-file", str(secret),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    machines = {name: tmp_path / name for name in ("east", "west")}  # each data center's own disk
    try:
        assert lighthouse.stdout is not None
        url = parse_ready_line(lighthouse.stdout.readline().strip())
        assert url is not None
        sites = {
            name: atoll(
                "site", str(cfg), "--finetune", "--topology", str(topology), "--site", name,
                "--lighthouse", url.removeprefix("http://"), "--secret-file", str(secret), "--no-progress",
                f"--run.dir={machines[name] / 'runs'}", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            for name in ("east", "west")
        }  # fmt: skip
        outputs = {name: finish(proc) for name, proc in sites.items()}
    finally:
        lighthouse.send_signal(signal.SIGTERM)
        lighthouse.communicate(timeout=30)
    for name, proc in sites.items():
        assert proc.returncode == 0, outputs[name][1][-4000:]
    east_stage, west_stage = (machines[n] / "runs" / "sites" for n in ("east", "west"))
    # West prepared its own copy of the stage: the same rows as east's, from the same inputs.
    for name in ("config.yaml", "model.json", "tokenizer.json", "data/train_tokens.npy", "data/train_mask.npy"):
        assert (west_stage / name).is_file(), name
    assert json.loads((west_stage / "data" / "data.json").read_text()) == json.loads(
        (east_stage / "data" / "data.json").read_text()
    )
    assert read_lineage(east_stage)["status"] == "finished"
    assert read_lineage(west_stage)["status"] == "prepared"  # the stage's record is the first site's
    ends = [
        [r for r in read_metrics(d) if "sync_applied" in r][-1] for d in (east_stage, west_stage / "sites" / "west")
    ]
    assert ends[0]["theta_digest"] == ends[1]["theta_digest"]
    assert ends[0]["sync_applied"][-1] == [6, 6] and ends[1]["heals"] == 0
    assert "(lora) finished at step 6/6" in outputs["east"][0]
    assert "site west: stage sites at step 6/6" in "".join(outputs["west"][0].split("\n"))


def test_sites_sharing_a_disk_prepare_the_stage_once(parent: Path, tmp_path: Path) -> None:
    """On one filesystem the second site to arrive verifies and uses the first's preparation and
    rewrites nothing under its ranks; a stage prepared with another config is prepared again."""
    from atoll.finetune.config import FinetuneConfig
    from atoll.finetune.setup import prepare_site_stage
    from atoll.rundir.layout import site_dir

    data = domain_docs(tmp_path / "domain")
    cfg = load_config(FinetuneConfig, ft_config(tmp_path, parent, data, name="shared"))
    run_dir = cfg.run.path
    prepare_site_stage(cfg, resume=False, first_site=False, own_dir=site_dir(run_dir, "west"))  # west first
    written = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert run_dir / "data" / "train_tokens.npy" in written
    prepare_site_stage(cfg, resume=False, first_site=True, own_dir=run_dir)  # then east, the first site
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == written
    other = load_config(FinetuneConfig, ft_config(tmp_path, parent, data, name="shared", train={"steps": 9}))
    prepare_site_stage(other, resume=False, first_site=False, own_dir=site_dir(run_dir, "west"))
    assert read_lineage(run_dir)["planned_steps"] == 9
