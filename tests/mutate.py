"""Mutation check: does each one-line break of the privacy machinery fail its tests?

For every mutation below, copies the repository's tracked files (their
working-tree contents) to a temporary directory, replaces ``old`` by ``new``
in ``file`` (the target must occur exactly once: the code may have moved, and
the table must then be updated, not silently skipped), runs ``tests`` there,
and reports "caught" when they fail and "SURVIVED" when they pass.

Usage::

    .venv/bin/python tests/mutate.py                 # every mutation
    .venv/bin/python tests/mutate.py --only "noise off" --only "clipping off"
    .venv/bin/python tests/mutate.py --baseline      # also: the tests pass unmutated
    .venv/bin/python tests/mutate.py --list

Exits non-zero if a mutation survived, a target was not found exactly once,
or (with ``--baseline``) the tests fail on unmutated code.

The packages are installed editable from the main checkout, so each run puts
the copy first on ``PYTHONPATH`` and checks, before running pytest, that the
copy's ``common``, ``clients``, ``server`` and ``simulations`` are the ones
imported. Not collected by pytest (no ``test_`` prefix).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DP_TESTS = ["tests/common/privacy/test_dp_mechanism.py"]
DP_FEDALS_TESTS = ["tests/common/ials/test_dp_fedals.py", "tests/simulations/attacks/test_region_privacy.py"]
REGION_TESTS = ["tests/simulations/attacks/test_region_privacy.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: list[str]


MUTATIONS = [
    # (a) DP-SGD without noise.
    Mutation(
        "noise off",
        "common/privacy/dp_sgd.py",
        "noise_multiplier=ledger.noise_multiplier,",
        "noise_multiplier=0.0,",
        DP_TESTS,
    ),
    # (b) Noise of the wrong scale: a tenth of what the ledger pays for.
    Mutation(
        "noise wrong",
        "common/privacy/dp_sgd.py",
        "noise_multiplier=ledger.noise_multiplier,",
        "noise_multiplier=ledger.noise_multiplier / 10,",
        DP_TESTS,
    ),
    # (c) No effective clipping.
    Mutation(
        "clipping off",
        "common/privacy/dp_sgd.py",
        "max_grad_norm=ledger.budget.max_grad_norm,",
        "max_grad_norm=1e9,",
        DP_TESTS,
    ),
    # (d) The loader samples at another rate than the ledger records: its batch size...
    Mutation(
        "loader rate differs",
        "common/privacy/dp_sgd.py",
        "sample_rate=rate, generator=sampling)",
        "sample_rate=rate * 2, generator=sampling)",
        DP_TESTS,
    ),
    # ... or the ledger's rate formula differs from Opacus's 1 / ceil(examples / batch).
    Mutation(
        "ledger rate differs",
        "common/privacy/ledger.py",
        "return 1.0 / ceil(num_examples / batch_size)",
        "return batch_size / num_examples",
        DP_TESTS,
    ),
    # (e) Fixed-size batches instead of Poisson sampling, which the accounting assumes.
    Mutation(
        "poisson off",
        "common/privacy/dp_sgd.py",
        "    loader = DPDataLoader(TensorDataset(torch.arange(data.split.num_users)), sample_rate=rate, "
        "generator=sampling)",
        "    loader = torch.utils.data.DataLoader(TensorDataset(torch.arange(data.split.num_users)), "
        "batch_size=config.batch_size); loader.sample_rate = rate",
        DP_TESTS,
    ),
    # DP-SGD's rate, steps and negatives from what the users bought or how many they are.
    Mutation(
        "dp-sgd rate from the exact count",
        "common/privacy/dp_sgd.py",
        "    return data.released_users if data.released_users is not None else data.split.num_users",
        "    return data.split.num_users",
        ["tests/clients/test_private_training.py"],
    ),
    Mutation(
        "dp-sgd negatives from the bought items",
        "common/neural/train.py",
        "    rows = data.public_rows\n",
        "    rows = data.market_items\n",
        ["tests/clients/test_private_training.py"],
    ),
    # The client app: covered by tests/clients/test_client_app.py; its owner adjusts these two. In
    # build_local_model, a market's saved head is no longer restored (the lines moved from
    # clients/client_app.py to clients/local_model.py unchanged).
    # The head a market trained is put back into its model from context.state every round.
    Mutation(
        "restore removed",
        "clients/local_model.py",
        "    if LOCAL_STATE_KEY in context.state:\n"
        "        set_arrays(model, context.state[LOCAL_STATE_KEY].to_torch_state_dict())\n",
        "    if LOCAL_STATE_KEY in context.state:\n        pass  # mutation: the market's saved head is not restored\n",
        ["tests/clients/test_client_privacy.py::test_the_head_a_market_trained_is_the_head_it_evaluates_next_round"],
    ),
    # The one decision every budget check goes through (the client's round, DP-SGD's epochs).
    Mutation(
        "enforcement removed",
        "common/privacy/ledger.py",
        "        return self.epsilon_after(steps, rate) <= self.budget.epsilon",
        "        return True  # mutation: every step is affordable",
        ["tests/clients/test_client_privacy.py::test_a_market_out_of_budget_neither_trains_nor_sends_what_it_trained"],
    ),
    # DP-fedals: what a market releases each round and what it reports.
    Mutation(
        "dp-fedals noise off",
        "common/ials/dp.py",
        "    if noise_multiplier > 0:\n        root_k",
        "    if False:\n        root_k",
        DP_FEDALS_TESTS,
    ),
    Mutation(
        "dp-fedals noise / 10",
        "clients/fedals.py",
        "private_release(market.train, users, rows, entry.ledger.noise_multiplier, generator)",
        "private_release(market.train, users, rows, entry.ledger.noise_multiplier / 10, generator)",
        DP_FEDALS_TESTS,
    ),
    Mutation(
        "dp-fedals per-user bound removed",
        "common/ials/dp.py",
        "weight = np.minimum(1.0, np.sqrt(release.items_per_user / np.maximum(per_user, 1.0)))",
        "weight = np.ones_like(per_user)",
        DP_FEDALS_TESTS,
    ),
    Mutation(
        "dp-fedals pairs not distinct",
        "common/ials/dp.py",
        "pairs = np.unique(users[inside] * max(len(rows), 1) + position[inside])",
        "pairs = users[inside] * max(len(rows), 1) + position[inside]",
        DP_FEDALS_TESTS,
    ),
    Mutation(
        "dp-fedals ledger record skipped",
        "clients/fedals.py",
        "            entry.ledger.record(1)\n",
        "            pass  # mutation: the release is not recorded\n",
        DP_FEDALS_TESTS,
    ),
    Mutation(
        "metrics sent exact under DP",
        "clients/messages.py",
        "        kept = {key: value for key, value in metrics.items() if key in DP_REPORTED}",
        "        kept = dict(metrics)",
        REGION_TESTS,
    ),
    Mutation(
        "seeded noise from the run config",
        "clients/privacy_state.py",
        "    return RegionPolicy.from_node_config(node_settings(context), market)",
        "    return RegionPolicy.from_node_config({**context.run_config, **node_settings(context)}, market)",
        REGION_TESTS,
    ),
    Mutation(
        "delta re-read at the run's",
        "clients/privacy_state.py",
        "        candidates.append(entry.ledger.budget.delta)",
        "        pass",
        REGION_TESTS,
    ),
    Mutation(
        "released rows from the data",
        "clients/fedals.py",
        "        rows = public_assortment(policy, catalog)",
        "        rows = split.market_items",
        REGION_TESTS,
    ),
    Mutation(
        "gram unchecked",
        "clients/fedals.py",
        "    if problem := gram_problem(items, gram):",
        "    if False:",
        REGION_TESTS,
    ),
    Mutation(
        "item-rows unchecked",
        "clients/fedals.py",
        "        if problem := item_rows_problem(item_rows, items, catalog.size):",
        "        if False:",
        REGION_TESTS,
    ),
    Mutation(
        "zero rows counted",
        "server/fedals.py",
        "        held = factors.any(axis=1)",
        "        held = np.ones(len(factors), dtype=bool)",
        ["tests/server/test_fedals.py::test_an_item_solved_to_zero_holds_no_factor_and_is_not_counted_in_item_rows"],
    ),
    Mutation(
        "tuning steered by test",
        "simulations/tune.py",
        '        return scores["val-ndcg@10"]',
        '        return scores["test-ndcg@10"]',
        ["tests/simulations/test_tune.py"],
    ),
    Mutation(
        "tuning takes DP settings",
        "simulations/tune.py",
        '        if key.startswith("dp-") or key.startswith("market-dp-"):',
        "        if False:",
        ["tests/simulations/test_tune.py"],
    ),
    Mutation(
        "user blocks misaligned",
        "common/ials/steps.py",
        "            regularization[first:last],",
        "            regularization[: last - first],",
        ["tests/common/ials/test_ials.py"],
    ),
    Mutation(
        "region error reason logged verbatim",
        "server/rounds.py",
        'log(WARNING, "round %d: %s failed: %s", server_round, _name(binding, node), printable(reply.error.reason))',
        'log(WARNING, "round %d: %s failed: %s", server_round, _name(binding, node), reply.error.reason)',
        ["tests/server/test_rounds.py"],
    ),
    Mutation(
        "metric names unchecked",
        "server/replies.py",
        "        if (problem := check_metric_name(key)) is not None:",
        "        if (problem := None) is not None:",
        ["tests/server/test_rounds.py"],
    ),
    Mutation(
        "app-index reads any declared length",
        "deploy/app_index.py",
        "                if not (length.isascii() and length.isdigit()) or int(length) > MAX_REQUEST_BYTES:",
        "                if not length.lstrip('-').isdigit():",
        ["tests/deploy/test_deploy_keys.py"],
    ),
    Mutation(
        "fedals reply decoded before its declared sizes are checked",
        "server/fedals.py",
        "        if not self.private:  # sizes from the declarations first: nothing is decoded before they pass",
        "        if False:",
        [
            "tests/server/test_fedals.py::test_a_reply_declaring_more_than_its_market_may_send_is_refused_before_decoding"
        ],
    ),
    Mutation(
        "fedmedian aggregates as fedavg",
        "server/strategy.py",
        '    "fedmedian": (FedMedian, lambda f, n: {}),',
        '    "fedmedian": (FedAvg, lambda f, n: {}),',
        ["tests/server/test_aggregation.py"],
    ),
    Mutation(
        "resumed tuning repeats its draws",
        "simulations/tune.py",
        "    study.sampler = optuna.samplers.TPESampler(seed=args.seed + len(study.trials))",
        "    study.sampler = optuna.samplers.TPESampler(seed=args.seed)",
        ["tests/simulations/test_tune.py"],
    ),
    Mutation(
        "refusal reasons logged verbatim",
        "server/replies.py",
        "                reason = printable(reason)  # it may quote what the sender declared",
        "                reason = reason",
        ["tests/server/test_rounds.py"],
    ),
    Mutation(
        "npy header not checked",
        "server/fedals.py",
        "                if (problem := npy_header_problem(array.data, array.dtype, tuple(array.shape))) is not None:",
        "                if (problem := None) is not None:",
        [
            "tests/server/test_fedals.py::test_a_reply_declaring_more_than_its_market_may_send_is_refused_before_decoding"
        ],
    ),
    Mutation(
        "robust rules weighted by claimed counts",
        "server/strategy.py",
        "            weighted_by_key=NUM_EXAMPLES_KEY if kind is FedAvg else TRAINED_KEY,",
        "            weighted_by_key=NUM_EXAMPLES_KEY,",
        ["tests/server/test_aggregation.py"],
    ),
    Mutation(
        "trained claims any count",
        "server/replies.py",
        "    if TRAINED_KEY in metrics and metrics[TRAINED_KEY] not in (0, 1):",
        "    if False:",
        ["tests/server/test_rounds.py"],
    ),
    Mutation(
        "the first users evaluated above the cap, not users spread over the market",
        "common/neural/train.py",
        "    evaluated = evenly_spaced(len(eval_set.users), EVALUATED_USERS)  # positions in the evaluation set",
        "    evaluated = np.arange(min(len(eval_set.users), EVALUATED_USERS))",
        ["tests/common/data/test_full_ranking.py"],
    ),
    Mutation(
        "rerank: fedals' rank breaks ties by position (the held-out item is column 0)",
        "common/rerank/features.py",
        "        np.put_along_axis(rank[start : start + RANK_BLOCK], order, above, axis=1)",
        "        rank[start : start + RANK_BLOCK] = np.argsort(np.argsort(-block, axis=1, kind='stable'), axis=1)",
        ["tests/common/rerank/test_features.py"],
    ),
    Mutation(
        "rerank: the test lists' context holds the test items",
        "common/rerank/features.py",
        "    items = np.concatenate([split.train_items, split.valid.candidates[:, 0]])",
        "    items = np.concatenate([split.train_items, split.test.candidates[:, 0]])",
        ["tests/common/rerank/test_features.py"],
    ),
    Mutation(
        "a refit for serving trains on the training interactions only",
        "clients/fedals.py",
        "    interactions = market.everything if _refit(round_config, config, split.market) else market.train",
        "    interactions = market.train",
        ["tests/server/test_refit.py"],
    ),
    Mutation(
        "a refit accepted under DP (the training's rounds spent the budget)",
        "clients/fedals.py",
        "    if refit and config.dp_epsilon > 0:",
        "    if refit and config.dp_epsilon < 0:",
        ["tests/server/test_refit.py"],
    ),
    Mutation(
        "a refit round evaluates the received factors with users solved on the held-out items",
        "clients/fedals.py",
        "    if interactions is not market.train and parse_bool(",
        "    if False and parse_bool(",
        ["tests/server/test_refit.py"],
    ),
    Mutation(
        "rerank: LightGBM sees the held-out item first in every list (it wins every tie)",
        "common/rerank/ranker.py",
        "    order = np.argsort(np.random.default_rng(seed).random((users, candidates)), axis=1)",
        "    order = np.tile(np.arange(candidates), (users, 1))",
        ["tests/common/rerank/test_ranker.py"],
    ),
    Mutation(
        "every user ranked in full",
        "common/neural/train.py",
        "        ranked_in_full[evenly_spaced(len(users), FULL_RANKING_USERS)] = True",
        "        ranked_in_full[:] = True",
        ["tests/common/data/test_full_ranking.py"],
    ),
    Mutation(
        "catalog rows as |I|",
        "common/ials/reference.py",
        "        users = [solve_users(market, items, gram, items.held_rows(), config) for market in markets]",
        "        users = [solve_users(market, items, gram, num_items, config) for market in markets]",
        ["tests/common/ials/test_ials.py"],
    ),
    Mutation(
        "lost ledger unnoticed",
        "clients/state_store.py",
        "            if self.marker.exists():",
        "            if False:",
        REGION_TESTS,
    ),
    Mutation(
        "budget error text sent",
        "clients/messages.py",
        '        return "PrivacyBudgetExceeded: the market\'s privacy budget does not allow this"',
        '        return f"PrivacyBudgetExceeded: {error}"',
        REGION_TESTS,
    ),
    Mutation(
        "run delta above the default",
        "clients/privacy_state.py",
        "    candidates = [default_delta(released_users)]\n"
        "    if config.dp_delta > 0:\n        candidates.append(config.dp_delta)",
        "    candidates = [config.dp_delta if config.dp_delta > 0 else default_delta(released_users)]",
        REGION_TESTS,
    ),
    Mutation(
        "count release unrecorded",
        "clients/privacy_state.py",
        "    releases.append(COUNT_NOISE_MULTIPLIER)\n",
        "    pass  # mutation: the count's release is not recorded\n",
        REGION_TESTS,
    ),
    Mutation(
        "dp-sgd moves the bought rows",
        "common/privacy/dp_sgd.py",
        "    outside[data.public_rows] = False",
        "    outside[data.market_items] = False",
        ["tests/clients/test_private_training.py"],
    ),
    Mutation(
        "fine-tune longer than calibrated",
        "clients/client_app.py",
        "epochs = min(int(round_config.get(FINE_TUNE_EPOCHS_KEY, 0)), config.fine_tune_epochs)",
        "epochs = int(round_config.get(FINE_TUNE_EPOCHS_KEY, 0))",
        ["tests/clients/test_private_training.py"],
    ),
    # fedals without DP: the minimum-buyers rule.
    Mutation(
        "min-buyers rule off",
        "clients/fedals.py",
        "        shared = restricted(market.train, shared_items(market.train, minimum))",
        "        shared = market.train",
        ["tests/simulations/attacks/test_reconstruction.py"],
    ),
    # An out-of-budget market keeps its weight in the average.
    Mutation(
        "out-of-budget weight kept",
        "clients/client_app.py",
        '                loss, examples = float("nan"), 0',
        '                loss = float("nan")  # mutation: the weight stays',
        ["tests/clients/test_client_privacy.py::test_a_market_out_of_budget_neither_trains_nor_sends_what_it_trained"],
    ),
    # FedProx's proximal term would be clipped with the users' gradients under DP-SGD: refused up front.
    Mutation(
        "fedprox under dp accepted",
        "common/run_config.py",
        "if method.proximal_mu and (self.dp_epsilon > 0",
        "if False and (self.dp_epsilon > 0",
        ["tests/common/test_config.py"],
    ),
    # A trainer other than plain training (DP-SGD's) running FedProx's hooks.
    Mutation(
        "fedprox with any trainer",
        "common/methods.py",
        "if method.proximal_mu and train is not None:",
        "if False:",
        ["tests/common/test_methods.py"],
    ),
    Mutation(
        "a checkpoint without fedals' rows and user Gram",
        "server/rounds.py",
        'state["strategy"] = strategy.state_dict()',
        "pass",
        ["tests/server/test_fedals.py"],
    ),
    Mutation(
        "a region keeps every users file a server makes it write",
        "clients/state_store.py",
        "                path.unlink(missing_ok=True)",
        "                pass",
        ["tests/server/test_fedals.py"],
    ),
    Mutation(
        "a region uses users solved on other data",
        "clients/state_store.py",
        "            if same and not same_data:",
        "            if False:",
        ["tests/server/test_fedals.py"],
    ),
    Mutation(
        "a fresh region context without its kept users",
        "clients/state_store.py",
        "            elif same:\n                return users, skipped",
        "            elif False:\n                return users, skipped",
        ["tests/server/test_fedals.py"],
    ),
    # A run-config path on the server host that leads outside XMFL_SERVER_ROOT is accepted.
    Mutation(
        "paths unconfined",
        "server/paths.py",
        "        if path != root and root not in path.parents:",
        "        if False:",
        ["tests/server/test_paths.py"],
    ),
    # Two ServerApps train in one out-dir at once: the lock does not exclude.
    Mutation(
        "out-dir not locked",
        "server/paths.py",
        "fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "pass",
        ["tests/server/test_paths.py"],
    ),
    # A deployed region warm-starts a new training from whatever head it saved last.
    Mutation(
        "new training warm-started",
        "clients/local_model.py",
        "saved = store.load_training(continues, latest) if continues else None",
        "saved = latest",
        ["tests/clients/test_client_app.py"],
    ),
    # A training's end removes the model the region serves.
    Mutation(
        "current model pruned",
        "clients/served.py",
        "if path.resolve() != served][",
        "if True][",
        ["tests/clients/test_models.py"],
    ),
    # A served model's manifest may claim any number of items: the model is allocated from it.
    Mutation(
        "served model sizes unchecked",
        "common/serving/checks.py",
        'if sizes["num_items"] != catalog_rows or sizes["num_users"] != users:',
        "if False:",
        ["tests/common/serving/test_checks.py"],
    ),
    # A served model's history offsets may descend.
    Mutation(
        "history offsets unchecked",
        "common/serving/checks.py",
        "if len(offsets) == 0 or offsets[0] != 0 or (np.diff(offsets) < 0).any():",
        "if False:",
        ["tests/common/serving/test_checks.py"],
    ),
    Mutation(
        "packed item step drops each block's last item",
        "common/ials/packed.py",
        "            start, stop = np.searchsorted(part.items, [low, high + 1])",
        "            start, stop = np.searchsorted(part.items, [low, high])",
        ["tests/common/ials/test_packed.py"],
    ),
    Mutation(
        "Cholesky factor not transposed",
        "common/ials/kernels.py",
        "            return np.linalg.cholesky(block.transpose(0, 2, 1) @ block).transpose(0, 2, 1)",
        "            return np.linalg.cholesky(block.transpose(0, 2, 1) @ block)",
        ["tests/common/ials/test_ials.py"],
    ),
    Mutation(
        "full ranking's columns of other users",
        "common/neural/train.py",
        "        full_ranks.append(full_rank_of_positive(all_scores.numpy(), positives[at], excluded[at]))",
        "        full_ranks.append(full_rank_of_positive(all_scores.numpy(), positives[at[::-1]], excluded[at]))",
        ["tests/common/data/test_full_ranking.py", "tests/server/test_fedals.py"],
    ),
    Mutation(
        "history means of the wrong block",
        "common/ials/model.py",
        "        means[start : start + len(rows)] = (total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)).numpy()",
        "        means[: len(rows)] = (total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)).numpy()",
        ["tests/common/ials/test_model.py"],
    ),
    Mutation(
        "Cholesky's rounding pivots trusted",
        "common/ials/kernels.py",
        "    if doubtful.any():",
        "    if False:",
        ["tests/common/ials/test_ials.py"],
    ),
    Mutation(
        "DP releases viewed unscreened",
        "server/fedals.py",
        "array.numpy() if self.private else npy_view(array.data)",
        "npy_view(array.data)",
        ["tests/server/test_fedals.py"],
    ),
]

IMPORT_CHECK = (
    "import sys, common, clients, server, simulations\n"
    "from pathlib import Path\n"
    "root = Path(sys.argv[1]).resolve()\n"
    "for module in (common, clients, server, simulations):\n"
    "    where = Path(module.__file__).resolve()\n"
    "    if root not in where.parents:\n"
    "        sys.exit(f'{module.__name__} imported from {where}, not from the copy {root}')\n"
    "print(common.__file__)\n"
)


class TargetNotFound(RuntimeError):
    """A mutation's ``old`` text is not in its file exactly once."""


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True)
    return [path for path in listed.stdout.split("\0") if path]


