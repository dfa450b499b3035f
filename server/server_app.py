"""ServerApp: FedAvg over the shared encoder, per-market metrics, checkpoints, resume, the published shared part.

A training starts from seeded shared arrays, or with ``init-from`` from the
shared part an earlier training published (``published.pt``, or a directory
holding one): a region whose data grew continues from it. A checkpoint to
resume from wins over both. ``fedals`` (federated implicit ALS) runs the same
loop with its own strategy (:mod:`server.fedals`), its shared arrays the
encoder's item table of iALS factors.
"""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid, ServerApp

from common.data.catalog import Catalog
from common.data.markets import MarketSource
from common.methods import get_method
from common.protocol import (
    FINAL_ROUND_KEY,
    FINE_TUNE_EPOCHS_KEY,
    REFIT_KEY,
)
from common.run_config import RunConfig, parse_market_epsilons
from common.runtime.durable import atomic_write_bytes
from common.serving.published import load_published, published_path
from server.families import server_family
from server.history import (
    CHECKPOINT_FILE,
    PUBLISHED_FILE,
    RunHistory,
    best_macro_round,
    check_new_training,
    summary_lines,
)
from server.paths import TrainingLock, confine, server_root
from server.replies import MarketBinding
from server.resume import check_resumable, run_fingerprint
from server.rounds import RoundSettings, restore_strategy_state, run_rounds

REFIT_DIR = "refit"  # <out-dir>/refit: the history of a refit for serving, apart from the training's
REFIT_DONE = "done.json"  # written in it when the refit has run to its end


def train_config(config: RunConfig) -> ConfigRecord:
    """Per-round local training settings sent to every market."""
    return ConfigRecord(config.train_settings())


def final_evaluate_config(config: RunConfig) -> ConfigRecord:
    """Extra evaluate settings of the last round: the markets write their served models; fedper-ft fine-tunes."""
    if not get_method(config.method).fine_tune:
        return ConfigRecord({FINAL_ROUND_KEY: True})
    final = train_config(config)
    final[FINE_TUNE_EPOCHS_KEY] = config.fine_tune_epochs
    final[FINAL_ROUND_KEY] = True
    return final


def load_catalog(config: RunConfig) -> Catalog:
    """The company catalog; in simulation without one, the catalog of every market's items."""
    if config.catalog_path:
        return Catalog.load(config.catalog_path)
    return MarketSource(config.data_dir, config.synthetic_markets, config.seed).catalog()


def initial_arrays(config: RunConfig, catalog: Catalog | None = None) -> ArrayRecord:
    """The seeded starting point of everything the method shares (over ``catalog``, loaded when None).

    fedals shares the encoder holding its seeded initial item factors, which markets draw
    for their own rows in round 1 (:func:`common.ials_model.initial_rows`).
    """
    catalog = catalog if catalog is not None else load_catalog(config)
    return server_family(config).initial_arrays(config, catalog)


