"""Run federated methods and baselines on the same markets and compare them.

    python -m simulations.run                       # generated markets, all methods
    python -m simulations.run --data-dir ../shared/data/xmarket-electronics --out OUT

Federated methods run as the real Flower app on Flower's simulation engine
(a SuperLink this command starts and stops); ``local``, ``pooled``,
``popular`` and ``pooled-ials`` (iALS on all markets' data, the reference
``fedals`` equals) run in this process on the same splits, as do
``implicit-local`` and ``implicit-pooled`` (the ``implicit`` library's ALS on
each market alone and pooled, at settings tuned on validation; a benchmark
extra: pip install ".[benchmark]"). Every method reports test metrics at the
round where each market's validation NDCG@10 was best (for ``fedals`` and
``pooled-ials`` a round is one ALS iteration; the implicit references report
their one point, after their tuned iterations, whatever ``--num-server-rounds`` says).

By default each federated method shows a progress bar over its rounds (on a
terminal) and one line per round; ``--verbose`` adds each market's line. Every
warning and error of Flower, the ServerApp or a market is shown.
"""

import argparse
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.data.markets import MarketSource
from common.ials.core import IALSConfig
from common.methods import BASELINES, METHODS
from common.neural.train import TrainConfig
from common.rerank.ranker import RankerConfig
from common.run_config import RunConfig, parse_market_epsilons
from common.runtime.command import (
    ArgumentParser,
    OutOfMemoryError,
    UserError,
    add_alias,
    add_verbose,
    comma_list,
    run_command,
)
from simulations.baselines import (
    BaselineSettings,
    LocalPrivacy,
    implicit_missing,
    run_implicit,
    run_local,
    run_pooled,
    run_pooled_ials,
    run_popular,
)
from simulations.blend import ALS_METHOD, BLEND, blend_partner, run_blend
from simulations.flower_runtime import SimulationSuperLink, exit_cleanly_on_sigterm
from simulations.progress import RoundProgress, say
from simulations.rerank import REPORT_FILE, RERANK, run_rerank
from simulations.results import (
    FINE_TUNED,
    TRANSFERRED,
    federated_curves,
    final_step_curves,
    method_summary,
    plot_rounds,
    selection_summary,
    write_results,
)
from xmfl.app import app_config

DP_NOISE_SECURE = "secure: os.urandom, never derived from the config"
DP_NOISE_INSECURE = (
    "INSECURE: the simulated markets seeded it from --seed (--dp-insecure-seeded-noise, "
    "their own node config); the noise can be removed"
)
# Old spellings of renamed options, still accepted (hidden from --help): option names equal the config keys.
ALIASES = {
    "--rounds": "--num-server-rounds",
    "--market-epsilons": "--dp-market-epsilons",
    "--insecure-seeded-dp-noise": "--dp-insecure-seeded-noise",
    "--market-dp-noise": "--market-dp-noise-multiplier",
    "--market-dp-clip": "--market-dp-clipping-norm",
}
# Bytes a market's training holds per item-table entry: float32 weights, gradients and Adam's two moments.
TRAINING_BYTES_PER_ENTRY = 4 * 4
# Bytes the server holds per entry and market: each market's reply (float32 arrays) until it is averaged.
REPLY_BYTES_PER_ENTRY = 4


