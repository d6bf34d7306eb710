"""A run deployed the way data centers run it, on loopback: `atoll lighthouse` and one `atoll site`
per site as separate processes, and the multi-site launcher that starts exactly those commands,
watching its sites: a site killed with SIGKILL is named in one line and restarted, the other
site is never stopped.

Every process is the real CLI (torchft Lighthouse, gloo, the trainer); nothing is mocked.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from atoll.report.metrics import read_metrics
from atoll.sync.lighthouse import parse_ready_line
from atoll.train.checkpoint import latest_checkpoint
from tests.conftest import REPO, tiny_config

TIMEOUT = 300  # seconds for a whole run; the two cores are shared with other jobs


def cli_env() -> dict[str, str]:
    env = dict(os.environ, ATOLL_NO_PROGRESS="1", PYTHONPATH=str(REPO / "src"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ATOLL_RUN_SECRET"):
        env.pop(key, None)
    return env


def atoll(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "atoll.cli", *args], text=True, env=cli_env(), cwd=REPO, **kwargs
    )


def write_topology(path: Path, *, mbps: float = 1000.0, lighthouse: dict[str, str] | None = None) -> Path:
    topology = {
        "name": "deploy-test",
        "sites": [{"name": s, "devices": [{"kind": "cpu", "count": 1, "per_node": 1}]} for s in ("east", "west")],
        "links": [{"site": s, "uplink_mbps": mbps, "latency_ms": 0.0} for s in ("east", "west")],
    }
    if lighthouse is not None:
        topology["lighthouse"] = lighthouse
    path.write_text(yaml.safe_dump(topology), encoding="utf-8")
    return path


def finish(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)  # type: ignore[no-any-return]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the launchers take their children down with them
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"timed out after {timeout} s:\n{err[-4000:]}") from None


def final_checksum(run_dir: Path) -> float:
    (record,) = [r for r in read_metrics(run_dir) if "sync_applied" in r]
    return float(record["params_checksum"])


def test_lighthouse_and_two_site_processes_train_a_run_to_the_end(tmp_path: Path, tiny_data: Path) -> None:
    # east: `atoll site --nproc 2` supervises its two ranks; west: torchrun starts two `atoll site`
    # processes, each of which becomes one rank (as on a site's nodes).
    topology = write_topology(tmp_path / "topology.yaml")  # no lighthouse.address: the sites get --lighthouse
    cfg = tiny_config(
        tmp_path,
        tiny_data,
        train={"steps": 4, "checkpoint_every": 0, "eval_every": 0},
        sync={"strategy": "diloco", "inner_steps": 2},
    )
    secret = tmp_path / "dc" / "run.secret"
    lighthouse = atoll(
        "lighthouse", "--bind", "127.0.0.1:0", "--topology", str(topology), "--secret-file", str(secret),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert lighthouse.stdout is not None
        url = parse_ready_line(lighthouse.stdout.readline().strip())
        assert url is not None and url.startswith("http://127.0.0.1:"), url
        assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_text().strip()) >= 32
        assert str(secret) in lighthouse.stdout.readline() + lighthouse.stdout.readline()
        site_args = [str(cfg), "--topology", str(topology), "--lighthouse", url.removeprefix("http://")]
        site_args += ["--secret-file", str(secret)]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        sites = {
            "east": atoll("site", *site_args, "--site", "east", "--nproc", "2", **pipes),
            "west": subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                + ["-m", "atoll.cli", "site", *site_args, "--site", "west"],
                text=True, env=cli_env(), cwd=REPO, **pipes,
            ),
        }  # fmt: skip
        outputs = {name: finish(proc) for name, proc in sites.items()}
        for name, proc in sites.items():
            assert proc.returncode == 0, outputs[name][1][-4000:]
            # Run standalone, a site reports its own outcome (no launcher above it).
            assert f"sites/{name}" in outputs[name][0] and "step 4" in outputs[name][0], outputs[name][0]
    finally:
        lighthouse.send_signal(signal.SIGTERM)
        out, _ = lighthouse.communicate(timeout=30)
    assert lighthouse.returncode == 0 and "lighthouse stopped" in out
    dirs = {name: tmp_path / "runs" / "t" / "sites" / name for name in ("east", "west")}
    assert final_checksum(dirs["east"]) == final_checksum(dirs["west"])  # one model, synced over the lighthouse
    for d in dirs.values():
        assert [r["step"] for r in read_metrics(d) if "loss" in r] == [1, 2, 3, 4]


def test_a_site_without_the_runs_secret_is_refused_in_one_line(tmp_path: Path, tiny_data: Path) -> None:
    topology = write_topology(tmp_path / "topology.yaml", lighthouse={"address": "127.0.0.1:9"})
    cfg = tiny_config(tmp_path, tiny_data)
    proc = atoll("site", str(cfg), "--topology", str(topology), "--site", "east", stderr=subprocess.PIPE)
    _, err = finish(proc, timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [
        "atoll: error: atoll site needs the run's secret: --secret-file PATH (the file `atoll lighthouse "
        "--secret-file` wrote, copied to this machine), or ATOLL_RUN_SECRET / ATOLL_RUN_SECRET_FILE"
    ]
    assert not (tmp_path / "runs").exists()


def site_pids(topology: Path, site: str) -> list[int]:
    """Pids of the `atoll site` processes of `site` started for this test's topology."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "site" in words and str(topology.resolve()) in words and words[words.index("--site") + 1] == site:
            pids.append(int(entry.name))
    return pids


