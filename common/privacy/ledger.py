"""Differential-privacy bookkeeping for one market: budget, calibrated noise, ledger.

The maths is Opacus's (its accountants and noise calibration); this module
keeps the state a market must carry across rounds and processes. A fresh
accountant each round would forget earlier rounds and under-report epsilon,
so the ledger holds the accountant's whole history, restores it every round
and serialises it with the market's state.

Neighbouring relation: one user of the market with all their interactions
(user-level DP; see :mod:`common.privacy.dp_sgd` for why not one interaction).
A market's units of privacy, and so its sample rate and default delta, are
its users.
"""

from dataclasses import dataclass, field, replace
from math import ceil
from typing import Any

ACCOUNTANTS = ("prv", "rdp")  # prv is Opacus 1.6's default and tightest; rdp is fast and conservative
# Past this noise multiplier what is left of a budget is treated as spent: the steps would learn nothing.
MAX_NOISE_MULTIPLIER = 1e4


class PrivacyBudgetExceeded(RuntimeError):
    """Taking the requested steps would spend more epsilon than the market's budget."""


@dataclass(frozen=True)
class PrivacyBudget:
    """A market's (epsilon, delta) for the whole run and how it is accounted."""

    epsilon: float  # total for all rounds
    delta: float  # below 1 / training examples of the market
    max_grad_norm: float = 1.0  # per-example gradient clipping bound of DP-SGD
    accountant: str = "prv"  # one of ACCOUNTANTS

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"The privacy budget needs epsilon > 0, got {self.epsilon}.")
        if not 0 < self.delta < 1:
            raise ValueError(f"The privacy budget needs 0 < delta < 1, got {self.delta}.")
        if not self.max_grad_norm > 0:
            raise ValueError(f"DP-SGD needs a clipping norm > 0, got {self.max_grad_norm}.")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"Unknown accountant '{self.accountant}'; choose one of {ACCOUNTANTS}.")


def default_delta(num_examples: int) -> float:
    """A delta well below ``1 / num_examples``, the usual ceiling for meaningful DP."""
    if num_examples < 1:
        raise ValueError(f"A market needs training examples to set delta, got {num_examples}.")
    return 0.1 / num_examples


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate as Opacus derives it: one over the batches per epoch."""
    return 1.0 / ceil(num_examples / batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Expected DP-SGD steps per epoch (the batches of a non-private epoch)."""
    return ceil(num_examples / batch_size)


def calibrate_noise(
    budget: PrivacyBudget, rate: float, total_steps: int, prior: list[tuple[float, float, int]] | None = None
) -> float:
    """The noise multiplier that spends exactly the budget over ``total_steps``.

    Calibrated once for a training (rounds x local epochs x steps per epoch),
    never per round. ``prior`` is what the market spent before, in the
    accountant's history format (earlier trainings, Gaussian releases of the
    whole data such as the popularity prior); the steps get what it leaves.

    Raises
    ------
    PrivacyBudgetExceeded
        If ``prior`` alone spends the budget, or what it leaves cannot pay for
        ``total_steps`` at any reasonable noise.
    """
    if total_steps < 1:
        raise ValueError(f"Noise calibration needs at least one step, got {total_steps}.")
    # Opacus is imported where it is used: importing it costs seconds, and a
    # deployed market pays imports on every message (a fresh process each).
    from opacus.accountants.utils import get_noise_multiplier

    if not prior:
        try:
            return get_noise_multiplier(
                target_epsilon=budget.epsilon,
                target_delta=budget.delta,
                sample_rate=rate,
                steps=total_steps,
                accountant=budget.accountant,
            )
        except ValueError as error:
            # Opacus's "The privacy budget is too low.": no noise it tries spends so little.
            raise PrivacyBudgetExceeded(
                f"A budget of epsilon {budget.epsilon} at delta {budget.delta:.3g} cannot pay for {total_steps} "
                f"steps at sample rate {rate:.3g} at any noise Opacus tries ({error})"
            ) from error
    if (spent := epsilon_of(budget, prior)) >= budget.epsilon:
        raise PrivacyBudgetExceeded(
            f"What was spent before (epsilon {spent:.3f}) leaves nothing of the budget of epsilon {budget.epsilon}."
        )
    low, high = 0.0, 10.0
    while epsilon_of(budget, prior + [(high, rate, total_steps)]) > budget.epsilon:
        if high > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetExceeded(
                f"What is left of the budget of epsilon {budget.epsilon} after epsilon {spent:.3f} spent before "
                f"cannot pay for {total_steps} steps at a noise multiplier up to {MAX_NOISE_MULTIPLIER}."
            )
        low, high = high, 2 * high
    while high - low > 0.005:  # Opacus's own tolerance is 0.01 in epsilon; this is finer
        middle = (low + high) / 2
        spent_after = epsilon_of(budget, prior + [(middle, rate, total_steps)])
        low, high = (middle, high) if spent_after > budget.epsilon else (low, middle)
    return high


def release_noise(budget: PrivacyBudget, share: float, prior: list[tuple[float, float, int]] | None = None) -> float:
    """The noise multiplier of a Gaussian release of the whole data that spends ``share`` of what is left.

    What is left is the budget minus what ``prior`` spent; composed with the
    DP-SGD steps the release costs less than that share, and the steps are
    then calibrated to what it leaves (:func:`calibrated_ledger`). A share of
    1 spends all that is left on the release.
    """
    if not 0 < share <= 1:
        raise ValueError(f"A release's share of the budget must lie in (0, 1], got {share}.")
    spent = epsilon_of(budget, prior or [])
    target = replace(budget, epsilon=spent + share * (budget.epsilon - spent))
    return calibrate_noise(target, rate=1.0, total_steps=1, prior=prior)


