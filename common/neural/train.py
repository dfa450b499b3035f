"""Local training and evaluation of the split recommender on one or more markets."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from common.data.metrics import full_rank_of_positive, hit_rate_at_k, ndcg_at_k, rank_of_positive
from common.data.split import MarketSplit
from common.neural.model import SplitRecommender


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings; one instance describes a round's local work."""

    epochs: int = 1  # local epochs per round; more drifts markets apart under FedAvg
    head_epochs: int = 1  # FedRep only: epochs on the head, encoder frozen, before the encoder epochs
    batch_size: int = 256  # interactions per step
    learning_rate: float = 0.005  # Adam step size, reset every round like the optimizer
    negatives: int = 8  # sampled negatives per positive in the sampled-softmax loss
    score_penalty: float = 1e-4  # penalty on squared scores: keeps logits small, a cheap regulariser
    user_positives: int = 16  # DP-SGD (one user, one example): training items of a sampled user per step

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.head_epochs < 0 or self.batch_size < 1 or self.negatives < 1:
            raise ValueError(
                "Training needs epochs >= 0, head_epochs >= 0, batch_size >= 1 and negatives >= 1, "
                f"got {self.epochs}, {self.head_epochs}, {self.batch_size} and {self.negatives}."
            )
        if self.user_positives < 1:
            raise ValueError(f"DP-SGD needs at least one positive per sampled user, got {self.user_positives}.")
        if self.learning_rate <= 0 or self.score_penalty < 0:
            raise ValueError(
                f"Training needs learning_rate > 0 and score_penalty >= 0, got "
                f"{self.learning_rate} and {self.score_penalty}."
            )


