"""The live view of a multi-site run (`atoll.report.sites`, `atoll.report.site_state`).

Synthetic ``metrics.jsonl`` files, written record by record as a site's loop writes them, fed to
the watch with a fake clock; the view is rendered into an 80-column rich console and read back.
"""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console

from atoll.report.site_state import MetricsTail, RunShape, SiteHistory, eta_seconds, exchange_state
from atoll.report.sites import SiteWatch

PAYLOAD = 820_668  # bytes one tiny-model exchange sends (lab-two-sites, two sites)
EXCHANGE_SECONDS = 1.96  # ... over a 3.4 Mbit/s link: 3.35 Mbit/s while exchanging
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakeSite:
    """One site's run directory; `step` appends the record the loop logs after a step."""

    def __init__(self, root: Path, name: str, *, strategy: str = "diloco", h: int = 10, log_every: int = 1) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        config = {
            "sync": {"strategy": strategy, "inner_steps": h, "site_inner_steps": {}, "round_seconds": None},
            "train": {"steps": 50, "log_every": log_every},
        }
        (self.dir / "config.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        self.exchanges = 0
        self.wan_seconds = 0.0
        self.wait = 0.0

    def write(self, record: dict[str, Any]) -> None:
        with (self.dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, step: int, time: float, *, exchanged: bool = False, wait: float = 0.0) -> None:
        if exchanged:
            self.exchanges += 1
            self.wan_seconds += EXCHANGE_SECONDS
        self.wait += wait
        self.write(
            {
                "step": step,
                "time": time,
                "loss": 7.0 - step / 100,
                "tokens_per_s": 10_240.0,
                "tokens_seen": 1024 * step,
                "step_seconds": 1.0,
                "compute_seconds": 0.9 * step,  # a step computes 0.9 s
                "compute_utilization": 0.875,
                "wan_bytes_sent": PAYLOAD * self.exchanges,
                "wan_bytes_received": PAYLOAD * self.exchanges,
                "wan_exchanges": self.exchanges,
                "wan_seconds": self.wan_seconds,
                "wan_failed": 0,
                "sync_wait_seconds": self.wait,
                "sync_round": self.exchanges,
                "heals": 0,
            }
        )


def _screen(watch: SiteWatch, clock: Clock, width: int = 80) -> list[str]:
    watch.poll()
    buf = StringIO()
    Console(file=buf, width=width, force_terminal=True, color_system=None).print(watch.render(now=clock.now))
    lines = buf.getvalue().splitlines()
    assert all(cell_len(line) <= width for line in lines), "\n".join(lines)
    return lines


def _row(lines: list[str], name: str) -> str:
    rows = [line for line in lines if line.startswith(name)]
    assert rows, "\n".join(lines)
    return rows[0]


@pytest.fixture
def two_sites(tmp_path: Path) -> tuple[FakeSite, FakeSite, SiteWatch, Clock]:
    east, west = FakeSite(tmp_path, "east"), FakeSite(tmp_path, "west")
    clock = Clock()
    watch = SiteWatch(
        {"east": east.dir, "west": west.dir},
        total_steps={"east": 50, "west": 50},
        console=Console(file=StringIO(), width=80, force_terminal=True),
        links={"east": (3.4, 3.4), "west": (3.4, 3.4)},
        clock=clock,
    )
    return east, west, watch, clock


def test_derived_states_mb_rates_and_eta_in_80_columns(two_sites: tuple[FakeSite, FakeSite, SiteWatch, Clock]) -> None:
    east, west, watch, clock = two_sites
    lines = _screen(watch, clock)
    assert lines[0].split() == ["site", "step", "loss", "tok/s", "util", "exchange", "MB", "sent", "ETA"]
    assert _row(lines, "east").split() == ["east", "0/50", "-", "-", "-", "-", "-", "-"]
    for step in range(1, 10):  # one step a second, no exchange yet
        east.step(step, T0 + step)
        west.step(step, T0 + step)
    clock.now = T0 + 9.5
    row = _row(_screen(watch, clock), "east").split()
    assert row == ["east", "9/50", "6.9100", "1.0k", "88%", "-", "0.0", "0:41"]  # 41 steps left, 1 s each

    clock.now = T0 + 11.0  # step 10 is a round boundary and its record is late (>0.9 s + 0.5 s): the exchange runs
    assert _row(_screen(watch, clock), "east").split()[5:7] == ["sending", "r1"]

    east.step(10, T0 + 12.0, exchanged=True)  # applied; the link carried 3.35 Mbit/s of its 3.4
    clock.now = T0 + 12.2
    lines = _screen(watch, clock)
    assert _row(lines, "east").split()[5:8] == ["applied", "r1", "0.8"]
    assert _row(lines, "west").split()[5:7] == ["sending", "r1"]  # west has not logged step 10 yet
    link = lines.index(next(line for line in lines if line.startswith("link Mb/s")))
    east_link = _row(lines[link:], "east").split()
    assert east_link[2:5] == ["3.35", "3.40", "99%"]  # in the exchange, of the uplink, use
    assert east_link[1] == f"{PAYLOAD * 8 / 11 / 1e6:.2f}"  # the bytes of the 11 s since step 1

    for step in range(11, 20):
        east.step(step, T0 + 1 + step)
    clock.now = T0 + 20 + 1.7  # late at the next boundary, but less than an exchange takes: sending
    assert _row(_screen(watch, clock), "east").split()[5:7] == ["sending", "r2"]
    clock.now = T0 + 20 + 3.0  # longer than its exchanges take: waiting for the others
    assert _row(_screen(watch, clock), "east").split()[5:7] == ["waiting", "r2"]


def test_quiet_away_from_a_boundary_and_a_failed_round(tmp_path: Path) -> None:
    site = FakeSite(tmp_path, "east")
    history = SiteHistory()
    shape = RunShape.read(site.dir, "east")
    tail = MetricsTail(site.dir / "metrics.jsonl")
    for step in range(1, 6):
        site.step(step, T0 + step)
    for record in tail.poll()[1]:
        history.add(record)
    assert exchange_state(history, shape, now=T0 + 5.5) == "-"
    assert exchange_state(history, shape, now=T0 + 47) == "quiet 42s"  # an evaluation, a checkpoint, a stall
    site.write({"step": 6, "time": T0 + 48, "loss": 6.9, "wan_exchanges": 0, "wan_failed": 1})
    for record in tail.poll()[1]:
        history.add(record)
    assert exchange_state(history, shape, now=T0 + 48.1) == "failed"


def test_exchange_records_give_the_exact_state(tmp_path: Path) -> None:
    """The records the loop writes when it has them: they win over the guesses, and a unit sent
    behind the steps (delayed, streaming) is in flight until it is waited for and applied."""
    site = FakeSite(tmp_path, "east", strategy="delayed")
    history, shape = SiteHistory(), RunShape.read(site.dir, "east")
    tail = MetricsTail(site.dir / "metrics.jsonl")

    def state(now: float) -> str:
        for record in tail.poll()[1]:
            history.add(record)
        return exchange_state(history, shape, now=now)

    for step in range(1, 10):
        site.step(step, T0 + step)
    site.write({"step": 10, "time": T0 + 10.0, "exchange": "sending", "exchange_round": 1})
    assert state(T0 + 10.1) == "sending r1"
    site.step(10, T0 + 10.2)
    assert state(T0 + 10.3) == "in flight r1"
    for step in range(11, 20):
        site.step(step, T0 + step + 0.2)
    site.write({"step": 20, "time": T0 + 20.3, "exchange": "waiting", "exchange_round": 1})
    assert state(T0 + 25) == "waiting r1"
    site.write({"step": 20, "time": T0 + 26, "exchange": "applied", "exchange_round": 1})
    assert state(T0 + 26.1) == "applied r1"
    site.write({"step": 20, "time": T0 + 26.2, "exchange": "failed", "exchange_round": 2})
    assert state(T0 + 26.3) == "failed r2"
    site.step(20, T0 + 26.4)
    assert state(T0 + 26.5) == "failed r2"
    assert state(T0 + 60) == "quiet 34s"  # late, and no exchange record says why: not an exchange


def test_a_lost_and_a_restarted_site(two_sites: tuple[FakeSite, FakeSite, SiteWatch, Clock]) -> None:
    east, west, watch, clock = two_sites
    for step in range(1, 9):
        east.step(step, T0 + step)
        west.step(step, T0 + step)
    clock.now = T0 + 8.5
    _screen(watch, clock)
    watch.mark("east", "lost")
    clock.now = T0 + 9
    watch.mark("west", "restarted 1x")
    lines = _screen(watch, clock)
    assert _row(lines, "east").split()[5:] == ["lost", "0.0", "-"]
    assert _row(lines, "west").split()[5:] == ["restarting", "0.0", "-"]
    assert lines[-1] == "east lost; west restarted 1x"

    # west resumes from its checkpoint at step 5: its metrics are cut back there, then it goes on
    kept = (west.dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    (west.dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    row = _row(_screen(watch, clock), "west").split()
    assert row[1] == "5/50" and row[5] == "restarting"
    for step in range(6, 9):
        west.step(step, T0 + 20 + 2 * step)  # slower now: 2 s a step, measured since the restart
    clock.now = T0 + 36.5
    row = _row(_screen(watch, clock), "west").split()
    assert row[1] == "8/50" and row[5] == "-" and row[-1] == "1:24"  # 42 steps x 2 s
    assert _screen(watch, clock)[-1] == "east lost; west restarted 1x"
    watch.mark("west", "done")  # it finished: its row says so, the line under the tables still tells its story
    lines = _screen(watch, clock)
    assert _row(lines, "west").split()[5:] == ["done", "0.0", "done"] and lines[-1] == "east lost; west restarted 1x"


def test_a_site_restarted_from_the_beginning_starts_over(tmp_path: Path) -> None:
    site = FakeSite(tmp_path, "east")
    history = SiteHistory()
    tail = MetricsTail(site.dir / "metrics.jsonl")
    for step in range(1, 11):
        site.step(step, T0 + step, exchanged=step == 10)
    site.exchanges = 0
    site.step(1, T0 + 30)  # no checkpoint: it appends from step 1 again
    for record in tail.poll()[1]:
        history.add(record)
    assert [r["step"] for r in history.steps] == [1]
    assert history.applied_round is None


def test_tail_reads_complete_lines_and_notices_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.poll() == (False, [])
    path.write_text('{"step": 1}\n{"step": 2', encoding="utf-8")  # the loop is writing line 2
    assert tail.poll() == (False, [{"step": 1}])
    with path.open("a", encoding="utf-8") as f:
        f.write("}\n")
    assert tail.poll() == (False, [{"step": 2}])
    path.write_text('{"step": 1}\n{"step": 9}\n', encoding="utf-8")  # rewritten, no shorter
    assert tail.poll() == (True, [{"step": 1}, {"step": 9}])


def test_run_shape_and_eta(tmp_path: Path) -> None:
    site = FakeSite(tmp_path, "east", h=10, log_every=5)
    assert RunShape.read(site.dir, "east") == RunShape(strategy="diloco", inner_steps=10, log_every=5, total_steps=50)
    assert RunShape.read(tmp_path / "nowhere", "east") == RunShape()
    raw = {"sync": {"strategy": "diloco", "inner_steps": 10, "site_inner_steps": {"east": 20}}, "train": {"steps": 55}}
    (site.dir / "config.yaml").write_text(json.dumps(raw), encoding="utf-8")
    assert RunShape.read(site.dir, "east").total_steps == 100  # 5 rounds of its own H (site_steps)
    assert RunShape.read(site.dir, "west").total_steps == 50
    history = SiteHistory()
    assert eta_seconds(history, RunShape(), total_steps=50) is None
    history.add({"step": 5, "time": T0, "loss": 1.0, "step_seconds": 0.5})
    assert eta_seconds(history, RunShape(), total_steps=50) == 45 * 0.5  # one record: its step time
    history.add({"step": 10, "time": T0 + 10, "loss": 1.0, "step_seconds": 0.5})
    assert eta_seconds(history, RunShape(), total_steps=50) == 40 * 2.0  # wall time per step


def test_off_when_not_a_terminal(tmp_path: Path) -> None:
    site = FakeSite(tmp_path, "east")
    site.step(1, T0)
    out = StringIO()
    watch = SiteWatch({"east": site.dir}, total_steps={"east": 50}, console=Console(file=out, width=80))
    assert not watch.enabled
    with watch:
        watch.refresh()
        watch.mark("east", "done")
    assert out.getvalue() == ""


def test_drawn_on_a_terminal_within_80_columns(tmp_path: Path) -> None:
    names = ["us-west", "eu-central", "asia-east-backup-7"]
    sites = {n: FakeSite(tmp_path, n) for n in names}
    for s in sites.values():
        if s is not sites["asia-east-backup-7"]:
            s.step(1, T0 + 1)
    big = sites["asia-east-backup-7"]  # the widest row a long run gives
    big.write({"step": 99_999, "time": T0 - 10, "loss": 10.3745, "tokens_seen": 0, "wan_bytes_sent": 123_456e6})
    big.write({"step": 100_000, "time": T0, "loss": 10.3745, "tokens_seen": 999_900, "wan_bytes_sent": 123_456e6})
    big.write({"step": 100_000, "time": T0 + 0.5, "exchange": "waiting", "exchange_round": 1234})
    out = StringIO()
    clock = Clock()
    clock.now = T0 + 1.5
    watch = SiteWatch(
        {n: s.dir for n, s in sites.items()},
        total_steps={n: 123_456 for n in names},
        console=Console(file=out, width=80, force_terminal=True, color_system=None),
        links={n: (4000.0, 4000.0) for n in names},
        clock=clock,
    )
    with watch:
        watch.mark("eu-central", "restarted 12x")
    text = out.getvalue()
    assert "1/123456" in text and "asia-east-b" in text and "eu-central restarted 12x" in text
    lines = _screen(watch, clock)
    assert lines[0].split()[:2] == ["site", "step"] and "ETA" in lines[0]
    assert _row(lines, "asia-east").split()[1:] == ["100000/123456", "10.374", "100.0k", "-", "waiting", "r1234"] + [
        "123.5k",
        "65:09:20",  # 23,456 steps of 10 s
    ]
    assert _row(lines, "us-west").split()[-1] == "34:17:35"  # 123,455 steps of 1 s (one record: its step time)


def test_the_launcher_gives_the_view_each_sites_link() -> None:
    from atoll.config.topology import load_topology
    from atoll.sync.launch import link_mbps

    repo = Path(__file__).resolve().parents[2]
    assert link_mbps(load_topology(repo / "examples/topologies/lab-two-sites.yaml")) == {
        "east": (3.4, 3.4),
        "west": (3.4, 3.4),
    }


def test_a_standalone_site_draws_its_view_while_its_ranks_run(tmp_path: Path) -> None:
    """`atoll site` without a launcher: `run_site_ranks` refreshes the watch while it waits and
    marks the site done when its ranks exit 0 (a stand-in rank writes two records)."""
    from atoll.deploy.site import SitePlacement, run_site_ranks, site_watch
    from atoll.sync.site_env import SiteEnv

    site = FakeSite(tmp_path, "east")
    (tmp_path / "fake_rank.py").write_text(
        "import json, sys, time\n"
        "with open(sys.argv[1], 'a') as f:\n"
        "    for step in (1, 2):\n"
        "        f.write(json.dumps({'step': step, 'time': time.time(), 'loss': 5.5, 'compute_seconds': 0.1,\n"
        "                            'tokens_seen': 1024 * step, 'wan_bytes_sent': 0}) + '\\n')\n",
        encoding="utf-8",
    )
    env_site = SiteEnv(
        site="east",
        index=0,
        num_sites=2,
        topology=tmp_path / "topology.yaml",
        lighthouse="http://127.0.0.1:1",
        address="127.0.0.1",
        wan_mode="emulated",
    )
    placement = SitePlacement(env=env_site, nproc=1, store_port=0)
    assert site_watch(placement, site.dir) is None  # pytest's stderr is no terminal: no view
    out = StringIO()
    watch = SiteWatch({"east": site.dir}, total_steps={}, console=Console(file=out, width=80, force_terminal=True))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    module_args = [str(site.dir / "metrics.jsonl")]
    assert run_site_ranks(placement, module="fake_rank", module_args=module_args, env=env, watch=watch) is None
    last_frame = out.getvalue().split("site")[-1]
    assert "2/50" in last_frame and "done" in last_frame  # 50 steps: from the site's config.yaml