def release_history(releases: tuple[float, ...] | list[float]) -> list[tuple[float, float, int]]:
    """Gaussian releases of the whole data in the accountant's format: sample rate 1, one step each."""
    return [(sigma, 1.0, 1) for sigma in releases]


def epsilon_of(budget: PrivacyBudget, history: list[tuple[float, float, int]]) -> float:
    """Epsilon of an accountant history ``(noise multiplier, sample rate, steps)`` at the budget's delta."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # lazily: see calibrate_noise

    accountant = create_accountant(budget.accountant)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=budget.delta))


def calibrated_ledger(
    budget: PrivacyBudget,
    examples: int,
    batch_size: int,
    total_steps: int,
    release_noise: float = 0.0,
    spent_before: "PrivacyLedger | None" = None,
) -> "PrivacyLedger":
    """A ledger whose noise spends exactly ``budget`` over ``total_steps`` Poisson batches.

    With ``release_noise`` > 0 the ledger starts with one Gaussian release of
    that noise multiplier already recorded (the caller makes it at once);
    ``spent_before`` carries the history of the market's earlier trainings,
    which the new steps compose with. The steps are calibrated to what both leave.
    """
    rate = sample_rate(examples, batch_size)
    history = list(spent_before.history) if spent_before is not None else []
    releases = list(spent_before.releases) if spent_before is not None else []
    if release_noise > 0:
        releases.append(release_noise)
    prior = release_history(releases) + history
    return PrivacyLedger(budget, calibrate_noise(budget, rate, total_steps, prior), rate, history, releases)


@dataclass
class PrivacyLedger:
    """Everything a market has spent, in the accountant's own history format.

    Parameters
    ----------
    budget : PrivacyBudget
        What the market may spend over the run.
    noise_multiplier : float
        Calibrated once for the run.
    rate : float
        Poisson sampling rate of every step.
    history : list
        ``(noise_multiplier, sample_rate, steps)`` entries of DP-SGD, Opacus's format.
    releases : list
        Noise multipliers of Gaussian releases of the whole data (sensitivity
        1, no sampling), composed with the steps.
    """

    budget: PrivacyBudget
    noise_multiplier: float
    rate: float
    history: list[tuple[float, float, int]] = field(default_factory=list)
    releases: list[float] = field(default_factory=list)  # noise multipliers of whole-data Gaussian releases

    def _epsilon_of(self, history: list[tuple[float, float, int]]) -> float:
        return epsilon_of(self.budget, release_history(self.releases) + history)

    @property
    def steps(self) -> int:
        """DP-SGD steps recorded so far."""
        return sum(steps for _, _, steps in self.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at the budget's delta."""
        return self._epsilon_of(self.history)

    def spent(self) -> dict[str, float]:
        """``epsilon`` spent so far and the ``delta`` it holds at, as markets report them."""
        return {"epsilon": self.epsilon(), "delta": self.budget.delta}

    def epsilon_after(self, steps: int, rate: float | None = None) -> float:
        """Epsilon that would be spent after ``steps`` more steps at sample rate ``rate`` (default: the planned one)."""
        return self._epsilon_of(self._with(steps, self.noise_multiplier, rate or self.rate))

    def can_afford(self, steps: int, rate: float | None = None) -> bool:
        """Whether ``steps`` more steps at sample rate ``rate`` (default: the planned one) stay within the budget."""
        return self.epsilon_after(steps, rate) <= self.budget.epsilon

    def record(self, steps: int, noise_multiplier: float | None = None, rate: float | None = None) -> None:
        """Record ``steps`` taken steps at the noise and sample rate they ran at; refuses any over the budget.

        The defaults are the calibrated ones. A caller that ran the steps passes
        what it actually used, so that a setting changed since the calibration
        (a resumed training with another batch size) is accounted as it ran.
        """
        noise_multiplier = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        history = self._with(steps, noise_multiplier, rate or self.rate)
        if (after := self._epsilon_of(history)) > self.budget.epsilon:
            raise PrivacyBudgetExceeded(
                f"{steps} more steps would spend epsilon {after:.4f} of a budget of {self.budget.epsilon}."
            )
        self.history = history

    def _with(self, steps: int, noise_multiplier: float, rate: float) -> list[tuple[float, float, int]]:
        if steps < 0:
            raise ValueError(f"Steps cannot be negative, got {steps}.")
        history = list(self.history)
        if history and history[-1][:2] == (noise_multiplier, rate):
            history[-1] = (noise_multiplier, rate, history[-1][2] + steps)
        elif steps:
            history.append((noise_multiplier, rate, steps))
        return history

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot to persist with the market's state."""
        return {
            "budget": {
                "epsilon": self.budget.epsilon,
                "delta": self.budget.delta,
                "max_grad_norm": self.budget.max_grad_norm,
                "accountant": self.budget.accountant,
            },
            "noise_multiplier": self.noise_multiplier,
            "rate": self.rate,
            "history": [list(entry) for entry in self.history],
            "releases": list(self.releases),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "PrivacyLedger":
        """Restore a ledger saved by :meth:`state`."""
        return cls(
            budget=PrivacyBudget(**state["budget"]),
            noise_multiplier=float(state["noise_multiplier"]),
            rate=float(state["rate"]),
            history=[(float(n), float(q), int(s)) for n, q, s in state["history"]],
            releases=[float(sigma) for sigma in state.get("releases", [])],
        )