@dataclass(frozen=True)
class MarketTensors:
    """A market's split as tensors, user indices shifted by ``user_offset``."""

    split: MarketSplit
    user_offset: int
    train_users: torch.Tensor
    train_items: torch.Tensor
    market_items: torch.Tensor
    history: torch.Tensor  # (users, history_length) most recent training items
    history_mask: torch.Tensor  # (users, history_length) 1.0 where history holds an item
    test_history: torch.Tensor  # history plus the validation item, which precedes the test item
    test_history_mask: torch.Tensor
    user_items: torch.Tensor  # (users, most training items of a user) each user's training items, -1 padded
    # Under DP, the rows whose shared parameters a market may change and whose popularity it
    # releases: public (the region's product list or the catalog, common.region.public_assortment),
    # never the items its users happen to have bought. None: market_items (no DP, or a local baseline).
    released_rows: torch.Tensor | None = None
    # Under DP, the user count the market released with noise: what DP-SGD's sample rate, steps
    # and noise scale are computed from, so that nothing it sends is a function of the exact
    # count. None: the exact count (no DP, or a local baseline).
    released_users: int | None = None

    @property
    def public_rows(self) -> torch.Tensor:
        """:attr:`released_rows`, or :attr:`market_items` when none are set."""
        return self.market_items if self.released_rows is None else self.released_rows

    @classmethod
    def from_split(cls, split: MarketSplit, history_length: int, user_offset: int = 0) -> "MarketTensors":
        """Tensors of ``split`` with each user's last ``history_length`` training items."""
        history = np.zeros((split.num_users, history_length), dtype=np.int64)
        mask = np.zeros((split.num_users, history_length), dtype=np.float32)
        # train_users is grouped by user in date order (see split_market).
        starts = np.searchsorted(split.train_users, np.arange(split.num_users))
        ends = np.searchsorted(split.train_users, np.arange(split.num_users), "right")
        histories = [split.train_items[start:end] for start, end in zip(starts, ends, strict=True)]
        user_items = np.full((split.num_users, max(map(len, histories), default=0)), -1, dtype=np.int64)
        test_history = np.zeros_like(history)
        test_mask = np.zeros_like(mask)
        validation_item = dict(zip(split.valid.users.tolist(), split.valid.candidates[:, 0].tolist(), strict=True))
        for user, items in enumerate(histories):
            user_items[user, : len(items)] = items
            for rows, row_mask, sequence in (
                (history, mask, items),
                (test_history, test_mask, np.append(items, validation_item.get(user, []))),
            ):
                recent = sequence[-history_length:] if history_length else sequence[:0]
                rows[user, : len(recent)] = recent
                row_mask[user, : len(recent)] = 1.0
        return cls(
            split=split,
            user_offset=user_offset,
            train_users=torch.as_tensor(split.train_users + user_offset),
            train_items=torch.as_tensor(split.train_items),
            market_items=torch.as_tensor(split.market_items),
            history=torch.as_tensor(history),
            history_mask=torch.as_tensor(mask),
            test_history=torch.as_tensor(test_history),
            test_history_mask=torch.as_tensor(test_mask),
            user_items=torch.as_tensor(user_items),
        )

    def user_history(self, users: torch.Tensor, for_test: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """History rows of global user indices ``users``.

        At test time the validation interaction is part of the user's past, as
        it would be in production; it is never trained on.
        """
        local = users - self.user_offset
        if for_test:
            return self.test_history[local], self.test_history_mask[local]
        return self.history[local], self.history_mask[local]


def batch_inputs(
    data: MarketTensors, batch: torch.Tensor, negatives: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs for the training interactions ``batch`` (indices into the market).

    The positive is masked out of its own user's history so that the model
    cannot learn to recommend what the history already shows.
    """
    users = data.train_users[batch]
    positives = data.train_items[batch]
    drawn = torch.randint(len(data.market_items), (len(batch), negatives), generator=generator)
    candidates = torch.cat([positives.unsqueeze(1), data.market_items[drawn]], dim=1)
    history, mask = data.user_history(users)
    mask = mask * (history != positives.unsqueeze(1))
    return users, history, mask, candidates


def user_batch_inputs(
    data: MarketTensors, users: torch.Tensor, positives: int, negatives: int, generator: torch.Generator
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Model inputs for the market's users ``users`` (local indices), one user per example.

    Each user contributes up to ``positives`` of their training items, drawn
    without replacement, each with its own negatives and with itself masked
    out of the history. Returns the inputs (candidates of shape ``(users,
    positives, 1 + negatives)``) and a ``(users, positives)`` mask of the real
    positives (users with fewer items are padded).
    """
    items = data.user_items[users]
    keys = torch.rand(items.shape, generator=generator).masked_fill(items < 0, -1.0)
    drawn_keys, drawn = keys.topk(min(positives, items.shape[1]), dim=1)
    real = drawn_keys >= 0
    chosen = items.gather(1, drawn).clamp(min=0)  # padding points at row 0 and carries no loss
    # Negatives come from the public rows: drawn from the items the users bought, one user's
    # purchase would change every other user's negatives, beyond the per-user clipping bound.
    rows = data.public_rows
    sampled = torch.randint(len(rows), (*chosen.shape, negatives), generator=generator)
    candidates = torch.cat([chosen.unsqueeze(-1), rows[sampled]], dim=-1)
    history, mask = data.user_history(users + data.user_offset)
    per_positive_mask = mask.unsqueeze(1) * (history.unsqueeze(1) != chosen.unsqueeze(-1))
    return (users + data.user_offset, history, per_positive_mask, candidates), real.float()


def sampled_softmax_loss(model: nn.Module, inputs: Sequence[torch.Tensor], score_penalty: float) -> torch.Tensor:
    """Cross-entropy of the positive (column 0) against its sampled negatives."""
    scores = model(*inputs)
    target = torch.zeros(len(scores), dtype=torch.long)
    loss = nn.functional.cross_entropy(scores, target)
    if score_penalty > 0:
        loss = loss + score_penalty * scores.pow(2).mean()
    return loss


def train_epochs(
    model: SplitRecommender,
    markets: Sequence[MarketTensors],
    config: TrainConfig,
    seed: int,
    parameters: Iterable[nn.Parameter] | None = None,
) -> float:
    """Train for ``config.epochs`` over all interactions of ``markets``.

    Each batch comes from one market, so negatives are that market's items;
    batches of different markets are interleaved at random (the pooled baseline
    passes several markets, a federated client one).

    Parameters
    ----------
    model : SplitRecommender
        Trained in place.
    markets : Sequence[MarketTensors]
        Training data, user indices already offset into the model's user table.
    config : TrainConfig
        Local optimisation settings.
    seed : int
        Seeds shuffling and negative sampling.
    parameters : Iterable[nn.Parameter], optional
        Parameters to update (default: all); the rest stay frozen.

    Returns
    -------
    float
        Mean training loss over the last epoch (nan when no step ran).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(
        list(model.parameters() if parameters is None else parameters),
        lr=config.learning_rate,
    )
    model.train()
    mean_loss = float("nan")
    for _ in range(config.epochs):
        batches = [
            (data, batch)
            for data in markets
            for batch in torch.randperm(len(data.train_users), generator=generator).split(config.batch_size)
        ]
        order = torch.randperm(len(batches), generator=generator).tolist()
        total = 0.0
        for index in order:
            data, batch = batches[index]
            inputs = batch_inputs(data, batch, config.negatives, generator)
            loss = sampled_softmax_loss(model, inputs, config.score_penalty)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        mean_loss = total / max(len(order), 1)
    return mean_loss


@dataclass(frozen=True)
class RankingMetrics:
    """NDCG@10 and HR@10 of one market on one evaluation set, sampled and full.

    ``ndcg`` and ``hit_rate`` rank the held-out item against its 99 sampled
    negatives (the published protocol); ``full_ndcg`` and ``full_recall``
    rank it against the market's whole assortment minus the user's own items
    (NaN when not measured). With one relevant item, recall@k is hit rate@k.
    """

    ndcg: float
    hit_rate: float
    users: int
    full_ndcg: float = float("nan")
    full_recall: float = float("nan")


EVAL_CHUNK = 1024  # users scored at once: (chunk, market items) floats, 32 MB for 8k items
# Users of a market ranked against its whole assortment (full NDCG and recall): every user up to
# this many, else this many spread evenly over the market's evaluated users. Full ranking costs
# users x assortment x d per evaluation, the rest of an evaluation users x 100 x d: a market of a
# million users selling half a million products would spend an hour a round on it. The cap
# leaves every XMarket market (at most 4,668 users) ranked in full; they are spread over the
# users ranked on sampled candidates.
FULL_RANKING_USERS = 5_000
# Users of a market ranked on their sampled candidates (NDCG and HR@10): every user up to this many,
# else this many spread evenly over the evaluated ones. Each user's 100 candidates are 100 rows of d
# read at random: a million users' are 50 GB of memory traffic, minutes of every round spent
# reading, while 100,000 users give a market's NDCG@10 to a standard error of about 0.001. Every
# method, baseline and served-model check evaluates through here, so all rank the same users
# (rerank and the refit benchmark rank every user: they are measured at XMarket's size).
EVALUATED_USERS = 100_000


@torch.no_grad()
def evaluate(
    model: SplitRecommender, data: MarketTensors, on_test: bool = False, k: int = 10, full: bool = True
) -> RankingMetrics:
    """Rank each held-out validation (or test) item against its sampled negatives and, with
    ``full``, against every item the market sells.

    The full ranking leaves out each user's training items and, on test, the
    validation item, which precedes the test item in the user's history (see
    :func:`common.metrics.full_rank_of_positive`). On validation the test item
    stays a candidate: it lies in the user's future. The market's items are
    encoded once (the encoder works item by item, so this is the forward
    pass's encoding); users are scored in chunks of :data:`EVAL_CHUNK`, their
    history and candidate vectors looked up among the encoded items (the same
    scores as the model's forward pass, which a test checks), against their
    sampled candidates and, with ``full``, against all items in one matrix
    product, for at most :data:`FULL_RANKING_USERS` users evenly spaced among
    the evaluated ones (:func:`evenly_spaced`). Above :data:`EVALUATED_USERS` users, the ranked
    users are that many spread evenly over the evaluated ones.
    """
    eval_set = data.split.test if on_test else data.split.valid
    if len(eval_set.users) == 0:
        raise ValueError(f"Market '{data.split.market}' has no users to evaluate.")
    model.eval()
    ranks, full_ranks = [], []
    evaluated = evenly_spaced(len(eval_set.users), EVALUATED_USERS)  # positions in the evaluation set
    users = torch.as_tensor(eval_set.users[evaluated]) + data.user_offset
    market_items = data.market_items
    item_vectors = model.encoder(market_items)
    item_bias = model.head.item_bias(market_items).squeeze(-1)
    if full:
        ranked_in_full = np.zeros(len(users), dtype=bool)
        ranked_in_full[evenly_spaced(len(users), FULL_RANKING_USERS)] = True
        # The held-out and excluded columns of those users alone: a market of a million users
        # would otherwise hold every user's padded training items twice.
        in_full = np.flatnonzero(ranked_in_full)
        positives, excluded = _full_ranking_columns(data, on_test, evaluated[in_full])
    # Users ranked in full wait until a chunk's worth is gathered: one matrix product per
    # EVAL_CHUNK of them, not one per chunk of evaluated users (each reads every item vector).
    waiting_rows: list[np.ndarray] = []
    waiting_vectors: list[torch.Tensor] = []

    def rank_in_full() -> None:
        rows, vectors = np.concatenate(waiting_rows), torch.cat(waiting_vectors)
        all_scores = torch.addmm(item_bias, vectors, item_vectors.T)
        at = np.searchsorted(in_full, rows)
        full_ranks.append(full_rank_of_positive(all_scores.numpy(), positives[at], excluded[at]))
        waiting_rows.clear()
        waiting_vectors.clear()

    for chunk in torch.arange(len(users)).split(EVAL_CHUNK):
        history, mask = data.user_history(users[chunk], for_test=on_test)
        # History items are the market's own: their encodings are rows of item_vectors.
        columns = torch.searchsorted(market_items, history).clamp(max=len(market_items) - 1)
        user_vectors = model.head.user_vectors(users[chunk], item_vectors[columns], mask)
        # Candidates' columns chunk by chunk: a million users' candidates are 800 MB, their columns as many.
        candidates = torch.as_tensor(eval_set.candidates[evaluated[int(chunk[0]) : int(chunk[-1]) + 1]])
        sampled = torch.searchsorted(market_items, candidates).clamp(max=len(market_items) - 1)
        if not torch.equal(market_items[sampled], candidates):
            raise ValueError(f"Market '{data.split.market}' ranks candidates outside its own assortment.")
        scores = torch.einsum("bd,bcd->bc", user_vectors, item_vectors[sampled]) + item_bias[sampled]
        ranks.append(rank_of_positive(scores.numpy()))
        if full and ranked_in_full[chunk.numpy()].any():
            rows = chunk.numpy()  # a one-element tensor would index numpy as a scalar
            chosen = ranked_in_full[rows]
            waiting_rows.append(rows[chosen])
            waiting_vectors.append(user_vectors[torch.as_tensor(chosen)])
            if sum(len(waiting) for waiting in waiting_rows) >= EVAL_CHUNK:
                rank_in_full()
    if waiting_rows:
        rank_in_full()
    all_ranks = np.concatenate(ranks)
    metrics = RankingMetrics(ndcg=ndcg_at_k(all_ranks, k), hit_rate=hit_rate_at_k(all_ranks, k), users=len(all_ranks))
    if not full:
        return metrics
    all_full_ranks = np.concatenate(full_ranks)
    return replace(metrics, full_ndcg=ndcg_at_k(all_full_ranks, k), full_recall=hit_rate_at_k(all_full_ranks, k))


def evenly_spaced(users: int, cap: int) -> np.ndarray:
    """Which of ``users`` users (positions) an evaluation ranks (:data:`EVALUATED_USERS`), or ranks
    against the whole assortment (:data:`FULL_RANKING_USERS`): all of them up to ``cap``, else
    ``cap`` positions spread evenly from the first to the last.

    Evenly spaced rather than drawn, so that every round, method and seed ranks the same users
    without a generator to keep in step.
    """
    if cap < 1:
        raise ValueError(f"An evaluation ranks at least one user, got a cap of {cap}.")
    if users <= cap:
        return np.arange(users)
    return np.unique(np.linspace(0, users - 1, cap).round().astype(np.int64))


def _full_ranking_columns(data: MarketTensors, on_test: bool, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns of ``data.market_items`` for the evaluated users at positions ``chosen``: the held-out
    item, and the items to leave out of its ranking (training items, plus the validation item on
    test; -1 pads)."""
    split = data.split
    eval_set = split.test if on_test else split.valid
    market_items = split.market_items  # sorted: a catalog row's column is its searchsorted position
    held_out = eval_set.candidates[chosen, 0]
    positives = np.searchsorted(market_items, held_out)
    if np.any(market_items[np.minimum(positives, len(market_items) - 1)] != held_out):
        raise ValueError(f"Market '{split.market}' holds out items outside its own assortment.")
    users = eval_set.users[chosen]
    seen = data.user_items[torch.as_tensor(users)].numpy()
    if on_test:
        validation_item = np.full(split.num_users, -1, dtype=np.int64)
        validation_item[split.valid.users] = split.valid.candidates[:, 0]
        seen = np.concatenate([seen, validation_item[users][:, None]], axis=1)
    excluded = np.where(seen >= 0, np.searchsorted(market_items, seen), -1)
    return positives, excluded
