"""Market-level DP on the server: Flower's fixed-clipping wrapper, accounted, through the real app."""

import json

import pytest
from flwr.serverapp import GaussianPrivacyEvent
from opacus.accountants import RDPAccountant

from server.rounds import restore_strategy_state, strategy_state
from server.strategy import MarketDPConfig, build_strategy, market_dp_epsilon
from simulations import run as harness

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize(
    "field, value",
    [("noise_multiplier", 0.0), ("clipping_norm", -1.0), ("num_markets", 0), ("delta", 1.0), ("max_epsilon", -1.0)],
)
def test_market_dp_settings_are_checked_up_front(field, value):
    settings = {"noise_multiplier": 1.0, "clipping_norm": 1.0, "num_markets": 3, "delta": 1e-5, "max_epsilon": 0.0}

    with pytest.raises(ValueError, match="[Mm]arket-level"):
        MarketDPConfig(**{**settings, field: value})


def test_without_market_dp_nothing_is_accounted():
    assert market_dp_epsilon(build_strategy(2, None)) is None


def _market_dp(noise: float = 2.0) -> MarketDPConfig:
    return MarketDPConfig(noise_multiplier=noise, clipping_norm=0.5, num_markets=3, delta=1e-5, max_epsilon=0.0)


def test_a_restored_accountant_goes_on_from_the_epsilon_it_had_spent():
    # Prepare: two releases accounted by the first server process.
    before = build_strategy(3, _market_dp())
    for _ in range(2):
        before.accountant.compose(GaussianPrivacyEvent(noise_multiplier=2.0, sample_size=3, population_size=3))

    # Execute: a new process restores the state and accounts one more release.
    after = build_strategy(3, _market_dp())
    restore_strategy_state(after, strategy_state(before))
    restored = market_dp_epsilon(after)
    after.accountant.compose(GaussianPrivacyEvent(noise_multiplier=2.0, sample_size=3, population_size=3))

    # Assert: three releases in all, as one uninterrupted account would have.
    reference = RDPAccountant()
    reference.history = [(2.0, 1.0, 3)]
    assert restored == market_dp_epsilon(before) > 0
    assert market_dp_epsilon(after) == pytest.approx(reference.get_epsilon(1e-5), rel=0.01)


def test_resuming_market_level_dp_without_an_accountant_state_is_refused():
    with pytest.raises(ValueError, match="restart epsilon from 0"):
        restore_strategy_state(build_strategy(3, _market_dp()), {})


def test_a_simulated_run_composes_one_gaussian_release_per_round(tmp_path):
    # Prepare: 3 markets, 2 rounds, every update clipped to 0.5 and noised with sigma 2.
    noise, rounds, delta = 2.0, 2, 1e-5

    # Execute
    results = harness.main(
        [
            "--synthetic-markets",
            "3",
            "--num-server-rounds",
            str(rounds),
            "--embedding-dim",
            "8",
            "--methods",
            "fedper",
            "--market-dp-noise-multiplier",
            str(noise),
            "--market-dp-clipping-norm",
            "0.5",
            "--out",
            str(tmp_path),
        ]
    )

    # Assert: the epsilon after each round matches Opacus's RDP accountant for
    # that many Gaussian releases without sampling (an independent implementation).
    history = json.loads((tmp_path / "fedper" / "history.json").read_text())
    spent = {entry["round"]: entry["market-dp-epsilon"] for entry in history["rounds"] if entry["round"] >= 1}
    for server_round, epsilon in spent.items():
        reference = RDPAccountant()
        reference.history = [(noise, 1.0, server_round)]
        assert epsilon == pytest.approx(reference.get_epsilon(delta), rel=0.01)
    assert spent[1] < spent[2]
    assert results["methods"]["fedper"]["macro"]["ndcg@10"] > 0
