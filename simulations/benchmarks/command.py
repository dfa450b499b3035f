"""Benchmarks that take longer than a test.

    python -m simulations.benchmark quality --data-dir DIR --num-seeds 3 --out OUT
    python -m simulations.benchmark scale --synthetic-markets 20 --items 1000000 --methods fedals,fedper --out OUT
    python -m simulations.benchmark dp-step --data-dir DIR --market uk
    python -m simulations.benchmark latency --num-regions 3 --num-server-rounds 4 --out OUT
    python -m simulations.benchmark join --data-dir DIR --fractions 0.1,0.25,0.5,1 --out OUT
    python -m simulations.benchmark continue --data-dir DIR --holdout 0.2 --out OUT
    python -m simulations.benchmark refit --data-dir DIR --num-server-rounds 15 --out OUT
    python -m simulations.benchmark dp-users --users 1000,10000,100000 --out OUT
    python -m simulations.benchmark attacks --data-dir DIR --out OUT
    python -m simulations.benchmark serving --users 10000 --items 1000000 --out OUT
    python -m simulations.benchmark dims --data-dir DIR --dims 64,128,256,512 --out OUT

``quality`` runs every method on the same splits for several seeds (a progress
bar with ETA counts the runs, on a terminal) and
writes the mean and standard deviation of test NDCG@10 and HR@10 per market
and macro, beside the published XMarket Electronics numbers, and the
seconds per federated round against the same local training without Flower.

``scale`` generates many markets over a large catalog and runs each federated method
through the harness, reporting seconds per round, bytes per market per round against the
items each market touches, and the peak memory of the whole process tree (see
``simulations.benchmarks.scale_benchmark``).

``serving`` times ``xmfl recommend --all`` (batched, bounded memory) against a plain batched
matrix product with top-k over the same factors, and ``score`` over many pairs, with the peak
memory of each (see ``simulations.benchmarks.serving_benchmark``).

``join`` holds out each market in turn, federates the others, and has the
held-out market join with a share of its users, against training alone on the
same users (see ``simulations.benchmarks.join_benchmark``).

``continue`` holds out each market's newest interactions, trains, then
continues on the whole data from the saved models, against a training from
scratch (see ``simulations.benchmarks.continue_benchmark``).

``refit`` removes each user's last interaction, trains fedals without and with ``serve-refit``
(a last training on all of each market's data) and ranks the removed interactions with each
phase's served model (see ``simulations.benchmarks.refit_benchmark``).

``dp-users`` generates federations of equal markets of each size in ``--users`` and reports
fedals' macro NDCG@10 at ε = 8 as a fraction of the same method without DP, and the users per
market at which it reaches 90% (see ``simulations.benchmarks.users_sweep``).

``attacks`` plays a hostile server against the real ClientApp of every market and reports what
each attack on a region's privacy got (see ``simulations.attacks``).

``dims`` runs fedals at several factor dimensions on the same split and reports quality, seconds
and bytes per interaction for each (see ``simulations.benchmarks.dims``).

``latency`` runs a real deployment on loopback (see ``simulations.benchmarks.latency``)
with Flower's default round loop and with this project's, and reports the
seconds per round and the part of them that is not training, as a ratio.
"""

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample.embedding import compute_embedding_norm_sample
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.grad_sample.linear import compute_linear_norm_sample
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import simulations.benchmarks.serving_benchmark as serving_benchmark
from common.data.markets import MarketSource, load_split
from common.methods import BASELINES
from common.neural.model import CatalogEmbedding, ModelConfig, PositionwiseLinear, SplitRecommender
from common.neural.train import MarketTensors, user_batch_inputs
from common.privacy.dp_sgd import UserSoftmaxLoss, dp_generator, privacy_units
from common.privacy.ghost_norms import register_norm_samplers
from common.runtime.command import ArgumentParser, add_alias, add_verbose, comma_list, run_command
from simulations import run as harness
from simulations.attacks import command as attacks
from simulations.benchmarks import (
    continue_benchmark,
    dims,
    join_benchmark,
    latency,
    refit_benchmark,
    scale_benchmark,
    users_sweep,
)
from simulations.flower_runtime import exit_cleanly_on_sigterm
from simulations.progress import over, say
from simulations.results import mean_and_std

