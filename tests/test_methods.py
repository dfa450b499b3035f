"""Each personalization method's local mechanics."""

from dataclasses import replace

import pytest
import torch

from common.data.markets import MarketSource, load_split
from common.methods import fine_tune, get_method, local_round
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import MarketTensors, TrainConfig, evaluate


@pytest.fixture(scope="module")
def market() -> MarketTensors:
    source = MarketSource("", synthetic_markets=2, seed=0)
    return MarketTensors.from_split(load_split(source, "m01", source.catalog()), history_length=10)


def _model(data: MarketTensors) -> SplitRecommender:
    torch.manual_seed(0)
    return SplitRecommender(ModelConfig(data.split.market_items.max() + 65, data.split.num_users, 8, 10))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def _moved(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[name], value) for name, value in module.state_dict().items())


def test_fedrep_head_phase_leaves_the_encoder_alone(market):
    # Prepare: only the head phase runs (no encoder epochs).
    model = _model(market)
    encoder, head = _snapshot(model.encoder), _snapshot(model.head)

    # Execute
    local_round(model, market, get_method("fedrep"), TrainConfig(epochs=0, head_epochs=1), seed=0)

    # Assert
    assert not _moved(encoder, model.encoder)
    assert _moved(head, model.head)


def test_fedrep_encoder_phase_leaves_the_head_alone(market):
    model = _model(market)
    encoder, head = _snapshot(model.encoder), _snapshot(model.head)

    local_round(model, market, get_method("fedrep"), TrainConfig(epochs=1, head_epochs=0), seed=0)

    assert _moved(encoder, model.encoder)
    assert not _moved(head, model.head)


def test_fedper_trains_encoder_and_head_together(market):
    model = _model(market)
    encoder, head = _snapshot(model.encoder), _snapshot(model.head)

    local_round(model, market, get_method("fedper"), TrainConfig(epochs=1), seed=0)

    assert _moved(encoder, model.encoder) and _moved(head, model.head)


def test_fine_tuning_leaves_the_global_model_untouched_and_never_loses_on_validation(market):
    # Prepare: a briefly trained "federated" model.
    model = _model(market)
    local_round(model, market, get_method("fedper"), TrainConfig(epochs=1), seed=0)
    before = _snapshot(model)

    # Execute
    tuned = fine_tune(model, market, TrainConfig(), epochs=2, seed=1)

    # Assert
    assert not _moved(before, model)
    assert tuned.valid.ndcg >= evaluate(model, market).ndcg
    assert 0 <= tuned.epochs <= 2


def test_fedper_ft_is_fedper_plus_fine_tuning():
    fedper, fedper_ft = get_method("fedper"), get_method("fedper-ft")

    assert replace(fedper_ft, name="fedper", fine_tune=False, description="", base="") == replace(
        fedper, description=""
    )
    assert fedper_ft.base == "fedper"  # its best federated round is served as fedper's model
