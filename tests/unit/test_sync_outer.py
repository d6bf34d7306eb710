import math

import pytest
import torch

from atoll.errors import AtollError
from atoll.sync.fragments import assign_owners
from atoll.sync.outer import OuterOptimizer, weighted_average

SHAPES = [(6, 5), (5,), (3, 2, 4)]
WEIGHTS = [3.0, 1.0, 2.5]  # tokens per site: deliberately not summing to 1


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def initial_params() -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen(i)) for i, s in enumerate(SHAPES)]


def inner_training(start: list[torch.Tensor], *, site: int, round_: int) -> list[torch.Tensor]:
    """Stand-in for H inner steps: a deterministic drift per site and round."""
    return [p - 0.1 * torch.randn(p.shape, generator=gen(1000 * round_ + 10 * site + i)) for i, p in enumerate(start)]


def run_rounds(outer: OuterOptimizer, rounds: range) -> list[list[torch.Tensor]]:
    """Each round: every site starts from θ, trains, sends Δ; θ takes the outer step."""
    history = []
    for r in rounds:
        deltas = []
        for site in range(len(WEIGHTS)):
            local = [torch.empty(s) for s in SHAPES]
            outer.copy_to(local)
            deltas.append(outer.pseudo_gradient(inner_training(local, site=site, round_=r)))
        outer.step(weighted_average(deltas, WEIGHTS))
        history.append([p.clone() for p in outer.params])
    return history


def test_outer_step_is_exactly_sgd_nesterov_on_the_weighted_average() -> None:
    outer = OuterOptimizer(initial_params())
    ref = [p.clone() for p in initial_params()]
    ref_opt = torch.optim.SGD(ref, lr=0.7, momentum=0.9, nesterov=True)
    total = sum(WEIGHTS)
    for r in range(5):
        site_params = [inner_training([p.clone() for p in ref], site=s, round_=r) for s in range(len(WEIGHTS))]
        # By hand: Δ_s = θ − θ_s, average Σ (w_s / W) Δ_s, then one SGD(nesterov) step.
        for i, p in enumerate(ref):
            avg = torch.zeros_like(p)
            for site, w in enumerate(WEIGHTS):
                avg.add_(p.detach() - site_params[site][i], alpha=w / total)
            p.grad = avg
        ref_opt.step()
        (got,) = run_rounds(outer, range(r, r + 1))
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), f"round {r}"


def test_averaging_equals_the_weighted_mean_of_site_params() -> None:
    outer = OuterOptimizer.averaging(initial_params())
    for r in range(3):
        sites = []
        for s in range(len(WEIGHTS)):
            local = [torch.empty(shape) for shape in SHAPES]
            outer.copy_to(local)
            sites.append(inner_training(local, site=s, round_=r))
        outer.step(weighted_average([outer.pseudo_gradient(p) for p in sites], WEIGHTS))
        for i, p in enumerate(outer.params):
            mean = sum(w * site[i] for w, site in zip(WEIGHTS, sites, strict=True)) / sum(WEIGHTS)
            assert torch.allclose(p, mean, atol=1e-6, rtol=0)


def test_weights_are_normalized() -> None:
    deltas = [[torch.randn(4, generator=gen(s))] for s in range(3)]
    a = weighted_average(deltas, [3.0, 1.0, 2.0])[0]
    b = weighted_average(deltas, [0.3, 0.1, 0.2])[0]
    assert torch.allclose(a, b, atol=1e-7)
    only_first = weighted_average(deltas, [5.0, 0.0, 0.0])[0]
    assert torch.equal(only_first, deltas[0][0])


def test_state_dict_round_trip_reproduces_later_steps_bitwise() -> None:
    outer = OuterOptimizer(initial_params(), lr=0.5, momentum=0.8)
    run_rounds(outer, range(0, 2))
    saved = outer.state_dict()
    expected = run_rounds(outer, range(2, 5))  # stepping on must not change `saved`
    resumed = OuterOptimizer([torch.zeros(s) for s in SHAPES], lr=0.5, momentum=0.8)
    resumed.load_state_dict(saved)
    got = run_rounds(resumed, range(2, 5))
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_per_owner_outer_steps_equal_the_whole_model_step() -> None:
    """The sharded exchange: each rank steps only the tensors it owns; together they equal one step."""
    whole = OuterOptimizer(initial_params())
    owner = assign_owners({str(i): math.prod(shape) for i, shape in enumerate(SHAPES)}, num_ranks=2)
    mine = {r: [i for i in range(len(SHAPES)) if owner[str(i)] == r] for r in range(2)}
    ranks = {r: OuterOptimizer([initial_params()[i] for i in idx]) for r, idx in mine.items()}
    for r in range(3):
        theta = [torch.empty(s) for s in SHAPES]
        whole.copy_to(theta)
        sites = [inner_training(theta, site=s, round_=r) for s in range(len(WEIGHTS))]
        whole.step(weighted_average([whole.pseudo_gradient(p) for p in sites], WEIGHTS))
        for rank, outer in ranks.items():
            local = [[p[i] for i in mine[rank]] for p in sites]
            outer.step(weighted_average([outer.pseudo_gradient(p) for p in local], WEIGHTS))
    for rank, outer in ranks.items():
        for i, t in zip(mine[rank], outer.params, strict=True):
            assert torch.equal(t, whole.params[i])


def test_theta_is_a_detached_fp32_copy_and_copy_to_casts() -> None:
    model = [torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16))]
    outer = OuterOptimizer(model)
    assert outer.params[0].dtype == torch.float32 and not outer.params[0].requires_grad
    with torch.no_grad():
        model[0].add_(1)
    assert not torch.equal(outer.params[0], model[0].float())
    outer.copy_to(model)
    assert model[0].dtype == torch.bfloat16 and torch.equal(model[0].float(), outer.params[0])


def test_errors() -> None:
    with pytest.raises(AtollError, match="nesterov=false"):
        OuterOptimizer(initial_params(), momentum=0.0)
    with pytest.raises(AtollError, match="lr"):
        OuterOptimizer(initial_params(), lr=0.0)
    with pytest.raises(AtollError, match="momentum"):
        OuterOptimizer(initial_params(), momentum=1.0)
    outer = OuterOptimizer(initial_params())
    with pytest.raises(AtollError, match="tensors it was built from"):
        outer.pseudo_gradient([torch.zeros(3)])
    deltas = [[torch.zeros(2)], [torch.zeros(2)]]
    with pytest.raises(AtollError, match="one weight per site"):
        weighted_average(deltas, [1.0])
    with pytest.raises(AtollError, match="non-negative"):
        weighted_average(deltas, [1.0, -1.0])
    with pytest.raises(AtollError, match="not all zero"):
        weighted_average(deltas, [0.0, 0.0])
    with pytest.raises(AtollError, match="shapes"):
        weighted_average([[torch.zeros(2)], [torch.zeros(3)]], [1.0, 1.0])
