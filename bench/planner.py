"""Validate the planner: published Megatron-LM throughput, and this lab's measured runs.

    .venv/bin/python bench/planner.py [--throughput bench/results/throughput.json] [--wan bench/results/wan.json]

Published: Megatron-LM SC'21 Table 1 (ten GPT models, 32 to 3,072 A100s) with the paper's own
layouts, against the planner's prediction; Calculon's errors on the same rows for comparison;
a sensitivity row (burst instead of sustained matmul efficiency); and the free search against
the paper's layouts. Lab: the multi-site runs of bench/wan.py (step time and utilization
predicted by the event simulator from the calibrated compute step and the link), and the
single-site runs of bench/throughput.py (the demo model on this machine's CPU, 1 and 2 ranks),
predicted from this machine's measured matmul peak.
Writes bench/results/planner.json and planner.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from atoll.hardware import DeviceSpec, get_device  # noqa: E402
from atoll.hardware.measure import matmul_peak_flops  # noqa: E402
from atoll.planner.calibrate import fit_efficiency, predict_step  # noqa: E402
from atoll.planner.shape import PLANNER_PRESETS, ModelShape  # noqa: E402
from atoll.planner.sites import DeviceGroup, SearchSpace, best_site_layout  # noqa: E402
from atoll.planner.step import MEGATRON_2021  # noqa: E402
from atoll.planner.validation import CALCULON_ERRORS, MEGATRON_TABLE1, SEQ_LEN, predict_row  # noqa: E402

RESULTS = REPO / "bench" / "results"
SOURCE = "Narayanan et al., SC'21 (arXiv 2104.04473), Table 1; layouts from Megatron-LM examples/sc21/run_table_1.sh"


def published() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predict every Table 1 row; also the sensitivity and free-search comparisons."""
    records = []
    burst = dataclasses.replace(get_device("a100-80g"), matmul_efficiency=0.869)
    burst_errors = []
    for row in MEGATRON_TABLE1:
        pred = predict_row(row)
        lay = pred.layout
        step = pred.step
        records.append(
            {
                "source": SOURCE,
                "model": row.model,
                "model_params": row.params_b * 1e9,
                "gpus": row.gpus,
                "batch": row.batch,
                "layout": f"TP{lay.tp} PP{lay.pp} DP{lay.dp} v{lay.vp} b{lay.micro_batch} full recompute, "
                f"DDP={'torch' if row.torch_ddp else 'local'}",
                "published_tflops_per_gpu": row.published_tflops,
                "predicted_tflops_per_gpu": round(pred.tflops_per_gpu, 2),
                "error": round(pred.error, 4),
                "predicted_step_s": round(step.seconds, 3),
                "breakdown": {
                    "bubble": round(step.bubble_seconds / step.seconds, 4),
                    "tensor_parallel": round(step.tp_seconds / step.seconds, 4),
                    "pipeline_p2p": round(step.p2p_seconds / step.seconds, 4),
                    "data_parallel_exposed": round(step.dp_seconds / step.seconds, 4),
                    "optimizer": round(step.optimizer_seconds / step.seconds, 4),
                },
            }
        )
        burst_errors.append(predict_row(row, device=burst).error)
    errors = [r["error"] for r in records]
    search = []
    for row in MEGATRON_TABLE1:
        search.append(_free_search(row))
    summary = {
        "mean_abs_error": round(sum(abs(e) for e in errors) / len(errors), 4),
        "worst_abs_error": round(max(abs(e) for e in errors), 4),
        "mean_signed_error": round(sum(errors) / len(errors), 4),
        "calculon_mean_abs_error": CALCULON_ERRORS["average"],
        "calculon_worst_abs_error": CALCULON_ERRORS["worst"],
        "sensitivity_burst_matmul_efficiency": {
            "matmul_efficiency": 0.869,
            "mean_abs_error": round(sum(abs(e) for e in burst_errors) / len(burst_errors), 4),
            "worst_abs_error": round(max(abs(e) for e in burst_errors), 4),
        },
        "free_search": search,
    }
    return records, summary


