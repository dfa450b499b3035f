"""Offline numpy replay of fedals on XMarket electronics with defences for rare items (exp24).

Runs the protocol of clients/fedals.py + server/fedals.py in one process (no Flower), with the
project's own functions: common.ials (user step, statistics, item solve), common.ials_private
(minimum-buyers rule, private item step, merge) and common.ials_model.evaluate_factors (the
evaluation every market runs; test NDCG@10 at each market's best validation round, macro mean
as simulations/attacks/reconstruction._macro_ndcg). Statistics stay float64 (no float16 wire).

Variants (``--variant``):
  undefended         every item's exact statistics are sent (als-min-buyers = 1)
  threshold          shipped rule: items with < m buyers in a market stay there (private solve)
  noisy              items with >= m buyers: exact; items with < m buyers: the market sends
                     b~ = (1+a) sum clip_B(x_u) + N(0, (sigma (1+a) B)^2 I)  (fresh noise every round)
                     A~ = count * a * (X_m^T X_m / n_m)   (data-independent "expected" A)
                     count exact.  B = 99th percentile of the market's user norms this round.
                     The market's own factor of its rare items (--own):
                       server : the server's factor (solved from the noisy sums)
                       private: its exact private solve (own buyers only, federation Gram)
                       correct: server's factor + first-order correction of its own noise,
                                y_s + (G + A_own + lam I)^-1 ((b - b~) - (A - A~) y_s);
                                exact when no other market has buyers of the item.
"""

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np

from common.ials import (
    IALSConfig, ItemFactors, ItemStatistics, _augmented_gram, _buyer_rows, _interaction_statistics, _solve_segments,
    initial_item_gram, item_regularization, segment_starts, solve_users,
)
from common.ials_model import IALSMarket, evaluate_factors, initial_rows
from common.ials_private import merged, restricted, shared_items, solve_private_items
from common.markets import MarketSource, load_split

DATA = "../shared/data/xmarket-electronics"
CONFIG = IALSConfig(factors=128, regularization=8.59215941282738, alpha=300.0, nu=1.0, iterations=15, seed=0)
KEEP_ROUNDS = 5
COV_RANK = 8  # eigenpairs of the market's user covariance in the rows-mode A~ of multi-buyer rare items  # the last rounds whose rare-item messages the attacker keeps


def load():
    source = MarketSource(DATA, 6, 0)
    catalog = source.catalog()
    names = source.markets
    markets = [IALSMarket.from_split(load_split(source, n, catalog), 50) for n in names]
    return names, markets, catalog.size


def dense_solve(gram, reg, extra_a, rhs):
    """(G + reg_i I + extra_a_i) y_i = rhs_i for a batch."""
    dim = gram.shape[0]
    m = gram[None] + extra_a
    m[:, np.arange(dim), np.arange(dim)] += reg[:, None]
    return np.linalg.solve(m, rhs[..., None])[..., 0]


def item_a_b(rows, counts, dim):
    """Per item (segments of z rows), A = F^T F and b = F^T t."""
    starts = segment_starts(counts)
    a = np.zeros((len(counts), dim, dim))
    b = np.zeros((len(counts), dim))
    for j, (s, c) in enumerate(zip(starts, counts)):
        f = rows[s:s + c, :dim]
        a[j] = f.T @ f
        b[j] = f.T @ rows[s:s + c, dim]
    return a, b


