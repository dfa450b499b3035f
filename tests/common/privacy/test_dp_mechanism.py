"""DP-SGD's mechanism as it runs: Gaussian noise of the ledger's scale, clipping, the ledger's sample rate.

The other private-training tests check what a market reports and spends;
these check that the steps it pays for are the steps it takes. They watch
:func:`common.private_train.train_epochs_private` from outside, without
replacing any part of the mechanism:

* the gradient Adam receives, captured by wrapping ``torch.optim.Adam.step``:
  with Opacus's ``loss_reduction="mean"`` it is ``(S + Z) / B``, where ``S`` is
  the sum of the batch's clipped per-user gradients (norm at most ``C`` per
  user), ``Z ~ N(0, sigma^2 C^2)`` per coordinate and ``B = rate * users`` the
  expected batch size;
* the users of each Poisson batch, by wrapping ``user_batch_inputs`` where
  ``common.privacy.dp_sgd`` looks it up;
* the ledger's ``history`` entries ``(noise_multiplier, sample_rate, steps)``.

Noise and Poisson sampling are not reproducible from a seed (they come from
a secure source), so the checks on them are statistical. Each test fails a
correct mechanism with probability about ``ALPHA`` = 1e-7 at most: exact
chi-square quantiles for the Gaussian noise, a normal tail at 6 standard
deviations for the users drawn, chi-square quantiles with slack for the
spread of batch sizes. Each break a check is meant to catch moves its
statistic far outside that band; the margins are in the comments.
"""

from dataclasses import dataclass

import pytest
import torch
from scipy import stats

import common.privacy.dp_sgd as private_train
from common.data.markets import MarketSource, load_split
from common.neural.model import CatalogEmbedding, ModelConfig, SplitRecommender
from common.neural.train import MarketTensors, TrainConfig, user_batch_inputs
from common.privacy.dp_sgd import UserSoftmaxLoss, private_steps, train_epochs_private
from common.privacy.ledger import PrivacyBudget, PrivacyLedger, calibrated_ledger

pytestmark = pytest.mark.filterwarnings("ignore")

ALPHA = 1e-7  # false-alarm probability of each statistical check on a correct mechanism


@dataclass
class Observed:
    """What one private training did, step by step."""

    grads: list[dict[int, torch.Tensor]]  # per Adam step: id(parameter) -> gradient Adam saw
    batch_users: list[int]  # per non-empty Poisson batch: its number of users


@pytest.fixture(scope="module")
def markets() -> dict[str, MarketTensors]:
    """Synthetic markets of 1200 (m00) and 321 (m02) users."""
    source = MarketSource("", 3, 0)
    catalog = source.catalog()
    return {
        market: MarketTensors.from_split(load_split(source, market, catalog), history_length=6)
        for market in ("m00", "m02")
    }


def _model(data: MarketTensors, dim: int) -> SplitRecommender:
    torch.manual_seed(0)
    rows = int(data.market_items.max()) + 1
    return SplitRecommender(ModelConfig(rows, data.split.num_users, dim=dim, history_length=6))


