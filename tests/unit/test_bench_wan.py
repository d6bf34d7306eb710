"""bench/wan.py v2: its settings checks, what runs again per seed, and the table's means and spreads."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import wan  # noqa: E402
import wan_report  # noqa: E402


def parse(*argv: str) -> Any:
    return wan.resolve(wan.build_parser().parse_args(list(argv)))


def test_defaults_run_16_rounds_and_fit_torchft_streaming() -> None:
    args = parse()
    assert args.rounds >= 16 and args.steps == args.rounds * args.inner_steps
    assert args.inner_steps % args.fragments == 0 and args.overlap_steps < args.inner_steps // args.fragments
    assert args.out == wan.RESULTS and len(args.seeds) >= 2


def test_quick_never_writes_bench_results() -> None:
    args = parse("--quick")
    assert args.out == wan.QUICK_OUT != wan.RESULTS
    assert args.seeds == [0] and args.rounds * args.inner_steps == args.steps == 8
    kinds = wan.grid(args)
    assert {k[1] for k in kinds} == {"ddp", "diloco", "streaming", "delayed"}
    assert ("torchft", "streaming", "none") in kinds and ("atoll", "streaming", "none") in kinds


@pytest.mark.parametrize(
    "argv",
    [("--rounds", "8"), ("--inner-steps", "30"), ("--overlap-steps", "8"), ("--rounds", "16", "--steps", "100")],
)
def test_bad_settings_stop_with_the_fix(argv: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit, match="rounds|fragments|steps"):
        parse(*argv)


def record(system: str, strategy: str, codec: str, seed: int, val: float, wall: float, sent: float) -> dict[str, Any]:
    return {
        "system": system,
        "strategy": strategy,
        "codec": codec,
        "seed": seed,
        "val_loss": val,
        "wall_s": wall,
        "wan_bytes": sent,
        "compute_utilization": 0.5,
    }


def test_means_spreads_and_the_repeats_after_the_first_seed() -> None:
    recs = [
        record("atoll", "ddp", "none", 0, 5.0, 1000.0, 1e9),
        record("atoll", "ddp", "none", 1, 5.2, 1200.0, 1e9),
        record("atoll", "diloco", "none", 0, 5.3, 300.0, 1e8),
        record("atoll", "streaming", "int4", 0, 5.1, 100.0, 1e6),
        record("torchft", "diloco", "none", 0, 5.3, 320.0, 1e8),
    ]
    for r in recs:  # as write_results sets them: against the same seed's DDP
        ddp = next(d for d in recs if d["strategy"] == "ddp" and d["seed"] == r["seed"])
        r["bytes_reduction_vs_ddp"] = ddp["wan_bytes"] / r["wan_bytes"]
        r["val_loss_vs_ddp"] = r["val_loss"] / ddp["val_loss"] - 1
    rows = {(r["system"], r["strategy"], r["codec"]): r for r in wan_report.aggregate(recs)}
    ddp = rows[("atoll", "ddp", "none")]
    assert ddp["seeds"] == 2
    assert ddp["val_loss"]["mean"] == pytest.approx(5.1) and ddp["val_loss"]["spread"] == pytest.approx(0.1)
    assert wan_report.pm(ddp["wall_s"], ",.0f") == "1,100 ± 100"
    assert wan_report.pm(rows[("atoll", "diloco", "none")]["wall_s"], ",.0f") == "300"  # one seed: no spread
    assert wan_report.check_targets(recs)["best"] == "streaming int4"  # 1,000x fewer bytes, within 2%
    args = parse("--seeds", "0", "1")
    again = wan.repeats(args, recs)
    assert again[:2] == [("atoll", "ddp", "none"), ("atoll", "streaming", "int4")]
    assert {("atoll", "diloco", "none"), ("atoll", "streaming", "none")} <= set(again)
    assert {("torchft", "diloco", "none"), ("torchft", "streaming", "none")} <= set(again)


def test_predicted_time_counts_fp32_exchanges_at_twice_a_bf16_scenario() -> None:
    args = parse()
    diloco = wan.predicted_seconds(("atoll", "diloco", "none"), args, 50.0, 2.0)
    assert diloco == pytest.approx(args.steps + args.rounds * 50.0 * 4 / 2)
    overlapped = wan.predicted_seconds(("atoll", "delayed", "int4"), args, 50.0, 2.0)
    assert args.steps <= overlapped < diloco


def test_the_closest_run_on_each_target_and_the_h_each_codec_needs() -> None:
    recs = [
        record("atoll", "ddp", "none", 0, 5.0, 1000.0, 32e9),
        record("atoll", "diloco", "none", 0, 5.1, 300.0, 2e9),  # +2%, 16x
        record("atoll", "diloco", "topk", 0, 6.0, 100.0, 40e6),  # +20%, 800x
    ]
    recs[2]["compute_utilization"] = 0.9
    for r in recs:
        r["bytes_reduction_vs_ddp"] = recs[0]["wan_bytes"] / r["wan_bytes"]
        r["val_loss_vs_ddp"] = r["val_loss"] / recs[0]["val_loss"] - 1
    text = "\n".join(wan_report.closest_section(recs, inner_steps=32, steps=512))
    assert "- loss: diloco + none" in text and "- utilization: diloco + topk" in text
    assert "- bytes (best loss past 500x): diloco + topk" in text
    # none sends 16x at H = 32: 500x needs H = 32 x 500 / 16 = 1,000, half a round of 512 steps
    assert "- none: H >= 1,000, 0.5 rounds" in text and "- topk: H >= 20, 25.6 rounds" in text


def test_a_grid_codec_with_options_runs_with_its_settings() -> None:
    assert wan.codec_flags("int4") == ["--sync.codec=int4"]
    assert wan.codec_flags("lowrank8-bf16") == ["--sync.codec=lowrank", "--sync.rank=8", "--sync.value_dtype=bf16"]
    assert set(wan.CODEC_VARIANTS) <= set(wan.CODEC_WIDTH)


def test_between_runs_meeting_as_many_targets_the_best_is_the_closer_to_the_rest() -> None:
    recs = [
        record("atoll", "ddp", "none", 0, 5.0, 1000.0, 32e9),
        record("atoll", "delayed", "topk", 0, 6.0, 80.0, 40e6),  # 800x, 96%, +20%: the faster
        record("atoll", "delayed", "lowrank", 0, 5.3, 90.0, 40e6),  # 800x, 96%, +6%
    ]
    for r in recs:
        r["compute_utilization"] = 0.96
        r["bytes_reduction_vs_ddp"] = recs[0]["wan_bytes"] / r["wan_bytes"]
        r["val_loss_vs_ddp"] = r["val_loss"] / recs[0]["val_loss"] - 1
    assert wan_report.check_targets(recs)["best"] == "delayed lowrank"