def app_defaults() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of pyproject.toml, the one place defaults live (the checkout's or wheel's copy)."""
    return app_config()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults come from pyproject.toml."""
    defaults = app_defaults()
    parser = ArgumentParser(
        prog="python -m simulations.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        default=defaults["data-dir"],
        help="directory with one interaction file per market (XMarket .txt, .csv or .parquet) "
        "(default: none, generated markets)",
    )
    parser.add_argument(
        "--synthetic-markets",
        type=int,
        default=defaults["synthetic-markets"],
        help="markets to generate when no --data-dir is given (default: %(default)s)",
    )
    parser.add_argument(
        "--methods",
        default="fedals,local,pooled-ials,fedper",
        help=f"comma-separated, from {', '.join(BASELINES + tuple(METHODS) + (BLEND, RERANK))}; {BLEND} "
        f"blends {ALS_METHOD} with the first neural federated method listed, per market on "
        f"validation; {RERANK} re-ranks {ALS_METHOD}'s lists with a LightGBM ranker per market "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--num-server-rounds",
        type=int,
        default=defaults["num-server-rounds"],
        help="federated rounds; baselines train as many epochs (default: %(default)s)",
    )
    parser.add_argument(
        "--local-epochs",
        type=int,
        default=defaults["local-epochs"],
        help="local epochs per round (default: %(default)s)",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=defaults["learning-rate"], help="Adam step size (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults["batch-size"], help="interactions per step (default: %(default)s)"
    )
    parser.add_argument(
        "--negatives",
        type=int,
        default=defaults["negatives"],
        help="sampled negatives per positive while training (default: %(default)s)",
    )
    parser.add_argument(
        "--embedding-dim",
        type=int,
        default=defaults["embedding-dim"],
        help="width of item and user vectors (default: %(default)s)",
    )
    parser.add_argument(
        "--history-length",
        type=int,
        default=defaults["history-length"],
        help="training items pooled into a user's vector (default: %(default)s)",
    )
    parser.add_argument(
        "--dp-epsilon",
        type=float,
        default=defaults["dp-epsilon"],
        help="per-market DP budget for the whole run (DP-SGD with Opacus), for the federated methods and local; "
        "pooled stays non-private; 0 trains without DP (default: %(default)s)",
    )
    parser.add_argument(
        "--dp-market-epsilons",
        default=defaults["dp-market-epsilons"],
        metavar="MARKET=EPS,...",
        help="named markets' own budgets in place of --dp-epsilon, e.g. de=4,jp=2 "
        "(needs --dp-epsilon > 0 for the others) (default: none)",
    )
    parser.add_argument(
        "--dp-insecure-seeded-noise",
        action="store_true",
        help="INSECURE, to reproduce an experiment only: draw DP noise and sampling from --seed, so "
        "that whoever knows the config can remove the noise; results.json marks such a run "
        "(default: off, noise from the operating system's secure source)",
    )
    add_min_buyers(parser)
    parser.add_argument(
        "--market-dp-noise-multiplier",
        type=float,
        default=defaults["market-dp-noise-multiplier"],
        help="market-level DP on the server: noise multiplier over the clipping norm, 0 for none; "
        "every market then weighs the same in the average (default: %(default)s)",
    )
    parser.add_argument(
        "--market-dp-clipping-norm",
        type=float,
        default=defaults["market-dp-clipping-norm"],
        help="market-level DP: L2 bound on each market's update of the shared arrays (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        dest="app_config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other key of the app config ([tool.flwr.app.config] in pyproject.toml) for the "
        "federated methods, e.g. --set dp-learning-rate=0.02; repeatable (default: none)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults["seed"],
        help="seeds data generation, negatives, models and training (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/run"),
        help="output directory for results.json, results.csv, results.md, rounds.png and logs (default: %(default)s)",
    )
    add_verbose(parser, "each market's line every round")
    for old, new in ALIASES.items():
        add_alias(parser, old, new)
    args = parser.parse_args(argv)
    methods = comma_list(args.methods)
    unknown = sorted(set(methods) - set(BASELINES) - set(METHODS) - {BLEND, RERANK})
    if unknown or not methods:
        parser.error(
            f"unknown methods {unknown}; choose from {', '.join(BASELINES + tuple(METHODS) + (BLEND, RERANK))}"
        )
    if BLEND in methods and (ALS_METHOD not in methods or blend_partner(methods) is None):
        parser.error(
            f"{BLEND} blends {ALS_METHOD} with a neural federated method: add {ALS_METHOD} and one of "
            f"{', '.join(m for m in METHODS if METHODS[m].family == 'sgd')} to --methods"
        )
    if RERANK in methods and ALS_METHOD not in methods:
        parser.error(f"{RERANK} re-ranks {ALS_METHOD}'s candidate lists: add {ALS_METHOD} to --methods")
    if any(m.startswith("implicit-") for m in methods) and (missing := implicit_missing()) is not None:
        parser.error(missing)
    if args.num_server_rounds < 1 or args.local_epochs < 1:
        parser.error("--num-server-rounds and --local-epochs must be at least 1")
    if args.market_dp_noise_multiplier < 0 or args.market_dp_clipping_norm <= 0:
        parser.error("--market-dp-noise-multiplier must not be negative and --market-dp-clipping-norm must be positive")
    args.methods = methods
    assignments, args.app_config = args.app_config, {}
    try:
        args.app_config = parse_app_config(
            assignments, defaults, reserved=set(run_config_for(args, "", Path(), 0)) - set(HARNESS_DEFAULTS)
        )
        # Checked here, before anything starts, for every federated method asked for: inside a
        # run a bad setting only shows as every market failing its first round.
        for method in [m for m in methods if m in METHODS] or [defaults["method"]]:
            run_config = {**defaults, **run_config_for(args, method, Path(), 1)}
            RunConfig.from_run_config(run_config)
    except ValueError as err:
        parser.error(str(err))
    return args


