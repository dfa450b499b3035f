"""Where 90% becomes reachable: DP quality against the users per market.

    python -m simulations.benchmark dp-users --users 1000,10000,100000 --out OUT

For each size in ``--users`` a federation of ``--synthetic-markets`` equal markets with
that many users each is generated (:mod:`common.data.synthetic`), shaped like XMarket
Electronics' median market (``de``: 1,851 users, 2,179 items, 8.99 interactions per user,
median 8): each market sells ``--items-per-market`` products of one shared catalog and each
user has ``--interactions-per-user`` on average (5 + Poisson, as the 5-core files have at
least 5). On each federation the DP methods (``--methods``: fedals and fedals-pt, its private
transfer, which one fedals training reports both) run twice through :func:`simulations.run.main`, the real Flower
harness: without DP (the reference) and with ``--dp-epsilon`` per market (the harness's
delta, 0.1 / users of the market). The answer per size is the macro test NDCG@10 at ε as a
fraction of the same method without DP, and the users per market at which that fraction
reaches ``--target`` (0.9), interpolated linearly in log(users) between the two sizes around
the first crossing (:func:`crossing`).

``--largest-markets`` and ``--largest-rounds`` shrink the largest size only, when the
machine cannot afford it at the others' settings; the report records what each size ran.

Writes ``OUT/users-<N>/`` per size (``data/`` the generated market files,
``federation.json`` their shape, ``non-private/`` and ``eps-<ε>/`` the harness's outputs),
and ``OUT/results.json``, ``OUT/users.csv``, ``OUT/users.md`` (the table) and
``OUT/users.png`` (the fraction against users per market on a log axis, 90% dashed, the
crossing marked). A size whose harness ``results.json`` exists with the same settings is
reused, so an interrupted sweep continues where it stopped.
"""

import argparse
import csv
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.data.interactions import discover_market_files, read_interactions  # noqa: E402
from common.data.synthetic import SyntheticConfig, write_markets  # noqa: E402
from common.methods import METHODS  # noqa: E402
from common.runtime.command import ArgumentParser, OptionError, add_verbose, comma_list, run_command  # noqa: E402
from simulations import run as harness  # noqa: E402
from simulations.progress import bar, say  # noqa: E402

# XMarket Electronics' median market by users (de, 1,851 users of 239 to 4,668), as common.data.interactions
# reads it (repeated user-item pairs once): 2,179 distinct items, 16,647 interactions, 8.99
# per user (median 8). median_market_shape() recomputes them from the files.
MEDIAN_MARKET_ITEMS = 2179
MEDIAN_MARKET_INTERACTIONS_PER_USER = 9
# common.data.synthetic sells the 40% most popular products in every market and each other one with
# probability catalog_share: a market sells 0.4 + 0.6 * catalog_share of the catalog.
CORE_SHARE = 0.4
BLOCK_USERS = 10_000  # users whose choices are drawn at once (memory: block x items doubles)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dp-users`` benchmark's options."""
    defaults = harness.app_defaults()
    parser.add_argument(
        "--users",
        default="1000,10000,100000",
        help="comma-separated users per market, one federation each (default: %(default)s)",
    )
    parser.add_argument(
        "--synthetic-markets", type=int, default=4, help="equal markets per federation (default: %(default)s)"
    )
    parser.add_argument(
        "--items-per-market",
        type=int,
        default=MEDIAN_MARKET_ITEMS,
        help="products each market sells, XMarket Electronics' median market's (default: %(default)s)",
    )
    parser.add_argument(
        "--interactions-per-user",
        type=int,
        default=MEDIAN_MARKET_INTERACTIONS_PER_USER,
        help="mean interactions per user, at least 5; the median market's 8.99 rounded (default: %(default)s)",
    )
    parser.add_argument(
        "--methods",
        default="fedals,fedals-pt",
        help="comma-separated federated methods, each run without DP and at --dp-epsilon (default: %(default)s)",
    )
    parser.add_argument(
        "--dp-epsilon", type=float, default=8.0, help="per-market DP budget of the private runs (default: %(default)s)"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=0.9,
        help="fraction of the non-private NDCG@10 whose crossing is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--num-server-rounds",
        type=int,
        default=defaults["num-server-rounds"],
        help="federated rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--largest-markets",
        type=int,
        default=0,
        help="markets at the largest size only, to fit a small machine; 0 keeps "
        "--synthetic-markets (default: %(default)s)",
    )
    parser.add_argument(
        "--largest-rounds",
        type=int,
        default=0,
        help="rounds at the largest size only; 0 keeps --num-server-rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults["seed"],
        help="seeds the generated markets and the runs (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/dp-users"), help="output directory (default: %(default)s)"
    )
    add_verbose(parser, "every run's per-market lines")


