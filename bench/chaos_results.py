"""The chaos benchmark's results: figures read back from each trial's run, the targets, and
bench/results/chaos.{json,md}. `bench/chaos.py` runs the trials and calls `write_results`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

from atoll.report.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MBPS = 3.4  # examples/topologies/lab-two-sites.yaml: one exchange of the tiny model takes ~2.5 s
LATENCY_MS = 15.0
HEAL_TAG_BYTES = 32  # a heal carries θ (fp32) and the outer momentum (bf16) and one HMAC tag

# Why a target was missed, read from the logs of the recorded trials (bench/results/chaos.*); a
# rerun that misses differently needs these lines rewritten.
WHY = {
    "cut-west": (
        "(history: the first recordings missed here) in the 64-step run at full speed east finished its last "
        "five rounds alone within 2 s of dropping west, before the link was back, and west trained alone to a "
        "different θ; with the sites 10x slower the first joint quorum after the cut failed to configure its "
        "gloo group and torchft never configured it again (same quorum id): fixed by reporting the failed "
        "exchange as a commit failure (`transport.report_failed_commit`, docs/decisions.md)."
    ),
    "cut-west-exchange-40": (
        "(rerun 2026-12-07 on quiet cores) the cut caught both sites in round 5's exchange; both waited out "
        "the 15 s timeout (east held 15.0 s after the fault: the stall is the timeout plus that step's "
        "compute, 0.02 s over), rolled the round back alike, and the link was still down at step 48's "
        "exchange: each site went on alone (min_sites 1). East finished first and, having lost west, waited "
        "for it (`atoll.sync.finish`, up to one exchange timeout); west's next exchange met east's final "
        "check, west healed from east (round 4 -> 7, 1.5x the model's bytes) and jumped to step 64, and both "
        "ended with equal θ. The loss is 1.48% above the fault-free run's because west's three rounds alone "
        "were discarded (east's θ is the run's): a partition of two sites with min_sites 1 costs one half's "
        "work. The first quiet rerun, before the final wait existed, ended with different θ (exit 3): east "
        "finished while west was still cut off and no quorum held both again."
    ),
}


def final_record(rows: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [r for r in rows if "sync_applied" in r]
    return finals[-1] if finals else {}


def stall_figures(rec: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> None:
    """`survivor_stall_s`: over the steps a survivor ended after the fault, its longest `step_seconds`
    minus its median (for a fault-free run: over every step). The fault's time is that of the
    hit site's record of `at_step` (plus the delay to the kill)."""
    victim = rec["site"] if rec["site"] in rows else None
    watched = victim or ("west" if "west" in rows else None)
    fault_time = None
    if rec["fault"] != "none" and watched is not None and rec.get("at_step") is not None:
        first = next((r for r in rows[watched] if "loss" in r and int(r["step"]) == rec["at_step"]), None)
        if first is not None:
            fault_time = float(first["time"]) + max(0.0, float(rec.get("s_after_step_record") or 0.0))
    stalls = {}
    for site, site_rows in rows.items():
        steps = [r for r in site_rows if "step_seconds" in r]
        if site == victim or not steps:
            continue
        median = statistics.median(float(r["step_seconds"]) for r in steps)
        window = [r for r in steps if fault_time is None or float(r["time"]) >= fault_time] or steps
        worst = max(window, key=lambda r: float(r["step_seconds"]))
        stalls[site] = {"stall_s": round(float(worst["step_seconds"]) - median, 2), "at_step": int(worst["step"])}
        if fault_time is not None:  # only the part of a step after the fault: how long the fault held it up
            held = max(min(float(r["step_seconds"]), float(r["time"]) - fault_time) for r in window)
            stalls[site]["held_after_fault_s"] = round(held - median, 2)
    if stalls:
        rec["survivor_stall_s"] = max(v["stall_s"] for v in stalls.values())
        rec["survivor_stalls"] = stalls
        held = [v["held_after_fault_s"] for v in stalls.values() if "held_after_fault_s" in v]
        rec["survivor_held_after_fault_s"] = max(held) if held else None


