"""DP-fedals and the private transfer: what a market releases, what it spends, and what it serves.

The maths is checked against hand-built or dense references; the privacy claims are checked
through the real ServerApp and ClientApps in this process, as an adversarial server sees them:
every message a market sends, and every release its lifetime ledger recorded.
"""

import copy
from itertools import count

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.client_app import app as client_app
from clients.privacy_state import COUNT_NOISE_MULTIPLIER, MarketPrivacy
from common.ials.core import IALSConfig, ItemFactors, MarketInteractions, confidence_weights, item_regularization
from common.ials.dp import (
    RELEASE_KEYS,
    ReleaseConfig,
    block_noise_multipliers,
    noise_generator,
    private_release,
    private_release_problem,
)
from common.ials.steps import market_item_statistics, solve_items
from common.ials.transfer import OWN, Candidate, choose, solve_items_toward
from common.ials.wire import ASSORTMENT_KEY
from common.neural.train import RankingMetrics
from common.serving.query import load_served_model
from server.server_app import main as server_main
from tests.conftest import server_task_identity
from tests.in_process import ClientAppGrid
from tests.in_process import run_config as in_process_config
from tests.oracles import dp_accounting_epsilon

pytestmark = [pytest.mark.usefixtures("server_task_identity"), pytest.mark.filterwarnings("ignore::UserWarning")]
_run_ids = count(5000)


def _market(rng: np.random.Generator, users: int, items: int, per_user: int) -> MarketInteractions:
    rows_users, rows_items = [], []
    for user in range(users):
        bought = rng.choice(items, size=min(items, int(rng.integers(1, per_user + 1))), replace=False)
        rows_users += [user] * len(bought)
        rows_items += sorted(bought)
    return MarketInteractions(np.array(rows_users), np.array(rows_items), users)


# --- the release: bounded contributions, calibrated noise ------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 2, 8]), removed=st.integers(0, 5))
def test_one_user_moves_each_block_by_at_most_its_sensitivity(seed, k, removed):
    # Prepare: a market and its neighbour without one user (same factors for everyone else).
    rng = np.random.default_rng(seed)
    market = _market(rng, users=6, items=9, per_user=12)
    factors = rng.normal(size=(6, 3)) * rng.uniform(0.01, 10)
    keep = market.users != removed
    neighbour = MarketInteractions(market.users[keep], market.items[keep], market.num_users)
    rows = np.arange(9)
    release = ReleaseConfig(items_per_user=k)

    # Execute: both releases without noise.
    with_user = private_release(market, factors, rows, 0.0, noise_generator(0), release)
    without = private_release(neighbour, factors, rows, 0.0, noise_generator(0), release)

    # Assert: the module docstring's sensitivities (Frobenius norm, a little float slack).
    bounds = {"sums": np.sqrt(k), "counts": np.sqrt(k), "gram": 1.0, "interaction-gram": float(k)}
    for name, bound in bounds.items():
        change = with_user[name].astype(np.float64) - without[name].astype(np.float64)
        assert np.linalg.norm(change) <= bound * (1 + 1e-5) + 1e-6, name


def test_the_four_blocks_together_are_one_mechanism_of_the_calibrated_multiplier():
    sums, side = block_noise_multipliers(2.0, ReleaseConfig(side_noise_ratio=4.0))

    # One sensitivity-normalised block of noise σ_b each: 1/σ² = Σ 1/σ_b².
    assert side == pytest.approx(4.0 * sums)
    assert 1.0 / np.sqrt(1 / sums**2 + 3 / side**2) == pytest.approx(2.0)


