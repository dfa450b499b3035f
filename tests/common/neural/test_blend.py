"""blend: fedals and a neural method's scores blended per market on validation, served as one split recommender."""

import json

import pytest
import torch

from common.data.markets import MarketSource, load_split
from common.neural.blend import BLEND_WEIGHTS, blended_recommender, choose_blend, validation_score_scale
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import MarketTensors, evaluate
from simulations import run as harness
from tests.conftest import server_task_identity
from tests.in_process import in_process_federated
from tests.served_check import served_test_ndcg

SOURCE = MarketSource("", 3, 0)
HISTORY = 10

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _random_model(num_items: int, num_users: int, dim: int, user_embeddings: bool, seed: int) -> SplitRecommender:
    """A model with every parameter random, the tower and bias included, so that each enters the scores."""
    torch.manual_seed(seed)
    model = SplitRecommender(ModelConfig(num_items, num_users, dim, HISTORY, user_embeddings))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.3)
    return model.eval()


def _market(name: str = "m01") -> MarketTensors:
    catalog = SOURCE.catalog()
    return MarketTensors.from_split(load_split(SOURCE, name, catalog), HISTORY)


# --- The blend is one split recommender.


def test_a_blend_scores_the_weighted_sum_of_both_models_scores():
    # Prepare: models of different widths, one with user rows and one without.
    first = _random_model(50, 7, 6, True, seed=1)
    second = _random_model(50, 7, 4, False, seed=2)
    generator = torch.Generator().manual_seed(3)
    users = torch.arange(7)
    history = torch.randint(0, 50, (7, HISTORY), generator=generator)
    mask = (torch.rand((7, HISTORY), generator=generator) > 0.3).float()
    candidates = torch.randint(0, 50, (7, 12), generator=generator)

    # Execute
    blend = blended_recommender(first, second, 0.7, -1.3)

    # Assert
    with torch.no_grad():
        expected = 0.7 * first(users, history, mask, candidates) - 1.3 * second(users, history, mask, candidates)
        scores = blend(users, history, mask, candidates)
    assert blend.config.dim == 10 and blend.config.user_embeddings
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_models_of_different_markets_or_catalogs_do_not_blend():
    first = _random_model(50, 7, 6, True, seed=1)

    with pytest.raises(ValueError, match="num_users is 7 in the first model and 8 in the second"):
        blended_recommender(first, _random_model(50, 8, 6, False, seed=2), 0.5, 0.5)
    with pytest.raises(ValueError, match="num_items is 50 in the first model and 60 in the second"):
        blended_recommender(first, _random_model(60, 7, 6, False, seed=2), 0.5, 0.5)


# --- The weight is chosen on validation.


def test_the_weight_is_the_best_on_validation_and_its_ends_are_the_two_models():
    # Prepare: model A differs between validation and test in its user rows, as fedals' does.
    data = _market()
    num_items, num_users = SOURCE.catalog().size, data.split.num_users
    first_valid = _random_model(num_items, num_users, 6, True, seed=1)
    first_test = _random_model(num_items, num_users, 6, True, seed=1)
    with torch.no_grad():
        first_test.head.user_embedding.weight.normal_(std=0.3)
    second = _random_model(num_items, num_users, 4, False, seed=2)

    # Execute
    choice = choose_blend(first_valid, first_test, second, data)

    # Assert: w = 1 is model A and w = 0 model B, on validation; the chosen w is the first best;
    # test is the served model's, with A's test-time user rows.
    curve = dict(choice.curve)
    assert [w for w, _ in choice.curve] == list(BLEND_WEIGHTS)
    assert curve[1.0] == pytest.approx(evaluate(first_valid, data, full=False).ndcg, abs=1e-12)
    assert curve[0.0] == pytest.approx(evaluate(second, data, full=False).ndcg, abs=1e-12)
    assert choice.valid.ndcg == max(curve.values())
    assert choice.weight == next(w for w, ndcg in choice.curve if ndcg == choice.valid.ndcg)
    assert choice.scales == (validation_score_scale(first_valid, data), validation_score_scale(second, data))
    assert choice.test.ndcg == evaluate(choice.model, data, on_test=True).ndcg
    expected = blended_recommender(
        first_test, second, choice.weight / choice.scales[0], (1 - choice.weight) / choice.scales[1]
    )
    assert choice.test.ndcg == pytest.approx(evaluate(expected, data, on_test=True).ndcg, abs=1e-12)


def test_a_weight_outside_zero_to_one_is_refused():
    data = _market()
    model = _random_model(SOURCE.catalog().size, data.split.num_users, 4, False, seed=1)

    with pytest.raises(ValueError, match=r"Blend weights must be a non-empty list of numbers in \[0, 1\], got \[1.5\]"):
        choose_blend(model, model, model, data, weights=(1.5,))


# --- In the harness.


def test_the_harness_refuses_blend_without_fedals_and_a_neural_method(capsys):
    with pytest.raises(SystemExit):
        harness.parse_args(["--methods", "local,fedals,blend"])

    assert "blend blends fedals with a neural federated method" in capsys.readouterr().err


@pytest.fixture(scope="module")
def blend_run(tmp_path_factory):
    """One harness run: local, fedals and fedrep through Flower, then the blend of the last two.

    The simulated regions send every item (``--als-min-buyers 1``): the published table is then
    the whole of what fedals' markets evaluated, which the first test compares with.
    """
    out = tmp_path_factory.mktemp("blend")
    # The real apps in this process (the transport has its own tests): the blend needs the outputs.
    server_task_identity.__wrapped__()  # the module's training runs before any test's own fixture
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "run_federated", in_process_federated)
        results = harness.main(
            [
                "--synthetic-markets",
                "3",
                "--rounds",
                "2",
                "--embedding-dim",
                "8",
                "--history-length",
                str(HISTORY),
                "--methods",
                "local,fedals,fedrep,blend",
                "--set",
                "als-factors=8",
                "--als-min-buyers",
                "1",
                "--out",
                str(out),
            ]
        )
    return out, results


def test_the_blend_starts_from_fedals_last_round_and_is_a_selection_candidate(blend_run):
    out, results = blend_run
    history = json.loads((out / "fedals" / "history.json").read_text(encoding="utf-8"))
    last = {
        market: metrics
        for entry in history["rounds"]
        if entry["round"] == 2
        for market, metrics in entry["per_market"].items()
        if "val-ndcg" in metrics
    }

    for market, metrics in results["methods"]["blend"]["per_market"].items():
        manifest = json.loads((out / "models" / "blend" / market / "manifest.json").read_text(encoding="utf-8"))
        curve = dict(manifest["blend"]["validation-ndcg@10"])
        # w = 1 is fedals' last round as its own markets evaluated it (float32 table, same solves).
        assert curve[1.0] == pytest.approx(last[market]["val-ndcg"], abs=1e-6)
        assert metrics["val-ndcg@10"] == max(curve.values())
        assert manifest["blend"]["of"] == ["fedals", "fedrep"]
    assert results["methods"]["selection"]["candidates"] == ["local", "fedals", "fedrep", "blend"]


def test_every_served_blend_reproduces_the_test_ndcg_results_report(blend_run):
    out, results = blend_run
    catalog = SOURCE.catalog()

    for market, reported in results["methods"]["blend"]["per_market"].items():
        served, ndcg = served_test_ndcg(out / "models" / "blend" / market, SOURCE, market, catalog)

        assert served.manifest["method"] == "blend"
        assert ndcg == pytest.approx(reported["ndcg@10"], abs=1e-6), market