def published_arrays(config: RunConfig, catalog: Catalog, seeded: ArrayRecord) -> tuple[ArrayRecord, str]:
    """The shared arrays of the published file ``init-from`` names, where this training starts, and its training.

    The training's id goes to the markets with every message (``CONTINUES_KEY``): a deployed region
    continues from its own head of that training.

    Parameters
    ----------
    config : RunConfig
        The run's settings; ``init_from`` names a ``published.pt`` or a directory holding one.
    catalog : Catalog
        The run's catalog.
    seeded : ArrayRecord
        :func:`initial_arrays` of the run: the names, shapes and dtypes the published arrays must have.

    Raises
    ------
    ValueError
        If the file cannot be read, or its training shared other arrays than
        this run does: another kind of method (fedavg shares the head's
        non-user arrays too), embedding-dim, history-length, user-embeddings
        or catalog. Every mismatch is named with both values.
    """
    published = load_published(published_path(config.init_from))
    differences = []
    if get_method(published.method).share_head != get_method(config.method).share_head:
        differences.append(f"method: {published.method} shares other arrays than {config.method} of this run")
    for key, theirs, ours in (
        ("embedding-dim", published.embedding_dim, config.shared_dim),
        ("history-length", published.history_length, config.history_length),
        ("user-embeddings", published.user_embeddings, config.user_embeddings),
        ("catalog fingerprint", published.catalog_fingerprint, catalog.fingerprint()),
    ):
        if theirs != ours:
            differences.append(f"{key}: {theirs!r} there, {ours!r} in this run")
    if not differences:
        described = {name: (tuple(a.shape), a.dtype) for name, a in published.arrays.items()}
        wanted = {name: (tuple(a.shape), a.dtype) for name, a in seeded.to_torch_state_dict().items()}
        differ = sorted(name for name in described.keys() | wanted.keys() if described.get(name) != wanted.get(name))
        if differ:
            differences.append(f"arrays: {differ} have other names, shapes or dtypes than this run's")
    if differences:
        raise ValueError(
            f"Cannot start from {published.path} (init-from): training {published.training_id} shared other arrays "
            f"than this run does ({'; '.join(differences)}). Run with the settings it was trained with, or leave "
            "init-from empty."
        )
    log(
        INFO,
        "Starting from the shared arrays training %s published after round %d (%s)",
        published.training_id,
        published.round,
        published.path,
    )
    return ArrayRecord(published.arrays), published.training_id


class RunRefusedError(ValueError):
    """The run's settings or files cannot start this training; the message says why and how to fix it."""


class _OneLineRefusal(logging.Filter):
    """Flower logs a ServerApp's exception with its traceback; a refused run is the operator's to fix: one line.

    Flower still marks the run failed (``flwr ls`` shows ``finished:failed``), since the exception
    still ends the ServerApp; only its log record loses the traceback, which says nothing the
    message does not.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RunRefusedError):
            record.msg, record.args = "The training was refused: %s", (str(record.exc_info[1]),)
            record.exc_info, record.exc_text = None, None
        return True


FLOWER_LOGGER.addFilter(_OneLineRefusal())


@contextmanager
def refusing() -> Iterator[None]:
    """Turn a ValueError or OSError of the block (bad settings, files in the way) into a :class:`RunRefusedError`."""
    try:
        yield
    except RunRefusedError:
        raise
    except (ValueError, OSError) as error:
        raise RunRefusedError(str(error)) from None


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds of FedAvg, from a checkpoint when resuming."""
    # Every key parsed and checked once, the markets' too: a bad market setting would otherwise
    # only show as every market failing round 1.
    with refusing():  # what the run's settings and files cannot start is refused in one line
        config = confine(RunConfig.from_run_config(context.run_config), server_root())
        lock = TrainingLock.acquire(Path(config.out_dir))
    try:
        _train(grid, context, config)
    finally:
        lock.release()