def server_solve(exact, noisy, config):
    """The server's item step over exact statistics (ItemStatistics, pooled rows) and noisy ones.

    noisy: list of dicts {items, counts, b, abar (d x d, A~ = count * abar)} (may be empty).
    Returns ItemFactors of every item with any statistics, and the federation's augmented user Gram.
    """
    dim = config.factors
    user_gram = sum(part.gram for part in exact)
    gram = user_gram[:dim, :dim]
    if noisy and noisy[0]["amode"] == "rows":  # pseudo rows: everything through the project's batched solve
        exact = exact + [ItemStatistics(p["items"], p["counts"], p["plen"], p["prows"], np.zeros_like(user_gram))
                         for p in noisy]
        noisy = []
    n_users = int(round(user_gram[dim, dim]))
    ex_items = np.concatenate([part.items for part in exact]) if exact else np.zeros(0, int)
    nz_items = np.concatenate([p["items"] for p in noisy]) if noisy else np.zeros(0, int)
    items = np.union1d(ex_items, nz_items)
    buyers = np.zeros(len(items))
    for part in exact:
        buyers[np.searchsorted(items, part.items)] += part.counts
    for p in noisy:
        buyers[np.searchsorted(items, p["items"])] += p["counts"]
    reg = item_regularization(buyers, n_users, config)
    # exact-only items: the project's batched solve over the stacked rows
    row_items = np.concatenate([np.repeat(part.items, part.ranks) for part in exact])
    rows = np.concatenate([part.rows for part in exact])
    order = np.argsort(row_items, kind="stable")
    rows, row_items = rows[order], row_items[order]
    lengths = np.zeros(len(items), dtype=np.int64)
    u, c = np.unique(row_items, return_counts=True)
    lengths[np.searchsorted(items, u)] = c
    factors = _solve_segments(gram, rows[:, :dim], rows[:, dim], lengths, reg)
    if noisy:
        touched = np.unique(nz_items)
        pos = np.searchsorted(items, touched)
        starts = segment_starts(lengths)
        for begin in range(0, len(touched), 1000):
            sel = pos[begin:begin + 1000]
            extra = np.zeros((len(sel), dim, dim))
            rhs = np.zeros((len(sel), dim))
            for j, p in enumerate(sel):  # exact parts of these items
                f = rows[starts[p]:starts[p] + lengths[p]]
                if len(f):
                    extra[j] = f[:, :dim].T @ f[:, :dim]
                    rhs[j] = f[:, :dim].T @ f[:, dim]
            for part in noisy:
                here = np.searchsorted(part["items"], items[sel]).clip(max=len(part["items"]) - 1)
                hit = part["items"][here] == items[sel]
                extra[hit] += a_tilde(part, here[hit])
                rhs[hit] += part["b"][here[hit]]
            factors[sel] = dense_solve(gram, reg[sel], extra, rhs)
    return ItemFactors(items, factors), user_gram


def a_tilde(p, idx):
    """The A~ the server uses for rows idx of a noisy message (expected: count*abar; rank1: from b~ itself)."""
    c = p["counts"][idx].astype(float)
    if p["amode"] == "expected":
        return c[:, None, None] * p["abar"][None]
    b = p["b"][idx]
    alpha = p["alpha"]
    return alpha * (np.einsum("nd,ne->nde", b, b) / ((1 + alpha) ** 2 * c[:, None, None])) \
        + (c - 1)[:, None, None] * p["acov"][None]