def test_the_release_noise_has_each_blocks_scale_and_is_not_reproducible():
    # Prepare: a market without interactions, so that the release is noise alone.
    market = MarketInteractions(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 4)
    rows, release = np.arange(20_000), ReleaseConfig(items_per_user=4)

    # Execute
    first = private_release(market, np.zeros((4, 2)), rows, 1.5, noise_generator(), release)
    second = private_release(market, np.zeros((4, 2)), rows, 1.5, noise_generator(), release)

    # Assert: standard deviations σ_b·sensitivity, and fresh noise from os.urandom each time.
    sums, side = block_noise_multipliers(1.5, release)
    assert first["sums"].std() == pytest.approx(sums * 2.0, rel=0.03)
    assert first["counts"].std() == pytest.approx(side * 2.0, rel=0.03)
    assert not np.array_equal(first["sums"], second["sums"])
    seeded = [private_release(market, np.zeros((4, 2)), rows, 1.5, noise_generator(7), release) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0]["sums"], seeded[1]["sums"])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: {**p, "extra": np.zeros(3, dtype=np.float32)}, "unexpected ['extra']"),
        (lambda p: {**p, "sums": p["sums"][:-1]}, "not (5, 3)"),
        (lambda p: {**p, "counts": np.full(5, np.nan, dtype=np.float32)}, "non-finite"),
        (lambda p: {**p, ASSORTMENT_KEY: np.array([0, 2, 1, 3, 4])}, "not sorted"),
        (lambda p: {**p, ASSORTMENT_KEY: np.array([0, 1, 2, 3, 99])}, "outside the catalog"),
    ],
)
def test_a_malformed_release_is_refused_with_its_reason(change, reason):
    payload = {
        "sums": np.zeros((5, 3), np.float32),
        "counts": np.zeros(5, np.float32),
        "gram": np.eye(3, dtype=np.float32),
        "interaction-gram": np.eye(3, dtype=np.float32),
        ASSORTMENT_KEY: np.arange(5),
    }
    assert private_release_problem(payload, 10, 3) is None

    assert reason in private_release_problem(change(payload), 10, 3)


# --- the transfer's local item step ------------------------------------------------------------------


def _dense_item_step(market, factors, prior, weight, config):
    """Each item's ridge solve written out: (XᵀX + Σ(c−1)xxᵀ + (λ_i+μ)I) y = Σ c x + μ y⁰."""
    alpha = config.alpha
    confidence = 1 + alpha * confidence_weights(None, config, len(market.users))
    gram = factors.T @ factors
    users = int(np.any(factors != 0, axis=1).sum())
    solved = []
    for position, row in enumerate(prior.rows):
        buyers = market.users[market.items == row]
        weights = confidence[market.items == row]
        lam = item_regularization(np.array([len(buyers)]), users, config)[0] + weight
        matrix = gram + lam * np.eye(factors.shape[1])
        right = weight * prior.factors[position]
        for user, c in zip(buyers, weights, strict=True):
            matrix += (c - 1) * np.outer(factors[user], factors[user])
            right = right + c * factors[user]
        solved.append(np.linalg.solve(matrix, right))
    return np.array(solved)


@pytest.mark.parametrize("weight", [0.0, 0.7, 30.0])
def test_the_local_item_step_toward_a_prior_is_each_items_ridge_solve(weight):
    # Prepare: d = 3, items with 0, 1, 2 and more than d buyers (both solver branches).
    rng = np.random.default_rng(1)
    market = _market(rng, users=12, items=6, per_user=5)
    config = IALSConfig(factors=3, regularization=0.3, alpha=4.0, nu=0.5)
    factors = rng.normal(size=(12, 3))
    prior = ItemFactors(np.arange(8), rng.normal(size=(8, 3)))  # rows 6 and 7: nobody bought them

    # Execute
    solved = solve_items_toward(market, factors, prior, weight, config)

    # Assert
    np.testing.assert_allclose(solved.factors, _dense_item_step(market, factors, prior, weight, config), atol=1e-9)


def test_without_a_prior_the_local_item_step_is_fedals_item_step_of_the_market_alone():
    rng = np.random.default_rng(2)
    market = _market(rng, users=30, items=10, per_user=6)
    config = IALSConfig(factors=4, regularization=0.5, alpha=8.0, nu=1.0)
    factors = rng.normal(size=(30, 4))

    own = solve_items_toward(market, factors, ItemFactors(np.arange(10), np.zeros((10, 4))), 0.0, config)
    alone = solve_items([market_item_statistics(market, factors, config)], config)

    np.testing.assert_allclose(own.lookup(alone.rows), alone.factors, atol=1e-9)


