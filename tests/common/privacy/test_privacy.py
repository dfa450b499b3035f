"""Privacy accounting: agreement with an independent accountant, restored ledgers, budgets."""

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.privacy.ledger import (
    PrivacyBudget,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    calibrate_noise,
    calibrated_ledger,
    default_delta,
    epsilon_of,
    release_history,
    sample_rate,
    steps_per_epoch,
)
from tests.oracles import dp_accounting_epsilon

SETTINGS = [(1.0, 0.01, 1000), (0.8, 0.004, 5000), (2.0, 0.05, 300), (1.2, 0.02, 2000)]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(("sigma", "rate", "steps"), SETTINGS)
def test_epsilon_agrees_with_dp_accounting_within_one_percent(accountant, sigma, rate, steps):
    ledger = PrivacyLedger(PrivacyBudget(epsilon=100.0, delta=1e-5, accountant=accountant), sigma, rate)

    ledger.record(steps)

    expected = dp_accounting_epsilon(1e-5, [(sigma, rate, steps)], accountant=accountant)
    assert ledger.epsilon() == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(("release", "sigma", "rate", "steps"), [(2.0, 1.0, 0.05, 300), (4.0, 0.9, 0.02, 1500)])
def test_a_release_composed_with_steps_agrees_with_dp_accounting(accountant, release, sigma, rate, steps):
    # Prepare: the popularity release (a Gaussian step on all the data) followed by DP-SGD.
    ledger = PrivacyLedger(
        PrivacyBudget(epsilon=100.0, delta=1e-5, accountant=accountant), sigma, rate, releases=[release]
    )

    # Execute
    ledger.record(steps)

    # Assert
    expected = dp_accounting_epsilon(1e-5, [(sigma, rate, steps)], [release], accountant=accountant)
    assert ledger.epsilon() == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_steps_calibrated_after_a_release_spend_what_it_leaves(accountant):
    budget = PrivacyBudget(epsilon=4.0, delta=1e-5, accountant=accountant)

    without = calibrate_noise(budget, 0.05, 300)
    after_release = calibrate_noise(budget, 0.05, 300, prior=release_history([2.0]))
    ledger = PrivacyLedger(budget, after_release, 0.05, releases=[2.0])
    ledger.record(300)

    assert after_release > without  # the release took part of the budget
    assert budget.epsilon - 0.05 <= ledger.epsilon() <= budget.epsilon


def test_a_release_that_alone_spends_the_budget_is_refused():
    with pytest.raises(PrivacyBudgetExceeded, match="leaves nothing of the budget"):
        calibrate_noise(PrivacyBudget(epsilon=0.5, delta=1e-5), 0.05, 300, prior=release_history([0.5]))


def test_a_ledger_restored_every_round_equals_one_continuous_ledger():
    # Prepare: 5 rounds of 120 steps, the ledger saved to JSON and restored between rounds.
    budget = PrivacyBudget(epsilon=8.0, delta=1e-5)
    continuous = PrivacyLedger(budget, noise_multiplier=1.1, rate=0.02, releases=[3.0])
    restored = PrivacyLedger(budget, noise_multiplier=1.1, rate=0.02, releases=[3.0])

    # Execute
    for _ in range(5):
        continuous.record(120)
        restored = PrivacyLedger.from_state(json.loads(json.dumps(restored.state())))
        restored.record(120)

    # Assert
    assert restored.history == continuous.history == [(1.1, 0.02, 600)]
    assert restored.releases == [3.0]
    assert restored.epsilon() == continuous.epsilon()


def test_a_fresh_accountant_per_round_would_under_report():
    budget = PrivacyBudget(epsilon=8.0, delta=1e-5)
    whole_run = PrivacyLedger(budget, 1.1, 0.02)
    whole_run.record(600)
    one_round = PrivacyLedger(budget, 1.1, 0.02)
    one_round.record(120)

    assert whole_run.epsilon() > 1.5 * one_round.epsilon()


def test_calibrated_noise_spends_at_most_the_budget_over_the_whole_run():
    budget = PrivacyBudget(epsilon=4.0, delta=default_delta(20_000))
    rate = sample_rate(20_000, 256)
    total = 10 * 2 * steps_per_epoch(20_000, 256)  # rounds x local epochs x steps

    sigma = calibrate_noise(budget, rate, total)
    ledger = PrivacyLedger(budget, sigma, rate)
    ledger.record(total)

    assert budget.epsilon - 0.05 <= ledger.epsilon() <= budget.epsilon


def test_steps_beyond_the_budget_are_refused_and_not_recorded():
    budget = PrivacyBudget(epsilon=1.0, delta=1e-5, accountant="rdp")
    ledger = PrivacyLedger(budget, noise_multiplier=1.0, rate=0.05)

    with pytest.raises(PrivacyBudgetExceeded, match="budget of 1.0"):
        ledger.record(10_000)
    assert ledger.steps == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0, "delta": 1e-5}, "epsilon > 0"),
        ({"epsilon": 1.0, "delta": 1.0}, "delta < 1"),
        ({"epsilon": 1.0, "delta": 1e-5, "accountant": "gdp"}, "Unknown accountant"),
    ],
)
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrivacyBudget(**kwargs)


@settings(max_examples=25, deadline=None)
@given(
    epsilon=st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0]),
    examples=st.integers(200, 50_000),
    batch_size=st.sampled_from([64, 128, 256]),
    rounds=st.integers(1, 12),
    planned_rounds=st.integers(1, 12),
    release=st.sampled_from([0.0, 2.0, 4.0]),
)
def test_no_market_ever_exceeds_its_budget(epsilon, examples, batch_size, rounds, planned_rounds, release):
    # A market calibrated for planned_rounds (after its popularity release, if any) keeps
    # training while it can afford a round; asked for more rounds than planned, it must
    # stop before overspending.
    budget = PrivacyBudget(epsilon=epsilon, delta=default_delta(examples), accountant="rdp")
    assume(epsilon_of(budget, [(release, 1.0, 1)] if release else []) < epsilon)
    per_round = steps_per_epoch(examples, batch_size)
    ledger = calibrated_ledger(budget, examples, batch_size, planned_rounds * per_round, release)

    for _ in range(rounds):
        if ledger.can_afford(per_round):
            ledger.record(per_round)

    assert ledger.epsilon() <= budget.epsilon
