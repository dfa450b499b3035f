"""A market's privacy bookkeeping across rounds, restarts and trainings.

Under DP a deployed region keeps one lifetime ledger in its ``state-dir``
(:class:`clients.state_store.LedgerStore`): every release it ever made is
composed there, whatever training the server names. A training calibrates its
noise once, to what the ledger leaves of the market's budget; the server's
``training-id`` only says whether the current calibration may be reused. In
simulation (no ``state-dir``) the ledger lives in ``context.state`` for the run.
"""

import json
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from logging import WARNING
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.common import log

from clients.state_store import LedgerEntry, LedgerStore, MarketStateStore
from common.data.markets import market_seed
from common.ials.dp import noise_generator
from common.methods import get_method
from common.neural.model import SplitRecommender
from common.neural.train import MarketTensors, TrainConfig
from common.privacy.dp_sgd import (
    market_budget,
    popularity_seed,
    private_round_steps,
    private_steps,
    start_private_training,
)
from common.privacy.ledger import (
    PrivacyBudget,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    calibrate_noise,
    default_delta,
    epsilon_of,
    release_history,
)
from common.privacy.region import SIMULATION_NODE_CONFIG_ENV, RegionPolicy
from common.protocol import INSECURE_NOISE_MARKER as INSECURE_KEY
from common.run_config import RunConfig

PRIVACY_KEY = "privacy-ledger"  # the market's ledger kept in context.state when it has no state-dir
# The user count a DP market releases once per calibration: Gaussian noise of this multiplier
# (sensitivity 1 under adding or removing one user), composed in the ledger like every release.
# Its std, 10 users, moves the weights and |U| it feeds by well under 1% for a market of 1,000 users.
COUNT_NOISE_MULTIPLIER = 10.0
RELEASED_USERS = "released-users"  # the calibration's entry holding that noised count


def node_settings(context: Context) -> dict[str, Any]:
    """The region's own settings: its node config, and for a simulated market the harness's.

    Flower gives a simulated market only ``partition-id`` and ``num-partitions``; the harness,
    which owns every simulated market, passes the rest as JSON in the environment variable
    :data:`common.region.SIMULATION_NODE_CONFIG_ENV` of the processes it starts. A deployed
    region (``market`` in its node config) never reads that variable.

    Raises
    ------
    ValueError
        If the variable is set but is not a JSON object.
    """
    settings = dict(context.node_config)
    text = os.environ.get(SIMULATION_NODE_CONFIG_ENV, "")
    if "market" not in settings and text:
        try:
            extra = json.loads(text)
        except json.JSONDecodeError:
            extra = None
        if not isinstance(extra, dict):
            raise ValueError(f"{SIMULATION_NODE_CONFIG_ENV} must hold a JSON object of node config keys.")
        settings = {**extra, **settings}
    return settings


def region_policy(context: Context, market: str = "") -> RegionPolicy:
    """The region's :class:`common.region.RegionPolicy`, read from :func:`node_settings`."""
    return RegionPolicy.from_node_config(node_settings(context), market)


def state_dir(context: Context) -> str | None:
    """The region's ``state-dir`` from its node config, if any."""
    value = context.node_config.get("state-dir")
    return str(value) if value else None


def require_durable_ledger(context: Context, config: RunConfig, market: str) -> None:
    """Refuse DP in a deployed region that would forget its spending on a restart.

    Raises
    ------
    ValueError
        If the node config names a market (a deployed region), the run trains it
        under DP, and the node config has no ``state-dir``.
    """
    if "market" in context.node_config and config.dp_epsilon > 0 and state_dir(context) is None:
        raise ValueError(
            f"Market '{market}' trains under DP but its node config has no state-dir: a restarted "
            "SuperNode would forget what it spent. Set state-dir in the node config."
        )


