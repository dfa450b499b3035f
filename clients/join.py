"""A market that joins late: it fits its own head on the federation's published shared part, alone.

    python -m clients.join --model-dir OUT/models/fedper --data uk.txt --catalog catalog.txt \\
        --out OUT/models/join-fedper/uk
    python -m clients.join --published published.pt --data uk.txt --catalog catalog.txt \\
        --out STATE/models/join --state-dir STATE --market uk [--join-epochs 10] [--fine-tune-epochs 15] [--seed 0] \\
        [--fraction 1]

When a training ends the ServerApp publishes its final shared arrays as
``published.pt`` in its out-dir (in simulation also in ``OUT/models/<method>/``,
beside the markets' served models), with the method, embedding-dim,
history-length, user-embeddings, the catalog's fingerprint, the training id and
the round. A market that was not part of that training reads it here with its
own interaction file and the company catalog (refused, in one line, when its
fingerprint differs), trains a head of its own on its own data over the
shared arrays for ``--join-epochs`` epochs with the encoder frozen, then the whole
model (its own fork of the encoder) for ``--fine-tune-epochs`` epochs at a
smaller step size, and keeps the epoch with the best validation NDCG@10. No
other market and no server is involved, and nothing leaves the region. The result is a served
model (:func:`common.serving.write_served_model`, method ``join-<method>``,
round = the kept epoch) in ``--out``, with the validation and test metrics of
that epoch; ``python -m clients.recommend`` and ``clients.score`` serve it.

``--fraction F`` trains the head on a random fraction F of the market's users
only (their training interactions); validation and test stay those of the whole
market, and every user keeps their full history as the model's input. This
measures how much data a joining market needs.

Taking part in the next training. The joined market is then a normal region:
in simulation, put its file in the data-dir with the others (it starts with a
new head: simulation keeps no state between runs). A deployed region runs a
SuperNode whose node config names ``market``, ``data-path``, ``catalog-path``
and ``state-dir``; ``--state-dir STATE --market NAME`` here writes the fitted
head into that state-dir as ``STATE/<NAME>.pt`` (a
:class:`clients.state_store.MarketState` of training ``join-<training id>``,
round 0, no own arrays), and the ClientApp restores it at its first message of
the next training that continues the published one (its server's ``init-from``;
:func:`clients.local_model._restore_saved_state`), with the
server's shared arrays over it. Under fedavg the head's non-user parameters are
shared, so the next training replaces them with the server's; under fedper and
fedrep the whole head carries over. With ``--out STATE/models/join`` the joined
model sits beside the region's trainings' models, and ``xmfl models --use join``
serves it (:mod:`clients.models`).

Privacy: the head is fitted without DP. The served model is never sent, so that
is as a market alone would do (see the threat model). But a head that seeds a
training shapes what the market then sends: a region that trains under DP must
not start from it. ``--state-dir`` therefore refuses a state-dir that holds a
privacy ledger for the market, and a market state from an earlier training
(move it away first if it is to be replaced).
"""

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from clients.recommend import run_cli
from clients.state_store import JOIN_TRAINING_PREFIX, LedgerStore, MarketState, MarketStateStore
from common.data.catalog import Catalog
from common.data.interactions import read_interactions
from common.data.markets import market_seed
from common.data.split import MarketSplit, split_market
from common.methods import get_method
from common.neural.model import ModelConfig, SplitRecommender, set_arrays, shared_parameter_names
from common.neural.train import MarketTensors, RankingMetrics, TrainConfig, evaluate, train_epochs
from common.runtime.command import ArgumentParser, add_alias, add_verbose
from common.runtime.names import check_name
from common.selection import improves
from common.serving.format import market_user_ids, write_served_model
from common.serving.published import PUBLISHED_FILE, Published, check_catalog, load_published

PROG = "python -m clients.join"


