"""Adaptive attack on a replay's last-round messages (exp24).

Two parts, users counted once (union) per market:

1. noisy-b attack (rare items sent with noisy b~): for each rare item the market reports 1 buyer,
   x_obs = mean over the last K rounds of b~_t / (1+a)  (fresh noise per round averages down),
   MAP-shrunk with the Gaussian prior N(mu_m, Sigma_m) read off the market's augmented Gram
   (which it sends) and the noise std sigma*B/sqrt(K) (attacker told sigma and B).
   Set recovery by the user's normal equations against the server's round-15 factors Y and Gram:
   candidate sets S_k = {the item} + top-(k-1) items of the market's assortment by x_hat . y,
   k = 1..KMAX; x_S solves (G_Y + a sum_S y y^T + lam_u I) x = (1+a) sum_S y; choose the k with
   the smallest ||x_S - x_obs||.  Second pass: every sole-buyer item of the chosen set is assumed
   the same user; their observations are averaged (noise / sqrt(#items)) and all are forced in.
   Oracle mode (--oracle): x_obs = the buyer's true factor (what an undefended sole-buyer item gives).
2. shipped attack (simulations/attacks/reconstruction.recover) on the exact statistics of the
   items with >= m buyers (float16 wire as shipped), with the server's round-15 factors for
   score completion.
"""

import argparse
import json
import pickle

import numpy as np

from common.ials import IALSConfig, ItemFactors, _solve_segments, market_item_statistics, user_regularization
from common.ials_private import restricted, shared_items
from common.ials_wire import pack_statistics
from replay import CONFIG, load

KMAX = 40
POOL = 400  # OMP searches the POOL items of the market's assortment the estimate scores highest


def histories_of(market):
    per = [set() for _ in range(market.split.num_users)]
    for u, i in zip(market.train.users, market.train.items):
        per[u].add(int(i))
    return [frozenset(h) for h in per]


def prefix_solve(ranked, forced_len, server_items, gram, num_items, config):
    """x_S for S = prefixes of each ranked list (lengths forced_len..KMAX); returns (n, K, d) and lengths."""
    alpha = config.alpha
    n, kmax = ranked.shape
    ks = np.arange(1, kmax + 1)
    out = np.zeros((n, kmax, config.factors))
    yr = server_items.lookup(ranked)  # (n, kmax, d)
    for begin in range(0, n, 50):
        block = yr[begin:begin + 50]
        rows = np.concatenate([block[c, :k] for c in range(len(block)) for k in ks]) * np.sqrt(alpha)
        lengths = np.tile(ks, len(block))
        targets = np.full(len(rows), (1 + alpha) / np.sqrt(alpha))
        sol = _solve_segments(gram, rows, targets, lengths, user_regularization(lengths, num_items, config))
        out[begin:begin + 50] = sol.reshape(len(block), kmax, -1)
    return out


def recover_sets(x_obs, x_hat, forced, cand_rows, cand_y, server_items, gram, num_items, config):
    """Greedy normal-equation recovery; forced: list of arrays of catalog rows that must be in S."""
    scores = x_hat @ cand_y.T  # (n, C)
    n = len(x_obs)
    ranked = np.zeros((n, KMAX), dtype=np.int64)
    starts = np.zeros(n, dtype=np.int64)
    for c in range(n):
        f = np.asarray(forced[c], dtype=np.int64)
        order = np.argsort(-scores[c])
        rest = cand_rows[order]
        rest = rest[~np.isin(rest, f)][: KMAX - len(f)]
        ranked[c] = np.concatenate([f, rest])[:KMAX] if len(f) + len(rest) >= KMAX else \
            np.pad(np.concatenate([f, rest]), (0, KMAX - len(f) - len(rest)), constant_values=-1)
        starts[c] = len(f)
    ranked_safe = np.where(ranked < 0, cand_rows[0], ranked)
    xs = prefix_solve(ranked_safe, starts, server_items, gram, num_items, config)
    err = np.linalg.norm(xs - x_obs[:, None, :], axis=2)
    ks = np.arange(1, KMAX + 1)[None, :]
    err[(ks < np.maximum(starts, 1)[:, None]) | (ranked < 0)] = np.inf
    best = err.argmin(axis=1)
    return [frozenset(ranked[c, : best[c] + 1].tolist()) for c in range(n)]


