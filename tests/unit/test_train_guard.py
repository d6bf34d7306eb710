"""StepGuard: non-finite steps are skipped and then rolled back, spikes are caught, noise is not."""

from __future__ import annotations

import math

import numpy as np

from atoll.train.guard import StepGuard


def test_non_finite_steps_are_skipped_then_rolled_back_after_max_bad_steps() -> None:
    guard = StepGuard(max_bad_steps=3)
    assert guard.judge(1, loss=5.0, grad_norm=1.0).action == "apply"
    first = guard.judge(2, loss=math.nan, grad_norm=1.0)
    assert (first.action, first.reason) == ("skip", "non-finite loss")
    second = guard.judge(3, loss=4.0, grad_norm=math.inf)
    assert (second.action, second.reason) == ("skip", "non-finite gradient norm")
    third = guard.judge(4, loss=math.nan, grad_norm=math.nan)
    assert third.action == "rollback" and third.first_bad_step == 2


def test_a_finite_step_ends_a_bad_run() -> None:
    guard = StepGuard(max_bad_steps=2)
    assert guard.judge(1, loss=math.nan, grad_norm=1.0).action == "skip"
    assert guard.judge(2, loss=5.0, grad_norm=1.0).action == "apply"
    assert guard.judge(3, loss=math.nan, grad_norm=1.0).action == "skip"


def _warm(guard: StepGuard, steps: int, *, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        loss = 6.0 - 2.0 * step / steps + rng.normal(0, 0.05)  # a falling, noisy curve
        assert guard.judge(step, loss=loss, grad_norm=1.0).action == "apply"
    return steps


def test_a_lasting_spike_triggers_a_rollback_to_its_first_step() -> None:
    guard = StepGuard(spike_steps=4, warmup_steps=20)
    step = _warm(guard, 100)
    verdicts = [guard.judge(step + i, loss=9.0, grad_norm=1.0) for i in range(1, 5)]
    assert [v.action for v in verdicts] == ["apply", "apply", "apply", "rollback"]
    assert verdicts[0].reason == "loss spike" and verdicts[-1].first_bad_step == step + 1


def test_a_lone_spike_is_applied_and_forgotten() -> None:
    guard = StepGuard(spike_steps=3, warmup_steps=20)
    step = _warm(guard, 100)
    assert guard.judge(step + 1, loss=9.0, grad_norm=1.0).reason == "loss spike"
    assert guard.judge(step + 2, loss=4.0, grad_norm=1.0).action == "apply"
    assert guard.spike_run == []


def test_noise_and_a_falling_loss_never_fire() -> None:
    for seed in range(5):
        _warm(StepGuard(), 400, seed=seed)  # the asserts inside check every verdict


def test_the_running_estimate_survives_a_checkpoint() -> None:
    a = StepGuard(warmup_steps=10)
    rng = np.random.default_rng(0)
    for step in range(1, 51):
        a.judge(step, loss=5.0 + rng.normal(0, 0.05), grad_norm=1.0)
    b = StepGuard(warmup_steps=10)
    b.load_state_dict(a.state_dict())
    assert (b.mean, b.var, b.observed) == (a.mean, a.var, a.observed)
    assert b.is_spike(9.0) and a.is_spike(9.0)
    assert not b.is_spike(5.1)
