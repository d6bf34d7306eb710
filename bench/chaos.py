"""Chaos benchmark: kill sites, cut a link and send a joiner with the wrong secret into real runs.

    PYTHONPATH=src .venv/bin/python bench/chaos.py            # the whole grid (~15 min on 2 shared cores)
    PYTHONPATH=src .venv/bin/python bench/chaos.py --resume   # skip trials already in bench/results/chaos.json
    PYTHONPATH=src .venv/bin/python bench/chaos.py --only kill-west-checkpoint-36 --resume

Not a test: every trial is a whole run of the real CLI (`atoll lab run`, or `atoll train --topology
--wan emulated` where the netns lab cannot be built), with the fault injected from outside by
this script, as an operator or a failing data center would inject it:

- `kill_site`: SIGKILL of a site's `atoll site` process and its ranks (the whole site), at a step
  picked for a phase: inner compute (right after a step between exchanges was logged), an
  exchange (shortly after the step before a round boundary was logged, while the link carries
  the round), or a checkpoint (while `checkpoints/step_N.tmp` exists). The launcher names the
  dead site and restarts it from its checkpoint (`--restart-sites`, 3 in the lab).
- `cut_link`: the site's veth (its WAN-side end, in the lab's `wan` namespace) down for longer
  than an exchange timeout, then up: once between exchanges, once while a round is on the wire.
  Needs the netns lab; not run in emulated mode.
- `wrong_secret`: an extra `atoll site` (a third site name, its own three-site topology) started
  with a different ATOLL_RUN_SECRET against the run's lighthouse, from inside west's namespace.

Each trial's record is written to bench/results/chaos.{json,md} as soon as it finishes, so that
`--resume` picks up where an interrupted grid stopped. Run directories stay under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from chaos_results import LATENCY_MS, MBPS, RESULTS, final_record, stall_figures, write_results  # noqa: E402

from atoll.config import RunConfig, load_config  # noqa: E402
from atoll.data import prepare_demo_data  # noqa: E402
from atoll.errors import AtollError  # noqa: E402
from atoll.lab.netns import IFACE_PREFIX, NETNS_PREFIX, STATE_DIR, lab_available  # noqa: E402
from atoll.report.metrics import read_metrics  # noqa: E402
from atoll.rundir.layout import read_model_json  # noqa: E402
from atoll.rundir.load import check_site_digests  # noqa: E402
from atoll.train.checkpoint import checkpoints_dir, verify_checkpoint  # noqa: E402

CONFIG = REPO / "examples" / "configs" / "tiny.yaml"
ATOLL = [sys.executable, "-m", "atoll.cli"]
POLL_S = 0.02
TRIAL_LIMIT_S = 420.0
CUT_SLOWDOWN = 10.0  # the between-exchanges cut's sites: see grid()


@dataclass(frozen=True)
class Trial:
    name: str
    fault: str  # none, kill_site, cut_link, wrong_secret
    sites: tuple[str, ...] = ("east", "west")
    site: str | None = None  # the site the fault hits
    phase: str = "none"  # compute, exchange, checkpoint, join
    after_step: int = 0  # the fault is injected once the site has logged this step
    slowdown: float = 1.0  # every site's emulated slowdown (compute, then sleep): the same θ, longer steps


def grid(steps: int, h: int, ckpt: int) -> list[Trial]:
    """The trials: fault-free references, six kills over three phases, a cut, a wrong secret, a 3-site kill,
    and the 2-site fault-free run once more (with `sync.min_sites=1` the sites' start is a race, so
    two fault-free runs need not end alike: the rerun says how much of a trial's loss is that)."""
    two, three = ("east", "west"), ("east", "west", "north")
    last_ckpt = max(s for s in range(ckpt, steps, ckpt) if s % h)  # a checkpoint between round boundaries
    first_ckpt = min(s for s in range(2 * ckpt, steps, ckpt) if s % h)
    return [
        Trial("fault-free", "none", two),
        Trial("fault-free-3site", "none", three),
        Trial(f"kill-west-compute-{h + 4}", "kill_site", two, "west", "compute", h + 3),
        Trial(f"kill-east-compute-{5 * h + 4}", "kill_site", two, "east", "compute", 5 * h + 3),
        Trial(f"kill-west-exchange-{3 * h}", "kill_site", two, "west", "exchange", 3 * h - 1),
        Trial(f"kill-east-exchange-{6 * h}", "kill_site", two, "east", "exchange", 6 * h - 1),
        Trial(f"kill-west-checkpoint-{first_ckpt}", "kill_site", two, "west", "checkpoint", first_ckpt - 2),
        Trial(f"kill-west-checkpoint-{last_ckpt}", "kill_site", two, "west", "checkpoint", last_ckpt - 2),
        # A lone survivor's round costs no exchange, so at the tiny model's 0.05 s a step east would
        # finish the run alone within 2 s of dropping west, long before the link is back (the first
        # recorded cut-west: west came back to no peer). Steps of ~0.5 s on both sites (alike, so
        # the split and θ stay those of the fault-free run) keep the survivor training past the cut,
        # as a real run's rounds of minutes would.
        Trial("cut-west", "cut_link", two, "west", "compute", 2 * h + 2, slowdown=CUT_SLOWDOWN),
        Trial(f"cut-west-exchange-{5 * h}", "cut_link", two, "west", "exchange", 5 * h - 1),
        Trial("wrong-secret-joiner", "wrong_secret", two, "mallory", "join", h // 2),
        Trial(f"kill-north-compute-{3 * h + 3}-3site", "kill_site", three, "north", "compute", 3 * h + 2),
        Trial("fault-free-rerun", "none", two),  # the same run again: how far apart two fault-free runs end
    ]


# ---------------------------------------------------------------- small helpers


def write_topology(path: Path, sites: tuple[str, ...], *, slowdown: float = 1.0) -> Path:
    device: dict[str, Any] = {"kind": "cpu", "count": 1, "per_node": 1}
    if slowdown != 1.0:
        device["slowdown"] = slowdown
    topo = {
        "name": f"chaos-{len(sites)}-sites",
        "sites": [{"name": s, "devices": [dict(device)]} for s in sites],
        "links": [{"site": s, "uplink_mbps": MBPS, "latency_ms": LATENCY_MS} for s in sites],
        "lighthouse": {"site": sites[0]},
    }
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ, ATOLL_NO_PROGRESS="1", PYTHONPATH=str(REPO / "src"), COLUMNS="250")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "ATOLL_RUN_SECRET", "ATOLL_RUN_SECRET_FILE"):
        env.pop(key, None)
    return env


