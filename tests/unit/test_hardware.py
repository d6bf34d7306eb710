"""The device catalog: lookups, aliases, user overrides, and the errors a user sees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from atoll.errors import AtollError
from atoll.hardware import BUILTIN, get_device, list_devices, reset_catalog, use_hardware_file

REQUIRED = {"a100-80g", "a800", "h100", "h800", "h20", "l20", "ascend-910b", "ascend-910c", "mlu370", "cpu"}


@pytest.fixture(autouse=True)
def _fresh_catalog(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("ATOLL_HARDWARE", raising=False)
    reset_catalog()
    yield
    reset_catalog()


def test_catalog_has_every_required_device_with_sane_figures() -> None:
    assert REQUIRED <= set(BUILTIN)
    for spec in list_devices():
        assert spec.peak_tflops > 0 and spec.memory_gb > 0 and spec.memory_bw_tbs > 0
        assert 0 < spec.matmul_efficiency <= 1
    a100 = get_device("a100-80g")
    assert (a100.peak_tflops, a100.memory_gb, a100.backend) == (312.0, 80.0, "nccl")
    assert get_device("ascend-910b").backend == "hccl" and get_device("ascend-910b").disputed
    assert get_device("cpu").compute_bytes == 4


def test_alias_and_unknown_kind() -> None:
    assert get_device("a100") is get_device("a100-80g")
    with pytest.raises(AtollError, match=r"unknown device kind 'tpu-v9'; known kinds: .*a100-80g.*cpu"):
        get_device("tpu-v9")


def test_hardware_file_overrides_derives_and_adds(tmp_path: Path) -> None:
    f = tmp_path / "hw.yaml"
    f.write_text(
        "devices:\n"
        "  a100-80g: {matmul_efficiency: 0.5, efficiency_source: calibrated}\n"
        "  my-npu: {base: ascend-910b, peak_tflops: 280, name: Ascend 910B4}\n"
        "  x1: {name: X1, vendor: Acme, backend: nccl, peak_tflops: 400, memory_gb: 96, memory_bw_tbs: 3.0,"
        " intra_node_gbs: 300}\n"
    )
    use_hardware_file(f)
    assert get_device("a100-80g").matmul_efficiency == 0.5
    assert get_device("a100-80g").peak_tflops == 312.0
    npu = get_device("my-npu")
    assert (npu.peak_tflops, npu.backend, npu.memory_gb) == (280.0, "hccl", 64.0)
    assert get_device("x1").memory_gb == 96


def test_env_var_file_is_read_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "hw.yaml"
    f.write_text("devices:\n  lab-gpu: {base: l20, memory_gb: 24}\n")
    monkeypatch.setenv("ATOLL_HARDWARE", str(f))
    reset_catalog()
    assert get_device("lab-gpu").memory_gb == 24


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("devices:\n  a100-80g: {flops: 3}\n", "unknown field"),
        ("devices:\n  a100-80g: {matmul_efficiency: 1.5}\n", "fraction in"),
        ("devices:\n  new-one: {peak_tflops: 3}\n", "needs name, vendor, backend"),
        ("devices:\n  x: {base: nope}\n", "base 'nope' is not a known kind"),
        ("gpus: {}\n", "one key, `devices:`"),
    ],
)
def test_bad_hardware_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "hw.yaml"
    f.write_text(text)
    with pytest.raises(AtollError, match=message):
        use_hardware_file(f)
    assert get_device("a100-80g").matmul_efficiency == BUILTIN["a100-80g"].matmul_efficiency


def test_topology_validation_uses_the_catalog(tmp_path: Path) -> None:
    from atoll.config.topology import load_topology

    f = tmp_path / "t.yaml"
    f.write_text("name: t\nsites:\n  - name: a\n    devices: [{kind: tpu-v9, count: 8}]\n")
    with pytest.raises(AtollError, match="unknown device kind 'tpu-v9'") as err:
        load_topology(f)
    assert "\n" not in str(err.value)