def _train_observed(
    monkeypatch: pytest.MonkeyPatch,
    model: SplitRecommender,
    data: MarketTensors,
    config: TrainConfig,
    ledger: PrivacyLedger,
) -> Observed:
    """Run :func:`train_epochs_private`, recording each step's gradient and each batch's users."""
    observed = Observed(grads=[], batch_users=[])
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        observed.grads.append(
            {
                id(p): p.grad.detach().clone()
                for group in self.param_groups
                for p in group["params"]
                if p.grad is not None
            }
        )
        return adam_step(self, *args, **kwargs)

    def recording_inputs(market, users, *args, **kwargs):
        observed.batch_users.append(len(users))
        return user_batch_inputs(market, users, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    monkeypatch.setattr(private_train, "user_batch_inputs", recording_inputs)
    train_epochs_private(model, data, config, ledger, seed=0)
    monkeypatch.undo()
    return observed


def _per_step(ledger: PrivacyLedger) -> list[tuple[float, float]]:
    """The ``(noise_multiplier, sample_rate)`` the ledger records for each of its steps."""
    return [(sigma, rate) for sigma, rate, steps in ledger.history for _ in range(steps)]


def _released_coordinates(model: SplitRecommender, data: MarketTensors) -> dict[int, torch.Tensor | None]:
    """Per trained parameter, the rows whose noisy gradient reaches Adam (``None``: all of them).

    Rows of catalog tables for items the market does not sell are zeroed after
    the noise (post-processing, see ``common.private_train._foreign_rows``).
    """
    catalog_tables = {id(module.weight) for module in model.modules() if isinstance(module, CatalogEmbedding)}
    return {id(p): data.market_items if id(p) in catalog_tables else None for p in model.parameters()}


def _flat_step(grads: dict[int, torch.Tensor], rows: dict[int, torch.Tensor | None]) -> torch.Tensor:
    """One step's released gradient coordinates as one vector."""
    parts = [grad if rows[key] is None else grad[rows[key]] for key, grad in grads.items()]
    return torch.cat([part.flatten() for part in parts]).double()


def test_the_noise_adam_sees_has_the_ledgers_scale_sigma_c_over_b(monkeypatch, markets):
    # Prepare: 1200 users in batches of 60 (rate 1/20, so B = rate * users = 60 exactly, the
    # integer Opacus divides by), a 32-wide model: ~24k released coordinates per step.
    # A small budget calibrates a large sigma (~8.75), so the noise, sigma*C*sqrt(24k) ~ 1360*C
    # per step, dwarfs the clipped signal, at most C per user (~60*C).
    data = markets["m00"]
    config = TrainConfig(epochs=1, batch_size=60, negatives=2, user_positives=4)
    budget = PrivacyBudget(epsilon=0.1, delta=1e-5, max_grad_norm=1.0, accountant="prv")
    ledger = calibrated_ledger(budget, data.split.num_users, config.batch_size, private_steps(data, config))
    model = _model(data, dim=32)
    rows = _released_coordinates(model, data)
    users = data.split.num_users

    # Execute
    observed = _train_observed(monkeypatch, model, data, config, ledger)

    # Assert: one recorded step per step taken (an empty batch of 1200 users at rate 1/20 has
    # probability 0.95^1200 ~ 1e-27), with the noise multiplier the ledger was calibrated for.
    recorded = _per_step(ledger)
    assert len(recorded) == len(observed.grads) == len(observed.batch_users), (
        f"{len(recorded)} steps recorded, {len(observed.batch_users)} batches drawn, {len(observed.grads)} steps taken"
    )
    ran_at = sorted({sigma for sigma, _ in recorded})
    assert ran_at == pytest.approx([ledger.noise_multiplier]), (
        f"steps recorded at noise multipliers {ran_at}, calibrated for {ledger.noise_multiplier}"
    )
    # Z_k = B_k * g_k - S_k with ||S_k|| <= C * users_k, so by the triangle inequality
    # ||Z_k|| / (sigma_k C) lies in [low_k, high_k], whatever the signal. sum_k ||Z_k||^2 / (sigma_k C)^2
    # is chi-square with n ~ 470k degrees of freedom: with probability 1 - ALPHA it lies within
    # +-1.1% of n, and then the bracket [sum low^2, sum high^2], which spans n * [0.91, 1.09] on a
    # correct mechanism, overlaps that band. Noise off or a tenth of it puts sum high^2 under
    # 0.03 n; clipping at 1e9 puts sum low^2 near 1e18 n; a loader batch twice the ledger's halves
    # the steps and the measured scale. (Today ledger.record also refuses
    # steps run at another noise multiplier or rate than calibrated, which overspend; this check
    # holds whatever the ledger records.)
    clip = ledger.budget.max_grad_norm
    low, high, n = 0.0, 0.0, 0
    for grads, batch_users, (sigma, rate) in zip(observed.grads, observed.batch_users, recorded, strict=True):
        summed = rate * users * _flat_step(grads, rows)  # S_k + Z_k, as Opacus released it
        scale = sigma * clip
        low += max(float(summed.norm()) - clip * batch_users, 0.0) ** 2 / scale**2
        high += (float(summed.norm()) + clip * batch_users) ** 2 / scale**2
        n += summed.numel()
    estimate = (low**0.5 + high**0.5) / 2 / n**0.5  # measured noise std over sigma * C
    assert low <= stats.chi2.isf(ALPHA / 2, n), f"noise std is {estimate:.3f} x sigma*C/B, not 1"
    assert high >= stats.chi2.ppf(ALPHA / 2, n), f"noise std is {estimate:.3f} x sigma*C/B, not 1"


def test_the_summed_gradient_before_noise_is_clipped_to_c_per_user(monkeypatch, markets):
    # Prepare: a tiny noise multiplier (~0.03, from a huge budget) and a clipping norm far below
    # the per-user gradient norms, so clipping binds for every user.
    data = markets["m00"]
    config = TrainConfig(epochs=1, batch_size=60, negatives=2, user_positives=4)
    budget = PrivacyBudget(epsilon=1e4, delta=1e-5, max_grad_norm=1e-3, accountant="rdp")
    ledger = calibrated_ledger(budget, data.split.num_users, config.batch_size, private_steps(data, config))
    model = _model(data, dim=8)
    rows = _released_coordinates(model, data)
    users, clip = data.split.num_users, budget.max_grad_norm
    # Precondition: unclipped, one batch's summed gradient is far above C per user.
    batch = torch.arange(config.batch_size)
    inputs, real = user_batch_inputs(
        data, batch, config.user_positives, config.negatives, torch.Generator().manual_seed(0)
    )
    per_user = UserSoftmaxLoss()
    per_user.reduction = "sum"
    model.zero_grad()
    per_user(model(*inputs), real).backward()
    unclipped = sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None) ** 0.5
    model.zero_grad(set_to_none=True)
    assert unclipped > 20 * clip * len(batch)

    # Execute
    observed = _train_observed(monkeypatch, model, data, config, ledger)

    # Assert: per step, ||S_k + Z_k|| <= C * users_k + ||Z_k||, where ||Z_k||^2 / (sigma C)^2 is
    # chi-square with n_k degrees of freedom; its quantile at ALPHA / steps bounds all steps at
    # once. The bound is ~(60 + 3) * C; unclipped, the sum is over 20 times C * users (~90 here).
    recorded = _per_step(ledger)
    assert len(recorded) == len(observed.grads) == len(observed.batch_users), (
        f"{len(recorded)} steps recorded, {len(observed.batch_users)} batches drawn, {len(observed.grads)} steps taken"
    )
    for grads, batch_users, (sigma, rate) in zip(observed.grads, observed.batch_users, recorded, strict=True):
        summed = rate * users * _flat_step(grads, rows)
        noise_bound = sigma * clip * stats.chi2.isf(ALPHA / len(recorded), summed.numel()) ** 0.5
        assert float(summed.norm()) <= clip * batch_users + noise_bound