def copy_repository(destination: Path, extra: list[str]) -> None:
    """Working-tree contents of the tracked files, plus ``extra`` (tests not yet committed)."""
    for path in dict.fromkeys(tracked_files() + extra):
        source = ROOT / path
        if not source.is_file():  # deleted in the working tree
            continue
        target = destination / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def apply(mutation: Mutation, copy: Path) -> None:
    path = copy / mutation.file
    text = path.read_text(encoding="utf-8")
    count = text.count(mutation.old)
    if count != 1:
        raise TargetNotFound(
            f"mutation '{mutation.name}': {mutation.file} holds its target {count} times, not once:\n"
            f"{mutation.old!r}\nUpdate the table in tests/mutate.py."
        )
    path.write_text(text.replace(mutation.old, mutation.new), encoding="utf-8")


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_tests(tests: list[str], copy: Path, verbose: bool, keep_going: bool = False) -> tuple[bool, str]:
    """Whether ``tests`` pass in ``copy``, and pytest's last lines."""
    env = environment(copy)
    check = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, str(copy)], cwd=copy, env=env, capture_output=True, text=True
    )
    if check.returncode != 0:
        raise RuntimeError(f"the copy's packages are not the ones imported: {check.stdout}{check.stderr}")
    stop = [] if keep_going else ["-x"]
    result = subprocess.run(
        # -n 0: one process, so that -x stops at the first failure (under xdist it ends as "interrupted", status 2)
        [sys.executable, "-m", "pytest", *stop, "-n", "0", "-q", "-p", "no:cacheprovider", *tests],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    if verbose:
        print(output)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line.strip() for line in lines if line.startswith("E ")][:1]  # why the first test failed
    summary = [line for line in lines if line.startswith(("FAILED", "ERROR"))] + errors + lines[-1:]
    if result.returncode not in (0, 1):  # 2-5: interrupted, internal error, usage error, no tests
        raise RuntimeError(f"pytest exited with {result.returncode}:\n{output}")
    return result.returncode == 0, "\n".join(summary)