def subsample_training_users(split: MarketSplit, fraction: float, seed: int) -> MarketSplit:
    """``split`` with the training interactions of a random ``fraction`` of its training users only.

    ``ceil(fraction * users with training interactions)`` users are drawn
    without replacement with ``seed``; everything else (users, assortment,
    validation and test sets) is unchanged. ``fraction`` 1 returns ``split``.

    Raises
    ------
    ValueError
        If ``fraction`` is not in (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"The fraction of users to train on must be in (0, 1], got {fraction}.")
    if fraction == 1:
        return split
    users = np.unique(split.train_users)
    chosen = np.random.default_rng(seed).choice(users, size=math.ceil(fraction * len(users)), replace=False)
    keep = np.isin(split.train_users, chosen)
    return replace(split, train_users=split.train_users[keep], train_items=split.train_items[keep])


@dataclass(frozen=True)
class Joined:
    """A joined market's model at its best epoch on validation."""

    model: SplitRecommender  # the published shared arrays and the fitted head
    data: MarketTensors  # the whole market's split: what the model is evaluated and served with
    best_epoch: int
    epochs: int
    train_users: int  # users whose training interactions fitted the head
    valid: RankingMetrics
    test: RankingMetrics
    shared: tuple[str, ...]  # the method's shared array names (the published ones)

    def metrics(self) -> dict[str, float]:
        """The manifest's metrics: sampled and full ranking on validation and test."""
        return {
            f"{prefix}-{key}": value
            for prefix, result in (("val", self.valid), ("test", self.test))
            for key, value in (
                ("ndcg", result.ndcg),
                ("hr", result.hit_rate),
                ("full-ndcg", result.full_ndcg),
                ("full-recall", result.full_recall),
            )
        }

    def head(self) -> dict[str, torch.Tensor]:
        """What the market keeps of the model under the published method: everything it does not share."""
        return {
            name: value.detach().clone() for name, value in self.model.state_dict().items() if name not in self.shared
        }


def build_model(published: Published, split: MarketSplit, catalog: Catalog, seed: int) -> SplitRecommender:
    """The market's model: a new head seeded as the ClientApp seeds one, the published arrays as they are.

    Raises
    ------
    ValueError
        If the published arrays are not the method's shared arrays of a model over ``catalog``.
    """
    torch.manual_seed(market_seed(split.market, seed))
    model = SplitRecommender(
        ModelConfig(
            catalog.size, split.num_users, published.embedding_dim, published.history_length, published.user_embeddings
        )
    )
    shared = shared_parameter_names(model, get_method(published.method).share_head)
    expected = model.state_dict()
    wrong = sorted(
        name
        for name in set(shared) | set(published.arrays)
        if name not in published.arrays
        or name not in expected
        or published.arrays[name].shape != expected[name].shape
        or published.arrays[name].dtype != expected[name].dtype
    )
    if wrong:
        raise ValueError(
            f"{published.path}: its arrays {wrong} are not the {published.method} shared arrays of a "
            f"model over this catalog ({catalog.size} rows, embedding-dim {published.embedding_dim})."
        )
    set_arrays(model, published.arrays)
    return model


