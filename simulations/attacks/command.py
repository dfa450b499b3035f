"""``xmfl benchmark attacks``: run every attack of :data:`ATTACKS` and write ``OUT/attacks.json`` and a table.

    xmfl benchmark attacks --data-dir DIR --out OUT
    xmfl benchmark attacks --quick --out OUT          # the suite's small run, on generated markets

Each attack plays the hostile server against the real ClientApp code of every market
(:mod:`simulations.attacks.hostile`). The table prints, per attack, what the attacker got
against regions as configured by default, beside the same attack where it is known to work
(undefended, or a region that chose the weaker setting itself), so that a zero means a
defence and not a broken attack.
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.attacks import counting_oracle, delta_reset, reconstruction, seeded_noise, server_paths
from simulations.attacks.settings import AttackSettings
from simulations.progress import say

Attack = Callable[[AttackSettings], dict[str, Any]]

# attacks.json's section name -> the attack; a new attack is a module and a line here.
ATTACKS: dict[str, Attack] = {
    "reconstruction": reconstruction.attack,
    "counting-oracle": counting_oracle.attack,
    "seeded-noise": seeded_noise.attack,
    "delta-reset": delta_reset.attack,
    "server-paths": server_paths.attack,
}
# The attacks of a malicious region on everyone's model (poisoning) go beside these.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``attacks`` benchmark's options."""
    parser.add_argument("--data-dir", default="", help="one interaction file per market (default: generated markets)")
    parser.add_argument(
        "--synthetic-markets", type=int, default=3, help="generated markets without --data-dir (default: %(default)s)"
    )
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), help="comma-separated attacks to run (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the split, the generated data and the honest training (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run (fewer users, rounds and queries), as the test suite runs it (default: off)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/attacks"), help="output directory (default: %(default)s)"
    )


def table(report: dict[str, Any]) -> str:
    """A Markdown table: per attack, the headline numbers against defaults and where the attack works."""
    lines = ["| attack | against regions as configured | where the attack works |", "|---|---|---|"]
    for name, section in report["attacks"].items():
        lines.append(f"| {name} | {_headline(name, section)} |")
    return "\n".join(lines)


def _headline(name: str, section: dict[str, Any]) -> str:
    if name == "counting-oracle":
        opted = section["region-opted-in-to-exact-metrics"]
        return (
            f"{section['exact-answers']} of {section['queries']} exact counts at ε {section['epsilon']:g} | "
            f"{opted['exact-answers']} of {opted['queries']} (region chose dp-exact-metrics)"
        )
    if name == "seeded-noise":
        asked, chosen = section["asked-by-run-config"], section["region-chose-seeded-noise"]
        return (
            f"noise removed in {asked['noise-removed-markets']} of {asked['markets-attacked']} markets | "
            f"{chosen['noise-removed-markets']} of {chosen['markets-attacked']} (region chose seeded noise)"
        )
    if name == "delta-reset":
        return (
            f"{section['fresh-releases']} fresh releases; "
            f"lifetime ε {section['most-lifetime-epsilon-at-first-delta']:.3f}"
            f" at δ {section['first-delta']:g} (cap {section['epsilon-cap']:g}) | "
            f"asked δ {section['asked-delta']:g}"
        )
    if name == "server-paths":
        bounded, everything = section["root-set"], section["root-is-everything"]
        return (
            f"{bounded['refused']} of {bounded['attempts']} hostile run configs refused, "
            f"{len(bounded['files-created-outside-root'])} files made outside the root | "
            f"root /: {everything['refused']} refused, {len(everything['files-created-outside-root'])} files made"
        )
    if name == "reconstruction":
        ndcg = section.get("macro-ndcg@10", {})
        undefended = section.get("undefended", {})
        return (
            f"{section['exact-users']} of {section['users']} users' histories recovered exactly "
            f"({section['exact-fraction']:.2%}); macro NDCG@10 {ndcg.get('defended', float('nan')):.4f} | "
            f"undefended: {undefended.get('exact-users', '?')} users; macro NDCG@10 "
            f"{ndcg.get('undefended', float('nan')):.4f}"
        )
    return json.dumps({k: v for k, v in section.items() if not isinstance(v, dict)})[:120] + " | "


def _write(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """``attacks.json``: the report, each attack's section also at its top level; returns what it wrote."""
    flat = {**report, **report["attacks"]}
    (out / "attacks.json").write_text(json.dumps(flat, indent=1, default=float), encoding="utf-8")
    return flat


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen attacks; write ``attacks.json`` and ``attacks.md``; return the report."""
    chosen = [name.strip() for name in args.attacks.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(ATTACKS))
    if unknown:
        raise ValueError(f"Unknown attacks {unknown}; choose among {', '.join(ATTACKS)}.")
    settings = AttackSettings(
        data_dir=args.data_dir,
        synthetic_markets=args.synthetic_markets,
        seed=args.seed,
        out=args.out / "runs",
        quick=args.quick,
    )
    report: dict[str, Any] = {
        "config": {
            "data-dir": args.data_dir,
            "synthetic-markets": args.synthetic_markets,
            "seed": args.seed,
            "quick": args.quick,
        },
        "attacks": {},
        "seconds": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for position, name in enumerate(chosen, 1):
        say(f"attack {position}/{len(chosen)}: {name}")
        started = time.perf_counter()
        report["attacks"][name] = ATTACKS[name](settings)
        report["seconds"][name] = round(time.perf_counter() - started, 1)
        _write(args.out, report)  # after each attack: a long run stopped later keeps what it measured
    flat = _write(args.out, report)
    rendered = table(report)
    (args.out / "attacks.md").write_text(rendered + "\n", encoding="utf-8")
    print(rendered)
    return flat
