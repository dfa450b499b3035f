"""Read a region's lifetime privacy ledger, or start a new budget period on purpose.

    python -m clients.ledger show --state-dir DIR --market NAME
    python -m clients.ledger new-period --state-dir DIR --market NAME

A region's DP spending composes over its lifetime, and its ``dp-epsilon``
node ceiling bounds that lifetime. A new budget period (a new year, a new
policy) is an operator's decision: ``new-period`` keeps the closed period's
ledger beside the new one as ``<market>.ledger.<UTC time>.json`` and records
it in the new ledger's ``periods``, so that what was spent stays auditable.
It is also the way out when a ledger is lost or unreadable: the new period
then records that the earlier spending is unknown.
"""

import argparse
import datetime
import sys
from pathlib import Path

from clients.state_store import CorruptStateError, LedgerEntry, LedgerStore
from common.privacy.ledger import PrivacyBudget, PrivacyLedger
from common.runtime.command import ArgumentParser


def show(store: LedgerStore) -> str:
    """One line per budget period and one for the current one."""
    entry = store.load()
    if entry is None:
        return f"{store.path}: no ledger; the market has not trained under DP with this state-dir."
    lines = [
        f"closed period until {period['closed']}: epsilon {period['epsilon']} ({period['archive']})"
        for period in entry.periods
    ]
    spent = entry.ledger.spent()
    lines.append(
        f"current period: epsilon {spent['epsilon']:.4f} at delta {spent['delta']:.3g} "
        f"({entry.ledger.steps} DP-SGD steps, {len(entry.ledger.releases)} releases)"
    )
    return "\n".join(lines)


def new_period(store: LedgerStore) -> str:
    """Close the current period (archived beside it) and start an empty ledger."""
    closed = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    with store.lock():
        try:
            entry = store.load()
            epsilon = f"{entry.ledger.epsilon():.4f}" if entry is not None else "none recorded"
            periods = entry.periods if entry is not None else []
        except CorruptStateError:
            epsilon, periods = "unknown (the ledger was unreadable)", []
        archive = store.path.with_name(f"{store.market}.ledger.{closed}.json")
        if store.path.exists():
            store.path.rename(archive)
        else:
            epsilon = "unknown (the ledger was missing)"
        # The placeholder budget is replaced by the first training's own calibration.
        empty = PrivacyLedger(PrivacyBudget(1.0, 0.5), 0.0, 1.0)
        period = {"closed": closed, "epsilon": epsilon, "archive": archive.name if archive.exists() else None}
        store.save(LedgerEntry(empty, "", {}, [*periods, period]))
    return f"{store.path}: new budget period; the closed one spent epsilon {epsilon}."


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m clients.ledger", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "action", choices=["show", "new-period"], help="show the ledger, or close its period and start a new one"
    )
    parser.add_argument("--state-dir", type=Path, required=True, help="the region's state-dir (node config) (required)")
    parser.add_argument("--market", required=True, help="the region's market name (node config) (required)")
    args = parser.parse_args(argv)
    try:
        store = LedgerStore(args.state_dir, args.market)
        print(show(store) if args.action == "show" else new_period(store))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