def _free_search(row: Any) -> dict[str, Any]:
    shape = PLANNER_PRESETS[row.model]
    paper = predict_row(row)
    runtime = dataclasses.replace(MEGATRON_2021, overlap_grad_reduce=row.torch_ddp)
    groups = (DeviceGroup(get_device("a100-80g"), row.gpus, 8),)
    out = {"model": row.model, "paper_tflops": round(paper.tflops_per_gpu, 1)}
    spaces = {
        # The paper's knobs: TP, PP, interleaving, micro-batch; full recomputation, no ZeRO, no SP.
        "paper_knobs": SearchSpace(
            zero=(0,),
            recompute=("full",),
            interleave=(1, 2, 3, 4, 5),
            sequence_parallel=False,
            micro_batch=(1, 2, 4, 8, 16),
        ),
        # Everything the planner knows: ZeRO-1, selective or no recomputation as well.
        "all_knobs": SearchSpace(
            zero=(0, 1),
            recompute=("none", "selective", "full"),
            interleave=(1, 2, 3, 4, 5),
            sequence_parallel=False,
            micro_batch=(1, 2, 4, 8, 16),
        ),
    }
    for name, space in spaces.items():
        best = best_site_layout(shape, groups, batch=row.batch, seq_len=SEQ_LEN, space=space, runtime=runtime)
        est = best[0]
        flops = paper.tflops_per_gpu * paper.step.seconds  # same model FLOPs per GPU
        out[name] = {
            "layout": est.layout.describe(),
            "tflops": round(flops / est.seconds, 1),
            "speedup": round(paper.step.seconds / est.seconds, 3),
        }
    return out


# ---------------------------------------------------------------- the lab


def _cpu_device(peak: float, **fields: Any) -> DeviceSpec:
    return dataclasses.replace(get_device("cpu"), peak_tflops=peak / 1e12, **fields)


