"""Serving a large market: ``recommend --all`` against a plain matrix product and ``argpartition``.

    python -m simulations.benchmark serving --users 10000 --items 1000000 --dim 128 --out OUT
    python -m simulations.benchmark serving --users 1000 --items 100000 --pairs 10000000 --out OUT

Generates a served model of the given size (a catalog of ``--items`` products plus 64 overflow
rows, the market selling all of them; each user with ``--history`` bought items, then a
validation and a test item; random parameters), then, in the same run:

* runs ``python -m clients.recommend --model OUT/model --all`` as its own process, its peak
  resident memory sampled every 20 ms in a thread (the kernel's high-water mark, and psutil's RSS); its
  users per second are those the command prints: users ranked **and written** per second of
  its batch loop (loading the model excluded). Timed there: each user's vector from their
  history, the scores with the item biases, what the user bought set to ``-inf``, the top K
  (NaN ranked last), the rows formatted and written;
* the reference, in this process: the same users' vectors and the same item vectors (what the
  command ranks with, made beforehand and not timed), ``users @ items.T`` in batches of the same
  size and ``numpy.argpartition`` with the K sorted: no bias, no history, no output;
* with ``--pairs``, ``python -m clients.score`` on that many random pairs (1% of their items
  unknown to the catalog), its pairs per second and peak memory likewise.

It writes ``OUT/serving.json`` with both rates, their ratio and the peak memories, and
prints them. The model and the tables it wrote are removed at the end unless ``--keep-files``.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pandas as pd
import psutil
import torch

from common.data.catalog import Catalog
from common.data.split import EvalSet, MarketSplit
from common.neural.model import ModelConfig, SplitRecommender
from common.neural.train import MarketTensors
from common.serving.batching import SCORE_MEMORY, users_per_batch
from common.serving.format import write_served_model
from common.serving.query import load_served_model

MARKET = "big"
OVERFLOW_ROWS = 64
UNKNOWN_ITEM_SHARE = 0.01  # of the generated pairs, whose item the catalog does not list
RATE = re.compile(r"([0-9][0-9,]*) (users|pairs)/s")
PAIR_CHUNK = 1_000_000  # pairs generated and written at once


def build_model(directory: Path, args: argparse.Namespace) -> None:
    """A served model of ``args.users`` users over ``args.items`` items, random parameters, written to ``directory``."""
    rng = np.random.default_rng(args.seed)
    catalog = Catalog(tuple(f"P{row:08d}" for row in range(args.items)), OVERFLOW_ROWS)
    torch.manual_seed(args.seed)
    model = SplitRecommender(ModelConfig(catalog.size, args.users, args.dim))
    with torch.no_grad():
        model.encoder.tower.weight.normal_(0.0, 0.01)
        model.head.item_bias.weight.normal_(0.0, 0.1)
    users = np.arange(args.users, dtype=np.int64)
    split = MarketSplit(
        market=MARKET,
        num_users=args.users,
        train_users=np.repeat(users, args.history),
        train_items=rng.integers(0, args.items, args.users * args.history),
        market_items=np.arange(args.items, dtype=np.int64),
        valid=EvalSet(users, rng.integers(0, args.items, (args.users, 1))),
        test=EvalSet(users, rng.integers(0, args.items, (args.users, 1))),
        user_ids=tuple(f"U{user:08d}" for user in range(args.users)),
    )
    # The writer reads a market's split and user offset only: no per-user history tensors here.
    data = cast(MarketTensors, SimpleNamespace(split=split, user_offset=0))
    manifest = {"method": "generated", "market": MARKET, "round": 0, "metrics": {}, "epsilon": None, "delta": None}
    write_served_model(directory, model, data, catalog, manifest)


def write_pairs(path: Path, args: argparse.Namespace) -> None:
    """``args.pairs`` random (user, item) pairs of the generated market as TSV, some items unknown."""
    rng = np.random.default_rng(args.seed + 1)
    with open(path, "w", encoding="utf-8") as file:
        file.write("userId\titemId\n")
        for start in range(0, args.pairs, PAIR_CHUNK):
            size = min(PAIR_CHUNK, args.pairs - start)
            items = rng.integers(0, args.items, size)
            unknown = rng.random(size) < UNKNOWN_ITEM_SHARE
            pd.DataFrame(
                {
                    "userId": np.char.add("U", np.char.zfill(rng.integers(0, args.users, size).astype(str), 8)),
                    "itemId": np.where(
                        unknown,
                        np.char.add("NEW", items.astype(str)),
                        np.char.add("P", np.char.zfill(items.astype(str), 8)),
                    ),
                }
            ).to_csv(file, sep="\t", index=False, header=False, lineterminator="\n")


def _high_water_mark(pid: int) -> int:
    """The process's peak resident memory so far in bytes (``VmHWM``, Linux), 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_measured(command: list[str], out: Path, name: str) -> dict[str, Any]:
    """Run ``command`` as a process: its seconds, output, exit status and peak resident memory.

    Every 20 ms a thread reads the process's high-water mark of resident memory (``VmHWM``:
    the peak of the command's own image, so only a peak in its last 20 ms is missed) and its
    RSS (psutil); the largest of each, in bytes. Not ``ru_maxrss``: Linux carries into it the
    resident memory of the forking process before ``exec``, here the benchmark's own.
    """
    stdout, stderr = out / f"{name}.stdout", out / f"{name}.stderr"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(stdout, "w") as out_file, open(stderr, "w") as err_file:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out_file, stderr=err_file, env=environment)
        peak = {"high_water": 0, "sampled": 0}
        done = threading.Event()

        def sample() -> None:
            watched = psutil.Process(process.pid)
            while not done.is_set():
                try:
                    peak["sampled"] = max(peak["sampled"], watched.memory_info().rss)
                except psutil.Error:
                    return
                peak["high_water"] = max(peak["high_water"], _high_water_mark(process.pid))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        process.wait()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    return {
        "command": " ".join(command),
        "returncode": process.returncode,
        "seconds": seconds,
        "stdout": stdout.read_text().strip(),
        "stderr": stderr.read_text().strip(),
        "peak_rss_bytes": max(peak["high_water"], peak["sampled"]),
        "peak_rss_sampled_bytes": peak["sampled"],
    }