def _train(grid: Grid, context: Context, config: RunConfig) -> None:
    """The training ``config`` describes, its out-dir locked."""
    with refusing():
        if not config.resume:
            check_new_training(Path(config.out_dir))  # never overwrite an earlier training's files
        log(INFO, "Federated %s for %d rounds, writing to %s", config.method, config.num_server_rounds, config.out_dir)
        history = RunHistory(Path(config.out_dir), asdict(config))
        catalog = load_catalog(config)
        family = server_family(config)
        strategy = family.strategy(config, catalog)
        fingerprint = run_fingerprint(context.run_config, catalog)
        arrays, first_round, training_id, continues = initial_arrays(config, catalog), 1, str(context.run_id), ""
        binding = MarketBinding()
        checkpoint = history.load_checkpoint() if config.resume else None
        if checkpoint is not None:
            # The checkpoint wins over init-from: its arrays already descend from wherever the training started.
            where = str(Path(config.out_dir) / CHECKPOINT_FILE)
            check_resumable(checkpoint.fingerprint, fingerprint, where)
            check_same_arrays(checkpoint.arrays, arrays, where)
            arrays = ArrayRecord(checkpoint.arrays)
            first_round, training_id = checkpoint.server_round + 1, checkpoint.training_id
            continues = checkpoint.continues
            restore_strategy_state(strategy, checkpoint.strategy_state)
            # The binding survives the resume: a registered SuperNode keeps its node id.
            binding = MarketBinding(checkpoint.markets)
        else:
            if config.resume:
                log(INFO, "Nothing to resume in %s: starting afresh", config.out_dir)
            if config.init_from:
                arrays, continues = published_arrays(config, catalog, arrays)
    if first_round > config.num_server_rounds:
        log(INFO, "All %d rounds were completed before; nothing to resume", config.num_server_rounds)
        # Publishing again costs nothing and covers a server stopped between the last checkpoint and publishing.
        publish(history, arrays, config, catalog, training_id, first_round - 1)
        log_summary(history, config, binding)
        # A refit stopped before its end is made again (from the start, as every refit is).
        if config.serve_refit and not refit_done(config, training_id):
            refit(grid, config, catalog, history, _refit_settings(config, training_id, continues, fingerprint), binding)
        return
    settings = RoundSettings(
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        poll_interval=config.poll_interval,
        fold_evaluation=config.fold_evaluation,
        training_id=training_id,
        continues=continues,
        node_timeout=config.node_timeout,
        fingerprint=fingerprint,
        budgeted_markets=frozenset(parse_market_epsilons(config.dp_market_epsilons)),
    )
    final = final_evaluate_config(config)
    arrays_problem = family.reply_check(strategy)
    arrays = run_rounds(
        grid, strategy, history, settings, arrays, train_config(config), final, first_round, binding, arrays_problem
    )
    publish(history, arrays, config, catalog, training_id, config.num_server_rounds)
    log_summary(history, config, binding)
    if config.serve_refit:
        refit(grid, config, catalog, history, settings, binding)


def _refit_settings(config: RunConfig, training_id: str, continues: str, fingerprint: dict) -> RoundSettings:
    """The round settings of a training resumed after its last round, for its refit."""
    return RoundSettings(
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        poll_interval=config.poll_interval,
        fold_evaluation=config.fold_evaluation,
        training_id=training_id,
        continues=continues,
        node_timeout=config.node_timeout,
        fingerprint=fingerprint,
    )


def refit_done(config: RunConfig, training_id: str) -> bool:
    """Whether the training's refit for serving ran to its end: ``<out-dir>/refit/done.json``, written last,
    naming this training."""
    try:
        done = json.loads((Path(config.out_dir) / REFIT_DIR / REFIT_DONE).read_text(encoding="utf-8"))
        return str(done["training-id"]) == training_id
    except (OSError, ValueError, KeyError, TypeError):
        return False


