"""The cross-site sync engine with sites simulated in one process (no process group, no torchft).

Each site is a thread with its own small model and `CrossSiteSync`; a fake transport pairs the
sites' payloads through a barrier, like the all-gather the real one runs over torchft (which
tests/dist/test_multisite.py covers). Inner training is replaced by a deterministic drift per
site and step, so expected parameters can be computed by hand, bit for bit. Faults are injected
deterministically: exchange k fails on every site, or arrives poisoned.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from atoll.config.schema import SyncSection
from atoll.sync.engine import CrossSiteSync
from atoll.sync.envelope import Sealer
from atoll.sync.transport import ByteCounter, Gathered

BARRIER_SECONDS = 60.0  # a site that never arrives fails the test instead of hanging it
SECRET = b"the run's secret, shared by every site"


# ---------------------------------------------------------------------------- test doubles


@dataclass
class Hub:
    """What the sites' transports share: a barrier, one slot per site, and mailboxes for heals.

    `fail`: exchange indices (0-based, counted per site) that fail on every site; `poison`:
    exchange index -> the site whose payload arrives as NaNs (sealed by the sender: a site that
    diverged); `tamper`: exchange index -> the site whose payload is altered in transit (after it
    was sealed) on its way to every other site.
    """

    num_sites: int
    fail: set[int] = field(default_factory=set)
    poison: dict[int, int] = field(default_factory=dict)
    tamper: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.barrier = threading.Barrier(self.num_sites, timeout=BARRIER_SECONDS)
        self.slots: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_sites
        self.mail = {(a, b): queue.Queue() for a in range(self.num_sites) for b in range(self.num_sites)}


class FakeTransport:
    """The `Transport` protocol over a `Hub`: a blocking all-gather of (envelope, body), and
    point-to-point transfers through the hub's mailboxes."""

    def __init__(self, hub: Hub, site: int, secret: bytes = SECRET) -> None:
        self.hub = hub
        self.site = site
        self.counter = ByteCounter()
        self.sealer = Sealer(secret)
        self.weights: list[float] = []  # the weight given to each exchange, failed ones included

    def exchange(self, envelope: torch.Tensor, body: torch.Tensor) -> Gathered | None:
        index = len(self.weights)
        header, _ = self.sealer.open(envelope, body)
        self.weights.append(header.weight)
        if index in self.hub.fail:
            self.counter.failed += 1
            return None
        if self.hub.poison.get(index) == self.site:
            body = torch.full((body.numel() // 4,), float("nan")).view(torch.uint8)
            envelope = self.sealer.seal(header, body)
        hub = self.hub
        hub.slots[self.site] = (envelope.clone(), body.clone())
        hub.barrier.wait()
        out = [slot for slot in hub.slots if slot is not None]
        hub.barrier.wait()  # no site overwrites its slot before every site has read them all
        bad = hub.tamper.get(index)
        if bad is not None and bad != self.site:
            altered = out[bad][1].clone()
            altered[0] ^= 1  # one bit flipped on the way
            out[bad] = (out[bad][0], altered)
        wire = envelope.numel() + body.numel()
        self.counter.add(sent=wire * (hub.num_sites - 1), received=wire * (hub.num_sites - 1), seconds=0.0)
        return Gathered(self.site, out)

    def transfer(self, tensor: torch.Tensor, *, src: int, dst: list[int], rank: int) -> torch.Tensor | None:
        if rank == src:
            for d in dst:
                self.hub.mail[(src, d)].put(tensor.clone())
            self.counter.add(sent=tensor.numel() * len(dst), received=0, seconds=0.0, exchanges=0)
            return tensor
        tensor.copy_(self.hub.mail[(src, rank)].get(timeout=BARRIER_SECONDS))
        self.counter.add(sent=0, received=tensor.numel(), seconds=0.0, exchanges=0)
        return tensor

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- sites


def small_model() -> nn.Module:
    """The same weights on every site (a fixed generator, not the global RNG)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def drift(model: nn.Module, *, site: int, step: int) -> None:
    """Stand-in for one inner optimizer step: a deterministic move per site and step."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            g = torch.Generator().manual_seed(10_000 * site + 100 * step + i)
            p.sub_((0.05 * torch.randn(p.shape, generator=g)).to(p.device))


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def make_sync(
    model: nn.Module, hub: Hub, site: int, cfg: SyncSection, *, inner_steps: int, secret: bytes = SECRET
) -> CrossSiteSync:
    return CrossSiteSync(
        model,
        cfg,
        transport=FakeTransport(hub, site, secret),
        site_name=f"s{site}",
        local_rank=0,
        local_world_size=1,
        inner_steps=inner_steps,
        secret=secret,
        address=f"10.0.0.{site + 1}",
    )


@dataclass
class Site:
    index: int
    model: nn.Module
    sync: CrossSiteSync
    before_sync: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # local params just before after_step
    after: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # params after after_step

    @property
    def transport(self) -> FakeTransport:
        return self.sync.transport  # type: ignore[return-value]


def make_sites(cfg: SyncSection, hub: Hub, *, inner_steps: int) -> list[Site]:
    sites = []
    for s in range(hub.num_sites):
        model = small_model()
        sites.append(Site(s, model, make_sync(model, hub, s, cfg, inner_steps=inner_steps)))
    return sites


def run_steps(
    sites: list[Site],
    steps: range,
    *,
    tokens: Callable[[int, int], int],
    finish_at: int | None = None,
    on_step: Callable[[Site, int], None] | None = None,
) -> None:
    """Every site, in its own thread: drift, then `after_step(step, tokens=tokens(site, step))`."""

    def one_site(site: Site) -> None:
        try:
            for step in steps:
                drift(site.model, site=site.index, step=step)
                site.before_sync[step] = params_of(site.model)
                site.sync.after_step(step, tokens=tokens(site.index, step))
                if finish_at == step:
                    site.sync.finish(step)
                site.after[step] = params_of(site.model)
                if on_step is not None:
                    on_step(site, step)
        except BaseException:
            site.transport.hub.barrier.abort()  # the other sites fail fast instead of waiting
            raise

    with ThreadPoolExecutor(max_workers=len(sites)) as pool:
        for future in [pool.submit(one_site, site) for site in sites]:
            future.result()


def weighted_avg_by_hand(
    theta: list[torch.Tensor], locals_: list[list[torch.Tensor]], weights: list[float]
) -> list[torch.Tensor]:
    """Σ (w_s / W) (θ − x_s), accumulated in site order from zero."""
    total = float(sum(weights))
    out = [torch.zeros_like(t) for t in theta]
    for x, w in zip(locals_, weights, strict=True):
        for acc, t, xi in zip(out, theta, x, strict=True):
            acc.add_(t - xi, alpha=w / total)
    return out


class ReferenceOuter:
    """θ under torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True), by hand."""

    def __init__(self, theta: list[torch.Tensor]) -> None:
        self.theta = [t.clone() for t in theta]
        self.opt = torch.optim.SGD(self.theta, lr=0.7, momentum=0.9, nesterov=True)

    def step(self, grad: list[torch.Tensor]) -> None:
        for t, g in zip(self.theta, grad, strict=True):
            t.grad = g.clone()
        self.opt.step()


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"{what}: tensor {i} differs by up to {(x - y).abs().max().item():.3g}"


DILOCO = SyncSection(strategy="diloco", inner_steps=2)


# ---------------------------------------------------------------------------- outer step


def test_outer_step_is_sgd_nesterov_on_the_token_weighted_average() -> None:
    hub = Hub(2)
    sites = make_sites(DILOCO, hub, inner_steps=2)
    rate = {0: 3, 1: 1}  # tokens per step: site 0 counts three times as much
    run_steps(sites, range(1, 7), tokens=lambda s, step: rate[s])

    ref = ReferenceOuter(params_of(small_model()))
    for step in (2, 4, 6):
        locals_ = [site.before_sync[step] for site in sites]
        ref.step(weighted_avg_by_hand(ref.theta, locals_, [2.0 * rate[0], 2.0 * rate[1]]))
        for site in sites:
            assert_equal(site.after[step], ref.theta, f"site {site.index} after the sync at step {step}")
    for site in sites:
        assert site.transport.weights == [2.0 * rate[site.index]] * 3
        assert site.sync.applied_log == [(2, 2), (4, 4), (6, 6)]
        assert site.sync.metrics()["sync_rejected"] == 0
    # Between syncs the sites move apart (their own data), then meet again.
    assert not torch.equal(sites[0].after[3][0], sites[1].after[3][0])


def test_ddp_gradients_are_the_token_weighted_average() -> None:
    hub = Hub(2)
    cfg = SyncSection(strategy="ddp")
    sites = make_sites(cfg, hub, inner_steps=1)
    weight = {0: 3, 1: 1}
    grads = {}
    for site in sites:
        g = torch.Generator().manual_seed(site.index)
        for p in site.model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        grads[site.index] = [p.grad.clone() for p in site.model.parameters()]

    def reduce(site: Site) -> bool:
        return site.sync.reduce_gradients(tokens=weight[site.index])

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert all(pool.map(reduce, sites))
    expected = [torch.zeros_like(g) for g in grads[0]]
    for s in (0, 1):
        for acc, g in zip(expected, grads[s], strict=True):
            acc.add_(g, alpha=weight[s] / 4.0)
    for site in sites:
        assert_equal([p.grad for p in site.model.parameters()], expected, f"site {site.index} gradients")


# ---------------------------------------------------------------------------- faults


def test_a_poisoned_update_is_rejected_counted_and_never_applied() -> None:
    hub = Hub(2, poison={1: 1})  # the second exchange: site 1's update arrives as NaNs
    sites = make_sites(DILOCO, hub, inner_steps=2)
    run_steps(sites, range(1, 7), tokens=lambda s, step: 1)

    ref = ReferenceOuter(params_of(small_model()))
    for step in (2, 4, 6):
        locals_ = [site.before_sync[step] for site in sites]
        if step == 4:
            ref.step(weighted_avg_by_hand(ref.theta, locals_[:1], [2.0]))  # site 0's update alone
        else:
            ref.step(weighted_avg_by_hand(ref.theta, locals_, [2.0, 2.0]))
        for site in sites:
            assert_equal(site.after[step], ref.theta, f"site {site.index} after step {step}")
    for site in sites:
        assert site.sync.metrics()["sync_rejected"] == 1
        assert all(torch.isfinite(p).all() for p in site.model.parameters())


def test_a_site_that_diverged_locally_restarts_from_the_global_parameters() -> None:
    hub = Hub(2)
    sites = make_sites(DILOCO, hub, inner_steps=2)

    def blow_up(site: Site, step: int) -> None:
        if site.index == 1 and step == 3:
            with torch.no_grad():
                next(site.model.parameters())[0, 0] = float("nan")  # e.g. an overflow in its inner step

    run_steps(sites, range(1, 7), tokens=lambda s, step: 1, on_step=blow_up)
    # Its round-2 update is rejected everywhere, and like every site it starts round 3 from θ.
    assert all(torch.isfinite(p).all() for p in sites[1].after[4])
    assert_equal(sites[1].after[4], sites[0].after[4], "after the sync at step 4")
    assert_equal(sites[1].after[6], sites[0].after[6], "after the sync at step 6")
    assert [site.sync.metrics()["sync_rejected"] for site in sites] == [1, 1]


def test_a_failed_exchange_leaves_parameters_untouched_and_carries_the_progress() -> None:
    hub = Hub(2, fail={0})  # the first exchange (step 2) fails on every site
    sites = make_sites(DILOCO, hub, inner_steps=2)
    theta_at_2: dict[int, list[torch.Tensor]] = {}

    def keep_theta(site: Site, step: int) -> None:
        if step == 2:
            theta_at_2[site.index] = [t.clone() for t in site.sync.units[0].outer.params]  # type: ignore[union-attr]

    run_steps(sites, range(1, 5), tokens=lambda s, step: 1 + s, on_step=keep_theta)

    theta0 = params_of(small_model())
    for site in sites:
        assert_equal(site.after[2], site.before_sync[2], f"site {site.index}: a failed round changes nothing")
        assert_equal(theta_at_2[site.index], theta0, "θ after the failed round")
        assert site.sync.applied_log == [(4, 4)]
        assert site.sync.metrics()["wan_failed"] == 1
    # The next round's update carries both rounds' progress: Δ = θ0 − x(4).
    ref = ReferenceOuter(theta0)
    ref.step(weighted_avg_by_hand(ref.theta, [site.before_sync[4] for site in sites], [1.0, 2.0]))
    for site in sites:
        assert_equal(site.after[4], ref.theta, f"site {site.index} after step 4")


def test_after_a_failed_exchange_the_weight_counts_the_tokens_of_the_carried_progress() -> None:
    hub = Hub(2, fail={0})
    sites = make_sites(DILOCO, hub, inner_steps=2)
    # Site 0 processes 10 tokens a step in round 1 and 1 in round 2; site 1 the reverse.
    run_steps(sites, range(1, 5), tokens=lambda s, step: 10 if (step <= 2) == (s == 0) else 1)
    # The exchange at step 4 carries the progress of steps 1-4: 22 tokens on either site.
    assert sites[0].transport.weights == [20.0, 22.0]
    assert sites[1].transport.weights == [2.0, 22.0]


# ---------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_continues_bitwise_identically() -> None:
    """Delayed strategy with int8 and error feedback: exchanges in flight, momentum and codec
    residuals all have to survive the round trip."""
    cfg = SyncSection(strategy="delayed", inner_steps=2, codec="int8", block_size=4)
    tokens = lambda s, step: 1 + s  # noqa: E731
    saved: dict[int, bytes] = {}

    def save_at_3(site: Site, step: int) -> None:
        if step == 3:  # the exchange sent at step 2 is in flight (applied at step 4)
            buf = io.BytesIO()
            torch.save({"model": site.model.state_dict(), "sync": site.sync.state_dict()}, buf)
            saved[site.index] = buf.getvalue()

    first = make_sites(cfg, Hub(2), inner_steps=2)
    run_steps(first, range(1, 9), tokens=tokens, finish_at=8, on_step=save_at_3)

    resumed = make_sites(cfg, Hub(2), inner_steps=2)
    for site in resumed:
        state = torch.load(io.BytesIO(saved[site.index]), weights_only=False)
        site.model.load_state_dict(state["model"])
        site.sync.load_state_dict(state["sync"])
    run_steps(resumed, range(4, 9), tokens=tokens, finish_at=8)

    for a, b in zip(first, resumed, strict=True):
        for step in range(4, 9):
            assert_equal(b.after[step], a.after[step], f"site {a.index} at step {step}")
        assert a.sync.applied_log == b.sync.applied_log == [(4, 2), (6, 4), (8, 6), (8, 8)]
        assert a.sync.metrics()["wan_bytes_sent"] == b.sync.metrics()["wan_bytes_sent"]
    assert_equal(first[0].after[8], first[1].after[8], "the sites at the end")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sites_training_on_cuda_exchange_through_host_memory() -> None:
    """Parameters on the GPU: θ, anchors and payloads stay in host memory (the cross-site gloo
    group takes CPU tensors) and the sites end where the same run on the CPU ends."""

    def run(device: str) -> list[Site]:
        sites = make_sites(DILOCO, Hub(2), inner_steps=2)
        for site in sites:
            site.model.to(device)
        run_steps(sites, range(1, 7), tokens=lambda s, k: 100 + s, finish_at=6)
        return sites

    on_cpu, on_cuda = run("cpu"), run("cuda")
    for a, b in zip(on_cpu, on_cuda):
        assert all(p.device.type == "cuda" for p in b.model.parameters())
        assert all(t.device.type == "cpu" for t in b.sync.anchor.values())
        assert all(t.device.type == "cpu" for t in b.sync.units[0].outer.params)  # type: ignore[union-attr]
        for x, y in zip(params_of(a.model), params_of(b.model)):
            torch.testing.assert_close(y.cpu(), x, rtol=0, atol=1e-6)
    ends = [params_of(site.model) for site in on_cuda]
    assert all(torch.equal(x, y) for x, y in zip(*ends))  # both sites end on the same θ