def _candidate(name: str, valid: float, test: float) -> Candidate:
    return Candidate(name, RankingMetrics(valid, 0.0, 1), RankingMetrics(test, 0.0, 1), model=None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=6))
def test_the_transfer_never_serves_a_fit_worse_than_going_alone_on_validation(validations):
    evaluated = [_candidate(OWN, validations[0], 0.0)] + [
        _candidate(f"prior-{i}", value, 1.0) for i, value in enumerate(validations[1:])
    ]

    choice = choose(evaluated)

    assert choice.chosen.valid.ndcg == max(validations) >= validations[0]
    if choice.chosen.name != OWN:  # a tie keeps going alone
        assert choice.chosen.valid.ndcg > validations[0]


# --- through the real apps: what leaves a market under DP, and what its ledger holds ------------------


class RecordingGrid(ClientAppGrid):
    """The real ClientApps in this process, keeping every reply they send."""

    def __init__(self, run_config: dict, partitions: int, node_config: dict | None = None) -> None:
        super().__init__(run_config, partitions, node_config)
        self.replies: list[Message] = []

    def answer(self, message: Message) -> Message:
        reply = super().answer(message)
        self.replies.append(copy.deepcopy(reply))  # as sent: the server's round loop consumes what it reads
        return reply


# The regions' own choice (their node config): noise seeded, so that two trainings can be
# compared bit for bit, and exact metrics, so that the served model's can be checked.
SEEDED_REGION = {"dp-insecure-seeded-noise": True, "dp-exact-metrics": True}