class MarketPrivacy:
    """Where the market's ledger lives: its ``state-dir``, or ``context.state`` in simulation."""

    def __init__(self, context: Context, market: str) -> None:
        self.context = context
        self.market = market
        directory = state_dir(context)
        self.store = LedgerStore(directory, market) if directory else None
        self.state_store = MarketStateStore(directory, market) if directory else None

    def hold(self) -> AbstractContextManager:
        """Hold the ledger from reading it to saving what a round spent."""
        return self.store.lock() if self.store is not None else nullcontext()

    def load(self) -> LedgerEntry | None:
        """The market's ledger, or None if it never trained under DP.

        Raises
        ------
        CorruptStateError
            If the ledger is unreadable, or missing although the market's saved
            state shows it trained under DP before.
        """
        if self.store is None:
            if PRIVACY_KEY not in self.context.state:
                return None
            return _entry_from_json(str(self.context.state[PRIVACY_KEY]["ledger"]))
        entry = self.store.load()
        if entry is None:
            saved = self.state_store.load()
            legacy = self.state_store.legacy_ledger()
            if legacy is not None:
                # An earlier version kept the ledger inside <market>.pt: adopt it once.
                return LedgerEntry(PrivacyLedger.from_state(legacy), saved.training_id if saved else "", {}, [])
            if saved is not None and saved.ledger:
                raise self.store.unusable("is missing although the market's saved state shows it trained under DP")
        return entry

    def save(self, entry: LedgerEntry) -> None:
        """Keep ``entry``: in the state-dir (durably) or in ``context.state``."""
        if self.store is not None:
            self.store.save(entry)
        else:
            self.context.state[PRIVACY_KEY] = ConfigRecord({"ledger": _entry_to_json(entry)})

    def spent(self, config: RunConfig) -> dict[str, float]:
        """``epsilon`` spent over the market's lifetime and the ``delta`` it holds at; empty without DP."""
        if config.dp_epsilon <= 0:
            return {}
        entry = self.load()
        return entry.ledger.spent() if entry is not None else {"epsilon": 0.0, "delta": config.dp_delta}


def round_ledger(
    privacy: MarketPrivacy,
    config: RunConfig,
    model: SplitRecommender,
    data: MarketTensors,
    train: TrainConfig,
    training_id: str,
    policy: RegionPolicy,
) -> LedgerEntry:
    """The ledger this round spends from: the training's calibration, or a new one.

    A new calibration (a new training, or settings the old one depended on
    changed) composes with everything the market spent before and pays for the
    popularity prior, which goes into ``model``'s head.

    Raises
    ------
    PrivacyBudgetExceeded
        If what the market spent before leaves nothing of its budget.
    """
    entry = privacy.load()
    method = get_method(config.method)

    def calibration_for(public: MarketTensors) -> dict[str, Any]:
        """What the calibration depends on, DP-SGD's steps counted at ``public``'s released count."""
        total_steps = config.num_server_rounds * private_round_steps(public, method, train)
        if method.fine_tune:
            # The fork is trained on private data too: its epochs are part of the budget.
            total_steps += private_steps(public, replace(train, epochs=config.fine_tune_epochs))
        return {
            "users": data.split.num_users,  # stays in the region: a new count means new data
            "batch-size": train.batch_size,
            "steps": total_steps,
            "max-grad-norm": config.dp_max_grad_norm,
            "accountant": config.dp_accountant,
            "popularity-share": config.dp_popularity_share,
        }

    if entry is not None and entry.training_id == training_id and RELEASED_USERS in entry.calibration:
        public = replace(data, released_users=released_users(entry))
        if _same_calibration(entry.calibration, calibration_for(public)):
            _tighten(entry.ledger, config, policy, data.split.market)
            return entry
    released = release_user_count(data.split.num_users, policy, config.seed, data.split.market)
    public = replace(data, released_users=released)
    calibration = calibration_for(public)
    total_steps = calibration["steps"]
    delta = period_delta(entry, config, policy, released)
    budget = market_budget(public, config.dp_epsilon, delta, config.dp_max_grad_norm, config.dp_accountant)
    noise_seed = popularity_seed(data.split.market, config.seed) if policy.insecure_seeded_noise else None
    spent_before = entry.ledger if entry is not None else PrivacyLedger(budget, 0.0, 1.0)
    spent_before = replace(spent_before, releases=[*spent_before.releases, COUNT_NOISE_MULTIPLIER])
    ledger = start_private_training(
        model,
        public,
        budget,
        train,
        total_steps,
        config.dp_popularity_share,
        spent_before,
        noise_seed,
    )
    calibration[RELEASED_USERS] = released
    return LedgerEntry(ledger, training_id, calibration, entry.periods if entry is not None else [])