def test_batches_sample_users_at_the_rate_the_ledger_records(monkeypatch, markets):
    # Prepare: 321 users in expected batches of 80: Opacus samples each user with probability
    # 1 / ceil(321 / 80) = 0.2, five batches per epoch; six epochs, 30 batches.
    # (A rate of 80 / 321 = 0.249 would be a different, wrongly accounted, mechanism.)
    data = markets["m02"]
    config = TrainConfig(epochs=6, batch_size=80, negatives=1, user_positives=2)
    budget = PrivacyBudget(epsilon=8.0, delta=1e-5, max_grad_norm=1.0, accountant="rdp")
    ledger = calibrated_ledger(budget, data.split.num_users, config.batch_size, private_steps(data, config))
    model = _model(data, dim=4)
    users = data.split.num_users

    # Execute
    observed = _train_observed(monkeypatch, model, data, config, ledger)

    # Assert: the ledger records one step per batch the loader drew (an empty batch, which the
    # loop skips, has probability 0.8^321 ~ 1e-31 each), at the rate it was calibrated for, so
    # the calibrated steps spend the whole budget (Opacus calibrates to within 0.01 of epsilon;
    # calibrated for 80 / 321 = 0.249 and run at 0.2 they would spend 6.5 of 8).
    recorded = _per_step(ledger)
    assert len(recorded) == len(observed.batch_users), (
        f"{len(recorded)} steps recorded, {len(observed.batch_users)} batches drawn"
    )
    ran_at = sorted({rate for _, rate in recorded})
    assert ran_at == pytest.approx([ledger.rate]), f"steps ran at rates {ran_at}, calibrated for {ledger.rate}"
    assert 0.99 * budget.epsilon <= ledger.epsilon() <= budget.epsilon
    # Users drawn over all batches: a sum of Binomial(users, rate_k), mean and variance below.
    # Its skewness is ~0.015, so the normal tail at 6 standard deviations (2e-9) is a safe
    # ALPHA. Sampling at a rate the ledger does not record is far outside: at 0.249 against 0.2
    # the mean moves by ~12 standard deviations, at twice the rate by ~40.
    total = sum(observed.batch_users)
    mean = sum(rate * users for _, rate in recorded)
    variance = sum(rate * (1 - rate) * users for _, rate in recorded)
    assert abs(total - mean) <= 6 * variance**0.5, (
        f"batches averaged {total / len(recorded):.1f} users; rate * users is {mean / len(recorded):.1f}"
    )
    # Poisson sampling: batch sizes vary binomially (not fixed batches of 80 and a remainder).
    # sum_k (size_k - users rate_k)^2 / (users rate_k (1 - rate_k)) is ~chi-square with one degree
    # of freedom per batch; a batch's skewness (0.08) makes the tails a little heavier than
    # chi-square's, which a tenth of ALPHA per side covers. Fixed batches (80, 80, 80, 80, 1 per
    # epoch) give ~580 against a ceiling of ~100.
    sizes = torch.tensor(observed.batch_users, dtype=torch.float64)
    rates = torch.tensor([rate for _, rate in recorded], dtype=torch.float64)
    ratio = float(((sizes - rates * users) ** 2 / (rates * (1 - rates) * users)).sum())
    assert stats.chi2.ppf(ALPHA / 20, len(sizes)) <= ratio <= stats.chi2.isf(ALPHA / 20, len(sizes))
