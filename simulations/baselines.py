"""Non-federated references on the same splits: each market alone, all pooled, and popularity.

``local`` can train under DP-SGD with the budget a federated market gets, which
answers whether federating pays for itself under DP; ``pooled`` puts all
markets' data in one place, so it stays the non-private ceiling; ``popular``
ranks by each market's item popularity, under DP released with the whole
budget: the simplest private recommender, which DP-SGD has to beat;
``pooled-ials`` is iALS on all markets' data in one place, the reference
``fedals`` equals, evaluated and served per market as fedals is;
``implicit-local`` and ``implicit-pooled`` are the ``implicit`` library's ALS
on each market alone and on all markets pooled (a benchmark extra:
``pip install ".[benchmark]"``), evaluated and served the same way.

On a terminal a progress bar with ETA follows the markets (and their rounds).
"""

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.data.catalog import Catalog
from common.data.markets import MarketSource, load_split, market_seed
from common.ials.core import IALSConfig, ItemFactors
from common.ials.model import IALSMarket, evaluate_factors, evaluate_market, interaction_ratings
from common.ials.reference import pooled_ials
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import MarketTensors, RankingMetrics, TrainConfig, evaluate, train_epochs
from common.privacy.dp_sgd import (
    dp_generator,
    market_budget,
    popularity_seed,
    private_popularity,
    private_steps,
    start_private_training,
    train_epochs_private,
)
from common.privacy.ledger import PrivacyBudget, epsilon_of, release_history, release_noise
from common.selection import improves
from common.serving.format import market_user_ids, write_served_model
from common.serving.sparse_state import compact_state, expand_state
from simulations.progress import bar, over
from simulations.results import select_on_validation

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
    privacy: "LocalPrivacy | None" = None  # DP-SGD for the local baseline; None trains without DP
    models_dir: Path | None = None  # writes <models_dir>/<method>/<market>/, the served models; None: none


@dataclass(frozen=True)
class LocalPrivacy:
    """The budget and DP-SGD settings a federated market would get, for the local baseline."""

    epsilon: float  # each market's budget over all rounds
    delta: float  # 0 picks 0.1 / users of the market, as the ClientApp does
    max_grad_norm: float  # per-example clipping bound
    accountant: str  # prv or rdp
    train: TrainConfig  # DP-SGD's users per step, step size and items per user (dp-batch-size, ...)
    popularity_share: float  # share of the budget the popularity release alone would spend; 0: none
    market_epsilons: dict[str, float] = field(default_factory=dict)  # named markets' own budgets (dp-market-epsilons)
    insecure_seeded_noise: bool = False  # INSECURE: DP noise from the seed, to reproduce an experiment only

    def noise_seed(self, seed: int) -> int | None:
        """``seed`` in an insecure reproducible run; None (secure noise) otherwise."""
        return seed if self.insecure_seeded_noise else None

    def budget(self, data: MarketTensors) -> PrivacyBudget:
        """The budget of one market: its own epsilon if named, its default delta from its own users."""
        epsilon = self.market_epsilons.get(data.split.market, self.epsilon)
        return market_budget(data, epsilon, self.delta, self.max_grad_norm, self.accountant)


def market_curve(model: SplitRecommender, data: MarketTensors, server_round: int) -> dict[str, float]:
    """Validation and test metrics of one market at one evaluation point: sampled, and
    against the market's whole assortment (``*-full-*``), keyed as a ClientApp replies."""
    return curve_point(evaluate(model, data), evaluate(model, data, on_test=True), server_round)


def curve_point(valid: RankingMetrics, test: RankingMetrics, server_round: int) -> dict[str, float]:
    """One evaluation point of a market's curve from its validation and test metrics."""
    return {
        "round": server_round,
        "val-ndcg": valid.ndcg,
        "val-hr": valid.hit_rate,
        "test-ndcg": test.ndcg,
        "test-hr": test.hit_rate,
        "val-full-ndcg": valid.full_ndcg,
        "val-full-recall": valid.full_recall,
        "test-full-ndcg": test.full_ndcg,
        "test-full-recall": test.full_recall,
        "users": test.users,
    }


