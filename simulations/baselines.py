"""Non-federated references trained on the same splits: each market alone, and all pooled."""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.catalog import Catalog
from common.markets import MarketSource, load_split, market_seed
from common.model import ModelConfig, SplitRecommender
from common.train import MarketTensors, TrainConfig, evaluate, train_epochs

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BaselineSettings:
    """What a baseline trains for: as many epochs as a federated run makes locally."""

    rounds: int  # evaluation points, matching the federated rounds
    train: TrainConfig  # epochs per evaluation point and optimiser settings
    embedding_dim: int  # same model size as the federated methods
    history_length: int  # same user representation as the federated methods
    user_embeddings: bool  # same user representation as the federated methods
    seed: int  # seeds model initialisation and training


def market_curve(
    model: SplitRecommender, data: MarketTensors, server_round: int
) -> dict[str, float]:
    """Validation and test metrics of one market at one evaluation point."""
    valid = evaluate(model, data)
    test = evaluate(model, data, on_test=True)
    return {
        "round": server_round,
        "val-ndcg": valid.ndcg,
        "val-hr": valid.hit_rate,
        "test-ndcg": test.ndcg,
        "test-hr": test.hit_rate,
        "users": test.users,
    }


def run_local(
    source: MarketSource, catalog: Catalog, settings: BaselineSettings, progress: Progress
) -> dict[str, list[dict[str, float]]]:
    """Each market trains alone; returns its metrics after every round's worth of epochs."""
    curves = {}
    for market in source.markets:
        started = time.perf_counter()
        data = MarketTensors.from_split(load_split(source, market, catalog), settings.history_length)
        torch.manual_seed(market_seed(market, settings.seed))
        model = SplitRecommender(
            ModelConfig(
                catalog.size,
                data.split.num_users,
                settings.embedding_dim,
                settings.history_length,
                settings.user_embeddings,
            )
        )
        curve = [market_curve(model, data, 0)]
        for server_round in range(1, settings.rounds + 1):
            train_epochs(model, [data], settings.train, market_seed(market, settings.seed) + server_round)
            curve.append(market_curve(model, data, server_round))
        curves[market] = curve
        best = max(curve[1:], key=lambda point: point["val-ndcg"])
        progress(
            f"local {market}: best val NDCG@10 {best['val-ndcg']:.4f} at round {best['round']}, "
            f"test {best['test-ndcg']:.4f} ({time.perf_counter() - started:.1f} s)"
        )
    return curves


def run_pooled(
    source: MarketSource, catalog: Catalog, settings: BaselineSettings, progress: Progress
) -> dict[str, list[dict[str, float]]]:
    """One model on all markets' data in one place: the non-private reference."""
    markets = []
    offset = 0
    for market in source.markets:
        split = load_split(source, market, catalog)
        markets.append(MarketTensors.from_split(split, settings.history_length, user_offset=offset))
        offset += split.num_users
    torch.manual_seed(settings.seed)
    model = SplitRecommender(
        ModelConfig(catalog.size, offset, settings.embedding_dim, settings.history_length, settings.user_embeddings)
    )
    curves = {data.split.market: [market_curve(model, data, 0)] for data in markets}
    for server_round in range(1, settings.rounds + 1):
        started = time.perf_counter()
        loss = train_epochs(model, markets, settings.train, settings.seed + server_round)
        for data in markets:
            curves[data.split.market].append(market_curve(model, data, server_round))
        macro = sum(curve[-1]["val-ndcg"] for curve in curves.values()) / len(curves)
        progress(
            f"pooled round {server_round}/{settings.rounds}: loss {loss:.4f}, "
            f"macro val NDCG@10 {macro:.4f} ({time.perf_counter() - started:.1f} s)"
        )
    return curves
