"""The run report in a real browser (issue 15): headless Chromium over the DevTools pipe.

Each test opens the page, and checks that no script error happened, that every plot drew data
(marks with a non-empty box), that the timeline has one lane per site, and that the hover readout
works; it saves a screenshot under the test's temporary folder. Skipped where Chromium is missing
(`make debian-deps` installs Debian's chromium as root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from atoll.report.browser import DevTools, find_chromium
from atoll.report.commands import write_run_report
from tests.conftest import run_atoll, tiny_config
from tests.unit.report_runs import fake_run

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="Chromium is not installed (Debian's chromium: `make debian-deps` as root, or set ATOLL_CHROMIUM)",
)

CHECK = """(() => {
  const visible = e => { const b = e.getBBox(); return b.width > 0 || b.height > 0; };
  const marks = 'g.series polyline, g.series circle, rect.seg, path.seg';
  const plots = Array.from(document.querySelectorAll('figure.plot')).map(f => ({
    title: f.querySelector('figcaption').textContent,
    marks: Array.from(f.querySelectorAll(marks)).filter(visible).length,
  }));
  const lanes = Array.from(document.querySelectorAll('figure.timeline g.lane')).map(g => ({
    site: g.dataset.site, bars: Array.from(g.querySelectorAll('rect.seg')).filter(visible).length,
  }));
  const svg = document.querySelector('figure.plot[data-kind="line"] svg.chart');
  const box = svg.getBoundingClientRect();
  svg.dispatchEvent(new MouseEvent('mousemove', {clientX: box.left + box.width / 2, clientY: box.top + 40}));
  const readout = svg.closest('figure').querySelector('.readout').textContent;
  return {plots, lanes, readout, rendered: document.body.dataset.rendered || null,
          pageErrors: document.body.dataset.errors || null};
})()"""


def _check_in_chromium(page: Path, shot: Path, *, sites: list[str]) -> dict[str, Any]:
    with DevTools(width=1240) as browser:
        result = browser.open(page, expression=CHECK)
        browser.screenshot(shot)
    assert result.errors == [], result.errors
    value = result.value
    assert value["rendered"] == "1" and value["pageErrors"] is None
    empty = [p["title"] for p in value["plots"] if p["marks"] == 0]
    assert value["plots"] and not empty, f"plots without data: {empty}"
    assert [lane["site"] for lane in value["lanes"]] == sites
    assert all(lane["bars"] > 0 for lane in value["lanes"]), value["lanes"]
    assert value["readout"].startswith("x "), value["readout"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return value


def test_report_of_a_three_site_run_with_failures_renders(tmp_path: Path) -> None:
    root = fake_run(tmp_path / "run", failures=True)
    page = write_run_report(root)
    value = _check_in_chromium(page, tmp_path / "report.png", sites=["east", "west", "north"])
    titles = " ".join(p["title"] for p in value["plots"])
    for expected in (
        "Loss against tokens",
        "Loss against wall-clock",
        "timeline",
        "WAN bytes",
        "Uplink",
        "utilization",
    ):
        assert expected in titles


def test_report_of_a_real_two_site_run_renders(tmp_path: Path, tiny_data: Path) -> None:
    topology = Path(__file__).resolve().parents[2] / "examples" / "topologies" / "lab-two-sites.yaml"
    config = tiny_config(
        tmp_path,
        tiny_data,
        train={"steps": 10, "eval_every": 5, "checkpoint_every": 5},
        sync={"strategy": "diloco", "inner_steps": 5, "codec": "int8"},
    )
    proc = run_atoll("train", str(config), "--topology", str(topology), "--wan", "emulated", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "t"
    page = write_run_report(run_dir, topology=topology)
    _check_in_chromium(page, tmp_path / "report.png", sites=["east", "west"])
    html = page.read_text(encoding="utf-8")
    assert "agree</span>" in html  # both sites ended with the same θ digest