def release_ledger(
    privacy: MarketPrivacy, config: RunConfig, num_users: int, training_id: str, policy: RegionPolicy
) -> LedgerEntry:
    """The ledger DP-fedals releases from: one Gaussian release of the whole data per round.

    Calibrated once per training: the market first releases its user count
    (:func:`release_user_count`), then ``num-server-rounds`` releases at sample rate 1 get what
    the market's lifetime ledger leaves of its budget (:func:`common.privacy.calibrate_noise`),
    at the δ of its budget period (:func:`period_delta`).

    Raises
    ------
    PrivacyBudgetExceeded
        If what the market spent before leaves nothing of its budget, or too little for the rounds.
    """
    entry = privacy.load()
    calibration = {
        "mechanism": "dp-fedals",
        "users": num_users,
        "releases": config.num_server_rounds,
        "accountant": config.dp_accountant,
    }
    if entry is not None and entry.training_id == training_id and _same_calibration(entry.calibration, calibration):
        _tighten(entry.ledger, config, policy, privacy.market)
        return entry
    history = list(entry.ledger.history) if entry is not None else []
    releases = list(entry.ledger.releases) if entry is not None else []
    released_users = release_user_count(num_users, policy, config.seed, privacy.market)
    releases.append(COUNT_NOISE_MULTIPLIER)
    budget = PrivacyBudget(
        config.dp_epsilon, period_delta(entry, config, policy, released_users), 1.0, config.dp_accountant
    )
    prior = release_history(releases) + history
    if (spent := epsilon_of(budget, prior)) >= budget.epsilon:
        raise PrivacyBudgetExceeded(
            f"Market '{privacy.market}' has spent epsilon {spent:.3f} of its budget of {budget.epsilon}: "
            "nothing is left for a new training."
        )
    noise = calibrate_noise(budget, 1.0, config.num_server_rounds, prior)
    ledger = PrivacyLedger(budget, noise, 1.0, history, releases)
    calibration[RELEASED_USERS] = released_users
    return LedgerEntry(ledger, training_id, calibration, entry.periods if entry is not None else [])


def release_user_count(num_users: int, policy: RegionPolicy, seed: int, market: str) -> int:
    """The market's user count with Gaussian noise of :data:`COUNT_NOISE_MULTIPLIER`, at least 1.

    Under adding or removing one user the count moves by 1: whatever depends on it and
    leaves the market (the aggregation weight, |U| of the server's regularisation, the
    default δ) uses this release, which the caller records in the ledger, never the count.
    """
    seeded = market_seed(market, seed) + 777 if policy.insecure_seeded_noise else None
    noisy = num_users + noise_generator(seeded).normal(0.0, COUNT_NOISE_MULTIPLIER)
    return max(1, int(round(noisy)))


def period_delta(entry: LedgerEntry | None, config: RunConfig, policy: RegionPolicy, released_users: int) -> float:
    """The δ a market accounts at: the lowest of the default, the run's, the region's and its budget period's.

    The default, 0.1 / the released user count, is a ceiling: a run may ask for a smaller δ,
    never a larger one (a δ near 1 would make any noise look private). The region's
    ``dp-delta`` is a ceiling too. The period's δ is recorded in the ledger at the market's
    first DP release, and a later run can only lower it: re-reading what was spent at a
    larger δ would report less epsilon and buy fresh releases.
    """
    candidates = [default_delta(released_users)]
    if config.dp_delta > 0:
        candidates.append(config.dp_delta)
    if policy.delta > 0:
        candidates.append(policy.delta)
    if entry is not None and (entry.ledger.history or entry.ledger.releases):
        # A ledger that recorded a release holds its period's δ; an empty one (a period just
        # opened with clients.ledger) holds a placeholder that is no one's choice.
        candidates.append(entry.ledger.budget.delta)
    return min(candidates)


