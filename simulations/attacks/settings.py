"""What every attack is given: the federation it attacks and how large a run to make."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AttackSettings:
    """The federation an attack runs against and where it may write.

    Parameters
    ----------
    data_dir : str
        One interaction file per market; empty for generated markets.
    synthetic_markets : int
        Generated markets when ``data_dir`` is empty.
    seed : int
        Seeds splits, generated data and the honest training (never DP noise).
    out : Path
        A directory the attack may write its own runs to.
    quick : bool
        The suite's small run: fewer users, rounds and queries, same code.
    """

    data_dir: str = ""  # market files; empty: generated markets
    synthetic_markets: int = 3  # generated markets without data_dir
    seed: int = 0  # splits, generated data, honest training (never DP noise)
    out: Path = Path("outputs/attacks")  # the attack's own runs and files
    quick: bool = False  # the suite's small run

    def __post_init__(self) -> None:
        if not self.data_dir and self.synthetic_markets < 1:
            raise ValueError(f"Generated markets need at least one market, got {self.synthetic_markets}.")