def parse_users(text: str) -> list[int]:
    """``"1000,10000"`` as distinct sizes in increasing order; each at least 5 users."""
    sizes = []
    for entry in comma_list(text):
        try:
            size = int(entry)
        except ValueError:
            raise OptionError(f"--users takes whole numbers of users, got '{entry}'.") from None
        if size < 5:
            raise OptionError(f"--users needs at least 5 users per market, got {size}.")
        sizes.append(size)
    if not sizes:
        raise OptionError("--users needs at least one size.")
    return sorted(set(sizes))


def crossing(users: list[int], fractions: list[float], target: float = 0.9) -> dict[str, Any]:
    """Users per market at which ``fractions`` first reach ``target``, on log(users).

    Parameters
    ----------
    users : list of int
        Sizes in increasing order.
    fractions : list of float
        The DP method's NDCG@10 over the non-private one's at each size.
    target : float
        The fraction asked for.

    Returns
    -------
    dict
        ``{"status": ..., "users": ...}``. ``"interpolated"``: the first size at or above
        ``target`` follows one below it, and ``users`` is where the straight line between
        the two points in (log users, fraction) meets ``target``. ``"at-smallest"``: the
        smallest size already reaches it (``users`` is that size, an upper bound).
        ``"not-reached"``: no size reaches it (``users`` is None, the need lies beyond the
        largest size).
    """
    for index, (size, fraction) in enumerate(zip(users, fractions, strict=True)):
        if fraction >= target:
            if index == 0:
                return {"status": "at-smallest", "users": float(size)}
            below, low = users[index - 1], fractions[index - 1]
            share = (target - low) / (fraction - low)
            log_users = math.log(below) + share * (math.log(size) - math.log(below))
            return {"status": "interpolated", "users": math.exp(log_users), "between": [below, size]}
    return {"status": "not-reached", "users": None}


def describe(found: dict[str, Any], users: list[int], target: float) -> str:
    """One phrase for a :func:`crossing`: where the fraction reaches ``target``."""
    percent = f"{target:.0%}"
    if found["status"] == "interpolated":
        low, high = found["between"]
        return f"{percent} at about {found['users']:,.0f} users per market (between {low:,} and {high:,})"
    if found["status"] == "at-smallest":
        return f"{percent} already at the smallest size, {users[0]:,} users per market"
    return f"{percent} not reached up to {users[-1]:,} users per market"