class Lines:
    """A child's stderr, line by line, collected in the background."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "\n".join(self.lines)


def wait_for(condition: object, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(TIMEOUT + 120)
def test_a_killed_site_is_named_and_restarted_while_the_other_goes_on(tmp_path: Path, tiny_data: Path) -> None:
    # 8 Mbit/s emulated: each exchange of the tiny model's 0.5 MB takes ~0.5 s, so the run lasts
    # long enough for the kill to land while both sites are training.
    topology = write_topology(tmp_path / "topology.yaml", mbps=8.0, lighthouse={"site": "east"})
    steps = 24
    cfg = tiny_config(
        tmp_path,
        tiny_data,
        train={"steps": steps, "checkpoint_every": 4, "eval_every": 0},
        sync={"strategy": "diloco", "inner_steps": 2, "min_sites": 1, "timeout_seconds": 60},
    )
    launcher = atoll(
        "train", str(cfg), "--topology", str(topology), "--wan", "emulated", "--restart-sites", "1",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = Lines(launcher.stdout), Lines(launcher.stderr)  # read as they come: the test watches the run
    dirs = {name: tmp_path / "runs" / "t" / "sites" / name for name in ("east", "west")}
    try:
        # The fault: once west has a complete checkpoint, SIGKILL its `atoll site` process.
        wait_for(lambda: latest_checkpoint(dirs["west"]) is not None, timeout=TIMEOUT, what="west's first checkpoint")
        (east_pid,) = site_pids(topology, "east")
        (west_pid,) = site_pids(topology, "west")
        os.kill(west_pid, signal.SIGKILL)
        launcher.wait(timeout=TIMEOUT)
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)  # the launcher takes its sites down with it
            launcher.wait(timeout=60)
    stderr = err.text()
    reports = [line for line in stderr.splitlines() if line.startswith("atoll: site ")]
    assert len(reports) == 1, stderr[-4000:]
    found = re.fullmatch(
        r"atoll: site west was killed by SIGKILL at step (\d+); restarting it from its checkpoint at step (\d+) "
        r"\(restart 1 of 1\)",
        reports[0],
    )
    assert found, reports[0]
    assert int(found.group(1)) >= int(found.group(2)) >= 4
    # The healthy site was started once and never stopped: the same process ran east to the end.
    assert stderr.count("site east started") == 1 and stderr.count("site west started") == 2, stderr[-6000:]
    assert "site east finished" in stderr
    said = [line for line in stderr.splitlines() if line.startswith("atoll: ")]
    assert not [line for line in said if "east" in line], said
    assert max(r["step"] for r in read_metrics(dirs["east"]) if "loss" in r) == steps
    assert east_pid not in site_pids(topology, "east")  # it ended on its own, the launcher waited for it
    # The restarted west resumed from its checkpoint and trained to the end: the run succeeds.
    assert launcher.returncode == 0, stderr[-4000:]
    assert max(r["step"] for r in read_metrics(dirs["west"]) if "loss" in r) == steps
    # rich wraps the summary at the terminal width, at a space or inside a long path: compare without whitespace
    assert f"sites/westreachedstep{steps}" in "".join(out.text().split())


def test_a_launchers_children_die_with_it_even_when_it_is_killed() -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from atoll.parallel.launch import die_with_parent\n"
            "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
            "child = subprocess.Popen(sleeper, preexec_fn=die_with_parent)\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait(timeout=30)
    wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in _state(child), timeout=30, what="the child to die")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def flaky_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], plan: str, *, restarts: int
) -> tuple[int, list[str], Path]:
    """`launch_sites` over `flaky_site` ranks: the launcher's policy without training."""
    from atoll.config.topology import load_topology
    from atoll.sync.launch import LoopbackHost, launch_sites

    topology = write_topology(tmp_path / "topology.yaml", lighthouse={"site": "east"})
    state = tmp_path / "state"
    state.mkdir()
    for key, value in cli_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "src")]))
    monkeypatch.setenv("FLAKY_PLAN", plan)
    monkeypatch.setenv("FLAKY_DIR", str(state))
    capfd.readouterr()
    code = launch_sites(
        [str(tmp_path / "unused.yaml")],
        topology=load_topology(topology),
        topology_path=topology,
        ranks_per_site=1,
        wan_mode="none",
        host=LoopbackHost(),
        site_dirs={s: tmp_path / s for s in ("east", "west")},
        restarts=restarts,
        module="tests.dist.flaky_site",
    )
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("atoll: ")]
    return code, lines, state