# fedals, the default method, first; its references (local, pooled iALS, implicit) beside it; then the
# neural federated methods and their pooled reference.
ALL_METHODS = "fedals,local,pooled-ials,implicit-pooled,pooled,fedavg,fedper,fedrep,fedper-ft"
# Best published test NDCG@10 per market (99 negatives, XMarket Electronics),
# from models that also train on the large US market: Bonab et al. CIKM 2021;
# Bhargav et al. ECIR 2023. Macro: the best single global model, MA-NMF++.
PUBLISHED_BEST = {"de": 0.344, "jp": 0.221, "in": 0.480, "fr": 0.327, "ca": 0.318, "mx": 0.559, "uk": 0.470}
PUBLISHED_BEST_MACRO = 0.379
PUBLISHED_SINGLE_MARKET_NMF_MACRO = 0.357


def aggregate_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds, per method, market and metric."""
    summary: dict[str, Any] = {}
    for method in runs[0]["methods"]:
        markets = list(runs[0]["methods"][method]["per_market"])
        entry: dict[str, Any] = {"per_market": {}, "macro": {}}
        for metric in ("ndcg@10", "hr@10"):
            for market in markets:
                values = [run["methods"][method]["per_market"][market][metric] for run in runs]
                entry["per_market"].setdefault(market, {})[metric] = mean_and_std(values)
            entry["macro"][metric] = mean_and_std([run["methods"][method]["macro"][metric] for run in runs])
        if method == "selection":
            entry["chosen"] = {
                market: [run["methods"][method]["per_market"][market]["chosen"] for run in runs] for market in markets
            }
        summary[method] = entry
    return summary


def quality_table(summary: dict[str, Any], metric: str) -> str:
    """Markdown: markets as rows, methods as columns (mean ± std), published beside."""
    methods = list(summary)
    markets = list(summary[methods[0]]["per_market"])
    header = f"| test {metric.upper()} | " + " | ".join(methods)
    header += " | published best |" if metric == "ndcg@10" else " |"
    lines = [header, "|---|" + "---:|" * (len(methods) + (metric == "ndcg@10"))]
    for market in [*markets, "macro"]:
        cells = []
        for method in methods:
            value = summary[method]["macro" if market == "macro" else "per_market"]
            value = value[metric] if market == "macro" else value[market][metric]
            cells.append(f"{value['mean']:.4f} ± {value['std']:.4f}")
        if metric == "ndcg@10":
            cells.append(
                f"{PUBLISHED_BEST_MACRO if market == 'macro' else PUBLISHED_BEST.get(market, float('nan')):.3f}"
            )
        lines.append(f"| {market} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acceptance(summary: dict[str, Any], federated: list[str]) -> dict[str, Any]:
    """The quality targets, judged on the federated method with the best macro NDCG@10.

    At least local on every market, at or above the best published number per market, and macro
    NDCG@10 against each reference run beside it (the best federated method should reach
    implicit's pooled ALS).
    """
    best = max(federated, key=lambda m: summary[m]["macro"]["ndcg@10"]["mean"])
    ndcg = {m: summary[best]["per_market"][m]["ndcg@10"]["mean"] for m in summary[best]["per_market"]}
    local = {m: summary["local"]["per_market"][m]["ndcg@10"]["mean"] for m in ndcg}
    macro = summary[best]["macro"]["ndcg@10"]["mean"]
    references = {}  # macro NDCG@10 relative to each reference run beside
    for reference in ("pooled", "pooled-ials", "implicit-pooled", "implicit-local"):
        if reference in summary:
            references[f"macro_relative_to_{reference}"] = macro / summary[reference]["macro"]["ndcg@10"]["mean"]
    return {
        "best_federated_method": best,
        "markets_at_least_local": sorted(m for m in ndcg if ndcg[m] >= local[m]),
        "markets_below_local": sorted(m for m in ndcg if ndcg[m] < local[m]),
        "macro_ndcg@10": macro,
        "markets_at_or_above_published": sorted(
            m for m in ndcg if m in PUBLISHED_BEST and ndcg[m] >= PUBLISHED_BEST[m]
        ),
        **references,
    }


def quality(args: argparse.Namespace) -> dict[str, Any]:
    """Every method on the same splits for ``args.num_seeds`` seeds from ``args.seed`` on."""
    runs = []
    seeds = range(args.seed, args.seed + args.num_seeds)
    for number, seed in enumerate(over(seeds, len(seeds), "quality", "run"), start=1):
        say(f"=== seed {seed} ({number} of {args.num_seeds}) ===")
        argv = [
            "--data-dir",
            args.data_dir,
            "--synthetic-markets",
            str(args.synthetic_markets),
            "--methods",
            args.methods,
            "--seed",
            str(seed),
            "--out",
            str(args.out / f"seed{seed}"),
        ]
        if args.num_server_rounds is not None:
            argv += ["--num-server-rounds", str(args.num_server_rounds)]
        if args.verbose:
            argv.append("--verbose")
        runs.append(harness.main(argv))
    summary = aggregate_seeds(runs)
    federated = [m for m in summary if m not in BASELINES]  # federated methods and their selection
    fed_round_seconds = [e["seconds"] for run in runs for e in run["rounds"]]
    local_round_seconds = [run["methods"]["local"]["seconds"] / run["config"]["num_server_rounds"] for run in runs]
    overhead = {
        "federated_seconds_per_round": statistics.fmean(fed_round_seconds),
        "local_training_seconds_per_round_without_flower": statistics.fmean(local_round_seconds),
    }
    overhead["ratio"] = (
        overhead["federated_seconds_per_round"] / overhead["local_training_seconds_per_round_without_flower"]
    )
    report = {
        "config": {
            "data_dir": args.data_dir,
            "seed": args.seed,
            "num_seeds": args.num_seeds,
            "methods": args.methods,
            "num_server_rounds": args.num_server_rounds,
        },
        "summary": summary,
        "acceptance": acceptance(summary, federated),
        "overhead": overhead,
        "published": {
            "best_per_market": PUBLISHED_BEST,
            "best_macro": PUBLISHED_BEST_MACRO,
            "single_market_nmf_macro": PUBLISHED_SINGLE_MARKET_NMF_MACRO,
        },
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    tables = quality_table(summary, "ndcg@10") + "\n\n" + quality_table(summary, "hr@10")
    (args.out / "quality.md").write_text(tables + "\n", encoding="utf-8")
    print("\n" + tables)
    print("\nacceptance:", json.dumps(report["acceptance"], indent=1))
    print("overhead:", json.dumps(overhead, indent=1))
    return report


def dp_step(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of a DP-SGD step (Opacus, ghost clipping) against a non-private step.

    Same model, same batch, same optimiser. The DP-SGD step is timed twice: with
    the project's norm samplers (:mod:`common.privacy.ghost_norms`) and with
    Opacus's own, as the baseline they replace. The three are timed in
    alternating blocks so that machine noise hits them alike, and the median
    ratios are kept.
    """
    source = MarketSource(args.data_dir, args.synthetic_markets, 0)
    catalog = source.catalog()
    market = args.market or source.markets[0]
    data = MarketTensors.from_split(load_split(source, market, catalog), 50)
    # One example is one user with up to user-positives of their items (user-level DP-SGD).
    batch = torch.arange(min(args.dp_batch_size, privacy_units(data)))
    inputs, target = user_batch_inputs(data, batch, args.dp_user_positives, 8, torch.Generator().manual_seed(0))

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = SplitRecommender(ModelConfig(catalog.size, data.split.num_users, args.embedding_dim, 50))
        return model, torch.optim.Adam(model.parameters(), lr=0.005)

    plain_model, plain_optimizer = build()
    plain_loss = UserSoftmaxLoss()
    model, optimizer = build()
    model.train()
    loader = DataLoader(TensorDataset(batch), batch_size=len(batch))
    register_norm_samplers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private_model, private_optimizer, private_loss, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=UserSoftmaxLoss(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="ghost",
            noise_generator=dp_generator(),
        )
    private_optimizer.secure_mode = True  # as common.privacy.dp_sgd draws its noise: four Gaussians per draw
    # Opacus looks the norm sampler up on every backward pass, so swapping the
    # registry entry switches the private step between the two implementations.
    norm_samplers = GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    samplers = {
        "project": {
            CatalogEmbedding: norm_samplers[CatalogEmbedding],
            PositionwiseLinear: norm_samplers[PositionwiseLinear],
        },
        "opacus": {CatalogEmbedding: compute_embedding_norm_sample, PositionwiseLinear: compute_linear_norm_sample},
    }

    def timed(step_model: nn.Module, step_optimizer: torch.optim.Optimizer, loss_fn: Any) -> float:
        started = time.perf_counter()
        for _ in range(args.steps):
            loss = loss_fn(step_model(*inputs), target)
            step_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step_optimizer.step()
        return (time.perf_counter() - started) / args.steps

    def timed_private(norms: str) -> float:
        norm_samplers.update(samplers[norms])
        return timed(private_model, private_optimizer, private_loss)

    seconds: dict[str, list[float]] = {"non-private": [], "dp-sgd": [], "dp-sgd-opacus-norms": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed(plain_model, plain_optimizer, plain_loss)  # warm-up
        timed_private("opacus")
        timed_private("project")
        for block in range(args.repeats):
            print(f"block {block + 1}/{args.repeats}", flush=True)
            seconds["non-private"].append(timed(plain_model, plain_optimizer, plain_loss))
            seconds["dp-sgd"].append(timed_private("project"))
            seconds["dp-sgd-opacus-norms"].append(timed_private("opacus"))
    norm_samplers.update(samplers["project"])
    ratios = [private / plain for private, plain in zip(seconds["dp-sgd"], seconds["non-private"], strict=True)]
    opacus_ratios = [
        private / plain for private, plain in zip(seconds["dp-sgd-opacus-norms"], seconds["non-private"], strict=True)
    ]
    report = {
        "market": market,
        "batch_users": len(batch),
        "batch_interactions": int(target.sum()),
        "embedding_dim": args.embedding_dim,
        "catalog_rows": catalog.size,
        "non_private_step_seconds": statistics.median(seconds["non-private"]),
        "dp_sgd_step_seconds": statistics.median(seconds["dp-sgd"]),
        "dp_sgd_opacus_norms_step_seconds": statistics.median(seconds["dp-sgd-opacus-norms"]),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "opacus_norms_ratio_median": statistics.median(opacus_ratios),
        "opacus_norms_ratios": opacus_ratios,
    }
    print(json.dumps(report, indent=1))
    print(
        f"\nDP-SGD step / non-private step: {report['ratio_median']:.2f}x "
        f"(with Opacus's own norm samplers: {report['opacus_norms_ratio_median']:.2f}x)"
    )
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The sub-command and its options."""
    parser = ArgumentParser(
        prog="python -m simulations.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    quality_parser = commands.add_parser(
        "quality", help="all methods, several seeds, mean ± std beside published numbers"
    )
    quality_parser.add_argument(
        "--data-dir", default="", help="one interaction file per market (default: generated markets)"
    )
    quality_parser.add_argument(
        "--synthetic-markets", type=int, default=6, help="generated markets without --data-dir (default: %(default)s)"
    )
    quality_parser.add_argument(
        "--num-server-rounds",
        type=int,
        default=None,
        help=f"federated rounds (default: {harness.app_defaults()['num-server-rounds']}, "
        "num-server-rounds of the app config)",
    )
    quality_parser.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    quality_parser.add_argument(
        "--num-seeds",
        type=int,
        default=3,
        help="seeds from --seed on, each a run of every method (default: %(default)s)",
    )
    quality_parser.add_argument("--methods", default=ALL_METHODS, help="comma-separated (default: %(default)s)")
    quality_parser.add_argument(
        "--out", type=Path, default=Path("outputs/quality"), help="output directory (default: %(default)s)"
    )
    add_verbose(quality_parser, "every run's per-market lines")
    add_alias(quality_parser, "--rounds", "--num-server-rounds")
    add_alias(quality_parser, "--seeds", "--num-seeds")
    scale_benchmark.add_arguments(
        commands.add_parser(
            "scale", help="many generated markets over a large catalog: seconds and bytes per round, peak memory"
        )
    )
    dp_parser = commands.add_parser("dp-step", help="seconds of a DP-SGD step against a non-private step")
    dp_parser.add_argument("--data-dir", default="", help="market files (default: generated markets)")
    dp_parser.add_argument(
        "--synthetic-markets", type=int, default=3, help="generated markets without --data-dir (default: %(default)s)"
    )
    dp_parser.add_argument("--market", default="", help="market whose data forms the batch (default: the first)")
    dp_parser.add_argument("--dp-batch-size", type=int, default=256, help="users in the batch (default: %(default)s)")
    dp_parser.add_argument(
        "--dp-user-positives", type=int, default=16, help="training items per user (default: %(default)s)"
    )
    dp_parser.add_argument("--embedding-dim", type=int, default=128, help="model width (default: %(default)s)")
    dp_parser.add_argument("--steps", type=int, default=20, help="steps per timed block (default: %(default)s)")
    dp_parser.add_argument("--repeats", type=int, default=5, help="alternating timed blocks (default: %(default)s)")
    add_alias(dp_parser, "--batch-size", "--dp-batch-size")
    add_alias(dp_parser, "--user-positives", "--dp-user-positives")
    join_benchmark.add_arguments(
        commands.add_parser(
            "join", help="a market joining late against training alone, by the share of its users it has"
        )
    )
    continue_benchmark.add_arguments(
        commands.add_parser(
            "continue", help="continuing on grown data from the saved models against a training from scratch"
        )
    )
    refit_benchmark.add_arguments(
        commands.add_parser(
            "refit", help="fedals served without and with a refit on all data, ranking each user's next interaction"
        )
    )
    latency.add_arguments(
        commands.add_parser("latency", help="seconds per round of a real 3-region deployment, before and after")
    )
    users_sweep.add_arguments(
        commands.add_parser(
            "dp-users", help="DP quality as a fraction of non-private against users per market: where 90%% is reached"
        )
    )
    attacks.add_arguments(
        commands.add_parser(
            "attacks", help="the attacks on a region's privacy, against the real ClientApp: attacks.json and a table"
        )
    )
    serving_benchmark.add_arguments(
        commands.add_parser("serving", help="recommend --all over a generated market against matmul + argpartition")
    )
    dims.add_arguments(
        commands.add_parser("dims", help="fedals at several factor dimensions: quality, seconds, bytes per interaction")
    )
    args = parser.parse_args(argv)
    if args.command == "quality":
        if args.num_seeds < 1:
            quality_parser.error(f"--num-seeds must be at least 1, got {args.num_seeds}")
        if not comma_list(args.methods):
            quality_parser.error("--methods needs at least one method")
    return args


def main(argv: list[str] | None = None) -> Any:
    """Parse the benchmark's sub-command and run it; returns its report."""
    args = parse_args(argv)
    return {
        "quality": quality,
        "scale": scale_benchmark.scale,
        "dp-step": dp_step,
        "join": join_benchmark.join,
        "continue": continue_benchmark.run,
        "refit": refit_benchmark.run,
        "latency": latency.latency,
        "dp-users": users_sweep.sweep,
        "attacks": attacks.run,
        "serving": serving_benchmark.serving,
        "dims": dims.run,
    }[args.command](args)


if __name__ == "__main__":
    exit_cleanly_on_sigterm()
    run_command(main)