def median_market_shape(data_dir: str | Path) -> dict[str, Any]:
    """The median market by users of ``data_dir``: its name, users, distinct items and interactions per user."""
    shapes = []
    for market, path in discover_market_files(data_dir).items():
        table = read_interactions(path)
        per_user = table.groupby("user").size()
        shapes.append(
            {
                "market": market,
                "users": int(per_user.size),
                "items": int(table["item"].nunique()),
                "interactions": int(len(table)),
                "mean-interactions-per-user": float(per_user.mean()),
                "median-interactions-per-user": float(per_user.median()),
            }
        )
    shapes.sort(key=lambda shape: (shape["users"], shape["market"]))
    return shapes[(len(shapes) - 1) // 2]


def catalog_items(items_per_market: int) -> int:
    """Catalog size whose generated markets each sell ``items_per_market`` products on average."""
    share = CORE_SHARE + (1 - CORE_SHARE) * SyntheticConfig.catalog_share
    return max(300, round(items_per_market / share))


def size_settings(args: argparse.Namespace, users: int, largest: int) -> dict[str, Any]:
    """What one size runs: its markets, rounds and generated federation."""
    at_largest = users == largest
    markets = args.largest_markets if at_largest and args.largest_markets else args.synthetic_markets
    rounds = args.largest_rounds if at_largest and args.largest_rounds else args.num_server_rounds
    return {
        "users": users,
        "markets": markets,
        "rounds": rounds,
        "items": catalog_items(args.items_per_market),
        "interactions-per-user": args.interactions_per_user,
        "seed": args.seed,
    }


def federation(settings: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Generate the size's markets into ``directory / "data"`` unless there already; their shape."""
    stamp = directory / "federation.json"
    wanted = {key: settings[key] for key in ("users", "markets", "items", "interactions-per-user", "seed")}
    if stamp.exists():
        shape = json.loads(stamp.read_text(encoding="utf-8"))
        if shape["settings"] == wanted and all((directory / "data" / f"{m}.csv").exists() for m in shape["markets"]):
            return shape
    config = SyntheticConfig(
        markets=settings["markets"],
        items=settings["items"],
        largest_market_users=settings["users"],
        smallest_market_users=settings["users"],
        mean_interactions=settings["interactions-per-user"],
        seed=settings["seed"],
        user_block=BLOCK_USERS,
    )
    started = time.perf_counter()
    paths = write_markets(config, directory / "data")
    markets = {}
    for market, path in paths.items():
        with open(path, encoding="utf-8") as file:
            next(file)
            rows = [line.split(",", 2)[:2] for line in file]
        markets[market] = {
            "users": len({user for user, _ in rows}),
            "items": len({item for _, item in rows}),
            "interactions": len(rows),
        }
    shape = {"settings": wanted, "markets": markets, "seconds": time.perf_counter() - started}
    stamp.write_text(json.dumps(shape, indent=1), encoding="utf-8")
    return shape


def harness_run(
    args: argparse.Namespace, methods: list[str], settings: dict[str, Any], data: Path, out: Path, epsilon: float
) -> dict[str, Any]:
    """The harness's results for ``methods`` on ``data`` at ``epsilon`` (0: no DP), reused from ``out`` when there."""
    saved = out / "results.json"
    if saved.exists():
        results = json.loads(saved.read_text(encoding="utf-8"))
        config = results["config"]
        if (config["methods"], config["num_server_rounds"], config["seed"], config["dp_epsilon"]) == (
            methods,
            settings["rounds"],
            args.seed,
            epsilon,
        ):
            say(f"reusing {saved}")
            return results
    argv = [
        "--data-dir",
        str(data),
        "--methods",
        ",".join(methods),
        "--num-server-rounds",
        str(settings["rounds"]),
        "--seed",
        str(args.seed),
        "--out",
        str(out),
        *(["--dp-epsilon", f"{epsilon:g}"] if epsilon else []),
        *(["--verbose"] if args.verbose else []),
    ]
    return harness.main(argv)


def summarise(results: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """Per method: macro test NDCG@10, its seconds, and under DP the most ε any market had spent.

    ``epsilon`` is at the round each market's validation chose (what its reported model had
    spent), ``run-epsilon`` at the run's last round (what the whole training spent).
    """
    last = max((entry["round"] for entry in results["rounds"]), default=None)
    spent = [
        market.get("epsilon")
        for entry in results["rounds"]
        if entry["round"] == last
        for market in entry["per_market"].values()
    ]
    summary = {}
    for method in methods:
        entry = results["methods"][method]
        summary[method] = {"ndcg@10": entry["macro"]["ndcg@10"], "seconds": entry.get("seconds")}
        chosen = [market.get("epsilon") for market in entry["per_market"].values()]
        if all(value is not None for value in chosen):
            summary[method]["epsilon"] = max(chosen)
            summary[method]["delta"] = max(market["delta"] for market in entry["per_market"].values())
        if spent and all(value is not None for value in spent):
            summary[method]["run-epsilon"] = max(spent)
    return summary


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per size, each method's NDCG@10 without and with DP and their ratio."""
    methods, label = report["methods"], report["epsilon-label"]
    header = "| users/market | markets | rounds | items touched (mean) | interactions/user | ε spent |"
    rule = "|---:|---:|---:|---:|---:|---:|"
    for method in methods:
        header += f" {method} non-private | {method} ε={label} | fraction |"
        rule += "---:|---:|---:|"
    lines = [header + " minutes (both runs) |", rule + "---:|"]
    for size in report["sizes"].values():
        cells = [
            f"{size['users']:,}",
            str(size["markets"]),
            str(size["rounds"]),
            f"{size['items-touched']:,.0f}",
            f"{size['interactions-per-user']:.2f}",
            _spent(size),
        ]
        for method in methods:
            plain, private = size["non-private"].get(method), size["dp"].get(method)
            fraction = size["fraction"].get(method)
            cells += [
                f"{plain['ndcg@10']:.4f}" if plain else "–",
                f"{private['ndcg@10']:.4f}" if private else "–",
                f"{fraction:.3f}" if fraction is not None else "–",
            ]
        lines.append("| " + " | ".join(cells) + f" | {size['seconds'] / 60:.1f} |")
    lines.append("")
    for method in methods:
        found = report["crossing"].get(method)
        if found is not None:
            lines.append(f"- {method}: {describe(found, report['users'], report['target'])}.")
    return "\n".join(lines)


def _spent(size: dict[str, Any]) -> str:
    """The most ε a private run of this size spent, or a dash where the runs do not say."""
    spent = [entry["run-epsilon"] for entry in size["dp"].values() if "run-epsilon" in entry]
    return f"{max(spent):.2f}" if spent else "–"


def plot(report: dict[str, Any], path: Path) -> None:
    """The fraction of non-private NDCG@10 against users per market (log axis), the target dashed, crossings marked."""
    figure, axis = plt.subplots(figsize=(6.8, 4.4))
    users = report["users"]
    for method in report["methods"]:
        points = [
            (size["users"], size["fraction"][method])
            for size in report["sizes"].values()
            if size["fraction"].get(method) is not None
        ]
        if not points:
            continue
        found = report["crossing"][method]
        short = f" (< {report['target']:.0%} up to {points[-1][0]:,})" if found["status"] == "not-reached" else ""
        (line,) = axis.plot(*zip(*points, strict=True), "o-", label=f"{method}, ε = {report['epsilon-label']}{short}")
        if not short:
            axis.plot([found["users"]], [report["target"]], "*", markersize=15, color=line.get_color())
            text = f"{'≤ ' if found['status'] == 'at-smallest' else '≈ '}{found['users']:,.0f}"
            axis.annotate(
                text,
                (found["users"], report["target"]),
                textcoords="offset points",
                xytext=(6, -14),
                color=line.get_color(),
            )
    axis.axhline(report["target"], linestyle="--", color="grey", label=f"{report['target']:.0%} of non-private")
    axis.set_xscale("log")
    axis.set_xticks(users, [f"{size:,}" for size in users])
    axis.minorticks_off()
    axis.set_xlabel("users per market")
    axis.set_ylabel("macro test NDCG@10, DP / non-private")
    axis.set_title(
        f"equal markets selling {report['items-per-market']:,} items, "
        f"{report['interactions-per-user']} interactions per user"
    )
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_csv(report: dict[str, Any], path: Path) -> None:
    """``users.csv``: one row per size and method."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["users", "markets", "rounds", "method", "ndcg@10 non-private", "ndcg@10 dp", "epsilon", "fraction"]
        )
        for size in report["sizes"].values():
            for method in report["methods"]:
                plain, private = size["non-private"].get(method), size["dp"].get(method)
                writer.writerow(
                    [
                        size["users"],
                        size["markets"],
                        size["rounds"],
                        method,
                        plain["ndcg@10"] if plain else "",
                        private["ndcg@10"] if private else "",
                        report["dp-epsilon"],
                        size["fraction"].get(method, ""),
                    ]
                )


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Run every size without DP and at ε; write the results, table and plot; return the report."""
    users = parse_users(args.users)
    methods = comma_list(args.methods)
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise OptionError(f"--methods takes federated methods from {sorted(METHODS)}, got '{args.methods}'.")
    if not args.dp_epsilon > 0:
        raise OptionError(f"--dp-epsilon must be positive, got {args.dp_epsilon}.")
    if not 0 < args.target <= 1:
        raise OptionError(f"--target is a fraction in (0, 1], got {args.target}.")
    args.out.mkdir(parents=True, exist_ok=True)
    label = f"{args.dp_epsilon:g}"
    report: dict[str, Any] = {
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "users": users,
        "methods": methods,
        "dp-epsilon": args.dp_epsilon,
        "epsilon-label": label,
        "target": args.target,
        "items-per-market": args.items_per_market,
        "interactions-per-user": args.interactions_per_user,
        "catalog-items": catalog_items(args.items_per_market),
        "sizes": {},
        "crossing": {},
    }
    started = time.perf_counter()
    with bar(2 * len(users), "dp-users sweep", "run") as progress:
        for size in users:
            settings = size_settings(args, size, users[-1])
            directory = args.out / f"users-{size}"
            directory.mkdir(parents=True, exist_ok=True)
            say(
                f"=== {size:,} users per market: {settings['markets']} markets, {settings['rounds']} rounds, "
                f"{time.perf_counter() - started:.0f} s so far ==="
            )
            shape = federation(settings, directory)
            runs = {}
            for name, epsilon in (("non-private", 0.0), (f"eps-{label}", args.dp_epsilon)):
                say(f"--- {size:,} users: {','.join(methods)} {'without DP' if not epsilon else f'at ε = {label}'} ---")
                runs[name] = summarise(
                    harness_run(args, methods, settings, directory / "data", directory / name, epsilon), methods
                )
                progress.update(1)
            plain, private = runs["non-private"], runs[f"eps-{label}"]
            entry = {
                **{key: settings[key] for key in ("users", "markets", "rounds")},
                "items-touched": statistics.fmean(m["items"] for m in shape["markets"].values()),
                "interactions-per-user": sum(m["interactions"] for m in shape["markets"].values())
                / sum(m["users"] for m in shape["markets"].values()),
                "generated": shape["markets"],
                "non-private": plain,
                "dp": private,
                "fraction": {
                    m: private[m]["ndcg@10"] / plain[m]["ndcg@10"] for m in methods if plain[m]["ndcg@10"] > 0
                },
                # The harness's seconds of both runs (as they were, when reused), as each run's methods share one.
                "seconds": sum(max(m["seconds"] or 0.0 for m in run.values()) for run in runs.values()),
            }
            report["sizes"][str(size)] = entry
            say(
                f"{size:,} users: "
                + ", ".join(
                    f"{m} {plain[m]['ndcg@10']:.4f} -> {private[m]['ndcg@10']:.4f} "
                    f"({entry['fraction'].get(m, math.nan):.3f})"
                    for m in methods
                )
            )
            (args.out / "results.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    for method in methods:
        points = [
            (size["users"], size["fraction"][method]) for size in report["sizes"].values() if method in size["fraction"]
        ]
        if points:
            report["crossing"][method] = crossing([u for u, _ in points], [f for _, f in points], args.target)
    (args.out / "results.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_csv(report, args.out / "users.csv")
    text = table(report)
    (args.out / "users.md").write_text(text + "\n", encoding="utf-8")
    plot(report, args.out / "users.png")
    say("\nmacro test NDCG@10, DP over non-private:\n" + text)
    say(
        f"\nWrote {args.out / 'results.json'}, users.csv, users.md and users.png "
        f"in {math.ceil(time.perf_counter() - started)} s"
    )
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m simulations.benchmarks.users_sweep``: the same as ``python -m simulations.benchmark dp-users``."""
    parser = ArgumentParser(
        prog="python -m simulations.benchmark dp-users",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return sweep(parser.parse_args(argv))


if __name__ == "__main__":
    run_command(main)