def omp_sets(x_obs, x_hat, forced, cand_rows, cand_y, gram, num_items, config):
    """Subset-sum greedy on the normal equations: (G + lam_u(|S|) I) x = sum_{i in S} w_i,
    w_i = y_i (1 + a - a y_i.x); items chosen one by one to shrink the residual, the size with the
    smallest relative residual kept (every prefix size is also named as a candidate set)."""
    alpha = config.alpha
    out = []
    index = {int(r): j for j, r in enumerate(cand_rows)}
    lam = user_regularization(np.arange(1, KMAX + 1), num_items, config)
    for c in range(len(x_obs)):
        x = x_hat[c]
        sc = cand_y @ x
        pool = np.argsort(-sc)[:POOL]  # the POOL best-scored items (forced ones added below)
        f_idx = [index[i] for i in forced[c] if i in index]
        pool = np.unique(np.concatenate([pool, np.asarray(f_idx, dtype=np.int64)]))
        rows_c, y_c = cand_rows[pool], cand_y[pool]
        local = {int(r): j for j, r in enumerate(rows_c)}
        w = y_c * (1 + alpha - alpha * (y_c @ x))[:, None]
        wn = (w ** 2).sum(axis=1)
        gx = gram @ x
        chosen = [local[i] for i in forced[c] if i in local]
        total = w[chosen].sum(axis=0) if chosen else np.zeros_like(x)
        avail = np.ones(len(rows_c), dtype=bool)
        avail[chosen] = False
        best, best_err = None, np.inf
        for step in range(len(chosen), KMAX):
            if step >= 1:
                target = gx + lam[step - 1] * x
                err = np.linalg.norm(target - total) / np.linalg.norm(target)
                if err < best_err:
                    best, best_err = list(chosen), err
            target = gx + lam[step] * x  # after adding one more item the size is step + 1
            res = target - total
            gain = np.where(avail, 2 * (w @ res) - wn, -np.inf)
            j = int(np.argmax(gain))
            chosen.append(j)
            avail[j] = False
            total = total + w[j]
        if best is not None:
            out.append(frozenset(rows_c[best].tolist()))
    return out


def noisy_b_attack(data, names, markets, num_items, config, sigma, rounds_avg, oracle=False, passes=2,
                   oracle_y=False):
    last = max(data["kept"])
    kept = data["kept"][last]
    server_items, server_gram = kept["server_sent"]
    d = config.factors
    alpha = config.alpha
    found = {}
    for k, (name, mk) in enumerate(zip(names, markets)):
        hist = histories_of(mk)
        users = kept["users"][k]
        msg = kept["noisy"][k]
        if oracle_y:
            server_items, server_gram = kept["sent"][k], kept["sent_gram"][k]
        if oracle:  # undefended: a sole-buyer item's statistics are the buyer's z
            rows, counts = np.unique(mk.train.items, return_counts=True)
            sole = rows[counts == 1]
            buyer = {int(i): int(u) for u, i in zip(mk.train.users, mk.train.items) if counts[np.searchsorted(rows, i)] == 1}
            x_obs = np.array([users[buyer[int(i)]] for i in sole]).reshape(-1, d)
            noise_var = 0.0
        else:
            if msg is None:
                found[name] = set()
                continue
            sole = msg["items"][msg["counts"] == 1]
            obs = []
            rounds = sorted(data["kept"])[-rounds_avg:]
            for r in rounds:
                m_r = data["kept"][r]["noisy"][k]
                pos = np.searchsorted(m_r["items"], sole)
                obs.append(m_r["b"][pos] / (1 + alpha))
            x_obs = np.mean(obs, axis=0)
            noise_var = (sigma * msg["bound"]) ** 2 / len(rounds)
        if not len(sole):
            found[name] = set()
            continue
        act = users[np.linalg.norm(users, axis=1) > 0]
        mu = act.mean(axis=0)
        cov = np.cov(act.T)
        def shrink(xo, var):
            if np.isscalar(var) and var == 0:
                return xo
            var = np.broadcast_to(np.asarray(var, float), (len(xo),))
            out = np.empty_like(xo)
            for v in np.unique(var):
                sel = var == v
                gain = cov @ np.linalg.inv(cov + v * np.eye(d))
                out[sel] = mu + (xo[sel] - mu) @ gain.T
            return out
        x_hat = shrink(x_obs, noise_var)
        cand_rows = mk.split.market_items
        cand_y = server_items.lookup(cand_rows)
        keep = np.any(cand_y != 0, axis=1)
        cand_rows, cand_y = cand_rows[keep], cand_y[keep]
        forced = [[int(i)] for i in sole]
        sets = recover_sets(x_obs, x_hat, forced, cand_rows, cand_y, server_items, server_gram, num_items, config)
        predicted = set(sets)
        omp = omp_sets(x_obs, x_hat, forced, cand_rows, cand_y, server_gram, num_items, config)
        predicted |= set(omp)
        if passes > 1:  # pool along the OMP sets too
            sets = sets + omp
            x_obs = np.concatenate([x_obs, x_obs]); x_hat = np.concatenate([x_hat, x_hat]); sole_rep = np.concatenate([sole, sole])
        else:
            sole_rep = sole
        sole_set = set(int(i) for i in sole)
        sole_index = {int(i): j for j, i in enumerate(sole)}
        for _ in range(passes - 1):  # pool the observations of the sole-buyer items a set claims
            groups = [sorted(sole_set & s | {int(sole_rep[c])}) for c, s in enumerate(sets)]
            pooled = np.array([x_obs[[sole_index[i] for i in g]].mean(axis=0) for g in groups])
            var = np.array([noise_var / len(g) if noise_var else 0.0 for g in groups])
            x_hat2 = shrink(pooled, var) if noise_var else pooled
            sets = recover_sets(pooled, x_hat2, groups, cand_rows, cand_y, server_items, server_gram, num_items, config)
            predicted |= set(sets)
            predicted |= set(omp_sets(pooled, x_hat2, groups, cand_rows, cand_y, server_gram, num_items, config))
        found[name] = {u for u, h in enumerate(hist) if h and h in predicted}
    return found