def _predict_lab(shape: ModelShape, rec: dict[str, Any], dev: DeviceSpec) -> Any:
    ranks = int(rec["ranks"])
    micro = 8 if ranks == 1 else 4  # bench/throughput.py's micro-batches
    per_rank = int(rec["global_batch"]) // ranks
    return predict_step(
        shape, dev, seq_len=int(rec["seq_len"]), micro_batch=micro, micro_batches=max(1, per_rank // micro), ranks=ranks
    )


def lab(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predict the runs recorded by bench/throughput.py on this machine."""
    from atoll.model.config import get_preset
    from atoll.planner.shape import shape_from_config

    records_in = json.loads(path.read_text())
    cores = os.cpu_count() or 1
    # The peak bench/throughput.py measured right before its runs (same machine load); a rank of
    # an n-rank run gets 1/n of it.
    peak_all = float(records_in[0].get("peak_flops") or matmul_peak_flops(threads=cores))
    out, notes = [], {"matmul_peak_all_cores": round(peak_all), "cores": cores}
    by_ranks = {int(r["ranks"]): r for r in records_in}
    shape = shape_from_config(get_preset(str(records_in[0]["model"])), name=str(records_in[0]["model"]))
    # Calibration (what `atoll calibrate` does): the 1-rank run fixes the CPU's matmul
    # efficiency, the one free parameter; the other runs are then predictions.
    calib = None
    if 1 in by_ranks:
        r1 = by_ranks[1]
        measured = r1["global_batch"] * r1["seq_len"] / r1["tokens_per_s"]
        calib = round(
            fit_efficiency(
                shape,
                _cpu_device(peak_all),
                measured_step_s=measured,
                seq_len=int(r1["seq_len"]),
                micro_batch=8,
                micro_batches=max(1, int(r1["global_batch"]) // 8),
            ),
            4,
        )
        notes["calibrated_matmul_efficiency"] = calib
    for ranks, rec in sorted(by_ranks.items()):
        measured_step = rec["global_batch"] * rec["seq_len"] / rec["tokens_per_s"]
        per_rank_peak = peak_all / ranks
        uncal = _predict_lab(shape, rec, _cpu_device(per_rank_peak))
        entry: dict[str, Any] = {
            "run": f"{rec['model']} x {ranks} rank(s), single site, CPU ({rec.get('device', '')})",
            "measured_step_s": round(measured_step, 4),
            "predicted_step_s_catalog": round(uncal.seconds, 4),
            "error_catalog": round((uncal.seconds - measured_step) / measured_step, 4),
        }
        if calib is not None:
            cal = _predict_lab(
                shape, rec, _cpu_device(per_rank_peak, matmul_efficiency=calib, attention_efficiency=calib)
            )
            entry["predicted_step_s"] = round(cal.seconds, 4)
            entry["error"] = round((cal.seconds - measured_step) / measured_step, 4)
            entry["role"] = "calibration" if ranks == 1 else "prediction"
            pred = cal
        else:
            entry["predicted_step_s"] = entry["predicted_step_s_catalog"]
            pred = uncal
        flops = pred.model_flops  # model FLOPs of the step
        entry["predicted_utilization"] = round(flops / (pred.seconds * peak_all), 4)
        entry["measured_utilization"] = round(flops / (measured_step * peak_all), 4)
        entry["utilization"] = "MFU against this machine's measured fp32 matmul peak (one site: no cross-site waiting)"
        entry["predicted_breakdown_s"] = {
            "pipeline": round(pred.pipeline_seconds, 4),
            "dp_exposed": round(pred.dp_seconds, 4),
            "dp_total": round(pred.dp_total_seconds, 4),
            "optimizer": round(pred.optimizer_seconds, 4),
        }
        out.append(entry)
    return out, notes


# bench/wan.py v1's defaults, for a wan.json written before it recorded its settings.
WAN_V1_SETTINGS = {
    "steps": 320,
    "inner_steps": 80,
    "batch": 4,
    "seq_len": 256,
    "preset": "demo",
    "fragments": 4,
    "overlap_steps": 10,
    "latency_ms": 15.0,
}


def lab_wan(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predict the multi-site runs of bench/wan.py: wall-clock per inner step and utilization.

    The inputs are what a user has before a run: the compute seconds per inner step measured by
    the benchmark's calibration run (both sites sharing this machine, no WAN: the role of `atoll
    calibrate`), the link rate and latency, the codec's payload formula, and the run's strategy,
    H, fragments, tau and steps. The planner's event simulator plays each run with no jitter.
    Nothing is fitted to the runs themselves.
    """
    import shlex

    sys.path.insert(0, str(REPO / "bench"))
    from wan import build_parser, resolve  # bench/wan.py: the settings the results were produced with

    from atoll.config.schema import SyncSection
    from atoll.model.config import get_preset
    from atoll.planner.shape import shape_from_config
    from atoll.planner.simulate import SimSite, SimSync, simulate
    from atoll.planner.wan import codec_bytes, link_from_mbps
    from atoll.sync.link_model import allgather_bytes, allgather_latency

    data = json.loads(path.read_text())
    args = resolve(build_parser().parse_args(shlex.split(data["command"])[2:]))
    for name, value in data.get("settings", WAN_V1_SETTINGS).items():  # wan.json records them (v2 on)
        setattr(args, name, value)
    step_s = float(data["scenario"]["step_seconds"])
    mbps = float(data["scenario"]["emulated_mbps"])
    defaults = SyncSection()
    shape = shape_from_config(get_preset(args.preset), name=args.preset)
    links = [link_from_mbps(n, up_mbps=mbps, down_mbps=mbps, latency_ms=args.latency_ms) for n in ("east", "west")]
    sites = [SimSite(link.name, step_s, args.batch * args.seq_len, 1, link) for link in links]
    out = []
    for rec in data["runs"]:
        codec = rec["codec"]
        payload = codec_bytes(codec, shape, block_size=defaults.block_size)
        streaming = rec["strategy"] == "streaming"
        sync = SimSync(
            rec["strategy"],
            1 if rec["strategy"] == "ddp" else args.inner_steps,
            allgather_bytes(payload, 2),
            allgather_latency(links),
            args.fragments if streaming else 1,
            args.overlap_steps if streaming else 0,
        )
        sim = simulate(sites, sync, num_steps=args.steps)
        measured_step = rec["wall_s"] / args.steps
        predicted_step = sim.wall_s / args.steps
        compute_per_step = (
            statistics.mean(v["compute_utilization"] * v["wall_s"] for v in rec["per_site"].values()) / args.steps
        )
        out.append(
            {
                "run": f"{rec['system']} {rec['strategy']} {codec}, 2 sites x {args.steps} steps, "
                f"H={args.inner_steps}, {mbps:.2f} Mbit/s ({data['lab_mode']})"
                + (" [measured wall extrapolated from a probe]" if rec.get("wall_extrapolated") else ""),
                "predicted_step_s": round(predicted_step, 4),
                "measured_step_s": round(measured_step, 4),
                "error": round((predicted_step - measured_step) / measured_step, 4),
                "predicted_utilization": round(sim.utilization(sites), 4),
                "measured_utilization": round(rec["compute_utilization"], 4),
                "utilization_error": round(sim.utilization(sites) - rec["compute_utilization"], 4),
                "calibrated_compute_step_s": round(step_s, 4),
                "measured_compute_step_s": round(compute_per_step, 4),
            }
        )
    notes = {
        "wan_results": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
        "wan_date": data.get("date"),
        "compute_step_s": step_s,
        "link_mbps": mbps,
    }
    return out, notes


# Measured in an earlier two-namespace setup on this kind of machine (shared/REFERENCES.md,
# "torchft across network namespaces"): 5.2M-parameter model, one process per site, 400 inner
# steps x 8 x 256 tokens per site, tbf-shaped 4.5 Mbit/s, fp32 exchange.
REFERENCE_RUNS = (
    {"run": "2 sites, DDP every step, 4.5 Mbit/s", "strategy": "ddp", "h": 1, "utilization": 0.016, "seconds": 18300.0},
    {"run": "2 sites, DiLoCo H=100, 4.5 Mbit/s", "strategy": "diloco", "h": 100, "utilization": 0.62, "seconds": 470.0},
    {"run": "2 sites, DiLoCo H=50, 4.5 Mbit/s", "strategy": "diloco", "h": 50, "utilization": 0.45, "seconds": 635.0},
)


REFERENCE_SPEED = {"tokens_per_s_one_process_two_threads": 4200.0, "two_processes_gain": (0.05, 0.13)}
"""shared/REFERENCES.md, "Measured on a machine like yours": the 5M model at ~4,200 tokens/s (fp32,
seq 256, batch 8, 2 threads); two 1-thread processes give 5-13% more in total."""


def reference_lab() -> list[dict[str, Any]]:
    """Predict the earlier two-site runs of shared/REFERENCES.md from its unloaded speed figure.

    Each site was one process doing 8 x 256 tokens per step; two such processes share the
    2-core machine, each at half the two-process total (4,200 tokens/s x 1.09). The WAN is the
    planner's model: a ring all-reduce of the fp32 model over two 4.5 Mbit/s links at the
    transport goodput (tbf adds no latency). Nothing here is fitted to these runs.
    """
    from atoll.model.config import get_preset
    from atoll.planner.shape import shape_from_config
    from atoll.planner.wan import codec_bytes, exposed_per_round, link_from_mbps
    from atoll.sync.link_model import allgather_seconds

    shape = shape_from_config(get_preset("demo"), name="demo")
    gain = sum(REFERENCE_SPEED["two_processes_gain"]) / 2  # type: ignore[arg-type]
    step_s = 8 * 256 / (REFERENCE_SPEED["tokens_per_s_one_process_two_threads"] * (1 + gain) / 2)  # type: ignore[operator]
    links = [link_from_mbps(n, up_mbps=4.5, down_mbps=4.5) for n in ("a", "b")]
    out = []
    for ref in REFERENCE_RUNS:
        payload = codec_bytes("none", shape)  # fp32 gradients or pseudo-gradients
        sync = allgather_seconds(payload, links)
        exposed = exposed_per_round(ref["strategy"], inner_steps=ref["h"], step_s=step_s, sync_s=sync)  # type: ignore[arg-type]
        rounds = 400 // ref["h"]
        wall = rounds * (ref["h"] * step_s + exposed)
        util = 400 * step_s / wall
        out.append(
            {
                "run": ref["run"] + " (shared/REFERENCES.md, earlier setup)",
                "predicted_step_s": round(wall / 400, 4),
                "measured_step_s": round(ref["seconds"] / 400, 4),
                "predicted_utilization": round(util, 4),
                "measured_utilization": ref["utilization"],
                "predicted_seconds": round(wall, 1),
                "measured_seconds": ref["seconds"],
                "assumed_compute_step_s": round(step_s, 4),
                "predicted_sync_s": round(sync, 2),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--throughput", type=Path, default=RESULTS / "throughput.json")
    parser.add_argument(
        "--wan", type=Path, default=RESULTS / "wan.json", help="bench/wan.py's results (multi-site runs)"
    )
    args = parser.parse_args()
    records, summary = published()
    lab_records, lab_notes = (
        lab(args.throughput) if args.throughput.is_file() else ([], {"missing": str(args.throughput)})
    )
    lab_notes["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
    wan_records, wan_notes = lab_wan(args.wan) if args.wan.is_file() else ([], {"missing": str(args.wan)})
    lab_notes["multi_site"] = wan_notes
    lab_records = wan_records + lab_records + reference_lab()
    result = {
        "date": dt.date.today().isoformat(),
        "published": records,
        "published_summary": summary,
        "lab": lab_records,
        "lab_notes": lab_notes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "planner.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Planner validation",
        "",
        f"{result['date']}; produced by `.venv/bin/python bench/planner.py`.",
        "",
        "## Megatron-LM, SC'21 Table 1 (A100-80GB), the paper's layouts",
        "",
        "| model | GPUs | layout | published TFLOP/s | atoll | atoll error | Calculon error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['gpus']} | {r['layout']} | {r['published_tflops_per_gpu']:.0f} | "
            f"{r['predicted_tflops_per_gpu']:.1f} | {r['error']:+.1%} | "
            f"{'+' + format(CALCULON_ERRORS['worst'], '.1%') if r['model'] == CALCULON_ERRORS['worst_row'] else 'over'}"
            " |"
        )
    lines += [
        "",
        f"atoll: mean |error| {summary['mean_abs_error']:.1%}, worst {summary['worst_abs_error']:.1%} "
        f"(signed mean {summary['mean_signed_error']:+.1%}). Calculon: {CALCULON_ERRORS['average']:.1%} mean, "
        f"{CALCULON_ERRORS['worst']:.1%} worst, overestimating every row.",
        f"Sensitivity, burst (MAMF) instead of sustained matmul efficiency: mean "
        f"{summary['sensitivity_burst_matmul_efficiency']['mean_abs_error']:.1%}, worst "
        f"{summary['sensitivity_burst_matmul_efficiency']['worst_abs_error']:.1%}.",
        "",
        "Free search (same GPUs and batch; TFLOP/s counted with Eq. 3, i.e. the paper's FLOPs per iteration / time):",
        "",
        "| model | paper layout (predicted) | best with the paper's knobs | best with all knobs |",
        "|---|---|---|---|",
    ]
    for s in summary["free_search"]:
        lines.append(
            f"| {s['model']} | {s['paper_tflops']} | {s['paper_knobs']['layout']}: {s['paper_knobs']['tflops']} "
            f"(x{s['paper_knobs']['speedup']}) | {s['all_knobs']['layout']}: {s['all_knobs']['tflops']} "
            f"(x{s['all_knobs']['speedup']}) |"
        )
    lines += ["", "## This lab: the multi-site runs of bench/wan.py", ""]
    if wan_records:
        lines += [
            "Each run predicted by the event simulator from the calibrated compute step "
            f"({wan_notes['compute_step_s']:.3f} s, "
            "both sites sharing this machine), the link "
            f"({wan_notes['link_mbps']:.2f} Mbit/s per site) and the codec's "
            f"payload; results of {wan_notes['wan_results']} ({wan_notes['wan_date']}).",
            "",
            "| run | measured s/step | predicted s/step | error | measured util | predicted util "
            "| compute s/step in the run |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in wan_records:
            lines.append(
                f"| {r['run']} | {r['measured_step_s']:.3f} | {r['predicted_step_s']:.3f} | {r['error']:+.1%} | "
                f"{r['measured_utilization']:.1%} | {r['predicted_utilization']:.1%} | "
                f"{r['measured_compute_step_s']:.3f} |"
            )
        errs = [abs(r["error"]) for r in wan_records]
        lines += [
            "",
            f"Step time: mean |error| {statistics.mean(errs):.1%}, worst {max(errs):.1%}; "
            "utilization: mean |difference| "
            f"{statistics.mean(abs(r['utilization_error']) for r in wan_records):.1%} points.",
        ]
    else:
        lines.append(f"No measurements: {wan_notes['missing']} is missing (run bench/wan.py first).")
    lines += ["", "## This lab (single-site runs of bench/throughput.py)", ""]
    if any("error_catalog" in r for r in lab_records):  # the multi-site and reference rows have their own tables
        lines += [
            f"Matmul peak measured by bench/throughput.py: {lab_notes['matmul_peak_all_cores'] / 1e9:.1f} GFLOP/s "
            f"({lab_notes['cores']} cores; each of n ranks gets 1/n); calibrated CPU matmul efficiency "
            f"{lab_notes.get('calibrated_matmul_efficiency')}.",
            "",
            "| run | role | measured step s | predicted step s | error | catalog-only error "
            "| measured MFU | predicted MFU |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in lab_records:
            if "error_catalog" not in r:
                continue
            lines.append(
                f"| {r['run']} | {r.get('role', '')} | {r['measured_step_s']:.3f} | {r['predicted_step_s']:.3f} | "
                f"{r.get('error', r['error_catalog']):+.1%} | {r['error_catalog']:+.1%} | "
                f"{r['measured_utilization']:.1%} | "
                f"{r['predicted_utilization']:.1%} |"
            )
        refs = [r for r in lab_records if "measured_seconds" in r]
        if refs:
            lines += [
                "",
                "Earlier two-site runs (shared/REFERENCES.md), predicted from its unloaded single-process speed:",
                "",
                "| run | measured s | predicted s | measured utilization | predicted utilization |",
                "|---|---|---|---|---|",
            ]
            for r in refs:
                lines.append(
                    f"| {r['run']} | {r['measured_seconds']:,.0f} | {r['predicted_seconds']:,.0f} | "
                    f"{r['measured_utilization']:.1%} | {r['predicted_utilization']:.1%} |"
                )
    else:
        lines.append(f"No measurements: {lab_notes['missing']} is missing (run bench/throughput.py first).")
    (RESULTS / "planner.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