class Tail:
    """New JSON records of a site's metrics.jsonl, read as they are appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.last_step = -1
        self.last_seen = 0.0  # monotonic time the last step record was read

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec:
                self.last_step = int(rec["step"])
                self.last_seen = time.monotonic()


def site_pids(topology: Path, site: str, *, exclude: set[int]) -> list[int]:
    """Pids of the `atoll site` processes of `site` started for `topology` (as tests/dist/test_deploy.py)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            words = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "site" in words and str(topology) in words and "--site" in words:
            if words[words.index("--site") + 1] == site:
                pids.append(int(entry.name))
    return pids


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def kill_site(topology: Path, site: str, *, exclude: set[int]) -> list[int]:
    """SIGKILL the site's `atoll site` process and its ranks (collected first: they die with it anyway)."""
    killed = []
    for pid in site_pids(topology, site, exclude=exclude):
        ranks = children(pid)
        for target in (pid, *ranks):
            try:
                os.kill(target, signal.SIGKILL)
                killed.append(target)
            except ProcessLookupError:
                pass
    return killed


def lab_of(launcher_pid: int) -> str | None:
    """The run id of the lab that `launcher_pid` built (its ownership record names it)."""
    for record in STATE_DIR.glob("*.json") if STATE_DIR.is_dir() else []:
        try:
            if json.loads(record.read_text()).get("pid") == launcher_pid:
                return record.stem
        except (OSError, ValueError):
            continue
    return None


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30).stdout


