"""The run report (issue 15): what it derives from the records, and the page it writes.

Run directories are written record by record (tests/unit/report_runs.py): no training, no torch
in the report itself. The page in a real browser is tests/e2e/test_report_browser.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from atoll.cli import main
from atoll.planner.plan import (
    DeviceCount,
    Plan,
    Predicted,
    SitePredicted,
    SiteSettings,
    SyncSettings,
    write_plan,
)
from atoll.report.commands import write_report, write_run_report
from atoll.report.measures import agreement, link_measures, site_measures
from atoll.report.page import render_report
from atoll.report.rundata import load_run
from atoll.report.sections import chain_section
from atoll.report.svg import Series, line_chart, nice_ticks
from atoll.report.timeline import busy_shares, site_timeline
from tests.unit.report_runs import fake_run, fake_single


def _figures(page: str) -> list[str]:
    return re.findall(r'<figure class="plot[^"]*"[^>]*>', page)


def test_timeline_accounts_for_every_second_the_counters_give(tmp_path: Path) -> None:
    run = load_run(fake_run(tmp_path / "r", failures=True))
    east = run.sites[0]
    segs = site_timeline(east, t0=run.start_time)
    last = east.steps[-1]
    shares = busy_shares(segs)
    assert shares["compute"] == pytest.approx(last["compute_seconds"], rel=1e-6)
    assert shares["wait"] == pytest.approx(last["sync_wait_seconds"], rel=1e-6)
    # Two evaluations of 0.04 s and two checkpoints of 0.06 s, from the records and the directories.
    assert shares["eval"] == pytest.approx(0.08, abs=1e-6)
    assert shares["checkpoint"] == pytest.approx(0.12, abs=1e-6)
    exchanges = [s for s in segs if s.kind == "exchange"]
    assert len(exchanges) == 4  # steps 5, 10, 15, 20: one per sync_applied pair
    assert all(s.row == "wan" and s.end > s.start for s in exchanges)
    kinds = [s.kind for s in segs]
    assert kinds.count("heal") == 1
    assert kinds.count("membership") == 2  # north dropped, then rejoined
    assert kinds.count("failure") == 2  # the skipped step, the failed exchange
    main_row = sorted((s for s in segs if s.row == "site"), key=lambda s: s.start)
    for a, b in zip(main_row, main_row[1:]):
        assert b.start >= a.end - 1e-6, (a, b)  # the site's own work never overlaps itself


def test_evaluation_and_checkpoint_between_logged_steps(tmp_path: Path) -> None:
    root = fake_single(tmp_path / "solo", steps=20)
    records = load_run(root).sites[0].records
    kept = [r for r in records if "loss" not in r or r["step"] % 4 == 0]  # log_every 4: step 10 is not logged
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    run = load_run(root)
    segs = site_timeline(run.sites[0], t0=run.start_time)
    val_10 = next(r for r in kept if r.get("val_loss") and r["step"] == 10)
    (eval_10,) = [s for s in segs if s.kind == "eval" and "step 10" in s.label]
    assert eval_10.end == pytest.approx(val_10["time"] - run.start_time)
    assert eval_10.seconds == pytest.approx(0.04, abs=1e-6)  # what the counters leave, less the checkpoint
    assert busy_shares(segs)["compute"] == pytest.approx(run.sites[0].steps[-1]["compute_seconds"], rel=1e-6)
    labels = [s.label for s in segs if s.kind == "compute"]
    assert labels[0].startswith("steps 1-10") and labels[1].startswith("steps 11-20"), labels
    main_row = sorted((s for s in segs if s.row == "site"), key=lambda s: s.start)
    for a, b in zip(main_row, main_row[1:]):
        assert b.start >= a.end - 1e-6, (a, b)


def test_timeline_without_a_final_record_uses_the_exchange_counters(tmp_path: Path) -> None:
    run = load_run(fake_run(tmp_path / "r", sites=("east", "west")))
    site = run.sites[0]
    site.records = [r for r in site.records if "theta_digest" not in r]  # a run cut short
    exchanges = [s for s in site_timeline(site, t0=run.start_time) if s.kind == "exchange"]
    assert len(exchanges) == 4
    assert exchanges[0].seconds == pytest.approx(0.3)


def test_timeline_reads_the_exchange_evaluation_and_checkpoint_records(tmp_path: Path) -> None:
    run = load_run(fake_run(tmp_path / "r", sites=("east", "west"), failures=True, exact=True))
    east = run.sites[0]
    segs = site_timeline(east, t0=run.start_time)
    # Exact durations from the records, not what the counters leave between two records.
    evals = [s for s in segs if s.kind == "eval"]
    assert [round(s.seconds, 6) for s in evals] == [0.03, 0.03]
    ckpts = [s for s in segs if s.kind == "checkpoint"]
    assert len(ckpts) == 2  # step 10's directory was pruned: its record still places it
    assert all(s.seconds == pytest.approx(0.05) for s in ckpts)
    # Every round from its `sending` record to its `applied` one; round 2 failed.
    wan = sorted((s for s in segs if s.row == "wan" and s.kind in ("exchange", "failure")), key=lambda s: s.start)
    assert [s.kind for s in wan] == ["exchange", "failure", "exchange", "exchange"]
    assert all(s.seconds == pytest.approx(0.3 + 0.1) for s in wan)  # the wait (0.3) plus the slow site (0.1)
    assert wan[1].label == "round 2: sent at step 10, failed at step 10"
    main_row = sorted((s for s in segs if s.row == "site"), key=lambda s: s.start)
    for a, b in zip(main_row, main_row[1:]):
        assert b.start >= a.end - 1e-6, (a, b)


def test_measures_per_site_and_per_link(tmp_path: Path) -> None:
    run = load_run(fake_run(tmp_path / "r"))
    ms = {m.name: m for m in site_measures(run)}
    # MFU: tokens x training FLOPs per token / wall seconds / peak (cpu 0.1 TFLOP/s, west / slowdown 2).
    from atoll.planner.cost import training_flops_per_token

    fpt = training_flops_per_token(run.model, seq_len=128)
    east, west = ms["east"], ms["west"]
    assert east.mfu == pytest.approx(east.tokens * fpt / east.wall_seconds / 0.1e12)
    assert west.mfu == pytest.approx(west.tokens * fpt / west.wall_seconds / 0.05e12)
    assert "slowdown 2" in west.peak_note
    links = {lk.site: lk for lk in link_measures(run)}
    assert links["west"].up_mbps == 4
    assert links["west"].share_while_busy == pytest.approx(400_000 * 8 / 1.2 / 4e6)


def test_mfu_and_link_rates_are_na_without_a_topology(tmp_path: Path) -> None:
    run = load_run(fake_run(tmp_path / "r", topology=False))
    assert all(m.mfu is None and m.peak_note.startswith("n/a") for m in site_measures(run))
    assert all(lk.up_mbps is None and lk.share_while_busy is None for lk in link_measures(run))
    assert any("no topology" in n for n in run.notes)
    page = render_report([run])
    assert "n/a" in page and "no topology" in page


def test_agreement_finds_sites_that_differ(tmp_path: Path) -> None:
    same = agreement(load_run(fake_run(tmp_path / "a", sites=("east", "west"))))
    assert same.final_agree is True
    assert same.checked_steps == [5, 10, 15, 20] and same.differing_steps == []
    differ = load_run(fake_run(tmp_path / "b", sites=("east", "west"), digests={"west": "cd" * 32}))
    assert agreement(differ).final_agree is False
    assert "DIFFER" in render_report([differ])


def test_multi_site_page_is_self_contained_with_one_lane_per_site(tmp_path: Path) -> None:
    root = fake_run(tmp_path / "r", failures=True)
    out = write_run_report(root)
    assert out == root / "report.html"
    page = out.read_text(encoding="utf-8")
    # Nothing is fetched: no external script, style, image or font.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "<link" not in page
    figures = _figures(page)
    assert len(figures) >= 7
    assert all('data-series="0"' not in f for f in figures)
    assert re.findall(r'data-lanes="(\d+)"', page) == ["3"]
    assert re.findall(r'<g class="lane" data-site="([a-z]+)"', page) == ["east", "west", "north"]
    for text in ("Loss against tokens", "Loss against wall-clock", "WAN bytes", "Uplink throughput", "MFU", "int8"):
        assert text in page
    assert "waits on the slowest link, <b>west</b>" in page


def test_single_site_page_has_no_wan_section(tmp_path: Path) -> None:
    page = render_report([load_run(fake_single(tmp_path / "solo"))])
    assert re.findall(r'data-lanes="(\d+)"', page) == ["1"]
    assert "<h3>WAN</h3>" not in page
    assert "none (one site)" in page


def test_several_runs_side_by_side_through_the_cli(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "a" / "tiny", sites=("east", "west"))
    b = fake_single(tmp_path / "b" / "tiny")
    out = tmp_path / "both.html"
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(a), str(b), "--out", str(out), "--topology", str(a / "topology.yaml")])
    assert exit_info.value.code == 0
    page = out.read_text(encoding="utf-8")
    assert "2 runs side by side" in page
    assert 'data-run="a/tiny"' in page and 'data-run="b/tiny"' in page  # labels made unique
    assert "a/tiny/east train" in page


def test_a_directory_without_metrics_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_plan_predictions_beside_measurements(tmp_path: Path) -> None:
    root = fake_run(tmp_path / "r", sites=("east", "west"))
    sites = [
        SiteSettings(
            name=n,
            devices=[DeviceCount(kind="cpu", count=1)],
            batch=4,
            inner_steps=5,
            predicted=SitePredicted(step_s=0.123, mfu=0.5, memory_gb=1.0),
        )
        for n in ("east", "west")
    ]
    plan = Plan(
        model="tiny",
        model_params=1000,
        topology="fake-three",
        tokens=1e6,
        seq_len=128,
        global_batch=8,
        steps=20,
        sync=SyncSettings(strategy="diloco", inner_steps=5, codec="int8"),
        sites=sites,
        predicted=Predicted(
            compute_step_s=0.1,
            wall_step_s=0.2,
            sync_s=0.3,
            wan_bytes_per_sync=1e5,
            utilization=0.777,
            time_to_train_s=4.0,
            days=0.0,
            cost_usd=0.0,
        ),
    )
    write_plan(plan, root / "plan.yaml")
    page = write_report([root], out=tmp_path / "p.html").read_text(encoding="utf-8")
    assert "Plan: predicted against measured" in page
    assert "0.123" in page and "77.7%" in page


def test_chain_shows_lineage_and_evaluation(tmp_path: Path) -> None:
    import json

    root = fake_single(tmp_path / "chain" / "netlink")
    results = {
        "sets": ["general", "netlink"],
        "stages": [
            {
                "stage": "general",
                "method": "pretrain",
                "ppl": {"general": 40.0, "netlink": 90.0},
                "loss": {"general": 3.7, "netlink": 4.5},
            },
            {
                "stage": "netlink",
                "method": "lora",
                "ppl": {"general": 44.0, "netlink": 30.0},
                "loss": {"general": 3.8, "netlink": 3.4},
            },
        ],
    }
    (tmp_path / "chain" / "eval.json").write_text(json.dumps(results), encoding="utf-8")
    run = load_run(root)
    assert run.eval_results == results  # found beside the stage, where `make finetune-demo` writes it
    run.lineage = [
        {"stage": "general", "method": "pretrain", "parent": None, "steps": 100, "tokens": 10_000},
        {
            "stage": "netlink",
            "method": "lora",
            "parent": "runs/chain/general",
            "steps": 20,
            "tokens": 2_000,
            "val_loss": 3.4,
        },
    ]
    html = chain_section(run)
    assert "Lineage (root first)" in html and "runs/chain/general" in html
    assert "30.00 (3.400)" in html


def test_charts_skip_empty_series_and_say_so() -> None:
    assert line_chart([Series("x", [], [], "#000")], title="T", x_label="x", y_label="y").startswith('<p class="na">')
    drawn = line_chart([Series("x", [0, 1, float("nan")], [1, 2, 3], "#000")], title="T", x_label="x", y_label="y")
    assert 'data-points="2"' in drawn
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