def reference_rate(users: np.ndarray, items: np.ndarray, k: int, batch: int) -> tuple[float, float]:
    """Users per second and seconds of ``users @ items.T`` in batches, ``argpartition`` and the top ``k`` sorted."""
    columns = len(items)
    width = min(k, columns)
    started = time.perf_counter()
    for start in range(0, len(users), batch):
        scores = users[start : start + batch] @ items.T
        top = np.argpartition(scores, columns - width, axis=1)[:, columns - width :]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        np.take_along_axis(top, order, axis=1)
    seconds = time.perf_counter() - started
    return len(users) / seconds, seconds


def _rate(summary: str) -> float:
    found = RATE.search(summary)
    if found is None:
        raise RuntimeError(f"The command's summary gives no rate: {summary!r}")
    return float(found.group(1).replace(",", ""))


def _checked(run: dict[str, Any]) -> dict[str, Any]:
    if run["returncode"] != 0:
        raise RuntimeError(f"{run['command']} failed ({run['returncode']}): {run['stderr'][-2000:]}")
    return run


def serving(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, time ``recommend --all`` and the reference (and ``score``), write ``OUT/serving.json``."""
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "model"
    batch = args.batch_users or users_per_batch(args.items, args.batch_memory * 2**20)
    print(f"building a served model: {args.users:,} users x {args.items:,} items, dim {args.dim} ...", flush=True)
    started = time.perf_counter()
    build_model(model_dir, args)
    build_seconds = time.perf_counter() - started
    print(f"  {build_seconds:.1f} s", flush=True)

    command = [sys.executable, "-m", "clients.recommend", "--model", str(model_dir), "--all", "--k", str(args.k)]
    command += ["--out", str(args.out / "recommendations.tsv"), "--batch-users", str(batch)]
    print(f"recommend --all, batches of {batch} users ...", flush=True)
    recommend = _checked(run_measured(command, args.out, "recommend"))
    recommend["users_per_second"] = _rate(recommend["stdout"])
    print(f"  {recommend['stdout']}", flush=True)

    print("reference: users @ items.T and argpartition over the same factors ...", flush=True)
    served = load_served_model(model_dir)
    user_vectors = served.user_vectors(served.user_ids)
    item_vectors = np.ascontiguousarray(served.item_factors[0])
    del served
    reference_users_per_second, reference_seconds = reference_rate(user_vectors, item_vectors, args.k, batch)
    del user_vectors, item_vectors
    ratio = recommend["users_per_second"] / reference_users_per_second
    report: dict[str, Any] = {
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "catalog_rows": args.items + OVERFLOW_ROWS,
        "batch_users": batch,
        "build_seconds": build_seconds,
        "recommend": recommend,
        "reference": {
            "what": "numpy users @ items.T in batches of batch_users, argpartition, the k sorted; "
            "the same user and item vectors, made beforehand; no bias, no history, no output",
            "users_per_second": reference_users_per_second,
            "seconds": reference_seconds,
        },
        "ratio_users_per_second": ratio,
    }
    print(
        f"recommend --all {recommend['users_per_second']:,.0f} users/s, reference {reference_users_per_second:,.0f} "
        f"users/s: ratio {ratio:.2f}; peak RSS {recommend['peak_rss_bytes'] / 2**30:.2f} GiB",
        flush=True,
    )
    if args.pairs:
        pairs = args.out / "pairs.tsv"
        print(f"score: {args.pairs:,} pairs ...", flush=True)
        write_pairs(pairs, args)
        command = [sys.executable, "-m", "clients.score", "--model", str(model_dir), "--candidates", str(pairs)]
        command += ["--out", str(args.out / "scored.tsv")]
        if args.chunk_pairs:
            command += ["--chunk-pairs", str(args.chunk_pairs)]
        score = _checked(run_measured(command, args.out, "score"))
        score["pairs_per_second"] = _rate(score["stdout"])
        report["score"] = score
        print(f"  {score['stdout']}; peak RSS {score['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    (args.out / "serving.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if not args.keep_files:
        shutil.rmtree(model_dir, ignore_errors=True)
        for name in ("recommendations.tsv", "pairs.tsv", "scored.tsv"):
            (args.out / name).unlink(missing_ok=True)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serving`` sub-command's options."""
    parser.add_argument("--users", type=int, default=10_000, help="users of the market (default: %(default)s)")
    parser.add_argument(
        "--items", type=int, default=1_000_000, help="catalog items, all sold by the market (default: %(default)s)"
    )
    parser.add_argument("--dim", type=int, default=128, help="model width (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="recommendations per user (default: %(default)s)")
    parser.add_argument(
        "--history", type=int, default=5, help="bought items per user before validation and test (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-users", type=int, default=None, help="users ranked at once (default: as recommend chooses)"
    )
    parser.add_argument(
        "--batch-memory",
        type=int,
        default=SCORE_MEMORY // 2**20,
        help="MiB of a batch's scores when --batch-users is not given (default: %(default)s)",
    )
    parser.add_argument(
        "--pairs", type=int, default=0, help="also score this many random pairs (default: %(default)s, none)"
    )
    parser.add_argument("--chunk-pairs", type=int, default=None, help="score's --chunk-pairs (default: score's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--keep-files", action="store_true", help="keep the model and tables written (default: off)")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/serving"), help="output directory (default: %(default)s)"
    )
