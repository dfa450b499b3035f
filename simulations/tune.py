"""Federated tuning: search fedals' settings with Optuna, each trial a federated training.

A company whose regions may not pool data cannot tune the way the als-* defaults were found
(a grid over every market's data pooled in one process, :mod:`simulations.benchmarks.ials_tuning`).
Here every trial is an ordinary fedals training through the harness (:mod:`simulations.run`):
the markets train as in any run, each picks its best round on its own validation interactions,
and the tuner reads only the per-market validation NDCG@10 the markets report. Optuna's TPE
sampler proposes the next settings from the trials so far; the first trial is the app's
defaults, so the search never ends below them on validation. Test NDCG@10 is recorded beside
each trial for the report and never steers the search.

Usage::

    xmfl tune --data-dir DIR --method fedals --trials 30 --out OUT

writes ``OUT/tune.json`` (``{"trials": [...], "best": {"settings", "val-ndcg@10", "test-ndcg@10"}}``),
``OUT/best-settings.txt`` (the best settings as a ``--set`` line for ``xmfl simulate``),
``OUT/best-config.toml`` (the same as a run-config file, for ``flwr run . --run-config FILE``),
``OUT/tune.png`` (each trial's validation NDCG@10 and the best so far) and each trial's run
under ``OUT/trials/<n>``. Trials are stored in ``OUT/tune.db`` (Optuna's SQLite storage), so an
interrupted search resumes where it stopped.

Differential privacy: a trial's released metrics are computed on the markets' users, and no
budget accounts for them, so the tuner refuses DP settings rather than release unaccounted
metrics (tune on data without a DP requirement, or with the budget a region spends on tuning
written into its plan). Written by hand only in the glue: the search is Optuna's.
"""

import argparse
import contextlib
import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: tuning runs on machines without a screen
import matplotlib.pyplot as plt
import tomli_w

from common.runtime.command import ArgumentParser, UserError, run_command
from common.selection import best_by
from simulations import run as harness
from simulations.progress import say

TUNABLE_METHODS = ("fedals",)  # methods with a search space below


@dataclass(frozen=True)
class SearchSpace:
    """The settings a trial draws, with their ranges (the als-* keys of the app config)."""

    factors: tuple[int, ...] = (32, 64, 128, 256)  # d, the factor dimension
    regularization: tuple[float, float] = (0.5, 100.0)  # λ, log-uniform
    alpha: tuple[float, float] = (3.0, 3000.0)  # α, log-uniform
    nu: tuple[float, float] = (0.0, 1.5)  # ν, uniform
    confidence: tuple[str, ...] = ("binary", "rating", "log")  # w of a positive
    rounds: tuple[int, int] = (4, 20)  # server rounds; each market serves its best on validation


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """One trial's settings, keyed as the app config (``num-server-rounds`` among them)."""
    return {
        "als-factors": trial.suggest_categorical("als-factors", list(space.factors)),
        "als-regularization": trial.suggest_float("als-regularization", *space.regularization, log=True),
        "als-alpha": trial.suggest_float("als-alpha", *space.alpha, log=True),
        "als-nu": trial.suggest_float("als-nu", *space.nu),
        "als-confidence": trial.suggest_categorical("als-confidence", list(space.confidence)),
        "num-server-rounds": trial.suggest_int("num-server-rounds", *space.rounds),
    }