def run_local(
    source: MarketSource, catalog: Catalog, settings: BaselineSettings, progress: Progress
) -> dict[str, list[dict[str, float]]]:
    """Each market trains alone; returns its metrics after every round's worth of epochs."""
    curves = {}
    with bar(len(source.markets) * settings.rounds, "local", "round") as rounds_done:
        for market in source.markets:
            rounds_done.set_postfix_str(market)
            curves[market] = _run_local_market(source, catalog, settings, progress, market, rounds_done)
    return curves


def _run_local_market(
    source: MarketSource,
    catalog: Catalog,
    settings: BaselineSettings,
    progress: Progress,
    market: str,
    rounds_done: tqdm,
) -> list[dict[str, float]]:
    """One market of :func:`run_local`; ``rounds_done`` (a progress bar) advances by one per round."""
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
    ledger = None
    if settings.privacy is not None:
        privacy = settings.privacy
        total_steps = settings.rounds * private_steps(data, privacy.train)
        ledger = start_private_training(
            model,
            data,
            privacy.budget(data),
            privacy.train,
            total_steps,
            privacy.popularity_share,
            noise_seed=privacy.noise_seed(popularity_seed(market, settings.seed)),
        )
    best_state = BestState()
    for server_round in range(1, settings.rounds + 1):
        seed = market_seed(market, settings.seed) + server_round
        if ledger is None:
            train_epochs(model, [data], settings.train, seed)
            curve.append(market_curve(model, data, server_round))
        else:
            train_epochs_private(
                model, data, settings.privacy.train, ledger, seed, noise_seed=privacy.noise_seed(seed + 500)
            )
            curve.append(market_curve(model, data, server_round) | ledger.spent())
        best_state.offer(model, curve[-1])
        rounds_done.update(1)
    best = select_on_validation(curve)
    if settings.models_dir is not None:
        best_state.write(settings.models_dir / "local" / market, "local", data, source, catalog, best)
    progress(
        f"local {market}: best val NDCG@10 {best['val-ndcg']:.4f} at round {best['round']}, "
        f"test {best['test-ndcg']:.4f} ({time.perf_counter() - started:.1f} s)"
    )
    return curve