def noisy_message(rare, users, config, sigma, rng, amode="expected", clip_q=0.99):
    """The noisy statistics of a market's rare items (module docstring) and their exact A, b."""
    dim = config.factors
    alpha = config.alpha
    norms = np.linalg.norm(users, axis=1)
    active = norms > 0
    bound = float(np.quantile(norms[active], clip_q))
    clipped = users * np.minimum(1.0, bound / np.maximum(norms, 1e-300))[:, None]
    items, counts, rows = _buyer_rows(rare, users, config)
    _, _, crow = _buyer_rows(rare, clipped, config)
    starts = segment_starts(counts)
    b_clip = np.add.reduceat(crow[:, :dim], starts, axis=0) * ((1 + alpha) / np.sqrt(alpha))  # (1+a) sum clip(x)
    b_noisy = b_clip + rng.normal(0.0, sigma * (1 + alpha) * bound, size=b_clip.shape)
    n = active.sum()
    abar = alpha * (users[active].T @ users[active]) / n
    mean = users[active].mean(axis=0)
    acov = abar - alpha * np.outer(mean, mean)  # alpha * covariance of the market's users (from its Gram)
    msg = {"items": items, "counts": counts, "b": b_noisy, "abar": abar, "acov": acov, "alpha": alpha,
           "amode": amode, "bound": bound}
    if amode == "rows":  # A~ = a b~b~^T/((1+a)^2 c) + (c-1) a Cov_m (Cov_m: top RANK eigenpairs), as rows
        values, vectors = np.linalg.eigh(acov)
        top = np.argsort(values)[::-1][:COV_RANK]
        root = np.sqrt(np.clip(values[top], 0, None))[:, None] * vectors[:, top].T  # (r, d): root^T root ~ a Cov
        c = counts.astype(float)
        first = np.hstack([np.sqrt(alpha) * b_noisy / ((1 + alpha) * np.sqrt(c))[:, None],
                           ((1 + alpha) * np.sqrt(c) / np.sqrt(alpha))[:, None]])
        plen = np.where(counts > 1, 1 + COV_RANK, 1)
        prows = np.zeros((int(plen.sum()), dim + 1))
        pst = segment_starts(plen)
        prows[pst] = first
        multi = np.flatnonzero(counts > 1)
        for j in range(COV_RANK):
            prows[pst[multi] + 1 + j, :dim] = np.sqrt(c[multi] - 1)[:, None] * root[j][None]
        msg.update(plen=plen, prows=prows)
    return msg, rows