def default_settings(defaults: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """The app's defaults as a trial, clipped into the search space."""
    low, high = space.rounds
    return {
        "als-factors": defaults["als-factors"],
        "als-regularization": float(defaults["als-regularization"]),
        "als-alpha": float(defaults["als-alpha"]),
        "als-nu": float(defaults["als-nu"]),
        "als-confidence": defaults["als-confidence"],
        "num-server-rounds": min(max(int(defaults["num-server-rounds"]), low), high),
    }


def trial_scores(results: dict[str, Any], method: str) -> dict[str, Any]:
    """Macro validation and test NDCG@10 of one trial, from the markets' best rounds on validation."""
    per_market = results["methods"][method]["per_market"]
    if not per_market:
        raise RuntimeError("no market reported a validation metric")
    return {
        "val-ndcg@10": sum(m["val-ndcg@10"] for m in per_market.values()) / len(per_market),
        "test-ndcg@10": sum(m["ndcg@10"] for m in per_market.values()) / len(per_market),
        "markets": {name: {"val-ndcg@10": m["val-ndcg@10"], "round": m["round"]} for name, m in per_market.items()},
    }


def set_line(settings: dict[str, Any]) -> str:
    """The settings as ``xmfl simulate`` options."""
    parts = []
    for key, value in settings.items():
        parts.append(f"--{key} {value}" if key == "num-server-rounds" else f"--set {key}={value}")
    return " ".join(shlex.quote(p) if " " not in p else p for p in parts)


def config_file(settings: dict[str, Any]) -> str:
    """The settings as a TOML run-config file (``flwr run . --run-config FILE``)."""
    return "# settings chosen by xmfl tune on the markets' validation NDCG@10\n" + tomli_w.dumps(settings)


def plot_search(trials: list[dict[str, Any]], path: Path) -> None:
    """Each complete trial's validation NDCG@10 and the best so far."""
    done = [t for t in trials if t["state"] == "COMPLETE"]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    numbers = [t["number"] for t in done]
    values = [t["val-ndcg@10"] for t in done]
    best = [max(values[: i + 1]) for i in range(len(values))]
    axes.scatter(numbers, values, s=14, label="trial")
    axes.step(numbers, best, where="post", color="C1", label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel("macro validation NDCG@10")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = ArgumentParser(
        prog="python -m simulations.tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", default="", help="one interaction file per market (default: none, generated markets)"
    )
    parser.add_argument(
        "--synthetic-markets",
        type=int,
        default=harness.app_defaults()["synthetic-markets"],
        help="markets to generate when no --data-dir is given (default: %(default)s)",
    )
    parser.add_argument("--method", default="fedals", choices=TUNABLE_METHODS, help="method (default: %(default)s)")
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=SearchSpace().rounds[1],
        help="most server rounds a trial may draw; a trial draws from min(4, this) up (default: %(default)s)",
    )
    parser.add_argument(
        "--trials", type=int, default=30, help="trials in all, resumed and failed ones included (default: 30)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the data, the trainings and the sampler (default: 0)"
    )
    harness.add_min_buyers(parser)
    parser.add_argument(
        "--set",
        dest="fixed",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an app-config setting every trial keeps (not a searched one); repeatable (default: none)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/tune"), help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show every trial's tables (default: off, in OUT/trials/<n>/log.txt)"
    )
    args = parser.parse_args(argv)
    if args.trials < 1 or args.max_rounds < 1:
        parser.error("--trials and --max-rounds must be at least 1")
    for assignment in args.fixed:
        key = assignment.split("=", 1)[0]
        if key.startswith("dp-") or key.startswith("market-dp-"):
            parser.error(
                f"--set {key}: tuning releases every trial's validation metrics, which no DP budget accounts "
                "for; tune without DP"
            )
        if key in suggest_keys():
            parser.error(f"--set {key}: {key} is searched; leave it to the tuner")
    return args


def suggest_keys() -> tuple[str, ...]:
    """The app-config keys a trial sets."""
    return tuple(default_settings(harness.app_defaults(), SearchSpace()))


def run_trial(args: argparse.Namespace, number: int, settings: dict[str, Any]) -> dict[str, Any]:
    """One federated training at ``settings``; its scores."""
    out = args.out / "trials" / f"{number:03d}"
    argv = [
        *harness.data_options(args),
        "--methods",
        args.method,
        "--seed",
        str(args.seed),
        "--out",
        str(out),
        "--num-server-rounds",
        str(settings["num-server-rounds"]),
        *(["--verbose"] if args.verbose else []),
    ]
    for key, value in settings.items():
        if key != "num-server-rounds":
            argv += ["--set", f"{key}={value}"]
    for assignment in args.fixed:
        argv += ["--set", assignment]
    out.mkdir(parents=True, exist_ok=True)
    if args.verbose:
        results = harness.main(argv)
    else:  # the trial's tables and lines go to its log; the tuner prints one line per trial
        with open(out / "log.txt", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            results = harness.main(argv)
    return trial_scores(results, args.method)


def tune(args: argparse.Namespace) -> dict[str, Any]:
    """Run the search; returns tune.json's content."""
    import optuna

    args.out.mkdir(parents=True, exist_ok=True)
    space = SearchSpace(rounds=(min(4, args.max_rounds), args.max_rounds))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=f"{args.method}-seed{args.seed}",
        storage=f"sqlite:///{args.out / 'tune.db'}",
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=args.seed),
    )
    # A resumed search draws on from a stream of its own: the seed alone would repeat the first
    # trials' random draws (TPE samples at random until it has 10 complete trials).
    study.sampler = optuna.samplers.TPESampler(seed=args.seed + len(study.trials))
    problem = search_problem(args)
    if study.user_attrs.get("problem", problem) != problem:
        raise UserError(
            f"{args.out / 'tune.db'} holds a search of other data or settings ({study.user_attrs['problem']}); "
            "give this search another --out"
        )
    study.set_user_attr("problem", problem)
    defaults = default_settings(harness.app_defaults(), space)
    if not any(t.params == defaults for t in study.trials if t.state != optuna.trial.TrialState.FAIL):
        study.enqueue_trial(defaults)  # the first trial (again, if it failed): the search never ends below it
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # A trial left running by an interrupted search: failed, and the search goes on.
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    started = time.perf_counter()
    remaining = args.trials - len([t for t in study.trials if t.state.is_finished()])

    def objective(trial: Any) -> float:
        settings = suggest(trial, space)
        begun = time.perf_counter()
        say(f"== trial {trial.number}: {set_line(settings)} ==")
        scores = trial_scores_or_fail(args, trial.number, settings)
        trial.set_user_attr("test-ndcg@10", scores["test-ndcg@10"])
        trial.set_user_attr("markets", scores["markets"])
        trial.set_user_attr("seconds", time.perf_counter() - begun)
        done = len([t for t in study.trials if t.state.is_finished()]) + 1
        left = args.trials - done
        per_trial = (time.perf_counter() - started) / max(1, done - (args.trials - remaining))
        say(
            f"trial {trial.number}: validation {scores['val-ndcg@10']:.4f} "
            f"(best {max(scores['val-ndcg@10'], _best_value(study)):.4f}); "
            f"{done}/{args.trials} done, ETA {left * per_trial / 60:.0f} min"
        )
        return scores["val-ndcg@10"]

    if remaining > 0:
        # A training that fails (a market's error, a timeout: the harness's RuntimeError and
        # FlowerRunError) fails its trial, not the search.
        study.optimize(objective, n_trials=remaining, catch=(RuntimeError, ValueError, MemoryError))
    report = tune_report(study)
    best = report["best"]
    (args.out / "tune.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    fixed = harness.parse_app_config(args.fixed, harness.app_defaults(), reserved=set())  # typed as the app's
    node = f" --als-min-buyers {args.als_min_buyers}" if args.als_min_buyers is not None else ""
    line = set_line({**best["settings"], **fixed}) + node  # what every trial also ran with
    (args.out / "best-settings.txt").write_text(line + "\n", encoding="utf-8")
    (args.out / "best-config.toml").write_text(config_file({**best["settings"], **fixed}), encoding="utf-8")
    plot_search(report["trials"], args.out / "tune.png")
    say(
        f"best of {len(report['trials'])} trials (trial {best['number']}): validation {best['val-ndcg@10']:.4f}, "
        f"test {best['test-ndcg@10']:.4f}\n  xmfl simulate ... {set_line(best['settings'])}\n"
        f"Wrote {args.out / 'tune.json'}, best-settings.txt, best-config.toml and tune.png"
    )
    return report


def search_problem(args: argparse.Namespace) -> dict[str, Any]:
    """What a search's trials are scored on: a resumed search must be the same problem."""
    return {
        "data-dir": str(args.data_dir),
        "synthetic-markets": args.synthetic_markets if not args.data_dir else None,
        "method": args.method,
        "seed": args.seed,
        "max-rounds": args.max_rounds,
        "als-min-buyers": args.als_min_buyers,
        "set": sorted(args.fixed),
    }


def trial_scores_or_fail(args: argparse.Namespace, number: int, settings: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_trial`, with a failed training named in one line (Optuna records the trial as failed)."""
    try:
        return run_trial(args, number, settings)
    except SystemExit as err:  # the harness refused the settings (argparse)
        raise UserError(f"trial {number} could not start with {set_line(settings)} (exit status {err.code})") from err


def _best_value(study: Any) -> float:
    values = [t.value for t in study.trials if t.value is not None]
    return max(values) if values else -math.inf


def tune_report(study: Any) -> dict[str, Any]:
    """tune.json: every trial, and the best on validation (the first of equals)."""
    trials = []
    for trial in study.trials:
        settings = dict(trial.params)
        trials.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "settings": settings,
                "val-ndcg@10": trial.value,
                "test-ndcg@10": trial.user_attrs.get("test-ndcg@10"),
                "seconds": trial.user_attrs.get("seconds"),
                "markets": trial.user_attrs.get("markets"),
            }
        )
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    if not complete:
        raise UserError("no trial completed; see the errors above")
    best = best_by(complete, lambda t: t["val-ndcg@10"])
    return {
        "trials": trials,
        "best": {
            "number": best["number"],
            "settings": best["settings"],
            "val-ndcg@10": best["val-ndcg@10"],
            "test-ndcg@10": best["test-ndcg@10"],
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``xmfl tune``."""
    return tune(parse_args(argv))


if __name__ == "__main__":
    run_command(main)