def released_users(entry: LedgerEntry) -> int:
    """The noised user count the entry's calibration released (what may leave the market)."""
    return int(entry.calibration[RELEASED_USERS])


def released_weight(privacy: "MarketPrivacy") -> int:
    """What a DP market's evaluation reply may carry as its weight: its released user count, 0 before any."""
    entry = privacy.load()
    return int(entry.calibration.get(RELEASED_USERS, 0)) if entry is not None else 0


def _same_calibration(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a saved calibration was made for the same settings (its released count aside)."""
    return {key: value for key, value in saved.items() if key != RELEASED_USERS} == current


def insecure_marker(policy: RegionPolicy, market: str) -> dict[str, int]:
    """Flag, in the reply and the region's log, a run whose DP noise anyone with the config can remove."""
    if not policy.insecure_seeded_noise:
        return {}
    log(
        WARNING,
        "INSECURE: market %s draws its DP noise from the run config's seed (dp-insecure-seeded-noise in "
        "its node config); whoever knows the config can remove it. Use it to reproduce experiments only.",
        market,
    )
    return {INSECURE_KEY: 1}


def training_noise_seed(policy: RegionPolicy, config: RunConfig, market: str, server_round: int) -> int | None:
    """The DP noise seed of an insecure reproducible run (the region's choice); None (secure noise) otherwise."""
    if not policy.insecure_seeded_noise:
        return None
    return market_seed(market, config.seed) + 1000 * server_round + 500


def out_of_budget(entry: LedgerEntry | None, error: PrivacyBudgetExceeded, market: str) -> None:
    """Log that the market stops training for want of budget."""
    spent = entry.ledger.epsilon() if entry is not None else float("nan")
    log(
        WARNING,
        "Market %s is out of privacy budget (lifetime epsilon %.3f): it stops training (%s).",
        market,
        spent,
        error,
    )


def _tighten(ledger: PrivacyLedger, config: RunConfig, policy: RegionPolicy, market: str) -> None:
    """Lower the ledger's budget to the config's and the region's, if one was lowered during the training."""
    deltas = [delta for delta in (ledger.budget.delta, config.dp_delta, policy.delta) if delta > 0]
    tightened = replace(ledger.budget, epsilon=min(ledger.budget.epsilon, config.dp_epsilon), delta=min(deltas))
    if tightened == ledger.budget:
        return
    # The noise stays as calibrated, so the market stops sooner.
    log(
        WARNING,
        "Market %s: its budget is now (epsilon %.3g, delta %.3g) instead of (%.3g, %.3g).",
        market,
        tightened.epsilon,
        tightened.delta,
        ledger.budget.epsilon,
        ledger.budget.delta,
    )
    ledger.budget = tightened
    if (spent := ledger.epsilon()) > tightened.epsilon:
        # Earlier rounds cannot be undone; the reply reports what they spent.
        log(
            WARNING,
            "Market %s has already spent epsilon %.3f at delta %.3g, over its new budget.",
            market,
            spent,
            tightened.delta,
        )


def _entry_to_json(entry: LedgerEntry) -> str:
    return json.dumps(
        {
            "ledger": entry.ledger.state(),
            "training-id": entry.training_id,
            "calibration": entry.calibration,
            "periods": entry.periods,
        }
    )


def _entry_from_json(text: str) -> LedgerEntry:
    saved: dict[str, Any] = json.loads(text)
    return LedgerEntry(
        PrivacyLedger.from_state(saved["ledger"]), saved["training-id"], saved["calibration"], saved["periods"]
    )
