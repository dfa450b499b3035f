"""Reconstruction of users' training histories from fedals' item statistics (the server as attacker).

Without DP a fedals market sends, per item it sends, the upper-trapezoidal factor ``R_i`` of
``S_i = Σ_{u∈U_i} z_u z_uᵀ`` with ``z_u = [√α·x_u, (1+α)/√α]`` (binary confidence) over its
buyers ``U_i``, the buyer count and its rank. The attacker is the server: it trains fedals
honestly with the real ServerApp and ClientApps in this process (each market's node config as its
SuperNode would give it) and keeps every train reply as it arrives, float16 as sent by default.
From a reply it recovers user vectors ``z_u`` and item sets:

- **sole buyer** — an item of rank 1 is ``±z_u`` of its one buyer;
- **two buyers** — ``S = z₁z₁ᵀ + z₂z₂ᵀ`` with both last coordinates ``t = (1+α)/√α`` has exactly
  one decomposition: the 2×2 rotation that takes ``R``'s last column to ``t·(1, 1)``;
- **differencing** — an item whose row space holds another's, one or two buyers more:
  ``S_j − S_i`` is the extra buyers' sum (then as above);
- **intersection** — two items of ranks ``r_i + r_j ≤ d + 1`` whose row spaces meet in one
  direction share exactly one buyer: that direction, scaled to last coordinate ``t``;
- **peeling** (with every seed) — a recovered ``z`` is a buyer of an item of rank ≤ d exactly when
  it lies in the item's row space; an item whose unexplained buyers drop to one or two gives them
  from ``S_i − Σ_known z zᵀ``; repeated until nothing new appears.

A candidate's predicted training set is every item of rank ≤ d whose row space holds it (an
exact test), plus, among the items it cannot test that way (rank d + 1, or not sent at all but
held by the server from other markets), those its score ``x·y`` against the factors the server
sent that round puts above a threshold fitted on the tested items.

Definitions (per market; "users" are the market's users with a training interaction):

- ``exposed-users``: users ``u`` for whom some candidate's tested set equals ``u``'s training
  items among the tested items, and is not empty (the attacker holds ``u``'s factor and
  footprint on what it can test).
- ``exact-users``: users ``u`` for whom some candidate's predicted set equals ``u``'s whole
  training set: nothing missing, no false positive.
- ``exact-fraction``: exact-users over users, over all markets (per market in ``per-market``).

A user counts once whichever variant found them (the attacker names every candidate set of
every variant); the replies attacked are those of ``attacked-rounds``. ``undefended`` is the
same training with the minimum-buyers rule switched off in each region's node config
(``als-min-buyers = 1``). Each variant uses the seeds named and everything before it; the
top-level numbers are the union over variants. Binary confidence is assumed (the default); under the
rating or log confidence the last coordinate differs per buyer and the seeds above do not apply.
"""

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict

from common.data.markets import MarketSource, load_split
from common.ials.kernels import segment_starts
from common.ials.private import DEFAULT_MIN_BUYERS, MIN_BUYERS_KEY
from common.ials.wire import ASSORTMENT_KEY, unpack_statistics
from common.selection import improves
from server.paths import process_root
from server.server_app import main as server_main
from simulations import run as harness
from simulations.attacks.hostile import HostileServer, InProcessGrid
from simulations.attacks.settings import AttackSettings

VARIANTS = ("sole-buyer", "two-buyers", "differencing", "full")
_QUICK = {"num-server-rounds": 4, "als-factors": 32}  # the suite's run: fewer rounds, d = 32
_MEMBER_TOL = 0.02  # relative distance of z to a row space below which z lies in it (float16 wire: ~1e-3)
_PAIR_ITEMS = 2500  # items (smallest ranks first) the pair seeds compare all pairs of
_run_ids = count(5000)


# --- recovery from one reply ---------------------------------------------------------------------


@dataclass
class _Reply:
    """One market's train reply, unpacked, and the item factors the server had sent it."""

    items: np.ndarray
    counts: np.ndarray
    ranks: np.ndarray
    factors: list[np.ndarray]  # R_i per item
    received_rows: np.ndarray
    received: np.ndarray  # the factors the server sent this round (attacker's own message)

    @classmethod
    def of(cls, payload: dict[str, np.ndarray], message_arrays: dict[str, np.ndarray]) -> "_Reply":
        stats = unpack_statistics({k: v for k, v in payload.items() if k != ASSORTMENT_KEY})
        starts = segment_starts(stats.ranks)
        factors = [stats.rows[s : s + r] for s, r in zip(starts, stats.ranks, strict=True)]
        rows = message_arrays.get("items", np.zeros(0, dtype=np.int64))
        received = message_arrays.get("factors", np.zeros((0, stats.dim)))
        return cls(stats.items, stats.counts, stats.ranks, factors, np.asarray(rows), np.asarray(received, float))


