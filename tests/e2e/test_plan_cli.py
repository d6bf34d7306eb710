"""`atoll plan` end to end: a plan, its reasons, a timeline and plan.yaml; bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from atoll.planner.plan import load_plan
from tests.conftest import REPO, run_atoll

TOPOLOGIES = REPO / "examples" / "topologies"


def test_plan_two_clusters_writes_plan_and_timeline(tmp_path: Path) -> None:
    out = tmp_path / "plan.yaml"
    proc = run_atoll(
        "plan",
        "--topology",
        str(TOPOLOGIES / "two-cluster-1gbps.yaml"),
        "--model",
        "qwen1.5-107b",
        "--tokens",
        "100B",
        "--out",
        str(out),
        "--trials",
        "3",
        "--explain",
        timeout=120,
        env={"COLUMNS": "160"},
    )
    assert proc.returncode == 0, proc.stderr
    for text in (
        "plans (1 = recommended)",
        "why this plan",
        "ddp across sites would wait",
        "WAN exchange",
        "simulated (3 runs",
        "wrote",
    ):
        assert text in proc.stdout
    plan = load_plan(out)
    assert plan.sync.strategy in ("diloco", "streaming", "delayed") and plan.sync.inner_steps > 1
    assert [s.name for s in plan.sites] == ["beijing", "shanghai"]
    png = out.with_suffix(".timeline.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "topology.yaml"
    p.write_text(text)
    return p


SITE = "  - {{name: {n}, devices: [{{kind: {k}, count: {c}}}]}}\n"


@pytest.mark.parametrize(
    ("topology", "model", "tokens", "message"),
    [
        (
            "name: t\nsites:\n" + SITE.format(n="a", k="tpu-v9", c=8),
            "llama3-8b",
            "1B",
            "unknown device kind 'tpu-v9'; known kinds: a100-80g",
        ),
        (
            "name: t\nsites:\n"
            + SITE.format(n="a", k="h100", c=8)
            + SITE.format(n="b", k="h100", c=8)
            + "links:\n  - {site: a, uplink_mbps: 1000}\n",
            "llama3-8b",
            "1B",
            "sites without an uplink: b",
        ),
        (
            "name: t\nsites:\n"
            + SITE.format(n="a", k="h100", c=8)
            + SITE.format(n="b", k="h100", c=8)
            + "links:\n  - {site: a, uplink_mbps: 0}\n  - {site: b, uplink_mbps: 1000}\n",
            "llama3-8b",
            "1B",
            "uplink_mbps",
        ),
        (
            "name: t\nsites:\n" + SITE.format(n="a", k="a100-80g", c=32),
            "gpt-1t",
            "1T",
            "fits on no site: model states alone need at least 2\\d\\d x 80 GB a100-80g \\(site a has 32\\)",
        ),
        ("name: t\nsites:\n" + SITE.format(n="a", k="h100", c=8), "llama3-8b", "lots", "--tokens 'lots'"),
        ("name: t\nsites:\n" + SITE.format(n="a", k="h100", c=8), "gpt-9000", "1B", "unknown model 'gpt-9000'"),
    ],
    ids=["unknown-device", "unreachable-site", "zero-bandwidth", "fits-nowhere", "bad-tokens", "unknown-model"],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], topology: str, model: str, tokens: str, message: str
) -> None:
    from atoll.cli import COMMAND_MODULES, main

    assert "atoll.planner.commands" in COMMAND_MODULES
    path = _write(tmp_path, topology)
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "plan",
                "--topology",
                str(path),
                "--model",
                model,
                "--tokens",
                tokens,
                "--out",
                str(tmp_path / "p.yaml"),
                "--no-simulate",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert err.startswith("atoll: error: ") and "\n" not in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "p.yaml").exists()


def test_a_plan_for_sites_of_two_speeds_trains_as_planned(tmp_path: Path, tiny_data: Path) -> None:
    """The planner gives the slower site fewer inner steps per round and the same batch; `atoll
    train --plan` starts from exactly that (nothing listed as not honoured) and re-measures, and
    both sites end alike."""
    from atoll.report.metrics import read_metrics
    from tests.conftest import tiny_config

    topology = TOPOLOGIES / "lab-two-speeds.yaml"
    out = tmp_path / "plan.yaml"
    proc = run_atoll(
        "plan",
        "--topology",
        str(topology),
        "--model",
        "tiny",
        "--tokens",
        "26K",  # 100 steps: at least 10 rounds leave H = 10 the only choice, a short round
        "--global-batch",
        "8",
        "--seq-len",
        "32",
        "--all-sites",
        "--strategy",
        "diloco",
        "--no-simulate",
        "--out",
        str(out),
        env={"COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "predicted efficiency" in proc.stdout
    plan = load_plan(out)
    east, west = plan.sites
    assert east.batch == west.batch == 4 and east.inner_steps > west.inner_steps
    assert plan.sync.inner_steps == 10 and east.inner_steps + west.inner_steps == 20
    assert plan.predicted is not None and 0.8 < (plan.predicted.efficiency or 0) <= 1.0

    cfg = tiny_config(tmp_path, tiny_data, train={"checkpoint_every": 0, "eval_every": 0})
    rounds = 2  # the command line wins over the plan: a short run of two rounds
    proc = run_atoll(
        "train",
        str(cfg),
        "--topology",
        str(topology),
        "--wan",
        "emulated",
        "--plan",
        str(out),
        f"--train.steps={rounds * plan.sync.inner_steps}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "does not honor" not in proc.stderr + proc.stdout
    finals, steps = {}, {}
    for site in plan.sites:
        rows = read_metrics(tmp_path / "runs" / "t" / "sites" / site.name)
        final = [r for r in rows if "sync_rounds" in r][-1]
        steps[site.name] = [int(r[1]) for r in final["sync_rounds"]]
        assert len(steps[site.name]) == rounds and steps[site.name][0] == site.inner_steps  # the plan's split first
        finals[site.name] = [r for r in rows if "params_checksum" in r][-1]["params_checksum"]
    # Then re-measured (a loaded machine is not the plan's): the round's work is split again (a
    # site that turns slow inside a round may stop early, at the planned time plus the tolerance).
    work = east.inner_steps + west.inner_steps
    assert all(1 <= w <= e and e + w <= work for e, w in zip(steps["east"], steps["west"])), steps
    assert finals["east"] == finals["west"]
    # The run's own report sets the plan's predictions beside what the sites measured.
    page = (tmp_path / "runs" / "t" / "report.html").read_text(encoding="utf-8")
    assert "Plan: predicted against measured" in page and "predicted efficiency" in page
    assert f"<td>{east.inner_steps}</td><td>{steps['east'][0]} then" in page  # planned H, then H run


def test_a_planned_layout_for_a_model_that_needs_tensor_parallelism_runs_at_lab_scale(
    tmp_path: Path, tiny_data: Path
) -> None:
    """The planner splits a 107B model inside each A800 site (one replica does not fit one
    device); `atoll train --plan` runs that layout on CPU ranks with a tiny model, honouring every
    layout key, and trains what one rank trains."""
    from atoll.report.metrics import read_metrics
    from tests.conftest import tiny_config

    out = tmp_path / "plan.yaml"
    proc = run_atoll(
        "plan",
        "--topology",
        str(TOPOLOGIES / "two-cluster-1gbps.yaml"),
        "--model",
        "qwen1.5-107b",
        "--tokens",
        "100B",
        "--no-simulate",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    layout = load_plan(out).sites[0].layout
    assert layout.tp * layout.pp > 1, layout  # 107B needs more than one device per replica
    ranks = layout.tp * layout.pp
    assert ranks <= 4, layout  # the lab runs it on this machine's cores
    # A tiny model whose heads, kv heads, MLP and vocabulary the plan's tp divides; the run's
    # size (steps, sequence, batch) from the command line, which wins over the plan.
    model = {"preset": "tiny", "num_heads": 4, "num_kv_heads": 4}
    size = ["--train.steps=4", "--data.seq_len=32", "--train.global_batch=4", "--train.micro_batch=1"]
    (tmp_path / "one").mkdir()
    one = tiny_config(tmp_path / "one", tiny_data, model=model, train={"checkpoint_every": 0, "eval_every": 0})
    proc = run_atoll("train", str(one), *size)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = tiny_config(tmp_path, tiny_data, model=model, train={"checkpoint_every": 0, "eval_every": 0})
    proc = run_atoll("train", str(cfg), "--plan", str(out), "--nproc", str(ranks), *size, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not honor" not in proc.stderr + proc.stdout
    assert f"tp{layout.tp}xpp{layout.pp}xdp1" in "".join(proc.stderr.split())  # rich wraps log lines
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "runs" / "t") if "loss" in r}
    reference = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "one" / "runs" / "t") if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(losses[s] == pytest.approx(reference[s], rel=1e-5) for s in losses), (losses, reference)


def test_a_plan_whose_sites_have_different_layouts_runs_each_site_in_its_own(tmp_path: Path, tiny_data: Path) -> None:
    """A plan with a tensor-parallel site and a pipeline site: `atoll train --plan --topology`
    gives each site its layout through the topology it launches with (RUN/topology.yaml),
    honours every key, and both sites end with one model."""
    import yaml

    from atoll.planner.plan import Plan, write_plan
    from tests.conftest import tiny_config

    def site(name: str, layout: dict[str, object]) -> dict[str, object]:
        devices = [{"kind": "cpu", "count": 2}]
        return {"name": name, "devices": devices, "batch": 4, "inner_steps": 2, "layout": {**layout, "dp": 1}}

    plan = Plan.model_validate(
        {
            "model": "tiny",
            "model_params": 1,
            "topology": "t.yaml",
            "tokens": 1e4,
            "seq_len": 32,
            "global_batch": 8,
            "steps": 4,
            "sync": {"strategy": "diloco", "inner_steps": 2, "codec": "none", "outer_lr": 1.0, "outer_momentum": 0.0},
            "sites": [site("east", {"tp": 2}), site("west", {"pp": 2})],
        }
    )
    write_plan(plan, tmp_path / "plan.yaml")
    topo = tmp_path / "sites.yaml"
    topo.write_text(
        yaml.safe_dump(
            {
                "name": "two",
                "sites": [{"name": n, "devices": [{"kind": "cpu", "count": 2}]} for n in ("east", "west")],
                "links": [{"site": n, "uplink_mbps": 1000} for n in ("east", "west")],
            }
        )
    )
    model = {"preset": "tiny", "num_heads": 4, "num_kv_heads": 4}
    cfg = tiny_config(tmp_path, tiny_data, model=model, train={"checkpoint_every": 0, "eval_every": 0})
    args = ["--topology", str(topo), "--ranks-per-site", "2", "--wan", "none", "--sync.nesterov=false"]
    proc = run_atoll("train", str(cfg), "--plan", str(tmp_path / "plan.yaml"), *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not honor" not in proc.stderr + proc.stdout
    launched = yaml.safe_load((tmp_path / "runs" / "t" / "topology.yaml").read_text())
    layouts = {s["name"]: s.get("parallel") for s in launched["sites"]}
    assert layouts == {"east": {"tp": 2, "pp": 1}, "west": {"tp": 1, "pp": 2, "vp": 1}}, layouts
    for name, shape in (("east", (2, 1)), ("west", (1, 2))):  # what each site's ranks ran with
        ran = yaml.safe_load((tmp_path / "runs" / "t" / "sites" / name / "config.yaml").read_text())["parallel"]
        assert (ran["tp"], ran["pp"]) == shape, (name, ran)