def refit(
    grid: Grid,
    config: RunConfig,
    catalog: Catalog,
    history: RunHistory,
    settings: RoundSettings,
    binding: MarketBinding,
) -> None:
    """A refit for serving (``serve-refit``): the training again from its start on every interaction.

    As many rounds as the training's best macro validation round, from the arrays the training
    started from (seeded, or ``init-from``'s); each market then writes the refit as the
    training's served model (:func:`clients.served.write_refit_model`). Nothing is held out of
    a refit, so no round is evaluated; its rounds, traffic and replies are kept apart from the
    training's, in ``<out-dir>/refit``. fedals only: an SGD method's epochs and fedals-pt's
    transfer have no such round count to repeat, and they serve their best validation round.
    """
    method = get_method(config.method)
    if not config.solved_by_als or method.transfer:
        log(INFO, "serve-refit: %s serves its best validation round; a refit is made for fedals only", config.method)
        return
    if config.dp_epsilon > 0 or config.dp_market_epsilons.strip():
        # The noise is calibrated so that the training's rounds spend each market's budget: a refit's
        # releases would find it spent, and the refit would be the seeded start.
        log(INFO, "serve-refit: under DP each market serves its best validation round; the budget is the training's")
        return
    rounds = best_macro_round(history) or config.num_server_rounds
    log(INFO, "Refit for serving: %d rounds (the best validation round) on every interaction of each market", rounds)
    refit_history = RunHistory(Path(config.out_dir) / REFIT_DIR, asdict(config) | {"refit-rounds": rounds})
    (refit_history.out_dir / REFIT_DONE).unlink(missing_ok=True)
    family = server_family(config)
    strategy = family.strategy(config, catalog)
    arrays = initial_arrays(config, catalog)
    if config.init_from:
        arrays, _ = published_arrays(config, catalog, arrays)
    train = train_config(config)
    train[REFIT_KEY] = True
    final = ConfigRecord({**final_evaluate_config(config), REFIT_KEY: True})
    run_rounds(
        grid,
        strategy,
        refit_history,
        replace(settings, num_rounds=rounds, evaluate_each_round=False, label="REFIT ROUND"),
        arrays,
        train,
        final,
        1,
        binding,
        family.reply_check(strategy),
    )
    done = {"rounds": rounds, "training-id": settings.training_id}
    atomic_write_bytes(refit_history.out_dir / REFIT_DONE, json.dumps(done).encode())
    log(INFO, "Refit for serving done: each market serves the refit of %d rounds (its manifest says so)", rounds)


def log_summary(history: RunHistory, config: RunConfig, binding: MarketBinding) -> None:
    """The training's last lines: rounds, who replied, the best round, where its files and models are."""
    method = get_method(config.method)
    serves_a_round = not (method.fine_tune or method.transfer)
    for line in summary_lines(history, config.num_server_rounds, binding.state().values(), serves_a_round):
        log(INFO, "%s", line)
    served = (
        Path(config.models_dir) / config.method / "<market>"
        if config.models_dir
        else "in each region, <state-dir>/models/<training-id>/ (xmfl models --use makes it the one served)"
    )
    log(INFO, "  served models: %s", served)


def publish(
    history: RunHistory,
    arrays: ArrayRecord,
    config: RunConfig,
    catalog: Catalog,
    training_id: str,
    server_round: int,
) -> None:
    """Publish ``arrays``, the shared arrays after ``server_round``, the last round, for markets that join later.

    In ``out-dir``; in simulation also as ``<models-dir>/<method>/published.pt``,
    beside the markets' served models (see :mod:`clients.join`).
    """
    about = {
        "method": config.method,
        "embedding-dim": config.shared_dim,
        "history-length": config.history_length,
        "user-embeddings": config.user_embeddings,
        "catalog-fingerprint": catalog.fingerprint(),
        "training-id": training_id,
        "round": server_round,
    }
    copies = [Path(config.models_dir) / config.method / PUBLISHED_FILE] if config.models_dir else []
    history.publish(arrays, about, copies)


def check_same_arrays(saved: dict[str, torch.Tensor], arrays: ArrayRecord, checkpoint: str) -> None:
    """Refuse a checkpoint whose arrays differ in names, shapes or dtypes from what this run shares."""
    expected = arrays.to_torch_state_dict()
    described = {name: (tuple(t.shape), str(t.dtype)) for name, t in saved.items()}
    wanted = {name: (tuple(t.shape), str(t.dtype)) for name, t in expected.items()}
    if described != wanted:
        differ = sorted(name for name in described.keys() | wanted.keys() if described.get(name) != wanted.get(name))
        raise ValueError(
            f"Cannot resume from {checkpoint}: its arrays differ from what this run shares in {differ} "
            f"(checkpoint: {[described.get(n) for n in differ]}, this run: {[wanted.get(n) for n in differ]}); "
            "resume with the run config it was made with."
        )