def run(variant, m, sigma, own, rounds=15, seed=0, out=None, evaluate=True, amode="expected"):
    names, markets, num_items = load()
    config = CONFIG
    dim = config.factors
    rng = np.random.default_rng(seed + 1000)
    init = [initial_rows(mk.split.market_items, config) for mk in markets]
    gram0 = initial_item_gram(num_items, dim, config.seed, config.init_std)
    model = [(init[k], gram0) for k in range(len(markets))]  # per market: item factors of its rows, Gram
    history = {n: [] for n in names}
    kept = {}  # attacker's view
    server_prev = None  # the server's own table and Gram of the last round (what it sent)
    t0 = time.time()
    for step in range(rounds + 1):
        users = [solve_users(mk.train, it, g, num_items, config) for mk, (it, g) in zip(markets, model)]
        if evaluate and step >= 1:
            for n, mk, (it, g), x in zip(names, markets, model, users):
                folded = solve_users(mk.with_valid, it, g, num_items, config)
                valid, test, _ = evaluate_factors(mk, it, num_items, x, folded)
                history[n].append((step - 1, valid.ndcg, test.ndcg))
        if step == rounds:
            break
        threshold = 1 if variant == "undefended" else m
        exact, noisy, rare_parts, exact_rows = [], [], [], []
        for k, (mk, x) in enumerate(zip(markets, users)):
            shared = restricted(mk.train, shared_items(mk.train, threshold))
            exact.append(_interaction_statistics(shared, x, config))
            rare = restricted(mk.train, shared_items(mk.train, threshold), keep=False)
            rare_parts.append(rare)
            if variant == "noisy" and len(rare.items):
                msg, rows = noisy_message(rare, x, config, sigma, rng, amode)
                noisy.append(msg)
                exact_rows.append(rows)
            else:
                noisy.append(None)
                exact_rows.append(None)
        server_items, user_gram = server_solve(exact, [p for p in noisy if p is not None], config)
        if step >= rounds - KEEP_ROUNDS:
            kept[step + 1] = {"noisy": [None if p is None else {kk: p[kk] for kk in ("items", "counts", "b", "bound")}
                                        for p in noisy],
                              "sent": [model[k][0] for k in range(len(markets))] if step + 1 == rounds else None,
                              "sent_gram": [model[k][1] for k in range(len(markets))] if step + 1 == rounds else None,
                              "users": users if step + 1 == rounds else None,
                              "server_sent": server_prev if step + 1 == rounds else None}
        server_gram = server_items.gram()
        server_prev = (server_items, server_gram)
        new_model = []
        for k, (mk, x) in enumerate(zip(markets, users)):
            received = server_items.subset(mk.split.market_items)
            rare = rare_parts[k]
            if variant == "undefended" or not len(rare.items):
                new_model.append((received, server_gram))
                continue
            if variant == "threshold" or own == "private":
                private = solve_private_items(rare, x, user_gram, config)
                if variant == "threshold":
                    items, used = merged(received, private)
                    new_model.append((items, server_gram + used.gram()))
                    continue
                replace = private
            elif own == "server":
                new_model.append((received, server_gram))
                continue
            elif noisy[k]["amode"] == "rows":  # correct, rows mode: all through _solve_segments
                msg = noisy[k]
                ys = server_items.lookup(msg["items"])
                true = exact_rows[k]
                tst = segment_starts(msg["counts"])
                f = true[:, :dim]
                b_true = np.add.reduceat(f * true[:, dim:], tst, axis=0)
                a_y = np.add.reduceat(f * np.einsum("nd,nd->n", f, np.repeat(ys, msg["counts"], axis=0))[:, None], tst, axis=0)
                pf = msg["prows"][:, :dim]
                pst = segment_starts(msg["plen"])
                at_y = np.add.reduceat(pf * np.einsum("nd,nd->n", pf, np.repeat(ys, msg["plen"], axis=0))[:, None], pst, axis=0)
                delta = (b_true - msg["b"]) - (a_y - at_y)
                reg = item_regularization(msg["counts"], int(round(user_gram[dim, dim])), config)
                fix = _solve_segments(user_gram[:dim, :dim], f, np.zeros(len(f)), msg["counts"], reg, prior=delta)
                replace = ItemFactors(msg["items"], ys + fix)
            else:  # correct
                msg = noisy[k]
                ys = server_items.lookup(msg["items"])
                a_true, b_true = item_a_b(exact_rows[k], msg["counts"], dim)
                delta = b_true - msg["b"]
                for begin in range(0, len(ys), 1000):
                    sl = np.arange(begin, min(begin + 1000, len(ys)))
                    delta[sl] -= np.einsum("nde,ne->nd", a_true[sl] - a_tilde(msg, sl), ys[sl])
                reg = item_regularization(msg["counts"], int(round(user_gram[dim, dim])), config)
                fixed = ys.copy()
                for begin in range(0, len(ys), 1000):
                    sl = slice(begin, begin + 1000)
                    fixed[sl] = ys[sl] + dense_solve(user_gram[:dim, :dim], reg[sl], a_true[sl], delta[sl])
                replace = ItemFactors(msg["items"], fixed)
            old = received.lookup(replace.rows)
            rows = received.rows
            factors = received.factors.copy()
            factors[np.searchsorted(rows, replace.rows)] = replace.factors
            g = server_gram - old.T @ old + replace.factors.T @ replace.factors
            new_model.append((ItemFactors(rows, factors), g))
        model = new_model
        print(f"round {step + 1} done {time.time() - t0:.0f}s", flush=True)
    result = {"variant": variant, "m": m, "sigma": sigma, "own": own, "amode": amode}
    if evaluate:
        per = {}
        for n in names:
            best = max(history[n], key=lambda r: r[1])
            per[n] = best[2]
        result["per_market_ndcg"] = per
        result["macro_ndcg"] = float(np.mean(list(per.values())))
        result["history"] = history
    result["seconds"] = time.time() - t0
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out + ".json", "w") as fh:
            json.dump(result, fh, indent=1)
        with open(out + ".pkl", "wb") as fh:
            pickle.dump({"kept": kept, "final_server": (server_items, server_gram), "names": names}, fh)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=("undefended", "threshold", "noisy"), default="undefended")
    p.add_argument("--m", type=int, default=20)
    p.add_argument("--sigma", type=float, default=0.0)
    p.add_argument("--own", choices=("server", "private", "correct"), default="correct")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--amode", choices=("expected", "rank1", "rows"), default="expected")
    a = p.parse_args()
    run(a.variant, a.m, a.sigma, a.own, a.rounds, out=a.out or None, evaluate=not a.no_eval, amode=a.amode)