def backfill(rec: dict[str, Any], run_root: Path) -> None:
    """Per-site heal counters (and θ's digest, for records from before it was kept), read from the run."""
    if "link_bytes_sent_in_0.3s_before_kill" in rec:  # the name before compute kills got their own window
        rec["link_bytes_sent_before_kill"] = rec.pop("link_bytes_sent_in_0.3s_before_kill")
        rec["link_window_s"] = 0.3
    if not run_root.is_dir():
        return
    rows = {d.name: read_metrics(d) for d in sorted(run_root.glob("sites/*"))}
    finals = {site: final_record(r) for site, r in rows.items()}
    stall_figures(rec, rows)
    if "theta_digest" not in rec:
        digests = {f.get("theta_digest") for f in finals.values()}
        rec["theta_digest"] = digests.pop() if len(digests) == 1 else None
    keys = ("heals", "heals_served", "heal_bytes", "heal_seconds")
    rec["heal_by_site"] = {site: {k: f.get(k) for k in keys} for site, f in finals.items()}
    # heal_bytes counts what a site moved in heals, sent as the source or received: per heal, take
    # the sites that only received.
    per_heal = [
        h["heal_bytes"] / h["heals"] for h in rec["heal_by_site"].values() if h["heals"] and not h["heals_served"]
    ]
    rec["heal_bytes_per_heal"] = max(per_heal) if per_heal else None


def evaluate(rec: dict[str, Any], *, ref: dict[str, Any] | None, model_bytes: int, timeout: float) -> dict[str, Any]:
    """Per target: True (met), False (missed) or None (does not apply, or the fault was not injected)."""
    if rec["fault"] != "none" and rec.get("at_step") is None:
        return dict.fromkeys(("finished", "stall", "heal", "val_loss", "digests", "checkpoints", "refused"))
    out: dict[str, Any] = {"finished": bool(rec.get("finished"))}
    stall = rec.get("survivor_stall_s")
    out["stall"] = None if stall is None or rec["fault"] == "none" else stall <= timeout
    per_heal = rec.get("heal_bytes_per_heal")
    out["heal"] = None if per_heal is None else per_heal <= 1.5 * model_bytes + HEAL_TAG_BYTES
    if ref is not None and rec.get("val_loss") is not None and ref.get("val_loss"):
        rec["val_loss_vs_fault_free"] = round(rec["val_loss"] / ref["val_loss"] - 1, 5)
        out["val_loss"] = abs(rec["val_loss_vs_fault_free"]) <= 0.01
    else:
        out["val_loss"] = None if rec["fault"] == "none" else False
    out["digests"] = bool(rec.get("digests_equal"))
    out["checkpoints"] = bool(rec.get("checkpoints_ok"))
    out["refused"] = rec.get("refused") if rec["fault"] == "wrong_secret" else None
    return out


