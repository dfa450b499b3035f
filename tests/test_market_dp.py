"""Market-level DP on the server: Flower's fixed-clipping wrapper, accounted, through the real app."""

import json

import pytest
from opacus.accountants import RDPAccountant

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


def test_a_simulated_run_composes_one_gaussian_release_per_round(tmp_path):
    # Prepare: 3 markets, 2 rounds, every update clipped to 0.5 and noised with sigma 2.
    noise, rounds, delta = 2.0, 2, 1e-5

    # Execute
    results = harness.main(
        ["--synthetic-markets", "3", "--rounds", str(rounds), "--embedding-dim", "8", "--methods", "fedper",
         "--market-dp-noise", str(noise), "--market-dp-clip", "0.5", "--out", str(tmp_path)]
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