def shipped_attack(data, names, markets, m, config):
    from simulations.attacks.reconstruction import _Reply, recover, score_users
    last = max(data["kept"])
    kept = data["kept"][last]
    server_items, _ = kept["server_sent"]
    found = {}
    for k, (name, mk) in enumerate(zip(names, markets)):
        hist = histories_of(mk)
        shared = restricted(mk.train, shared_items(mk.train, m))
        if not len(shared.items):
            found[name] = set()
            continue
        payload = pack_statistics(market_item_statistics(shared, kept["users"][k], config), "float16")
        rows = mk.split.market_items
        sent = {"items": rows, "factors": server_items.lookup(rows).astype(np.float32)}
        reply = _Reply.of(payload, sent)
        tested_items = set(reply.items[reply.ranks < len(reply.factors[0][0])].tolist())
        users = set()
        for variant, (tested, predicted) in recover(reply, config.alpha).items():
            users |= score_users(hist, tested_items, tested, predicted)[1]
        found[name] = users
    return found


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--sigma", type=float, default=0.0)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--oracle", action="store_true")
    p.add_argument("--rounds-avg", type=int, default=5)
    p.add_argument("--shipped", action="store_true")
    p.add_argument("--no-noisy", action="store_true")
    p.add_argument("--oracle-y", action="store_true")
    a = p.parse_args()
    data = pickle.load(open(a.run + ".pkl", "rb"))
    names, markets, num_items = load()
    parts = {}
    if not a.no_noisy:
        parts["noisy-b"] = noisy_b_attack(data, names, markets, num_items, CONFIG, a.sigma, a.rounds_avg, a.oracle, oracle_y=a.oracle_y)
    if a.shipped:
        parts["shipped"] = shipped_attack(data, names, markets, a.m, CONFIG)
    report = {"run": a.run, "per-market": {}}
    total_users = total_exact = 0
    for name, mk in zip(names, markets):
        users = sum(1 for h in histories_of(mk) if h)
        union = set().union(*(part.get(name, set()) for part in parts.values()))
        report["per-market"][name] = {"users": users, "exact": len(union), "fraction": len(union) / users,
                                      **{f"exact-{p}": len(v.get(name, set())) for p, v in parts.items()}}
        total_users += users
        total_exact += len(union)
    report["exact"] = total_exact
    report["fraction"] = total_exact / total_users
    report["max-market-fraction"] = max(v["fraction"] for v in report["per-market"].values())
    print(json.dumps(report, indent=1))
    tag = ("oracle" if a.oracle else f"K{a.rounds_avg}") + ("_oracleY" if a.oracle_y else "")
    with open(a.run + f".attack_{tag}{'_shipped' if a.shipped else ''}.json", "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