def write_results(
    records: list[dict[str, Any]], *, meta: dict[str, Any], all_trials: list[str], args: argparse.Namespace
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    by_name = {r["trial"]: r for r in records}
    ff2, ff3, rerun = by_name.get("fault-free"), by_name.get("fault-free-3site"), by_name.get("fault-free-rerun")
    for rec in records:
        backfill(rec, args.work / rec["trial"] / "runs" / rec["trial"])
        ref = ff3 if len(rec.get("last_steps", {})) == 3 else ff2
        if ref is not None and rec.get("theta_digest") and rec is not ref:
            rec["same_theta_as_fault_free"] = rec["theta_digest"] == ref.get("theta_digest")
        if rec["fault"] == "none" and rec["trial"] != "fault-free-rerun":
            ref = None
        rec["targets"] = evaluate(rec, ref=ref, model_bytes=meta["model_bytes"], timeout=args.timeout)
    missing = [t for t in all_trials if t not in by_name]
    result = {
        **meta,
        "date": dt.date.today().isoformat(),
        "fault_free": {k: ff2.get(k) for k in ("val_loss", "wall_s", "launcher_s")} if ff2 else None,
        "fault_free_3site": {k: ff3.get(k) for k in ("val_loss", "wall_s", "launcher_s")} if ff3 else None,
        "fault_free_rerun": (
            {k: rerun.get(k) for k in ("val_loss", "wall_s", "val_loss_vs_fault_free")} if rerun else None
        ),
        "missing_trials": missing,
        "trials": [r for r in records if r["fault"] != "none"],
        "references": [r for r in records if r["fault"] == "none"],
    }
    (RESULTS / "chaos.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "chaos.md").write_text(markdown(result, args=args))


def _yes(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "no")


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**MISSED**")


def markdown(result: dict[str, Any], *, args: argparse.Namespace) -> str:
    mb = result["model_bytes"]
    lines = [
        "# Chaos benchmark",
        "",
        f"`{result['command']}` ({result['date']}). Lab mode: **{result['lab_mode']}**"
        + (f" ({result['lab_note']})" if result["lab_note"] else "")
        + f". Model: tiny preset, {mb:,} bytes in fp32. Each run: {args.steps} steps, H = {args.inner_steps} "
        f"({args.steps // args.inner_steps} rounds), checkpoint every {args.checkpoint_every} steps, "
        f"`sync.min_sites=1`, exchange timeout {args.timeout:.0f} s, links {MBPS} Mbit/s and {LATENCY_MS:.0f} ms "
        "per site, 2 CPU cores shared by every process of the run (and by other work on the machine).",
        "",
    ]
    for key, label in (
        ("fault_free", "Fault-free, 2 sites"),
        ("fault_free_3site", "Fault-free, 3 sites"),
        ("fault_free_rerun", "Fault-free, 2 sites, run again"),
    ):
        ff = result.get(key)
        if ff:
            vs = ff.get("val_loss_vs_fault_free")
            again = "" if vs is None else f" ({vs:+.2%} against the first: two fault-free runs differ this much)"
            lines.append(f"- {label}: validation loss {ff['val_loss']:.4f}{again}, {ff['wall_s']:.0f} s of training.")
    lines += [
        "",
        "Targets: every trial finishes; survivors stall ≤ one exchange timeout "
        f"({args.timeout:.0f} s; stall = the survivor's longest `step_seconds` after the fault, "
        "minus its median); a heal ≤ 1.5x the model's bytes (θ in fp32 + momentum in bf16 is exactly 1.5x; "
        f"the {HEAL_TAG_BYTES}-byte HMAC tag is allowed on top); validation loss within 1% of the fault-free run "
        "with as many sites; the sites end with equal θ digests; every complete checkpoint verifies; every "
        "wrong-secret joiner is refused.",
        "",
        "| trial | phase | at step | finished | survivor stall s | heal bytes (per heal, x model) | heal s "
        "| rounds lost "
        "| val loss (vs fault-free) | θ = fault-free's | digests equal | checkpoints ok | refused |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in result["references"] + result["trials"]:
        t = rec["targets"]
        heal = "–" if rec.get("heal_bytes") is None else f"{rec['heal_bytes']:,}"
        if rec.get("heal_bytes_per_heal"):
            heal += f"; per heal {rec['heal_bytes_per_heal'] / mb:.5f}x {_mark(t['heal'])}"
        vs = rec.get("val_loss_vs_fault_free")
        val = "–" if rec.get("val_loss") is None else f"{rec['val_loss']:.4f}"
        if vs is not None:
            val += f" ({vs:+.2%}) {_mark(t['val_loss'])}"
        stall = rec.get("survivor_stall_s")
        stall_s = "–" if stall is None else f"{stall:.1f} {_mark(t['stall'])}"
        refused = "–" if t["refused"] is None else f"{rec.get('sync_refused_total')} refusals {_mark(t['refused'])}"
        cks = f"{rec.get('checkpoints_checked', 0)} {_mark(t['checkpoints'])}"
        lines.append(
            f"| {rec['trial']} | {rec['phase']} | {rec.get('at_step', '–')} | {_mark(t['finished'])} | {stall_s} "
            f"| {heal} | {rec.get('heal_s', '–')} | {rec.get('rounds_lost', '–')} | {val} "
            f"| {_yes(rec.get('same_theta_as_fault_free'))} | {_mark(t['digests'])} | {cks} | {refused} |"
        )
    lines += ["", "## Misses", ""]
    misses = []
    for rec in result["trials"]:
        for target, ok in rec["targets"].items():
            if ok is False:
                misses.append(f"- {rec['trial']}: {target}: {miss_words(rec, target, args=args, mb=mb)}")
    lines += misses or ["None."]
    why = [f"- {name}: {text}" for name, text in WHY.items() if any(m.startswith(f"- {name}:") for m in misses)]
    if why:
        lines += ["", "Why, as the trials' logs and metrics show it (`--work` keeps every run directory):", "", *why]
    if result["missing_trials"]:
        lines += ["", "## Not run", "", *[f"- {t}" for t in result["missing_trials"]]]
    lines += ["", "## How each fault landed", ""]
    for rec in result["trials"]:
        lines.append(f"- **{rec['trial']}**: {landing_words(rec)}")
        for line in rec.get("launcher_lines", []):
            lines.append(f"  - `{line}`")
    lines += ["", "Commands (each trial's run directory names differ only in `--run.name`):", ""]
    for rec in result["references"] + result["trials"]:
        lines.append(f"- {rec['trial']}: `{rec['command']}`")
        if rec.get("joiner_command"):
            lines.append(f"  - joiner: `ATOLL_RUN_SECRET=<another> {rec['joiner_command']}`")
    return "\n".join(lines) + "\n"


def miss_words(rec: dict[str, Any], target: str, *, args: argparse.Namespace, mb: int) -> str:
    if target == "stall":
        return (
            f"{rec['survivor_stall_s']:.1f} s > {args.timeout:.0f} s, "
            f"by {rec['survivor_stall_s'] - args.timeout:.1f} s "
            f"(per survivor: {rec.get('survivor_stalls')})"
        )
    if target == "heal":
        return f"{rec['heal_bytes_per_heal'] / mb:.4f}x the model per heal"
    if target == "val_loss":
        vs = rec.get("val_loss_vs_fault_free")
        return "no final validation loss" if vs is None else f"{vs:+.2%} (by {abs(vs) - 0.01:.2%} beyond 1%)"
    if target == "finished":
        return f"launcher exit {rec.get('launcher_rc')}, last steps {rec.get('last_steps')} {rec.get('note', '')}"
    if target == "digests":
        return rec.get("digests_note", "")
    if target == "checkpoints":
        return "; ".join(rec.get("checkpoint_errors", []))
    return "the joiner was not refused"


def landing_words(rec: dict[str, Any]) -> str:
    parts = []
    if rec["fault"] == "kill_site":
        parts.append(
            f"SIGKILL of {rec['site']} (pids {rec.get('killed_pids')}) {rec.get('s_after_step_record')} s after its "
            f"step {rec.get('at_step')} was logged"
        )
        if "link_bytes_sent_before_kill" in rec:
            parts.append(
                f"its veth sent {rec['link_bytes_sent_before_kill']:,} bytes in the {rec['link_window_s']} s before"
            )
        if "link_bytes_since_step_record" in rec:
            parts.append(f"{rec['link_bytes_since_step_record']:,} bytes since that step's record (aim: 64 KB)")
        if rec["phase"] == "checkpoint":
            hit = rec.get("tmp_seen_at_kill")
            parts.append(
                "step_N.tmp existed at the kill (hit)"
                if hit
                else "step_N.tmp was not seen at the kill (missed the window; killed just after the write)"
            )
    elif rec["fault"] == "cut_link":
        parts.append(rec.get("note") or f"`{rec.get('link_cut')}` at step {rec.get('at_step')}")
        if rec.get("slowdown"):
            parts.append(f"every site's steps emulated {rec['slowdown']:g}x slower (the survivor outlasts the cut)")
    elif rec["fault"] == "wrong_secret":
        parts.append(
            f"joiner started at step {rec.get('at_step')}, exit {rec.get('joiner_rc')}"
            + (" (stopped by the bench)" if rec.get("joiner_stopped_by_bench") else "")
            + (
                " (SIGKILL from the lab's teardown at the run's end: it ran inside west's namespace)"
                if rec.get("joiner_rc") == -9 and not rec.get("joiner_stopped_by_bench")
                else ""
            )
            + f", said refused: {rec.get('joiner_said_refused')}"
        )
    parts.append(f"survivors' wan_failed {rec.get('survivor_wan_failed')}")
    if rec.get("resumed_from") is not None:
        parts.append(f"restarted from its checkpoint at step {rec['resumed_from']}")
    if rec.get("site_events"):
        parts.append(f"events {rec['site_events']}")
    return "; ".join(parts)