def tx_bytes(rid: str, index: int, site: str) -> int:
    """Bytes the site's veth sent, as the kernel counts them."""
    out = ip(
        "-n", f"{NETNS_PREFIX}{rid}-site-{site}", "-s", "-j", "link", "show", "dev", f"{IFACE_PREFIX}{rid}s{index}"
    )
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


# ---------------------------------------------------------------- one trial


def run_trial(trial: Trial, *, args: argparse.Namespace, mode: str, work: Path) -> dict[str, Any]:
    tdir = work / trial.name
    if tdir.exists():
        subprocess.run(["rm", "-rf", str(tdir)], check=True)
    tdir.mkdir(parents=True)
    topology = write_topology(tdir / "topology.yaml", trial.sites, slowdown=trial.slowdown)
    run_root = tdir / "runs" / trial.name
    overrides = [
        f"--run.dir={tdir / 'runs'}",
        f"--run.name={trial.name}",
        f"--train.steps={args.steps}",
        "--train.log_every=1",
        "--train.eval_every=0",
        f"--train.checkpoint_every={args.checkpoint_every}",
        "--sync.strategy=diloco",
        f"--sync.inner_steps={args.inner_steps}",
        "--sync.min_sites=1",
        f"--sync.timeout_seconds={args.timeout}",
    ]
    verb = ["lab", "run"] if mode == "netns" else ["train"]
    wan = [] if mode == "netns" else ["--wan", "emulated", "--restart-sites", "3"]
    argv = [*verb, str(CONFIG.relative_to(REPO)), "--topology", str(topology), *wan, "--no-progress", *overrides]
    log_path = tdir / "launcher.log"
    t0 = time.monotonic()
    with log_path.open("wb") as log_file:
        launcher = subprocess.Popen(
            [*ATOLL, *argv], cwd=REPO, env=cli_env(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    rec: dict[str, Any] = {"trial": trial.name, "fault": trial.fault, "site": trial.site, "phase": trial.phase}
    if trial.slowdown != 1.0:
        rec["slowdown"] = trial.slowdown
    rec["command"] = "atoll " + shlex.join(argv)
    try:
        if trial.fault != "none":
            inject(trial, rec, launcher=launcher, topology=topology, run_root=run_root, args=args, mode=mode, tdir=tdir)
        launcher.wait(timeout=max(1.0, TRIAL_LIMIT_S - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        rec["note"] = f"stopped after {TRIAL_LIMIT_S:.0f} s (SIGINT to the launcher)"
    except (AtollError, subprocess.CalledProcessError) as exc:
        rec["note"] = f"fault not injected: {exc}"
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)  # the launcher tears the lab and its sites down
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    rec["launcher_rc"] = launcher.returncode
    rec["launcher_s"] = round(time.monotonic() - t0, 1)
    text = log_path.read_text(errors="replace")
    rec["launcher_lines"] = [line.strip() for line in text.splitlines() if line.startswith("atoll: ")]
    try:
        measure(trial, rec, run_root=run_root, args=args)
    except (OSError, ValueError, KeyError) as exc:
        rec.update(finished=False, note=f"{rec.get('note', '')} (not measurable: {exc!r})")
    return rec


def wait_step(tail: Tail, step: int, launcher: subprocess.Popen[bytes], *, limit_s: float = 300.0) -> None:
    deadline = time.monotonic() + limit_s
    while tail.last_step < step:
        if launcher.poll() is not None or time.monotonic() > deadline:
            raise AtollError(f"the run ended (or stalled) before step {step} was logged")
        time.sleep(POLL_S)
        tail.poll()


def inject(
    trial: Trial,
    rec: dict[str, Any],
    *,
    launcher: subprocess.Popen[bytes],
    topology: Path,
    run_root: Path,
    args: argparse.Namespace,
    mode: str,
    tdir: Path,
) -> None:
    """Wait for the trial's step on the target site (or on west, for a joiner) and inject its fault."""
    watched = trial.site if trial.site in trial.sites else "west"
    site_dir = run_root / "sites" / watched
    tail = Tail(site_dir / "metrics.jsonl")
    wait_step(tail, 1, launcher)  # the lab is built before any site starts
    rid = lab_of(launcher.pid) if mode == "netns" else None
    if mode == "netns" and rid is None:
        raise AtollError(f"no lab record in {STATE_DIR} names the launcher (pid {launcher.pid})")
    # A compute kill reads the link's counter two steps early, to show it idle up to the kill.
    early = 2 if trial.fault == "kill_site" and trial.phase == "compute" and rid is not None else 0
    wait_step(tail, trial.after_step - early, launcher)
    index = trial.sites.index(watched)
    busy: Callable[[], int] | None = (lambda: tx_bytes(rid, index, watched)) if rid else None
    if trial.fault == "kill_site":
        sent_before = None
        if trial.phase == "exchange":
            aim_at_exchange(rec, busy=busy, delay_s=args.exchange_delay)
            sent_before = busy() if busy else None
            time.sleep(0.3)
        elif trial.phase == "checkpoint":
            ckpt_step = trial.after_step + 2
            tmp = checkpoints_dir(site_dir) / f"step_{ckpt_step:08d}.tmp"
            final = checkpoints_dir(site_dir) / f"step_{ckpt_step:08d}"
            deadline = time.monotonic() + 60
            while not tmp.exists() and not final.exists() and time.monotonic() < deadline:
                time.sleep(0.001)
            rec["tmp_seen_at_kill"] = tmp.exists()
        elif busy:
            sent_before, since = busy(), time.monotonic()
            wait_step(tail, trial.after_step, launcher)
            rec["link_window_s"] = round(time.monotonic() - since, 3)
        own = {os.getpid(), launcher.pid}
        killed = kill_site(topology, trial.site or "", exclude=own)
        kill_time = time.monotonic()
        if trial.phase == "checkpoint":
            rec["tmp_seen_at_kill"] = rec["tmp_seen_at_kill"] and tmp.exists()
            rec["final_existed_at_kill"] = final.exists()
        tail.poll()
        rec["at_step"] = tail.last_step
        rec["s_after_step_record"] = round(kill_time - tail.last_seen, 3)
        rec["killed_pids"] = killed
        if busy and sent_before is not None:
            rec["link_bytes_sent_before_kill"] = busy() - sent_before
            rec.setdefault("link_window_s", 0.3)
    elif trial.fault == "cut_link":
        if rid is None:
            rec["note"] = "not run: a link cut needs the netns lab (emulated mode has no link to cut)"
            return
        wan_ns, veth = f"{NETNS_PREFIX}{rid}-wan", f"{IFACE_PREFIX}{rid}w{index}"
        if trial.phase == "exchange":
            aim_at_exchange(rec, busy=busy, delay_s=args.exchange_delay)
        tail.poll()
        rec["at_step"] = tail.last_step
        ip("-n", wan_ns, "link", "set", veth, "down")
        t_down = time.monotonic()
        # Between exchanges the site's next rounds fail at once (no route) and it trains on alone;
        # cut in a round, the exchange waits out its timeout: up again 2 s after that.
        down_s = args.timeout + 2.0 if trial.phase == "exchange" else args.cut_seconds
        rec["link_cut"] = f"ip -n {wan_ns} link set {veth} down; {down_s:.0f} s; up"
        time.sleep(down_s)
        ip("-n", wan_ns, "link", "set", veth, "up")
        rec["link_down_s"] = round(time.monotonic() - t_down, 2)
        tail.poll()
        rec["step_when_up"] = tail.last_step
    elif trial.fault == "wrong_secret":
        tail.poll()
        rec["at_step"] = tail.last_step
        rec.update(join_with_wrong_secret(trial, launcher=launcher, tdir=tdir, rid=rid, args=args))


def aim_at_exchange(rec: dict[str, Any], *, busy: Callable[[], int] | None, delay_s: float) -> None:
    """Return once the watched site's round is on the wire (called right after the step before a boundary).

    The round's exchange follows the next step's compute; first the quorum, then the bytes. In the
    lab: once the site's veth has sent 64 KB since (its contribution is going out); else, or
    after 20 s, at a fixed delay.
    """
    if busy is None:
        time.sleep(max(0.0, delay_s - 0.3))
        return
    start, deadline = busy(), time.monotonic() + 20.0
    while busy() - start < 64 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    rec["link_bytes_since_step_record"] = busy() - start


def join_with_wrong_secret(
    trial: Trial, *, launcher: subprocess.Popen[bytes], tdir: Path, rid: str | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Start `atoll site` for a third site with another secret against the run's lighthouse; wait for it."""
    text = (tdir / "launcher.log").read_text(errors="replace")
    found = re.search(r"lighthouse at (\S+?);", text)
    if found is None:
        return {"joiner": "not started: the launcher's log names no lighthouse"}
    lighthouse = found.group(1)
    topo = write_topology(tdir / "joiner-topology.yaml", (*trial.sites, trial.site or "mallory"))
    env = cli_env()
    env["ATOLL_RUN_SECRET"] = "not-the-runs-secret-" + secrets.token_hex(8)
    argv = [
        *ATOLL,
        "site",
        str(CONFIG.relative_to(REPO)),
        "--topology",
        str(topo),
        "--site",
        trial.site or "mallory",
        "--lighthouse",
        lighthouse,
        "--no-progress",
        f"--run.dir={tdir / 'joiner'}",
        f"--train.steps={args.steps}",
        "--train.eval_every=0",
        "--train.checkpoint_every=0",
        "--sync.strategy=diloco",
        f"--sync.inner_steps={args.inner_steps}",
        "--sync.min_sites=1",
        f"--sync.timeout_seconds={args.timeout}",
    ]
    if rid is not None:  # inside west's namespace, at west's address: a rogue machine in that data center
        west = trial.sites.index("west")
        env.update(
            ATOLL_LAB_MODE="netns",
            ATOLL_LAB_SITE="west",
            ATOLL_LAB_ADDRESS=f"10.213.{west + 1}.2",
            ATOLL_LAB_LATENCY_MS=repr(LATENCY_MS),
            GLOO_SOCKET_IFNAME=f"{IFACE_PREFIX}{rid}s{west}",
        )
        argv = ["ip", "netns", "exec", f"{NETNS_PREFIX}{rid}-site-west", *argv, "--wan", "netns"]
    else:
        argv = [*argv, "--wan", "emulated"]
    with (tdir / "joiner.log").open("wb") as out:
        joiner = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out_rec: dict[str, Any] = {"joiner_command": shlex.join(argv[argv.index("-m") - 1 :])}
    deadline = time.monotonic() + args.joiner_seconds
    while joiner.poll() is None and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if joiner.poll() is None:
        os.killpg(joiner.pid, signal.SIGKILL)  # our own process group: the joiner and its ranks
        joiner.wait()
        out_rec["joiner_stopped_by_bench"] = True
    out_rec["joiner_rc"] = joiner.returncode
    log_text = (tdir / "joiner.log").read_text(errors="replace")
    out_rec["joiner_said_refused"] = "refused" in log_text
    out_rec["joiner_log_tail"] = [line.strip() for line in log_text.splitlines()[-6:]]
    return out_rec


# ---------------------------------------------------------------- measuring a finished trial


def measure(trial: Trial, rec: dict[str, Any], *, run_root: Path, args: argparse.Namespace) -> None:
    rows = {s: read_metrics(run_root / "sites" / s) for s in trial.sites}
    finals = {s: final_record(r) for s, r in rows.items()}
    last_steps = {s: max((int(r["step"]) for r in rows[s] if "loss" in r), default=0) for s in trial.sites}
    rec["last_steps"] = last_steps
    digests = {f.get("theta_digest") for f in finals.values()}
    rec["theta_digest"] = digests.pop() if len(digests) == 1 else None
    rec["finished"] = rec["launcher_rc"] == 0 and all(v == args.steps for v in last_steps.values())
    vals = [[r["val_loss"] for r in rows[s] if "val_loss" in r] for s in trial.sites]
    rec["val_loss"] = round(statistics.mean(v[-1] for v in vals), 5) if all(vals) else None
    walls = [max((r.get("wall_seconds", 0.0) for r in rows[s] if "loss" in r), default=0.0) for s in trial.sites]
    rec["wall_s"] = round(max(walls), 1)
    try:
        check_site_digests(run_root)
        rec["digests_equal"] = True
    except AtollError as exc:
        rec["digests_equal"] = False
        rec["digests_note"] = str(exc)
    bad, tmp_left, count = [], [], 0
    for s in trial.sites:
        root = checkpoints_dir(run_root / "sites" / s)
        for ckpt in sorted(root.iterdir()) if root.is_dir() else []:
            if ckpt.name.endswith(".tmp"):
                tmp_left.append(f"{s}/{ckpt.name}")
                continue
            count += 1
            try:
                verify_checkpoint(ckpt)
            except AtollError as exc:
                bad.append(str(exc))
    rec["checkpoints_ok"] = not bad
    rec["checkpoints_checked"] = count
    if bad:
        rec["checkpoint_errors"] = bad
    if tmp_left:
        rec["tmp_dirs_left"] = tmp_left  # incomplete by design: never listed, loaded or resumed from
    victim = trial.site if trial.site in trial.sites else None
    survivors = [s for s in trial.sites if s != victim]
    stall_figures(rec, rows)
    for s in survivors:
        f = finals.get(s, {})
        rec.setdefault("survivor_wan_failed", {})[s] = f.get("wan_failed")
        rec.setdefault("survivor_sync_refused", {})[s] = f.get("sync_refused")
    healed = victim or trial.sites[-1]
    f = finals.get(healed, {})
    rec["heal_site"] = healed
    rec["heals"] = f.get("heals")
    rec["heal_bytes"] = f.get("heal_bytes")
    rec["heal_s"] = round(f["heal_seconds"], 2) if "heal_seconds" in f else None
    lost = 0
    events = []
    keys = ("event", "site", "step", "round", "rounds_missed")
    for s in survivors:
        evs = [e for e in finals.get(s, {}).get("sync_site_events", []) if victim is None or e.get("site") == victim]
        events += [{"seen_by": s, **{k: e[k] for k in keys if k in e}} for e in evs]
        lost = max(lost, sum(int(e.get("rounds_missed", 0)) for e in evs))
    rec["rounds_lost"] = lost
    rec["site_events"] = events
    if trial.fault == "wrong_secret":
        refused = sum(int(finals.get(s, {}).get("sync_refused", 0)) for s in trial.sites)
        rec["sync_refused_total"] = refused
        rec["refused"] = refused > 0 or bool(rec.get("joiner_said_refused"))
    restart = [line for line in rec.get("launcher_lines", []) if "restarting it" in line]
    if restart:
        m = re.search(r"at step (\d+); restarting it from its checkpoint at step (\d+)", restart[0])
        if m:
            rec["launcher_at_step"], rec["resumed_from"] = int(m.group(1)), int(m.group(2))


def grid_flags(argv: list[str]) -> list[str]:
    """The flags that shape the grid's runs: without --resume, --only and --redo (which pick trials)."""
    out, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg.split("=")[0] in ("--resume", "--only", "--redo")
        if not skipping:
            out.append(arg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--inner-steps", type=int, default=8, help="H: steps per round")
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=15.0, help="sync.timeout_seconds: one exchange's timeout")
    ap.add_argument("--cut-seconds", type=float, default=20.0, help="how long the link stays down (> --timeout)")
    ap.add_argument("--exchange-delay", type=float, default=0.9, help="s after the step before a boundary to kill")
    ap.add_argument("--joiner-seconds", type=float, default=90.0, help="how long the wrong-secret joiner may run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/atoll-chaos"), help="where the runs are kept")
    ap.add_argument("--only", nargs="*", default=None, metavar="TRIAL", help="run only these trials")
    ap.add_argument("--resume", action="store_true", help="keep the trials already in bench/results/chaos.json")
    ap.add_argument("--redo", nargs="*", default=[], metavar="TRIAL", help="with --resume: run these again")
    args = ap.parse_args()

    cfg: RunConfig = load_config(RunConfig, CONFIG)
    prepare_demo_data(REPO / cfg.data.dir, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len, seed=cfg.run.seed)
    lab_ok, lab_reason = lab_available()
    mode = "netns" if lab_ok else "emulated"
    trials = grid(args.steps, args.inner_steps, args.checkpoint_every)
    meta = {
        "lab_mode": mode,
        "lab_note": "" if lab_ok else f"emulated without root: {lab_reason}",
        "model_bytes": 0,  # from the first run's model.json
        "settings": {
            "steps": args.steps,
            "inner_steps": args.inner_steps,
            "checkpoint_every": args.checkpoint_every,
            "timeout_seconds": args.timeout,
            "cut_seconds": args.cut_seconds,
            "mbps": MBPS,
            "latency_ms": LATENCY_MS,
        },
        "command": ("PYTHONPATH=src .venv/bin/python bench/chaos.py " + shlex.join(grid_flags(sys.argv[1:]))).strip(),
    }
    order = {t.name: i for i, t in enumerate(trials)}
    records: list[dict[str, Any]] = []
    if args.resume and (RESULTS / "chaos.json").exists():
        old = json.loads((RESULTS / "chaos.json").read_text())
        keep = set(order) - set(args.redo)
        records = [r for r in old.get("references", []) + old.get("trials", []) if r["trial"] in keep]
        meta["model_bytes"] = old.get("model_bytes", 0)
    done = {r["trial"] for r in records}
    print(f"chaos: lab mode {mode}; {len(trials)} trials", flush=True)
    for trial in trials:
        if trial.name in done or (args.only is not None and trial.name not in args.only):
            continue
        print(f"chaos: {trial.name} ...", flush=True)
        rec = run_trial(trial, args=args, mode=mode, work=args.work)
        records = sorted([r for r in records if r["trial"] != trial.name] + [rec], key=lambda r: order[r["trial"]])
        if not meta["model_bytes"]:
            site_dir = args.work / trial.name / "runs" / trial.name / "sites" / trial.sites[0]
            meta["model_bytes"] = 4 * read_model_json(site_dir).num_params()
        write_results(records, meta=meta, all_trials=[t.name for t in trials], args=args)
        print(
            f"chaos: {trial.name}: finished {rec['finished']} at step {rec.get('at_step')} stall "
            f"{rec.get('survivor_stall_s')} heal {rec.get('heal_bytes')} val {rec.get('val_loss')} "
            f"digests {rec.get('digests_equal')} ckpts {rec.get('checkpoints_ok')} in {rec['launcher_s']} s",
            flush=True,
        )

    if records:  # also with nothing left to run: rewrite the results from the records (and run directories)
        write_results(records, meta=meta, all_trials=[t.name for t in trials], args=args)


if __name__ == "__main__":
    main()