def run_popular(
    source: MarketSource, catalog: Catalog, settings: BaselineSettings, progress: Progress
) -> dict[str, list[dict[str, float]]]:
    """Each market ranks items by its own popularity; under DP, released with the whole budget.

    The release is :func:`common.private_train.private_popularity` (one user
    moves the counts by at most 1 in L2) with the noise of one Gaussian
    release that spends each market's epsilon at its delta.
    """
    curves = {}
    for market in over(source.markets, len(source.markets), "popular", "market"):
        data = MarketTensors.from_split(load_split(source, market, catalog), settings.history_length)
        model = SplitRecommender(ModelConfig(catalog.size, data.split.num_users, 1, settings.history_length))
        with torch.no_grad():
            model.encoder.item_embedding.weight.zero_()  # scores are the item bias alone
        noise, spent, noise_seed = 0.0, {}, popularity_seed(market, settings.seed)
        if settings.privacy is not None:
            noise_seed = settings.privacy.noise_seed(noise_seed)
            budget = settings.privacy.budget(data)
            noise = release_noise(budget, share=1.0)
            spent = {"epsilon": epsilon_of(budget, release_history([noise])), "delta": budget.delta}
        with torch.no_grad():
            model.head.item_bias.weight[:, 0] = private_popularity(data, catalog.size, noise, dp_generator(noise_seed))
        point = market_curve(model, data, 1)
        curves[market] = [point | spent]
        progress(
            f"popular {market}: test NDCG@10 {point['test-ndcg']:.4f}"
            + (f" (popularity released at epsilon {spent['epsilon']:.3f})" if spent else "")
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
    best_states = {data.split.market: _best_state(settings, "pooled", data.split.market) for data in markets}
    for server_round in over(range(1, settings.rounds + 1), settings.rounds, "pooled", "round"):
        started = time.perf_counter()
        loss = train_epochs(model, markets, settings.train, settings.seed + server_round)
        for data in markets:
            curves[data.split.market].append(market_curve(model, data, server_round))
            best_states[data.split.market].offer(model, curves[data.split.market][-1])
        macro = sum(curve[-1]["val-ndcg"] for curve in curves.values()) / len(curves)
        progress(
            f"pooled round {server_round}/{settings.rounds}: loss {loss:.4f}, "
            f"macro val NDCG@10 {macro:.4f} ({time.perf_counter() - started:.1f} s)"
        )
    if settings.models_dir is not None:
        # Each market serves the one pooled model at its own best round, with its own users only.
        for data in markets:
            market = data.split.market
            best = select_on_validation(curves[market])
            best_states[market].write(settings.models_dir / "pooled" / market, "pooled", data, source, catalog, best)
    return curves


def _best_state(settings: BaselineSettings, method: str, market: str) -> "BestState":
    """A market's best-round keeper for a pooled baseline: in a file beside its served model, if it has one."""
    if settings.models_dir is None:
        return BestState()
    return BestState(spill=settings.models_dir / method / f"{market}.best.pt")


def run_pooled_ials(
    source: MarketSource,
    catalog: Catalog,
    settings: BaselineSettings,
    config: IALSConfig,
    progress: Progress,
    iteration_seconds: list[float] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """iALS on all markets' training data in one process (:func:`common.ials.pooled_ials`), never private.

    After each iteration every market is evaluated as fedals evaluates it: its own users solved
    against the pooled item factors, through the same split recommender
    (:func:`common.ials_model.evaluate_market`); its served model is its best validation iteration.
    ``iteration_seconds``, if given, receives each iteration's wall time with its evaluation
    (reading the markets and writing the served models left out): fedals' round without Flower.
    """
    markets = []
    for market in source.markets:
        split = load_split(source, market, catalog)
        ratings = None
        if config.confidence != "binary":
            ratings = interaction_ratings(split, source.interactions(market), catalog)
        markets.append(IALSMarket.from_split(split, settings.history_length, ratings))
    curves: dict[str, list[dict[str, float]]] = {market.split.market: [] for market in markets}
    best_states = {market.split.market: _best_state(settings, "pooled-ials", market.split.market) for market in markets}
    started = time.perf_counter()

    def evaluate_iteration(step: int, users: list[np.ndarray], items: ItemFactors) -> None:
        nonlocal started
        gram = items.gram()
        for market, user_factors in zip(markets, users, strict=True):
            valid, test, model = evaluate_market(
                market, items, gram, catalog.size, config, user_factors, item_rows=items.held_rows()
            )
            curves[market.split.market].append(curve_point(valid, test, step))
            best_states[market.split.market].offer(model, curves[market.split.market][-1])
        macro = sum(curve[-1]["val-ndcg"] for curve in curves.values()) / len(curves)
        seconds = time.perf_counter() - started
        if iteration_seconds is not None:
            iteration_seconds.append(seconds)
        progress(f"pooled-ials iteration {step}/{config.iterations}: macro val NDCG@10 {macro:.4f} ({seconds:.1f} s)")
        started = time.perf_counter()

    pooled_ials([market.train for market in markets], catalog.size, config, evaluate_iteration)
    if settings.models_dir is not None:
        for market in markets:
            name = market.split.market
            best = select_on_validation(curves[name])
            best_states[name].write(
                settings.models_dir / "pooled-ials" / name, "pooled-ials", market.tensors, source, catalog, best
            )
    return curves


IMPLICIT_INSTALL = 'pip install ".[benchmark]"'


@dataclass(frozen=True)
class ImplicitALS:
    """Settings of implicit's ``AlternatingLeastSquares``: a positive's confidence is ``alpha · 1``."""

    factors: int
    regularization: float
    alpha: float
    iterations: int


# Chosen on validation (macro NDCG@10, seed 0) by simulations.benchmarks.ials_tuning's implicit grid on
# XMarket Electronics: d ∈ {64, 128} × reg ∈ {0.05 … 3000} × alpha ∈ {10 … 3000}, 15 iterations
# (the "implicit" lines of the ials-tuning log; the grid and its results are in docs/fedals.md).
IMPLICIT_SETTINGS = {
    # grid's best for each market alone: val 0.5152, test 0.4394
    "implicit-local": ImplicitALS(factors=128, regularization=300.0, alpha=300.0, iterations=15),
    # grid's best on all markets pooled: val 0.5305, test 0.4573
    "implicit-pooled": ImplicitALS(factors=128, regularization=1000.0, alpha=1000.0, iterations=15),
}


def implicit_missing() -> str | None:
    """Why the implicit baselines cannot run here (one line), or None when ``implicit`` imports."""
    try:
        import implicit.cpu.als  # noqa: F401  (a benchmark extra: imported only when asked for)
    except ImportError as error:
        return f"implicit-local and implicit-pooled need the implicit library ({error}): {IMPLICIT_INSTALL}"
    return None


def _implicit_threads() -> int:
    """implicit's threads: OMP_NUM_THREADS when set to a positive whole number, else 1."""
    try:
        return max(int(os.environ.get("OMP_NUM_THREADS", "1")), 1)
    except ValueError:
        return 1


@dataclass(frozen=True)
class ImplicitFit:
    """What :func:`fit_implicit` measured: each market's curve and the time of the ALS iterations."""

    curves: dict[str, list[dict[str, float]]]  # one point per market, as run_implicit returns
    iteration_seconds: list[float]  # wall time of each ALS iteration (users then items) of every fit, in order
    threads: int  # implicit's threads


def run_implicit(
    source: MarketSource,
    catalog: Catalog,
    settings: BaselineSettings,
    method: str,
    progress: Progress,
    als: ImplicitALS | None = None,
) -> dict[str, list[dict[str, float]]]:
    """implicit's ALS on each market alone (``implicit-local``) or on all markets pooled (``implicit-pooled``).

    Evaluated as ``pooled-ials`` is (:func:`common.ials_model.evaluate_factors`): validation with
    the users implicit fitted on the training interactions, test with users folded in by
    implicit's ``recalculate_user`` from training plus the validation interaction (the item
    factors never see it), as :mod:`simulations.benchmarks.ials_tuning` tuned it. One point per market, at
    round ``als.iterations``; ``--rounds`` does not apply. The served model holds implicit's
    factors as a split recommender. Threads: OMP_NUM_THREADS (:func:`fit_implicit` takes them).
    """
    return fit_implicit(source, catalog, settings, method, progress, als).curves


def fit_implicit(
    source: MarketSource,
    catalog: Catalog,
    settings: BaselineSettings,
    method: str,
    progress: Progress,
    als: ImplicitALS | None = None,
    threads: int | None = None,
) -> ImplicitFit:
    """:func:`run_implicit` with ``threads`` implicit threads (None: OMP_NUM_THREADS, else 1), timed.

    ``iteration_seconds`` holds, per ALS iteration, the wall time implicit itself measures
    around its two half-steps (users, then items), reported through its fit callback: neither
    building the interaction matrix, implicit's transpose and initialisation, nor evaluation
    is in it.
    """
    if (missing := implicit_missing()) is not None:
        raise RuntimeError(missing)
    import threadpoolctl  # implicit's own dependency
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy import sparse

    als = als or IMPLICIT_SETTINGS[method]
    threads = _implicit_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"implicit needs at least one thread, got {threads}.")
    markets = [
        IALSMarket.from_split(load_split(source, market, catalog), settings.history_length) for market in source.markets
    ]

    def matrix(parts: list, rows: int) -> "sparse.csr_matrix":
        """Users × catalog rows, 1 per interaction (implicit multiplies by alpha); users stacked in order."""
        offsets = np.cumsum([0] + [part.num_users for part in parts])
        users = np.concatenate([part.users + offset for part, offset in zip(parts, offsets, strict=False)])
        items = np.concatenate([part.items for part in parts])
        ones = np.ones(len(users), dtype=np.float32)
        return sparse.csr_matrix((ones, (users, items)), shape=(rows, catalog.size))

    curves: dict[str, list[dict[str, float]]] = {}
    iteration_seconds: list[float] = []
    groups = [markets] if method == "implicit-pooled" else [[market] for market in markets]
    for group in over(groups, len(groups), method, "market" if len(groups) > 1 else "fit"):
        started = time.perf_counter()
        users_total = sum(market.split.num_users for market in group)
        # implicit's BLAS calls run inside its own threads: one BLAS thread each (implicit warns otherwise).
        with threadpoolctl.threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=als.factors,
                regularization=als.regularization,
                alpha=als.alpha,
                iterations=als.iterations,
                random_state=settings.seed,
                num_threads=threads,
            )
            model.fit(
                matrix([market.train for market in group], users_total),
                show_progress=False,
                callback=lambda _iteration, seconds, _loss: iteration_seconds.append(seconds),
            )
            items = ItemFactors(np.arange(catalog.size), np.asarray(model.item_factors, dtype=np.float64))
            offset = 0
            for market in group:
                name, count = market.split.market, market.split.num_users
                fitted = np.asarray(model.user_factors[offset : offset + count], dtype=np.float64)
                offset += count
                folded = model.recalculate_user(np.arange(count), matrix([market.with_valid], count))
                valid, test, served = evaluate_factors(
                    market, items, catalog.size, fitted, np.asarray(folded, dtype=np.float64)
                )
                curves[name] = [curve_point(valid, test, als.iterations)]
                if settings.models_dir is not None:
                    best = BestState()
                    best.offer(served, curves[name][0])
                    best.write(
                        settings.models_dir / method / name, method, market.tensors, source, catalog, curves[name][0]
                    )
                progress(
                    f"{method} {name}: val NDCG@10 {valid.ndcg:.4f}, test {test.ndcg:.4f} "
                    f"({time.perf_counter() - started:.1f} s since the fit began)"
                )
    return ImplicitFit(curves, iteration_seconds, threads)