def _serve(run_config: dict, grid: RecordingGrid | None = None) -> RecordingGrid:
    grid = grid or RecordingGrid(run_config, 2, SEEDED_REGION)
    server_main(
        grid, Context(run_id=next(_run_ids), node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    )
    return grid


def _private_config(tmp_path, method: str, **overrides) -> dict:
    return in_process_config(
        **{
            "method": method,
            "synthetic-markets": 2,
            "num-server-rounds": 3,
            "als-factors": 8,
            "dp-epsilon": 4.0,
            "dp-accountant": "rdp",
            "out-dir": str(tmp_path / method / "server"),
            "models-dir": str(tmp_path / "models"),
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def private_runs(tmp_path_factory):
    """fedals-pt and fedals under DP with the same (insecure, seeded) noise: two trainings of two markets."""
    tmp_path = tmp_path_factory.mktemp("dp-fedals")
    server_task_identity.__wrapped__()  # the module's trainings run before any test's own fixture
    return {method: (_serve(_private_config(tmp_path, method)), tmp_path) for method in ("fedals-pt", "fedals")}


def test_under_dp_a_market_sends_its_release_only_and_never_its_transfer(private_runs):
    transfer, _ = private_runs["fedals-pt"]
    plain, _ = private_runs["fedals"]

    # Every training reply holds the release and the public assortment, nothing else; no
    # evaluation reply holds an array; every metric is a number.
    for reply in transfer.replies:
        arrays = reply.content.array_records
        if reply.metadata.message_type == "train":
            assert set(arrays["arrays"]) == {*RELEASE_KEYS, ASSORTMENT_KEY}
        else:
            assert not arrays
        assert all(
            isinstance(v, int | float) for record in reply.content.metric_records.values() for v in record.values()
        )

    # The transfer is fitted after the last reply it could shape: with the same seeded noise,
    # fedals-pt's markets send bit for bit what fedals' markets send.
    def trains(grid: RecordingGrid) -> list[Message]:  # node after node, each in round order
        return sorted(
            (r for r in grid.replies if r.metadata.message_type == "train"), key=lambda r: r.metadata.src_node_id
        )

    sent = list(zip(trains(transfer), trains(plain), strict=True))
    assert len(sent) == 6
    for with_transfer, without in sent:
        for name in RELEASE_KEYS:
            np.testing.assert_array_equal(
                with_transfer.content["arrays"][name].numpy(), without.content["arrays"][name].numpy()
            )


def test_the_transfer_is_served_with_its_choice_and_the_spent_budget(private_runs):
    _, tmp_path = private_runs["fedals-pt"]

    served = load_served_model(tmp_path / "models" / "fedals-pt" / "m00")

    manifest = served.manifest
    assert manifest["method"] == "fedals-pt" and 0 < manifest["epsilon"] <= 4.0
    choice = manifest["transfer"]
    assert choice["chosen"] in choice["validation-ndcg@10"]
    assert choice["validation-ndcg@10"][choice["chosen"]] == max(choice["validation-ndcg@10"].values())
    assert choice["validation-ndcg@10"][choice["chosen"]] >= choice["validation-ndcg@10"][OWN]
    assert manifest["metrics"]["val-ndcg"] == choice["validation-ndcg@10"][choice["chosen"]]
    # fedals' own served model (its best round) is written beside it, as fedper-ft's base.
    assert load_served_model(tmp_path / "models" / "fedals" / "m00").manifest["method"] == "fedals"


def test_the_ledger_records_every_release_and_a_new_training_gets_no_fresh_budget(private_runs, tmp_path):
    grid, _ = private_runs["fedals"]

    for node, context in grid.contexts.items():
        # Prepare: the releases this market sent, counted from the messages themselves.
        market = f"m0{node - 1}"
        sent = [
            r
            for r in grid.replies
            if r.metadata.message_type == "train"
            and r.metadata.src_node_id == node
            and r.content["metrics"]["num-examples"] > 0
        ]
        ledger = MarketPrivacy(context, market).load().ledger

        # Assert: one recorded Gaussian release per message, within budget, and the epsilon an
        # independent accountant computes for them.
        recorded = [sigma for sigma, rate, steps in ledger.history for _ in range(steps) if rate == 1.0]
        assert len(recorded) == len(sent) == 3
        spent = ledger.epsilon()
        assert spent <= 4.0
        # The ledger's other releases: the user count, released once per calibration.
        assert ledger.releases == [COUNT_NOISE_MULTIPLIER]
        assert spent == pytest.approx(
            dp_accounting_epsilon(ledger.budget.delta, releases=ledger.releases + recorded), rel=1e-3
        )
        assert sent[-1].content["metrics"]["epsilon"] == pytest.approx(spent)

    # Execute: the server names a new training for the same markets (their contexts kept).
    first = {
        node: MarketPrivacy(context, f"m0{node - 1}").load().ledger.noise_multiplier
        for node, context in grid.contexts.items()
    }
    again = _private_config(tmp_path, "fedals")
    for context in grid.contexts.values():
        context.run_config.update(again)
        context.node_config.pop("dp-insecure-seeded-noise")
    grid.replies.clear()
    _serve(again, grid)

    # Assert: no fresh budget. Whatever the sliver left by the first training buys is recorded,
    # drowned in far more noise, and the lifetime total stays within the budget.
    for node, context in grid.contexts.items():
        ledger = MarketPrivacy(context, f"m0{node - 1}").load().ledger
        sent = [
            r
            for r in grid.replies
            if r.metadata.message_type == "train"
            and r.metadata.src_node_id == node
            and r.content["metrics"]["num-examples"] > 0
        ]
        assert sum(steps for _, _, steps in ledger.history) == 3 + len(sent)
        assert not sent or ledger.noise_multiplier > 10 * first[node]
        assert ledger.epsilon() <= 4.0


def test_client_app_is_the_one_the_grid_runs():
    # The recording grid must exercise the shipped ClientApp, not a stand-in.
    assert ClientAppGrid.answer.__globals__["client_app"] is client_app