def run(mutation: Mutation | None, tests: list[str], verbose: bool, keep_going: bool = False) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="mutate-") as directory:
        copy = Path(directory)
        copy_repository(copy, tests)
        if mutation is not None:
            apply(mutation, copy)
        return run_tests(tests, copy, verbose, keep_going)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    parser.add_argument("--baseline", action="store_true", help="first check the tests pass without mutation")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--verbose", action="store_true", help="print pytest's whole output")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="run every test of a mutation (no -x): shows each test that catches it",
    )
    args = parser.parse_args(argv)
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name:22} {mutation.file:26} {' '.join(mutation.tests)}")
        return 0
    names = {mutation.name for mutation in MUTATIONS}
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        parser.error(f"unknown mutations {unknown}; choose from {sorted(names)}")
    chosen = [mutation for mutation in MUTATIONS if not args.only or mutation.name in args.only]
    failed = False
    if args.baseline:
        tests = list(dict.fromkeys(test for mutation in chosen for test in mutation.tests))
        started = time.perf_counter()
        passed, summary = run(None, tests, args.verbose, args.keep_going)
        print(
            f"{'baseline':22} {'passes' if passed else 'FAILS'} ({time.perf_counter() - started:.0f} s)"
            f"  [{' '.join(tests)}]"
        )
        if not passed:
            print(summary)
            failed = True
    for mutation in chosen:
        started = time.perf_counter()
        try:
            passed, summary = run(mutation, mutation.tests, args.verbose, args.keep_going)
        except TargetNotFound as error:
            print(f"{mutation.name:22} ERROR: {error}")
            failed = True
            continue
        verdict = "SURVIVED" if passed else "caught"
        print(
            f"{mutation.name:22} {verdict} ({time.perf_counter() - started:.0f} s)"
            f"  {mutation.file}: {mutation.old.strip().splitlines()[-1].strip()!r}"
            f" -> {mutation.new.strip().splitlines()[-1].strip()!r}"
        )
        if passed:
            failed = True
        elif not args.verbose:
            print("\n".join("    " + line[:160] for line in summary.splitlines()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
