"""Each site's device and collective library come from its devices' catalog entries."""

from __future__ import annotations

import pytest
import torch

from atoll.config.topology import SiteSpec
from atoll.errors import AtollError
from atoll.parallel.dist import DistEnv, npu_available, pick_backend, pick_device


def test_auto_follows_the_sites_devices_and_falls_back_to_the_cpu_in_the_lab() -> None:
    env = DistEnv()
    assert pick_device("auto", env, site_backend="gloo") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto", env, site_backend="nccl") == torch.device("cpu")
    if not npu_available():
        assert pick_device("auto", env, site_backend="hccl") == torch.device("cpu")


@pytest.mark.skipif(npu_available(), reason="torch_npu is installed here")
def test_npu_without_torch_npu_names_the_missing_package() -> None:
    with pytest.raises(AtollError, match="torch_npu"):
        pick_device("npu", DistEnv())


def test_backend_follows_the_device() -> None:
    assert pick_backend("auto", torch.device("cpu")) == "gloo"
    assert pick_backend("auto", torch.device("cuda", 0)) == "nccl"
    # torch knows "npu" only once torch_npu registers it: a stand-in with that type.
    npu = type("Device", (), {"type": "npu"})()
    assert pick_backend("auto", npu) == "hccl"  # type: ignore[arg-type]
    with pytest.raises(AtollError, match="'hccl' but the device is cpu"):
        pick_backend("hccl", torch.device("cpu"))


def test_a_site_mixing_collective_libraries_is_refused_like_the_planner_does() -> None:
    nvidia = SiteSpec(name="a", devices=[{"kind": "a100-80g", "count": 8}, {"kind": "h20", "count": 8}])
    assert nvidia.backend == "nccl"
    assert SiteSpec(name="b", devices=[{"kind": "ascend-910b", "count": 8}]).backend == "hccl"
    mixed = SiteSpec(name="c", devices=[{"kind": "a100-80g", "count": 8}, {"kind": "ascend-910b", "count": 8}])
    with pytest.raises(AtollError, match="split it into one site per backend"):
        _ = mixed.backend


def test_ranks_take_the_sites_devices_in_order() -> None:
    site = SiteSpec(name="a", devices=[{"kind": "cpu", "count": 1}, {"kind": "cpu", "count": 1, "slowdown": 2.0}])
    assert [d.slowdown for d in site.rank_devices(2)] == [1.0, 2.0]
    assert [d.slowdown for d in site.rank_devices(4)] == [1.0, 2.0, 1.0, 2.0]
