"""A deployed region's served models, one per training, and the one it serves: ``xmfl models``.

    xmfl models --state-dir STATE                  # every training's model; the one served is marked
    xmfl models --state-dir STATE --use latest     # serve the newest training's model
    xmfl models --state-dir STATE --use 1234       # serve training 1234's model (roll back, or forward)
    xmfl recommend --model STATE/current --all --out recs.tsv

A region writes the served model of each training to ``STATE/models/<training-id>/``
(:mod:`clients.served`), so a later training never replaces what the region serves.
``STATE/current`` is a symbolic link to one of them and is set here only: the operator
decides when a new model goes live, after looking at its numbers. The link is replaced
atomically (a new link renamed over the old one), so a ``recommend`` starting during the
switch reads the old model or the new one, never a mix. A model that does not load (no
manifest, another format version, a catalog that does not match its manifest) is never
made current. A region keeps its newest served models (:data:`clients.served.KEPT_MODELS`)
and the current one; a training removes older ones.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clients.served import CURRENT, MODELS_DIR
from common.protocol import TEST_NDCG_KEY, VAL_NDCG_KEY
from common.runtime.command import ArgumentParser
from common.runtime.names import check_name
from common.serving.format import MANIFEST, ServedModelError, read_manifest

LATEST = "latest"  # --use latest: the training whose model was written last


def trainings(state_dir: Path) -> list[dict[str, Any]]:
    """Each training's served model in ``state_dir``, oldest first: its id, manifest numbers, and whether current.

    A folder that does not hold a loadable served model is listed with its ``problem``.
    """
    models = state_dir / MODELS_DIR
    current = _current_training(state_dir)
    rows = []
    folders = sorted((path for path in models.iterdir() if path.is_dir()), key=_written) if models.is_dir() else []
    for folder in folders:
        row: dict[str, Any] = {"training-id": folder.name, "current": folder.name == current}
        try:
            manifest, _ = read_manifest(folder)
        except ServedModelError as error:
            rows.append(row | {"problem": str(error)})
            continue
        metrics = manifest.get("metrics", {})
        rows.append(
            row
            | {
                "method": manifest.get("method"),
                "round": manifest.get("round"),
                VAL_NDCG_KEY: metrics.get(VAL_NDCG_KEY),
                TEST_NDCG_KEY: metrics.get(TEST_NDCG_KEY),
                "epsilon": manifest.get("epsilon"),
            }
        )
    return rows


def use(state_dir: Path, training: str) -> Path:
    """Point ``STATE/current`` at ``training``'s served model (``latest``: the newest); return the model folder.

    Raises
    ------
    ValueError
        If the training has no served model in ``state_dir``, or it does not load.
    """
    rows = trainings(state_dir)
    if training == LATEST:
        if not rows:
            raise ValueError(f"{state_dir / MODELS_DIR} holds no served model yet: a training writes one when it ends.")
        training = rows[-1]["training-id"]
    folder = state_dir / MODELS_DIR / check_name(training, "training")
    if not folder.is_dir():
        known = ", ".join(row["training-id"] for row in rows) or "none"
        raise ValueError(f"{state_dir} has no served model of training {training} (trainings: {known}).")
    try:
        read_manifest(folder)
    except ServedModelError as error:
        raise ValueError(f"Training {training}'s model is not made current: {error}") from error
    link = state_dir / CURRENT
    if link.exists() and not link.is_symlink():
        raise ValueError(f"{link} exists and is not the link this command sets; move it away first.")
    staged = state_dir / f".{CURRENT}.{os.getpid()}"
    staged.unlink(missing_ok=True)
    staged.symlink_to(Path(MODELS_DIR) / folder.name)  # relative: the state-dir may be moved or mounted elsewhere
    os.replace(staged, link)
    directory = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return folder


def table(rows: list[dict[str, Any]]) -> str:
    """The trainings as a Markdown table, the current one marked with ``*``."""
    lines = [
        "| | training | method | round | val NDCG@10 | test NDCG@10 | epsilon |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        mark = "*" if row["current"] else ""
        if "problem" in row:
            lines.append(f"| {mark} | {row['training-id']} | unreadable: {row['problem']} | | | | |")
            continue
        numbers = [_number(row[key]) for key in (VAL_NDCG_KEY, TEST_NDCG_KEY, "epsilon")]
        lines.append(f"| {mark} | {row['training-id']} | {row['method']} | {row['round']} | {' | '.join(numbers)} |")
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _written(folder: Path) -> float:
    manifest = folder / MANIFEST
    return manifest.stat().st_mtime if manifest.exists() else folder.stat().st_mtime


def _current_training(state_dir: Path) -> str | None:
    link = state_dir / CURRENT
    return Path(os.readlink(link)).name if link.is_symlink() else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="xmfl models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--state-dir", type=Path, required=True, help="the region's state-dir (node config) (required)")
    parser.add_argument(
        "--use",
        metavar="TRAINING",
        help=f"make this training's model the one served ('{LATEST}': the newest) (default: only list them)",
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON instead of a table (default: off)")
    args = parser.parse_args(argv)
    try:
        if args.use:
            folder = use(args.state_dir, args.use)
            current = args.state_dir / CURRENT
            print(f"{current} -> {folder}: recommend and score with --model {current}")
        rows = trainings(args.state_dir)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