def add_min_buyers(parser: argparse.ArgumentParser) -> None:
    """``--als-min-buyers``: the simulated regions' own minimum, for the harness and the commands that run it."""
    parser.add_argument(
        "--als-min-buyers",
        type=int,
        default=None,
        metavar="K",
        help="fedals without DP: the simulated regions' own minimum buyers of an item before its "
        "statistics leave the market (their node config's als-min-buyers; 1 sends every "
        "item, as pooled iALS needs) (default: the code's, common.ials.private)",
    )


def data_options(args: argparse.Namespace) -> list[str]:
    """The harness options naming ``args``' markets (``--data-dir`` or generated) and their regions' minimum."""
    options = ["--data-dir", args.data_dir] if args.data_dir else ["--synthetic-markets", str(args.synthetic_markets)]
    return options + (["--als-min-buyers", str(args.als_min_buyers)] if args.als_min_buyers is not None else [])


def parse_app_config(assignments: list[str], defaults: dict[str, Any], reserved: set[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as app config entries, each converted to its default's type.

    Parameters
    ----------
    assignments : list[str]
        The ``--set`` values.
    defaults : dict
        The app config of pyproject.toml: its keys are the known ones.
    reserved : set[str]
        Keys the harness sets from its own options, so that baselines and
        federated methods always see the same value.

    Raises
    ------
    ValueError
        If an assignment has no ``=``, names an unknown or reserved key, or has a
        value of the wrong type.
    """
    parsed: dict[str, Any] = {}
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        if not separator:
            raise ValueError(f"--set takes KEY=VALUE, got '{assignment}'.")
        if key not in defaults:
            raise ValueError(
                f"--set {key}: the app config has no key '{key}'; see [tool.flwr.app.config] in pyproject.toml."
            )
        if key in reserved:
            raise ValueError(f"--set {key}: the harness sets '{key}' from its own option; see --help.")
        default = defaults[key]
        if isinstance(default, bool):
            if text not in ("true", "false"):
                raise ValueError(f"--set {key}: expected true or false, got '{text}'.")
            parsed[key] = text == "true"
        else:
            try:
                parsed[key] = type(default)(text)
            except ValueError:
                raise ValueError(
                    f"--set {key}: expected a value of type {type(default).__name__}, got '{text}'."
                ) from None
    return parsed


# App config values of the harness's own that --set may still change: the served models reproduce the test
# metrics the harness reports, which a refit for serving (trained on the test interactions) cannot.
HARNESS_DEFAULTS = {"serve-refit": False}


def run_config_for(args: argparse.Namespace, method: str, out_dir: Path, markets: int) -> dict[str, Any]:
    """Overrides of the app config for one federated method."""
    return {
        **HARNESS_DEFAULTS,
        **args.app_config,
        "method": method,
        "num-server-rounds": args.num_server_rounds,
        "local-epochs": args.local_epochs,
        "learning-rate": args.learning_rate,
        "batch-size": args.batch_size,
        "negatives": args.negatives,
        "embedding-dim": args.embedding_dim,
        "history-length": args.history_length,
        "data-dir": str(Path(args.data_dir).resolve()) if args.data_dir else "",
        "synthetic-markets": args.synthetic_markets,
        "seed": args.seed,
        "dp-epsilon": args.dp_epsilon,
        "dp-market-epsilons": args.dp_market_epsilons,
        "market-dp-noise-multiplier": args.market_dp_noise_multiplier,
        "market-dp-clipping-norm": args.market_dp_clipping_norm,
        "market-dp-markets": markets,
        "min-nodes": markets,
        "out-dir": str(out_dir.resolve()),
        # Simulation only: markets write their served models to <models-dir>/<method>/<market>.
        "models-dir": str((out_dir.parent / "models").resolve()),
    }


def harness_ials_config(args: argparse.Namespace, defaults: dict[str, Any]) -> IALSConfig:
    """The iALS settings fedals would train with in this run, for the references the harness computes itself."""
    run_config = {**defaults, **run_config_for(args, "fedals", Path(), 1), "market-dp-noise-multiplier": 0.0}
    return RunConfig.from_run_config(run_config).ials_config()


def memory_need(markets: int, catalog_rows: int, embedding_dim: int, workers: int) -> int:
    """Bytes a run needs at least: the markets training at once and the replies the server holds.

    Each market training at once (``workers`` of them, one per core) holds an
    item table of ``catalog_rows`` x ``embedding_dim`` with its gradients and
    Adam's two moments; the server holds every market's reply of that table
    until it has averaged them.
    """
    entries = catalog_rows * embedding_dim
    return entries * (TRAINING_BYTES_PER_ENTRY * min(markets, workers) + REPLY_BYTES_PER_ENTRY * markets)


def check_memory(markets: int, catalog_rows: int, embedding_dim: int) -> None:
    """Refuse a run the machine's free memory cannot hold, before anything starts.

    Raises
    ------
    OutOfMemoryError
        If :func:`memory_need` exceeds the memory available now.
    """
    import psutil

    need = memory_need(markets, catalog_rows, embedding_dim, os.cpu_count() or 1)
    available = psutil.virtual_memory().available
    if need > available:
        raise OutOfMemoryError(
            f"{markets} markets over a catalog of {catalog_rows:,} rows at embedding-dim {embedding_dim} need about "
            f"{need / 2**30:.1f} GiB, but only {available / 2**30:.1f} GiB of memory is free; run fewer markets, "
            "a smaller --embedding-dim, or on a larger machine."
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every requested method and write the results; returns results.json's content."""
    args = parse_args(argv)
    source = MarketSource(args.data_dir, args.synthetic_markets, args.seed)
    started = time.perf_counter()
    markets = source.markets
    unknown = sorted(set(parse_market_epsilons(args.dp_market_epsilons)) - set(markets))
    if unknown:
        # A misspelt market would quietly get the run's budget instead of its own.
        raise UserError(
            f"--dp-market-epsilons names {unknown}, which are not markets of this run: {', '.join(markets)}."
        )
    catalog = source.catalog()  # reads every market once: bad files fail here, before training
    check_memory(len(markets), catalog.size, args.embedding_dim)
    say(
        f"{len(markets)} markets ({', '.join(markets[:10])}{', ...' if len(markets) > 10 else ''}), "
        f"catalog of {len(catalog.item_ids)} items, loaded in {time.perf_counter() - started:.1f} s"
    )
    defaults = {**app_defaults(), **args.app_config}
    train = TrainConfig(
        epochs=args.local_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        negatives=args.negatives,
        score_penalty=defaults["score-penalty"],
    )
    privacy = None
    if args.dp_epsilon > 0:
        private_train = replace(
            train,
            batch_size=defaults["dp-batch-size"],
            learning_rate=defaults["dp-learning-rate"],
            user_positives=defaults["dp-user-positives"],
        )
        privacy = LocalPrivacy(
            args.dp_epsilon,
            defaults["dp-delta"],
            defaults["dp-max-grad-norm"],
            defaults["dp-accountant"],
            private_train,
            defaults["dp-popularity-share"],
            parse_market_epsilons(args.dp_market_epsilons),
            args.dp_insecure_seeded_noise,
        )
        for pooled in ("pooled", "pooled-ials", "implicit-pooled"):
            if pooled in args.methods:
                say(
                    f"{pooled} pools every market's data in one place: it trains without DP, as the non-private ceiling"
                )
        if "implicit-local" in args.methods:
            say("implicit-local is the implicit library's ALS: it trains without DP, a non-private reference")
    settings = BaselineSettings(
        args.num_server_rounds,
        train,
        args.embedding_dim,
        args.history_length,
        defaults["user-embeddings"],
        args.seed,
        privacy,
        models_dir=args.out / "models",  # served models: OUT/models/<method>/<market>/
    )
    results: dict[str, Any] = {
        "config": {**vars(args), "out": str(args.out), "markets": markets},
        "methods": {},
        "rounds": [],
    }
    if args.dp_epsilon > 0:
        results["dp-noise"] = DP_NOISE_INSECURE if args.dp_insecure_seeded_noise else DP_NOISE_SECURE
        if args.dp_insecure_seeded_noise:
            say("INSECURE: DP noise and sampling are seeded from --seed; whoever knows the config can remove the noise")
    curves_by_method = {}
    # fedper-ft trains exactly as fedper and only adds a final fine-tuning step (fedals-pt: fedals
    # and a private transfer), so when both are asked for, one run yields both.
    bases = {METHODS[m].base for m in args.methods if m in METHODS and METHODS[m].base}
    runs = [m for m in args.methods if m not in bases and m not in (BLEND, RERANK)]
    for method in runs:
        say(f"== {method} ==")
        started = time.perf_counter()
        if method == "local":
            curves = run_local(source, catalog, settings, say)
        elif method == "pooled":
            curves = run_pooled(source, catalog, settings, say)
        elif method == "popular":
            curves = run_popular(source, catalog, settings, say)
        elif method == "pooled-ials":
            ials = harness_ials_config(args, defaults)
            iteration_seconds: list[float] = []
            curves = run_pooled_ials(source, catalog, settings, ials, say, iteration_seconds)
        elif method in ("implicit-local", "implicit-pooled"):
            curves = run_implicit(source, catalog, settings, method, say)
        else:
            curves, rounds = run_federated(args, method, markets)
            results["rounds"].extend({"method": method, **entry} for entry in rounds)
        seconds = time.perf_counter() - started
        if method in METHODS and METHODS[method].base:
            if METHODS[method].base in args.methods:
                record_method(results, curves_by_method, METHODS[method].base, curves, seconds)
            curves = final_step_curves(curves, TRANSFERRED if METHODS[method].transfer else FINE_TUNED)
        record_method(results, curves_by_method, method, curves, seconds)
        if method == "pooled-ials":  # one iteration with its evaluation: a fedals round without Flower
            results["methods"][method]["iteration-seconds"] = iteration_seconds
    if BLEND in args.methods:
        say(f"== {BLEND} ==")
        started = time.perf_counter()
        ials = harness_ials_config(args, defaults)
        curves = run_blend(
            source, catalog, args.out / "models", blend_partner(args.methods), ials, args.history_length, say
        )
        record_method(results, curves_by_method, BLEND, curves, time.perf_counter() - started)
    if RERANK in args.methods:
        say(f"== {RERANK} ==")
        started = time.perf_counter()
        curves = run_rerank(
            source,
            catalog,
            args.out / "models",
            harness_ials_config(args, defaults),
            args.history_length,
            RankerConfig(seed=args.seed),
            say,
            report_path=args.out / REPORT_FILE,
        )
        # Not a selection candidate: its validation NDCG@10 is over held-out users only (simulations.rerank).
        record_method(results, curves_by_method, RERANK, curves, time.perf_counter() - started)
    federated = [m for m in results["methods"] if m in METHODS or m == BLEND]
    if "local" in results["methods"] and federated:
        results["methods"]["selection"] = selection_summary(results["methods"], ["local", *federated])
        chosen = {m: v["chosen"] for m, v in results["methods"]["selection"]["per_market"].items()}
        say(f"selection (best on each market's validation): {chosen}")
        serve_selection(args.out / "models", chosen)
    table = write_results(results, args.out)
    plot_rounds(curves_by_method, args.out / "rounds.png")
    say("\n" + table)
    say(f"\nWrote {args.out / 'results.json'}, results.csv, results.md and rounds.png")
    return results


def serve_selection(models_dir: Path, chosen: dict[str, str]) -> None:
    """``models/selection/<market>``: a copy of the served model of the method chosen for each market."""
    for market, method in chosen.items():
        target = models_dir / "selection" / market
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(models_dir / method / market, target)


def record_method(
    results: dict[str, Any], curves_by_method: dict[str, dict], method: str, curves: dict, seconds: float
) -> None:
    """Summarise one method into ``results`` and say its macro score."""
    results["methods"][method] = method_summary(curves, seconds)
    curves_by_method[method] = curves
    say(f"{method}: macro test NDCG@10 {results['methods'][method]['macro']['ndcg@10']:.4f} in {seconds:.1f} s")


def simulation_node_config(args: argparse.Namespace) -> dict[str, Any]:
    """The node config the harness gives every simulated market (it owns them all).

    A region's own settings never come from the run config: seeded DP noise is the simulated
    markets' choice, made here by the harness's owner with ``--dp-insecure-seeded-noise``; and
    simulated markets report exact metrics under DP (``dp-exact-metrics``), which results.json
    needs per market, so that a privacy experiment's numbers are outside the DP guarantee by the
    experimenter's choice, as results.json's ``dp-noise`` says.
    """
    settings = {"dp-insecure-seeded-noise": bool(args.dp_insecure_seeded_noise), "dp-exact-metrics": True}
    if getattr(args, "als_min_buyers", None) is not None:  # the regions' own fedals threshold (common.ials.private)
        settings["als-min-buyers"] = args.als_min_buyers
    return settings


def run_federated(args: argparse.Namespace, method: str, markets: list[str]) -> tuple[dict, list]:
    """One federated method over ``markets`` on a SuperLink of this process; its curves and round log."""
    out_dir = args.out / method
    shutil.rmtree(out_dir, ignore_errors=True)  # a stale history must not pass for this run's
    with (
        SimulationSuperLink(len(markets), args.out / "logs", node_config=simulation_node_config(args)) as superlink,
        RoundProgress(method, args.num_server_rounds, markets, args.verbose) as progress,
    ):
        superlink.run(run_config_for(args, method, out_dir, len(markets)), method, on_line=progress)
    history_path = out_dir / "history.json"
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.exists() else {"rounds": []}
    completed = max((entry["round"] for entry in history["rounds"]), default=0)
    if completed < args.num_server_rounds:
        raise RuntimeError(
            f"{method} stopped after round {completed} of {args.num_server_rounds}; "
            f"see {args.out / 'logs' / method}.log and superlink.log beside it."
        )
    rounds = [entry for entry in history["rounds"] if entry["round"] >= 1]
    return federated_curves(history), rounds


if __name__ == "__main__":
    exit_cleanly_on_sigterm()
    run_command(main)
