"""Noticing a step that went wrong: a non-finite loss or gradient, and a loss that spikes.

Pure bookkeeping, no communication: the loop hands `StepGuard.judge` the site's loss and
gradient norm of every step (the same numbers on every rank, so every rank decides alike) and
acts on the verdict:

- ``apply``: a normal step (a lone spike is applied too: most recover by themselves);
- ``skip``: the loss or the gradient norm is not finite; the optimizer step is not taken;
- ``rollback``: `max_bad_steps` non-finite steps in a row, or a spike that lasted
  `spike_steps` steps in a row (0: spikes are only reported): go back to the last good
  checkpoint (or, with peers, to the sites' shared parameters) and skip the batches that led
  here (what PaLM, OPT and BLOOM did by hand).

Spikes are judged against an exponential moving mean and variance of the loss (a window of about
1 / (1 - beta) steps): a step is a spike when its loss exceeds the mean by more than
`spike_sigma` deviations *and* by more than `spike_ratio` of the mean. The ratio keeps a run
whose loss barely moves (tiny variance late in training) from firing on noise; the deviations
keep a noisy run from firing on its own noise. Spike steps do not update the running estimate,
so a lasting spike cannot become the new normal before it is caught.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from atoll.config import TrainSection

Action = Literal["apply", "skip", "rollback"]


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str | None = None  # "non-finite loss", "non-finite gradient norm", "loss spike"
    first_bad_step: int | None = None  # with rollback: the first step of the bad run


@dataclass
class StepGuard:
    """Judges each step; its state goes into checkpoints so a resumed run judges alike."""

    max_bad_steps: int = 3
    spike_sigma: float = 6.0
    spike_ratio: float = 0.25
    spike_steps: int = 10
    warmup_steps: int = 50  # steps observed before spikes are judged
    beta: float = 0.98
    mean: float | None = None
    var: float = 0.0
    observed: int = 0
    bad_run: list[int] = field(default_factory=list)  # consecutive non-finite steps
    spike_run: list[int] = field(default_factory=list)  # consecutive spike steps

    @classmethod
    def from_config(cls, t: TrainSection) -> StepGuard:
        return cls(
            max_bad_steps=t.max_bad_steps,
            spike_sigma=t.spike_sigma,
            spike_ratio=t.spike_ratio,
            spike_steps=t.spike_steps,
        )

    def judge(self, step: int, *, loss: float, grad_norm: float) -> Verdict:
        """The verdict on `step` (1-based) whose site-wide mean loss and gradient norm are given."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            self.bad_run.append(step)
            self.spike_run.clear()
            reason = "non-finite loss" if not math.isfinite(loss) else "non-finite gradient norm"
            if len(self.bad_run) >= self.max_bad_steps:
                return Verdict("rollback", reason, first_bad_step=self.bad_run[0])
            return Verdict("skip", reason)
        self.bad_run.clear()
        if self.is_spike(loss):
            self.spike_run.append(step)
            if self.spike_steps and len(self.spike_run) >= self.spike_steps:
                return Verdict("rollback", "loss spike", first_bad_step=self.spike_run[0])
            return Verdict("apply", "loss spike")
        self.spike_run.clear()
        self._update(loss)
        return Verdict("apply")

    @property
    def in_bad_run(self) -> bool:
        """Whether the last step was bad (not finite, or a spike): no time to write a checkpoint."""
        return bool(self.bad_run or self.spike_run)

    def is_spike(self, loss: float) -> bool:
        if self.mean is None or self.observed < self.warmup_steps:
            return False
        excess = loss - self.mean
        return excess > self.spike_sigma * math.sqrt(self.var) and excess > self.spike_ratio * abs(self.mean)

    def _update(self, loss: float) -> None:
        self.observed += 1
        if self.mean is None:
            self.mean = loss
            return
        delta = loss - self.mean
        self.mean += (1 - self.beta) * delta
        self.var = self.beta * (self.var + (1 - self.beta) * delta * delta)

    def reset_runs(self) -> None:
        """After a rollback: the bad run is behind us (the running estimate stays)."""
        self.bad_run.clear()
        self.spike_run.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "observed": self.observed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = state.get("mean")
        self.var = float(state.get("var", 0.0))
        self.observed = int(state.get("observed", 0))
        self.reset_runs()