def join_market(
    published: Published,
    split: MarketSplit,
    catalog: Catalog,
    epochs: int = 10,
    seed: int = 0,
    fraction: float = 1.0,
    train: TrainConfig | None = None,
    fine_tune_epochs: int = 15,
    fine_tune_learning_rate: float = 0.001,
) -> Joined:
    """Fit the market's head on the published shared arrays, then fine-tune the whole model; keep the best epoch.

    First ``epochs`` epochs train the head alone with the encoder frozen (as
    FedRep's head phase), so that the head fits the federation's item vectors;
    then ``fine_tune_epochs`` epochs train everything at the smaller
    ``fine_tune_learning_rate``, so that the market's own items, which the
    federation may never have sold, get vectors of their own. After every
    epoch the model is evaluated on validation (sampled NDCG@10); the first
    best epoch of either phase is kept, then evaluated in full on validation
    and test. The fine-tuned encoder is the market's own fork: it is served,
    never sent. ``fraction`` < 1 trains on that share of the users
    (:func:`subsample_training_users`); evaluation uses the whole market.
    ``train`` gives batch size, step size, negatives and score penalty
    (default :class:`common.train.TrainConfig`); its epochs are ignored.

    On XMarket, with the fedrep encoder of the six other markets, the head
    alone did not beat a market training alone on 10% of its users for the
    largest market (ca: 0.258 vs 0.263 test NDCG@10 after 30 head epochs); a
    head phase then a fine-tune at 0.001 reached 0.275 (see docs/join.md).
    """
    if epochs < 1 or fine_tune_epochs < 0:
        raise ValueError(
            f"Joining trains the head for at least one epoch and fine-tunes for zero or more, "
            f"got {epochs} and {fine_tune_epochs}."
        )
    if fine_tune_learning_rate <= 0:
        raise ValueError(f"The fine-tuning learning rate must be positive, got {fine_tune_learning_rate}.")
    model = build_model(published, split, catalog, seed)
    shared = tuple(shared_parameter_names(model, get_method(published.method).share_head))
    local_seed = market_seed(split.market, seed)
    data = MarketTensors.from_split(split, published.history_length)
    train_split = subsample_training_users(split, fraction, local_seed)
    train_data = data if train_split is split else MarketTensors.from_split(train_split, published.history_length)
    head_epoch = replace(train or TrainConfig(), epochs=1)
    phases = [
        (model.head.parameters, head_epoch, epochs),
        (model.parameters, replace(head_epoch, learning_rate=fine_tune_learning_rate), fine_tune_epochs),
    ]
    best_epoch, best_ndcg, best_state, epoch = 0, None, None, 0
    model.encoder.requires_grad_(False)  # frozen in the head phase: no gradient is even computed for it
    for parameters, one_epoch, phase_epochs in phases:
        for _ in range(phase_epochs):
            epoch += 1
            train_epochs(model, [train_data], one_epoch, local_seed + epoch, parameters=parameters())
            ndcg = evaluate(model, data, full=False).ndcg
            if improves(ndcg, best_ndcg):
                best_epoch, best_ndcg = epoch, ndcg
                best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        model.encoder.requires_grad_(True)
    model.load_state_dict(best_state)
    return Joined(
        model=model,
        data=data,
        best_epoch=best_epoch,
        epochs=epochs + fine_tune_epochs,
        train_users=len(np.unique(train_split.train_users)),
        valid=evaluate(model, data),
        test=evaluate(model, data, on_test=True),
        shared=shared,
    )


def write_joined_model(
    directory: str | Path,
    joined: Joined,
    published: Published,
    catalog: Catalog,
    user_ids: Sequence[str],
    fraction: float,
    seed: int,
) -> None:
    """Write the joined model as the market's served model (method ``join-<method>``, round = the kept epoch)."""
    manifest = {
        "method": f"join-{published.method}",
        "market": joined.data.split.market,
        "round": joined.best_epoch,
        "metrics": joined.metrics(),
        "epsilon": None,
        "delta": None,
        "joined": {
            "published-training-id": published.training_id,
            "published-round": published.round,
            "epochs": joined.epochs,  # head epochs plus fine-tuning epochs
            "fraction": fraction,
            "train-users": joined.train_users,
            "seed": seed,
        },
    }
    write_served_model(directory, joined.model, joined.data, catalog, manifest, user_ids=user_ids)


def save_market_state(state_dir: str | Path, market: str, joined: Joined, published: Published) -> Path:
    """Write the fitted head as the market's state in a region's ``state-dir``, for its next training.

    Raises
    ------
    ValueError
        If the state-dir holds a privacy ledger of the market (it trains under
        DP: a head fitted without DP must not seed what it sends), or a market
        state from a training rather than from an earlier join.
    """
    store = check_state_dir(state_dir, market)
    store.save(
        MarketState(training_id=f"{JOIN_TRAINING_PREFIX}{published.training_id}", last_round=0, head=joined.head())
    )
    return store.path


