"""What a region decides for itself: the settings that may weaken its users' protection.

The run config is written by whoever reaches the SuperLink; it may tighten a region's
protections, never loosen them. So every setting below is read from the region's own node
config (a deployed SuperNode's ``--node-config``), never from the run config:

* ``dp-epsilon``: a ceiling on every run's budget (the run's is lowered to it, never raised);
* ``dp-delta``: the region's δ; the run's may only be lower, and the lifetime ledger keeps the
  δ of its budget period whatever a later run asks (:mod:`clients.privacy_state`);
* ``dp-insecure-seeded-noise``: draw DP noise and sampling from the run's seed, so that whoever
  knows the run config can remove it; for reproducing experiments on one's own data only;
* ``dp-exact-metrics``: under DP, still report exact evaluation metrics, which the server can
  steer into counting queries about the region's users (outside the DP guarantee);
* ``assortment-path``: the market's public product list (one item ID a line); under DP the
  release covers exactly these rows, and without it the whole catalog, never a set derived
  from the market's interactions.

Values are parsed by type (:func:`common.config.parse_value`); a bad one is refused in one line.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import parse_bool, parse_value
from common.data.catalog import Catalog

EPSILON_KEY, DELTA_KEY = "dp-epsilon", "dp-delta"
SEEDED_NOISE_KEY = "dp-insecure-seeded-noise"
EXACT_METRICS_KEY = "dp-exact-metrics"
ASSORTMENT_KEY = "assortment-path"
# The environment variable by which the harness gives its simulated markets their node config (JSON).
SIMULATION_NODE_CONFIG_ENV = "XMFL_SIMULATION_NODE_CONFIG"
POLICY_KEYS = (EPSILON_KEY, DELTA_KEY, SEEDED_NOISE_KEY, EXACT_METRICS_KEY, ASSORTMENT_KEY)


@dataclass(frozen=True)
class RegionPolicy:
    """A region's own privacy settings (module docstring); the defaults protect most."""

    epsilon_ceiling: float = math.inf  # dp-epsilon: the most any run may spend; inf: the run's budget
    delta: float = 0.0  # dp-delta: the region's δ; 0: the run's, else the default (see clients.privacy_state)
    insecure_seeded_noise: bool = False  # dp-insecure-seeded-noise: removable noise, experiments only
    exact_metrics: bool = False  # dp-exact-metrics: exact metrics under DP, outside the guarantee
    assortment_path: str = ""  # assortment-path: the public product list released under DP; empty: the catalog

    @property
    def demands_dp(self) -> bool:
        """Whether the region set a DP ceiling, and so refuses a run without DP."""
        return self.epsilon_ceiling < math.inf or self.delta > 0

    def demanded(self) -> str:
        """The ceilings the region set, as ``dp-epsilon=1 dp-delta=1e-06`` (empty when none)."""
        parts = [f"{EPSILON_KEY}={self.epsilon_ceiling:g}"] if self.epsilon_ceiling < math.inf else []
        return " ".join(parts + ([f"{DELTA_KEY}={self.delta:g}"] if self.delta > 0 else []))

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], market: str = "") -> "RegionPolicy":
        """Read the policy keys of ``node_config``; keys it lacks keep their defaults.

        Raises
        ------
        ValueError
            Naming the market and the key, if a value is not of its kind or out of range.
        """
        where = f"Market '{market}': the node config's " if market else "The node config's "
        values: dict[str, Any] = {}
        try:
            if EPSILON_KEY in node_config:
                values["epsilon_ceiling"] = _number(
                    node_config[EPSILON_KEY], EPSILON_KEY, 0.0, math.inf, "a positive number"
                )
            if DELTA_KEY in node_config:
                values["delta"] = _number(node_config[DELTA_KEY], DELTA_KEY, 0.0, 1.0, "a number between 0 and 1")
            for key, name in ((SEEDED_NOISE_KEY, "insecure_seeded_noise"), (EXACT_METRICS_KEY, "exact_metrics")):
                if key in node_config:
                    values[name] = parse_bool(key, node_config[key])
        except ValueError as error:
            raise ValueError(where + str(error)) from None
        if ASSORTMENT_KEY in node_config:
            values["assortment_path"] = str(node_config[ASSORTMENT_KEY])
        return cls(**values)


def _number(value: Any, key: str, low: float, high: float, expected: str) -> float:
    """``value`` as a float in the open interval (low, high), or a ValueError naming ``key``."""
    try:
        number = parse_value(key, float, value)
    except ValueError:
        number = math.nan
    if not low < number < high:
        raise ValueError(f"{key} must be {expected}, got '{value}'.")
    return number


def public_assortment(policy: RegionPolicy, catalog: Catalog) -> np.ndarray:
    """The rows a market releases under DP: its product list's rows, or every row of the catalog.

    Neither depends on the market's interactions, so the set of released rows says nothing
    about its users. Items of the list outside the catalog map to overflow rows, as in the data.

    Raises
    ------
    ValueError
        If the product list cannot be read or lists no item.
    """
    if not policy.assortment_path:
        return np.arange(catalog.size, dtype=np.int64)
    path = Path(policy.assortment_path)
    try:
        items = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"The assortment file {path.name} cannot be read ({type(error).__name__}).") from None
    items = [item for item in items if item and not item.startswith("#")]
    if not items:
        raise ValueError(f"The assortment file {path.name} lists no item.")
    return np.unique(catalog.rows(items)).astype(np.int64)