def test_a_failed_site_is_restarted_from_the_beginning_and_the_run_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # status 3: a run failure (e.g. sites that could not confirm agreement), restarted like a crash
    code, lines, state = flaky_run(tmp_path, monkeypatch, capfd, "west=3,0;east=wait", restarts=1)
    assert code == 0
    assert lines == [
        "atoll: site west exited with status 3 before its first step; restarting it from the beginning "
        "(no complete checkpoint yet) (restart 1 of 1)"
    ]
    assert sorted(p.name for p in state.iterdir()) == [
        "east.attempt0",
        "east.finished",
        "west.attempt0",
        "west.attempt1",
    ]


def test_a_site_out_of_restarts_is_lost_and_the_others_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    code, lines, state = flaky_run(tmp_path, monkeypatch, capfd, "west=3;east=wait", restarts=0)
    assert code == 3  # the lost site's status is the run's
    assert lines == [
        (
            "atoll: site west exited with status 3 before its first step; not restarted (--restart-sites 0); "
            "the other sites go on (east)"
        )
    ]
    assert (state / "east.finished").exists()  # east ran to its end: nobody stopped it


def test_a_mistake_in_the_config_stops_every_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLAKY_WAIT_SECONDS", "120")
    code, lines, state = flaky_run(tmp_path, monkeypatch, capfd, "west=2;east=wait", restarts=3)
    assert code == 2
    assert lines == [
        "atoll: site west exited with status 2 before its first step: a mistake in the run's config (its message is "
        "above); stopping the run"
    ]
    assert not (state / "east.finished").exists()  # stopped, not waited for