def check_state_dir(state_dir: str | Path, market: str) -> MarketStateStore:
    """The market's state store in ``state_dir``, if a joined head may be written there (:func:`save_market_state`)."""
    store = MarketStateStore(state_dir, market)
    ledger = LedgerStore(state_dir, market)
    if ledger.exists():
        raise ValueError(
            f"{ledger.path} exists: market {market} trains under DP, and a head fitted without DP must not shape "
            "what it sends. Serve the joined model from --out and leave --state-dir out."
        )
    saved = store.load()
    if saved is not None and not saved.training_id.startswith(JOIN_TRAINING_PREFIX):
        raise ValueError(
            f"{store.path} holds the head market {market} trained in training {saved.training_id} "
            f"(round {saved.last_round}); move it away first if the joined head is to replace it."
        )
    return store


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model-dir",
        type=Path,
        metavar="DIR",
        help=f"a training's models directory with {PUBLISHED_FILE} (simulation: OUT/models/<method>) "
        "(required: this or --published)",
    )
    source.add_argument(
        "--published",
        type=Path,
        metavar="FILE",
        help=f"the {PUBLISHED_FILE} itself (deployment: from the server's out-dir) (required: this or --model-dir)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE",
        help="the joining market's interactions: userId itemId rating [date], as text, CSV or Parquet (required)",
    )
    parser.add_argument(
        "--catalog",
        type=Path,
        required=True,
        metavar="FILE",
        help="the company catalog; refused unless it is the one the training used (required)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="served-model directory to write (required)"
    )
    parser.add_argument(
        "--market",
        metavar="NAME",
        help="the market's name, as its node config names it; it seeds the evaluation negatives "
        "(default: the data file's name up to its first '_'; required with --state-dir)",
    )
    parser.add_argument(
        "--join-epochs", type=int, default=10, help="epochs of head training, the encoder frozen (default: %(default)s)"
    )
    parser.add_argument(
        "--fine-tune-epochs",
        type=int,
        default=15,
        help="then epochs of training the whole model, the market's own fork of the encoder; "
        "the best epoch of both phases on validation is kept (default: %(default)s)",
    )
    parser.add_argument(
        "--fine-tune-learning-rate",
        type=float,
        default=0.001,
        help="Adam step size of the fine-tuning (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the federation's seed: evaluation negatives, head initialisation, shuffling (default: %(default)s)",
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="train on this random share of the market's users, in (0, 1]; evaluation keeps "
        "every user (default: %(default)s)",
    )
    defaults = TrainConfig()
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="interactions per step (default: %(default)s)"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="Adam step size (default: %(default)s)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="also write the head as <DIR>/<market>.pt, which the region's ClientApp restores "
        "in its next training (default: none)",
    )
    add_alias(parser, "--epochs", "--join-epochs")
    add_verbose(parser)
    args = parser.parse_args(argv)
    if args.join_epochs < 1 or args.fine_tune_epochs < 0 or args.fine_tune_learning_rate <= 0:
        parser.error(
            f"--join-epochs must be at least 1, --fine-tune-epochs at least 0 and --fine-tune-learning-rate "
            f"positive, got {args.join_epochs}, {args.fine_tune_epochs} and {args.fine_tune_learning_rate}"
        )
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.batch_size < 1 or args.learning_rate <= 0:
        parser.error(
            f"--batch-size must be at least 1 and --learning-rate positive, got {args.batch_size} "
            f"and {args.learning_rate}"
        )
    if args.state_dir is not None and args.market is None:
        parser.error("--state-dir needs --market: the state file is named after the market its node config names")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Join the market; returns the one-line summary."""
    args = parse_args(argv)
    started = time.perf_counter()
    published = load_published(args.published or args.model_dir / PUBLISHED_FILE)
    catalog = Catalog.load(args.catalog)
    check_catalog(published, catalog, args.catalog)
    market = check_name(args.market or args.data.stem.split("_", 1)[0])
    interactions = read_interactions(args.data)
    if args.state_dir is not None:
        check_state_dir(args.state_dir, market)  # before the training, not after it
    split = split_market(market, interactions, catalog, args.seed)
    train = replace(TrainConfig(), batch_size=args.batch_size, learning_rate=args.learning_rate)
    joined = join_market(
        published,
        split,
        catalog,
        args.join_epochs,
        args.seed,
        args.fraction,
        train,
        args.fine_tune_epochs,
        args.fine_tune_learning_rate,
    )
    write_joined_model(args.out, joined, published, catalog, market_user_ids(interactions), args.fraction, args.seed)
    state = ""
    if args.state_dir is not None:
        state = f"; head for the next training in {save_market_state(args.state_dir, market, joined, published)}"
    return (
        f"{market}: joined {published.method} training {published.training_id} (round {published.round}) with "
        f"{joined.train_users} of {split.num_users} users; best epoch {joined.best_epoch} of {joined.epochs}; "
        f"val NDCG@10 {joined.valid.ndcg:.4f}, test NDCG@10 {joined.test.ndcg:.4f}; "
        f"{time.perf_counter() - started:.1f} s -> {args.out}{state}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