def _normalised(z: np.ndarray, t: float) -> np.ndarray | None:
    """``z`` scaled to last coordinate ``t`` (binary confidence), None if that is ill-posed."""
    if abs(z[-1]) < 1e-3 * np.abs(z).max(initial=1e-300):
        return None
    return z * (t / z[-1])


def _two_buyers(root: np.ndarray, t: float) -> list[np.ndarray]:
    """Both ``z`` of a rank-2 sum from a 2×D factor ``L`` (``LᵀL = S``): the rotation of ``L[:, -1]`` to ``t(1, 1)``."""
    v = root[:, -1]
    angle = np.arctan2(1.0, 1.0) - np.arctan2(v[1], v[0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scaled = [_normalised(row, t) for row in rotation @ root]
    return [z for z in scaled if z is not None]


def _low_rank_root(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The top ``rank`` components of a symmetric matrix as a ``rank × D`` factor."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    top = np.argsort(values)[::-1][:rank]
    return np.sqrt(np.clip(values[top], 0.0, None))[:, None] * vectors[:, top].T


def _split(residual: np.ndarray, buyers: int, t: float) -> list[np.ndarray]:
    """The ``buyers`` (1 or 2) vectors of a residual sum ``Σ z zᵀ``."""
    root = _low_rank_root(residual, buyers)
    if buyers == 1:
        z = _normalised(root[0], t)
        return [] if z is None else [z]
    return _two_buyers(root, t)


class _Recovery:
    """The candidate vectors recovered from one reply, grown by seeds and peeling."""

    def __init__(self, reply: _Reply, t: float) -> None:
        self.reply, self.t = reply, t
        self.dim = len(reply.factors[0][0]) if reply.factors else 0
        testable = np.flatnonzero(reply.ranks < self.dim)
        self.testable = testable
        # Orthonormal bases of the testable items' row spaces, stacked (Σ r × D).
        bases = [np.linalg.qr(reply.factors[i].T)[0].T for i in testable]
        self.basis = np.concatenate(bases) if bases else np.zeros((0, self.dim))
        self.basis_ranks = reply.ranks[testable]
        self.candidates: list[np.ndarray] = []

    def add(self, vectors: Iterable[np.ndarray]) -> int:
        """Add new candidates (not within 1% of a held one); how many were new."""
        added = 0
        for z in vectors:
            if not np.isfinite(z).all():
                continue
            held = np.array(self.candidates) if self.candidates else np.zeros((0, len(z)))
            if len(held) and (np.linalg.norm(held - z, axis=1) < 0.01 * np.linalg.norm(z)).any():
                continue
            self.candidates.append(z)
            added += 1
        return added

    def memberships(self) -> np.ndarray:
        """``(candidates, testable items)``: True where the candidate lies in the item's row space."""
        if not self.candidates or not len(self.testable):
            return np.zeros((len(self.candidates), len(self.testable)), dtype=bool)
        z = np.array(self.candidates)
        norms = (z**2).sum(axis=1)
        starts = segment_starts(self.basis_ranks)
        out = np.zeros((len(z), len(self.testable)), dtype=bool)
        for begin in range(0, len(z), 512):
            block = z[begin : begin + 512]
            projected = np.add.reduceat((block @ self.basis.T) ** 2, starts, axis=1)
            residual = np.sqrt(
                np.clip(norms[begin : begin + 512, None] - projected, 0.0, None) / norms[begin : begin + 512, None]
            )
            out[begin : begin + 512] = residual < _MEMBER_TOL
        return out

    # seeds

    def sole_buyers(self) -> int:
        reply = self.reply
        return self.add(
            z for i in np.flatnonzero(reply.ranks == 1) if (z := _normalised(reply.factors[i][0], self.t)) is not None
        )

    def two_buyers(self) -> int:
        reply = self.reply
        found = []
        for i in np.flatnonzero((reply.ranks == 2) & (reply.counts == 2)):
            found.extend(_two_buyers(reply.factors[i], self.t))
        return self.add(found)

    def pairs(self, nested: bool, intersect: bool) -> int:
        """Seeds from pairs of testable items: nested row spaces (differencing) and one-direction intersections."""
        reply = self.reply
        order = self.testable[np.argsort(reply.ranks[self.testable], kind="stable")][:_PAIR_ITEMS]
        if len(order) < 2:
            return 0
        bases = [np.linalg.qr(reply.factors[i].T)[0] for i in order]  # D × r each
        stacked = np.concatenate([b.T for b in bases])
        ranks = reply.ranks[order]
        starts = segment_starts(ranks)
        found = []
        for a_begin in range(0, len(order), 256):
            a_items = np.arange(a_begin, min(a_begin + 256, len(order)))
            rows = slice(starts[a_items[0]], starts[a_items[-1]] + ranks[a_items[-1]])
            overlap = np.add.reduceat(
                np.add.reduceat((stacked[rows] @ stacked.T) ** 2, starts[a_items] - starts[a_items[0]], axis=0),
                starts,
                axis=1,
            )
            for a_local, a in enumerate(a_items):
                for b in np.flatnonzero(overlap[a_local] > 0.5):
                    if b <= a:  # sorted by rank: a nested pair has the smaller rank first
                        continue
                    ra, rb = ranks[a], ranks[b]
                    i, j = order[a], order[b]
                    if (
                        nested
                        and rb > ra
                        and overlap[a_local, b] > ra - 0.02
                        and rb - ra <= 2
                        and reply.counts[j] - reply.counts[i] == rb - ra
                    ):
                        residual = reply.factors[j].T @ reply.factors[j] - reply.factors[i].T @ reply.factors[i]
                        found.extend(_split(residual, int(rb - ra), self.t))
                    elif intersect and ra + rb <= self.dim:
                        left, values, _ = np.linalg.svd(bases[a].T @ bases[b])
                        if values[0] > 0.999 and (len(values) < 2 or values[1] < 0.99):
                            z = _normalised(bases[a] @ left[:, 0], self.t)
                            if z is not None:
                                found.append(z)
        return self.add(found)

    def peel(self, rounds: int = 20) -> None:
        """Membership, then the one or two unexplained buyers of every item down to them, until nothing is new."""
        reply = self.reply
        for _ in range(rounds):
            members = self.memberships()
            z = np.array(self.candidates) if self.candidates else np.zeros((0, self.dim))
            found = []
            for column, i in enumerate(self.testable):
                known = np.flatnonzero(members[:, column])
                left = int(reply.counts[i]) - len(known)
                if left in (1, 2) and len(known):
                    residual = reply.factors[i].T @ reply.factors[i] - z[known].T @ z[known]
                    found.extend(_split(residual, left, self.t))
            if not self.add(found):
                return

    def predicted_sets(self, alpha: float) -> tuple[list[frozenset], list[frozenset]]:
        """Each candidate's tested set and predicted training set (tested plus score-completed)."""
        reply = self.reply
        members = self.memberships()
        tested_rows = reply.items[self.testable]
        tested = [frozenset(tested_rows[row].tolist()) for row in members]
        # Items not testable by row space: full-rank sent items and the server's other rows.
        untestable = np.setdiff1d(reply.received_rows, tested_rows)
        if not self.candidates or not len(untestable):
            return tested, list(tested)
        x = np.array(self.candidates)[:, :-1] / np.sqrt(alpha)
        factors = dict(zip(reply.received_rows.tolist(), range(len(reply.received_rows)), strict=True))
        y_test = reply.received[[factors[r] for r in tested_rows if r in factors]]
        in_test = np.array([r in factors for r in tested_rows])
        threshold = _threshold(x @ y_test.T, members[:, in_test]) if in_test.any() else np.inf
        y_other = reply.received[[factors[r] for r in untestable]]
        held = np.any(y_other != 0.0, axis=1)
        scores = x @ y_other.T
        chosen = (scores > threshold) & held[None, :]
        predicted = [tested[c] | frozenset(untestable[chosen[c]].tolist()) for c in range(len(tested))]
        return tested, predicted


def _threshold(scores: np.ndarray, members: np.ndarray) -> float:
    """The score threshold that best separates members from non-members among tested pairs."""
    positive, negative = scores[members], scores[~members]
    if not len(positive):
        return np.inf
    grid = np.quantile(np.concatenate([positive, negative]), np.linspace(0, 1, 201))
    errors = [(positive <= g).sum() + (negative > g).sum() for g in grid]
    return float(grid[int(np.argmin(errors))])


def recover(reply: _Reply, alpha: float) -> dict[str, tuple[list[frozenset], list[frozenset]]]:
    """Candidates' tested and predicted sets from one reply after each variant's seeds (:data:`VARIANTS`, cumulative).

    The predicted sets of a variant are those of its candidates both with and without the score
    completion (the attacker may name both).
    """
    t = (1.0 + alpha) / np.sqrt(alpha)
    if not reply.factors:
        return {variant: ([], []) for variant in VARIANTS}
    recovery = _Recovery(reply, t)
    snapshots = {}

    def snapshot(variant: str) -> None:
        tested, predicted = recovery.predicted_sets(alpha)
        snapshots[variant] = (tested, predicted + tested)

    recovery.sole_buyers()
    snapshot("sole-buyer")
    recovery.two_buyers()
    recovery.peel()
    snapshot("two-buyers")
    recovery.pairs(nested=True, intersect=False)
    recovery.peel()
    snapshot("differencing")
    recovery.pairs(nested=True, intersect=True)
    recovery.peel()
    snapshot("full")
    return snapshots


def score_users(
    histories: list[frozenset], tested_items: set, tested: list[frozenset], predicted: list[frozenset]
) -> tuple[set, set]:
    """Users exposed and exactly recovered by candidate sets (module docstring), as sets of user indices."""
    tested_sets, predicted_sets = set(s for s in tested if s), set(predicted)
    exposed = {u for u, h in enumerate(histories) if (h & tested_items) and (h & tested_items) in tested_sets}
    exact = {u for u, h in enumerate(histories) if h and h in predicted_sets}
    return exposed, exact


# --- the training the attacker watches ------------------------------------------------------------


class _WatchingGrid(InProcessGrid):
    """A grid whose nodes are the real ClientApp (through :class:`HostileServer`); it keeps every train exchange."""

    def __init__(self, hostile: HostileServer) -> None:
        super().__init__([context.node_id for context in hostile.contexts])
        self.hostile = hostile
        self.exchanges: dict[tuple[int, int], tuple[dict, dict]] = {}  # (round, node) -> (sent, reply arrays)

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        sent = {k: v.numpy() for k, v in message.content["arrays"].items()}
        reply = self.hostile.ask(node - 1, message.metadata.message_type, sent, dict(message.content["config"]))
        reply = Message(reply.error if reply.has_error() else reply.content, reply_to=message)
        if message.metadata.message_type == "train" and not reply.has_error():
            record = next(iter(reply.content.array_records.values()))
            self.exchanges[(int(message.content["config"]["server-round"]), node)] = (
                sent,
                {k: v.numpy() for k, v in record.items()},
            )
        return reply


def _train(run_config: dict[str, Any], markets: int, node_extra: dict[str, Any]) -> tuple[_WatchingGrid, dict]:
    """One honest fedals training over the real apps; the grid (with every train exchange) and its history."""
    nodes = [{"partition-id": p, "num-partitions": markets, **node_extra} for p in range(markets)]
    grid = _WatchingGrid(HostileServer(run_config, nodes))
    with process_root("/"):  # the attack's own training, in this process, writing where the attack says
        server_main(
            grid, Context(run_id=next(_run_ids), node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
        )
    history = json.loads((Path(run_config["out-dir"]) / "history.json").read_text(encoding="utf-8"))
    return grid, history


def _macro_ndcg(history: dict) -> tuple[float, dict[str, float]]:
    """Test NDCG@10 at each market's best validation round (as the harness reports), and the macro mean.

    Round 0, the untrained starting point, is never a candidate (:func:`simulations.results.select_on_validation`).
    """
    best: dict[str, tuple[float, float]] = {}
    for entry in history["rounds"]:
        if entry["round"] < 1:
            continue
        for market, metrics in entry["per_market"].items():
            kept = best[market][0] if market in best else None
            if "test-ndcg" in metrics and improves(metrics["val-ndcg"], kept):
                best[market] = (metrics["val-ndcg"], metrics["test-ndcg"])
    per_market = {market: test for market, (_, test) in sorted(best.items())}
    return float(np.mean(list(per_market.values()))), per_market


def attack(settings: AttackSettings, defended_min_buyers: int | None = None) -> dict:
    """Train fedals honestly with and without the minimum-buyers rule, attack every market's replies.

    Returns ``{"users", "exposed-users", "exact-users", "exact-fraction", "macro-ndcg@10":
    {"defended", "undefended"}, "undefended": {...the same counts...}, "per-market": {...},
    "variants": {...}, "attacked-rounds", "min-buyers", "seconds"}`` (definitions in the module docstring).
    """
    started = time.perf_counter()
    source = MarketSource(settings.data_dir, settings.synthetic_markets, settings.seed)
    markets = source.markets
    catalog = source.catalog()
    histories = {}
    for name in markets:
        split = load_split(source, name, catalog)
        per_user: list[set] = [set() for _ in range(split.num_users)]
        for user, item in zip(split.train_users, split.train_items, strict=True):
            per_user[user].add(int(item))
        histories[name] = [frozenset(h) for h in per_user]
    base = {
        **harness.app_defaults(),
        "method": "fedals",
        # The training's rounds are attacked (exchanges kept by round number); a refit for serving's
        # rounds send the same statistics over every interaction, under the same minimum of buyers.
        "serve-refit": False,
        "data-dir": settings.data_dir,
        "synthetic-markets": settings.synthetic_markets,
        "seed": settings.seed,
        "min-nodes": len(markets),
        "poll-interval": 0.001,
        "round-timeout": 600.0,
        **(_QUICK if settings.quick else {}),
    }
    base.pop(MIN_BUYERS_KEY, None)
    rounds = int(base["num-server-rounds"])
    attacked = [rounds]  # the last round's replies (any round's would do; the factors are the most trained)
    alpha = float(base["als-alpha"])
    result: dict[str, Any] = {
        "attacked-rounds": attacked,
        "factors": int(base["als-factors"]),
        "wire": base["als-wire"],
        "rounds": rounds,
    }
    sections = {}
    defended_node = {} if defended_min_buyers is None else {MIN_BUYERS_KEY: defended_min_buyers}
    result["min-buyers"] = {"defended": defended_min_buyers or DEFAULT_MIN_BUYERS, "undefended": 1}
    for label, node_extra in (("defended", defended_node), ("undefended", {MIN_BUYERS_KEY: 1})):
        out = Path(settings.out) / "reconstruction" / label
        shutil.rmtree(out, ignore_errors=True)  # the attack's own earlier run: the server refuses to overwrite it
        config = {**base, "out-dir": str(out / "fedals"), "models-dir": str(out / "models")}
        grid, history = _train(config, len(markets), node_extra)
        macro, per_market_ndcg = _macro_ndcg(history)
        section: dict[str, Any] = {"macro-ndcg@10": macro, "per-market": {}, "variants": {}}
        found = {variant: {name: (set(), set()) for name in markets} for variant in (*VARIANTS, "any")}
        for (server_round, node), (sent, payload) in sorted(grid.exchanges.items()):
            if server_round not in attacked:
                continue
            name = markets[node - 1]
            reply = _Reply.of(payload, sent)
            tested_items = set(reply.items[reply.ranks < len(reply.factors[0][0])].tolist()) if reply.factors else set()
            for variant, (tested, predicted) in recover(reply, alpha).items():
                exposed, exact = score_users(histories[name], tested_items, tested, predicted)
                found[variant][name][0].update(exposed)
                found[variant][name][1].update(exact)
                found["any"][name][0].update(exposed)
                found["any"][name][1].update(exact)
        for variant in VARIANTS:
            section["variants"][variant] = {
                name: {"exposed-users": len(found[variant][name][0]), "exact-users": len(found[variant][name][1])}
                for name in markets
            }
        for name in markets:
            users = sum(1 for h in histories[name] if h)
            exposed, exact = found["any"][name]
            section["per-market"][name] = {
                "users": users,
                "exposed-users": len(exposed),
                "exact-users": len(exact),
                "exact-fraction": len(exact) / max(users, 1),
                "ndcg@10": per_market_ndcg.get(name),
            }
        totals = section["per-market"].values()
        section["users"] = sum(m["users"] for m in totals)
        section["exposed-users"] = sum(m["exposed-users"] for m in totals)
        section["exact-users"] = sum(m["exact-users"] for m in totals)
        section["exact-fraction"] = section["exact-users"] / max(section["users"], 1)
        sections[label] = section
    defended, undefended = sections["defended"], sections["undefended"]
    result.update(
        {
            "users": defended["users"],
            "exposed-users": defended["exposed-users"],
            "exact-users": defended["exact-users"],
            "exact-fraction": defended["exact-fraction"],
            "macro-ndcg@10": {"defended": defended["macro-ndcg@10"], "undefended": undefended["macro-ndcg@10"]},
            "per-market": defended["per-market"],
            "variants": defended["variants"],
            "undefended": {
                key: undefended[key]
                for key in ("users", "exposed-users", "exact-users", "exact-fraction", "per-market", "variants")
            },
            "seconds": time.perf_counter() - started,
        }
    )
    return result
