"""Each personalization method's local mechanics."""

from dataclasses import replace

import pytest
import torch

from common.data.markets import MarketSource, load_split
from common.methods import Method, _proximal, fine_tune, get_method, local_round, plain_epochs
from common.neural.model import ModelConfig, SplitRecommender, shared_parameter_names
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


def _shared_distance(model: SplitRecommender, before: dict[str, torch.Tensor], names: list[str]) -> float:
    state = model.state_dict()
    return float(sum(((state[name] - before[name]) ** 2).sum() for name in names))


def test_the_proximal_term_adds_mu_times_the_drift_to_the_gradient():
    # Prepare: w₀ = (1, 2), then w moved to (3, 5) inside the block; loss Σw has gradient (1, 1).
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))

    # Execute
    with _proximal(layer, ["weight"], mu=0.5):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[3.0, 5.0]]))
        layer.weight.sum().backward()

    # Assert: 1 + 0.5·(3 − 1) = 2, 1 + 0.5·(5 − 2) = 2.5; the hook is gone after the block.
    assert layer.weight.grad.tolist() == [[2.0, 2.5]]
    layer.weight.grad = None
    layer.weight.sum().backward()
    assert layer.weight.grad.tolist() == [[1.0, 1.0]]


def test_fedprox_with_mu_0_is_fedavg(market):
    fedavg, fedprox = _model(market), _model(market)

    local_round(fedavg, market, get_method("fedavg"), TrainConfig(epochs=1), seed=0)
    local_round(fedprox, market, replace(get_method("fedprox"), proximal_mu=0.0), TrainConfig(epochs=1), seed=0)

    assert not _moved(_snapshot(fedavg), fedprox)


def test_fedprox_keeps_the_shared_parameters_nearer_the_received_ones(market):
    # Prepare: the same start and seed; a strong μ so that the pull shows within two epochs.
    fedavg, fedprox = _model(market), _model(market)
    received = _snapshot(fedavg)
    names = shared_parameter_names(fedavg, share_head=True)
    strong = replace(get_method("fedprox"), proximal_mu=50.0)

    # Execute
    local_round(fedavg, market, get_method("fedavg"), TrainConfig(epochs=2), seed=0)
    local_round(fedprox, market, strong, TrainConfig(epochs=2), seed=0)

    # Assert
    assert 0 < _shared_distance(fedprox, received, names) < 0.5 * _shared_distance(fedavg, received, names)


def test_fedprox_refuses_a_trainer_other_than_plain_training(market):
    model = _model(market)

    with pytest.raises(ValueError, match="proximal term to plain training only"):
        local_round(model, market, get_method("fedprox"), TrainConfig(epochs=1), seed=0, train=plain_epochs(market))


def test_methods_take_keyword_options_only_and_check_them():
    with pytest.raises(TypeError):
        Method("x", "sgd", "positional")  # the point: positional options fail
    with pytest.raises(ValueError, match="family"):
        Method(name="x", family="gbdt", description="")
    with pytest.raises(ValueError, match="als family"):
        Method(name="x", family="als", description="", share_head=True)
    with pytest.raises(ValueError, match="at least 0"):
        Method(name="x", family="sgd", description="", proximal_mu=-1.0)
    assert get_method("fedprox").proximal_mu == 0.01 and get_method("fedprox").share_head


def test_every_family_has_its_server_and_client_pieces_and_every_method_a_family():
    from clients.client_app import CLIENT_FAMILIES
    from common.methods import FAMILIES, METHODS
    from server.families import SERVER_FAMILIES
    from server.resume import FAMILY_FINGERPRINT_KEYS

    assert set(SERVER_FAMILIES) == set(CLIENT_FAMILIES) == set(FAMILY_FINGERPRINT_KEYS) == set(FAMILIES)
    assert {method.family for method in METHODS.values()} == set(FAMILIES)