class BestState:
    """A copy of the model at the best validation NDCG@10 seen so far, to serve it.

    Offered every trained round; the first of equal points wins (:func:`common.selection.improves`),
    as in :func:`simulations.results.select_on_validation`, so the served model is
    the one whose metrics results.json reports. With ``spill``, the copy is kept in that file
    (its mostly-zero tables by their non-zero rows, :func:`common.serving.sparse_state.compact_state`)
    instead of in memory, removed once written: the pooled baselines keep one per market, and a
    thousand markets' copies of a catalog-size model do not fit in memory.
    """

    def __init__(self, spill: Path | None = None) -> None:
        self.point: dict[str, float] | None = None
        self.model: SplitRecommender | None = None
        self.spill = spill
        self.config: ModelConfig | None = None  # of the spilled model

    def offer(self, model: SplitRecommender, point: dict[str, float]) -> None:
        """Keep a copy of ``model`` if ``point`` (its metrics this round) beats the kept one."""
        if improves(point["val-ndcg"], None if self.point is None else self.point["val-ndcg"]):
            self.point = point
            if self.spill is None:
                self.model = copy.deepcopy(model)
                return
            self.spill.parent.mkdir(parents=True, exist_ok=True)
            torch.save(compact_state(model.state_dict()), self.spill)  # scratch: written as the served model
            self.config = model.config

    def _kept(self) -> SplitRecommender | None:
        if self.spill is None or self.config is None:
            return self.model
        model = SplitRecommender(self.config)
        model.load_state_dict(expand_state(torch.load(self.spill, weights_only=True), into=model.state_dict()))
        return model

    def write(
        self,
        directory: Path,
        method: str,
        data: MarketTensors,
        source: MarketSource,
        catalog: Catalog,
        selected: dict[str, float],
    ) -> None:
        """Write the kept model as ``data``'s served model; ``selected`` is the point results.json reports."""
        model = self._kept()
        if model is None or self.point is None or self.point["round"] != selected["round"]:
            raise RuntimeError(
                f"{method} {data.split.market}: the kept model is of round "
                f"{None if self.point is None else self.point['round']}, results report round {selected['round']}."
            )
        # Every metric of the point results.json reports (sampled and full ranking, users).
        metrics = {key: value for key, value in selected.items() if key not in ("round", "epsilon", "delta")}
        manifest = {
            "method": method,
            "market": data.split.market,
            "round": int(selected["round"]),
            "metrics": metrics,
            "epsilon": selected.get("epsilon"),
            "delta": selected.get("delta"),
        }
        user_ids = market_user_ids(source.interactions(data.split.market))
        write_served_model(directory, model, data, catalog, manifest, user_ids=user_ids)
        if self.spill is not None:
            self.spill.unlink(missing_ok=True)
