"""Reading one market's interaction file into a validated, de-duplicated table.

Formats are chosen by suffix:

* ``.txt``, ``.tsv``, ``.dat``: the XMarket text format, fields separated by
  runs of whitespace (spaces or tabs), header ``userId itemId rate date``;
* ``.csv``: comma-separated with the same header names;
* ``.parquet``: a table with the same column names.

The rating column may be called ``rate`` or ``rating``; ``date`` is optional.
Every problem is reported as an :class:`InteractionFileError` naming the file,
the first offending line (or Parquet row) and what is wrong with it.
"""

import csv
import errno
import io
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.runtime.command import UserError
from common.runtime.names import check_name

__all__ = [
    "SUPPORTED_SUFFIXES",
    "InteractionFileError",
    "discover_market_files",
    "read_interactions",
]

SUPPORTED_SUFFIXES = frozenset({".txt", ".tsv", ".dat", ".csv", ".parquet"})

# Output column -> header names accepted for it. All but "date" are required.
_SOURCE_NAMES: dict[str, tuple[str, ...]] = {
    "user": ("userId",),
    "item": ("itemId",),
    "rating": ("rate", "rating"),
    "date": ("date",),
}

# pandas stores dates in nanoseconds, which only reach from 1677 to 2262.
_EARLIEST = pd.Timestamp.min.tz_localize("UTC")
_LATEST = pd.Timestamp.max.tz_localize("UTC")


class InteractionFileError(UserError, ValueError):
    """A market's interaction file cannot be used (a user error: :mod:`common.runtime.command`).

    The message names the file, the line (or row) and the problem, e.g.
    ``de_5core.txt line 7: rating 'abc' is not a number``.

    Parameters
    ----------
    path : str or Path
        The file (or directory) at fault, as given by the caller.
    line : int or None
        1-based physical line of the problem (Parquet: 1-based data row), or
        None when the problem concerns the whole file.
    problem : str
        What is wrong.
    unit : str, default "line"
        How ``line`` is counted: ``"line"`` for text files, ``"row"`` for Parquet.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str, unit: str = "line") -> None:
        # Every field goes to args so the error survives pickling across processes.
        super().__init__(path, line, problem, unit)
        self.path = Path(path)
        self.line = line
        self.problem = problem
        self.unit = unit

    def __str__(self) -> str:
        where = str(self.path) if self.line is None else f"{self.path} {self.unit} {self.line}"
        return f"{where}: {self.problem}"


def read_interactions(path: str | Path) -> pd.DataFrame:
    """Read, validate and de-duplicate one market's interactions.

    Parameters
    ----------
    path : str or Path
        A ``.txt``/``.tsv``/``.dat`` (XMarket text), ``.csv`` or ``.parquet`` file
        with columns ``userId``, ``itemId``, ``rate`` (or ``rating``) and
        optionally ``date``. Other columns are ignored.

    Returns
    -------
    pandas.DataFrame
        Columns ``user`` (str), ``item`` (str), ``rating`` (float64), ``date``
        (datetime64[ns], NaT throughout when the file has no dates) and
        ``position`` (int64, 0-based order of the data row in the file), index
        ``0..n-1``, sorted by ``position``. Of repeated (user, item) pairs only
        the latest is kept: latest date, then latest position.

    Raises
    ------
    InteractionFileError
        If the suffix is unsupported, the file cannot be read, a required column
        is missing, there are no data rows, or a line has the wrong number of
        fields, an empty id, a rating that is not a number or a date that is
        not an ISO 8601 date. Only the first bad line is reported.

    Notes
    -----
    Ids are kept as text with surrounding whitespace removed, so ``'0012'``
    stays ``'0012'``. Blank lines are skipped but still counted in line
    numbers. Dates are parsed as ISO 8601 (``YYYY-MM-DD`` with optional time);
    times with an offset are converted to UTC and stored without time zone.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InteractionFileError(
            path,
            None,
            f"unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(sorted(SUPPORTED_SUFFIXES))}",
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InteractionFileError(path, None, f"cannot be read ({err.strerror or err})") from err
    if not data.strip():
        raise _no_interactions(path)
    if suffix == ".parquet":
        raw = _read_parquet(path, data)
        return _validate(path, raw, np.arange(1, len(raw) + 1), "row", None)
    raw, lines, stopped = _read_delimited(path, _decode(path, data), csv_format=suffix == ".csv")
    return _validate(path, raw, np.asarray(lines, dtype=np.int64), "line", stopped)


def discover_market_files(data_dir: str | Path) -> dict[str, Path]:
    """Find the interaction file of every market in a directory.

    Parameters
    ----------
    data_dir : str or Path
        Directory holding one file per market; not searched recursively. Entries
        with other suffixes (e.g. ``README.md``) and hidden ones are ignored.

    Returns
    -------
    dict of str to Path
        Market name -> file, sorted by market name. The market name is the file
        stem up to its first underscore: ``de_5core.txt`` -> ``'de'``.

    Raises
    ------
    FileNotFoundError
        If ``data_dir`` does not exist.
    NotADirectoryError
        If ``data_dir`` is not a directory.
    InteractionFileError
        If no market file is found; an entry named like a market file is not a
        regular file (a directory, a dangling symbolic link, a link loop); a
        name yields no market name or one that :func:`common.names.check_name`
        refuses; or two files yield market names that are equal or differ only
        by case.
    """
    directory = Path(data_dir)
    if not directory.exists():
        raise FileNotFoundError(f"market data directory {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"market data directory {directory} is not a directory")
    markets: dict[str, Path] = {}
    by_folded_name: dict[str, str] = {}
    for file in sorted(directory.iterdir()):
        if file.name.startswith(".") or file.suffix.lower() not in SUPPORTED_SUFFIXES:
            continue
        # Named like a market file, so it must be one: skipping it would drop a market unseen.
        _check_regular_file(file)
        market = file.stem.split("_", 1)[0]
        if not market:
            raise InteractionFileError(file, None, "file name does not start with a market name")
        try:
            check_name(market)
        except ValueError as err:
            raise InteractionFileError(file, None, str(err).rstrip(".")) from err
        if market in markets:
            raise InteractionFileError(file, None, f"market {market!r} is also provided by {markets[market]}")
        # 'DE' and 'de' would share state files on a case-insensitive filesystem.
        if (other := by_folded_name.get(market.casefold())) is not None:
            raise InteractionFileError(
                file,
                None,
                f"market {market!r} and market {other!r} of {markets[other]} differ only by case",
            )
        markets[market] = file
        by_folded_name[market.casefold()] = market
    if not markets:
        raise InteractionFileError(
            directory,
            None,
            f"no market files ({', '.join(sorted(SUPPORTED_SUFFIXES))}) in directory",
        )
    return dict(sorted(markets.items()))


def _check_regular_file(file: Path) -> None:
    """Raise :class:`InteractionFileError` unless ``file`` is (a link to) a regular file."""
    try:
        mode = file.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            problem = "is a symbolic link loop"
        elif err.errno == errno.ENOENT and file.is_symlink():
            problem = f"is a symbolic link to nothing (target {os.readlink(file)} does not exist)"
        else:
            problem = f"cannot be examined ({err.strerror or err})"
        raise InteractionFileError(file, None, problem) from err
    if stat.S_ISDIR(mode):
        raise InteractionFileError(file, None, "is a directory, not a market file")
    if not stat.S_ISREG(mode):
        raise InteractionFileError(file, None, "is not a regular file")


def _no_interactions(path: Path) -> InteractionFileError:
    return InteractionFileError(path, None, "market has no interactions")


def _decode(path: Path, data: bytes) -> str:
    try:
        # utf-8-sig so that a byte-order mark does not end up in the first column name.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InteractionFileError(path, line, "is not UTF-8 text") from err


def _records(text: str, csv_format: bool) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line, fields)`` for each non-blank record, ``line`` being where it starts.

    pandas' readers cannot say on which physical line a row was (they skip blank
    lines, and a quoted CSV value may span lines) and silently pad short rows,
    so records are split here to report exact line numbers.
    """
    lines = io.StringIO(text, newline="")
    if csv_format:
        reader = csv.reader(lines)
        start = 1
        for fields in reader:
            if len(fields) > 1 or "".join(fields).strip():
                yield start, fields
            start = reader.line_num + 1
    else:
        for number, line in enumerate(lines, start=1):
            if fields := line.split():
                yield number, fields


def _read_delimited(
    path: Path, text: str, csv_format: bool
) -> tuple[pd.DataFrame, list[int], InteractionFileError | None]:
    """Split a text or CSV file into raw string columns and their line numbers.

    Reading stops at the first line with the wrong number of fields; that
    problem is returned rather than raised because an earlier line may hold a
    different problem, and the first one is reported.
    """
    records = _records(text, csv_format)
    first = next(records, None)
    if first is None:
        raise _no_interactions(path)
    header_line, header = first
    sources = _match_columns(path, header, header_line)
    rows: list[list[str]] = []
    lines: list[int] = []
    stopped = None
    for line, fields in records:
        if len(fields) != len(header):
            problem = f"found {len(fields)} fields, expected {len(header)} ({' '.join(header)})"
            stopped = InteractionFileError(path, line, problem)
            break
        rows.append(fields)
        lines.append(line)
    table = pd.DataFrame(rows, columns=range(len(header)), dtype="str")
    raw = pd.DataFrame({ours: table[header.index(name)] for ours, name in sources.items()})
    return raw, lines, stopped


def _read_parquet(path: Path, data: bytes) -> pd.DataFrame:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as err:
        raise InteractionFileError(path, None, f"is not a readable Parquet file ({err})") from err
    columns = {}
    for ours, name in _match_columns(path, table.column_names, None).items():
        column = table.column(name)
        if ours in ("user", "item"):
            # Ids are labels: integer ids become their decimal text, as in text files.
            try:
                column = column.cast(pa.string())
            except pa.ArrowException as err:
                raise InteractionFileError(
                    path, None, f"column {name!r} of type {column.type} cannot hold ids"
                ) from err
        columns[ours] = column.to_pandas()
    return pd.DataFrame(columns)


def _match_columns(path: Path, found: Sequence[str], line: int | None) -> dict[str, str]:
    """Map output column -> the file's column holding it."""
    sources = {}
    missing = []
    for ours, accepted in _SOURCE_NAMES.items():
        present = [name for name in found if name in accepted]
        if len(present) > 1:
            raise InteractionFileError(path, line, f"more than one {ours} column ({', '.join(map(repr, present))})")
        if present:
            sources[ours] = present[0]
        elif ours != "date":
            missing.append(" or ".join(map(repr, accepted)))
    if missing:
        raise InteractionFileError(
            path,
            line,
            f"missing required column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(columns found: {', '.join(map(repr, found)) or 'none'})",
        )
    return sources


def _describe(column: str, value: object, problem: str) -> str:
    if pd.isna(value) or not str(value).strip():
        return f"{column} is missing"
    return f"{column} {value!r} {problem}"


def _validate(
    path: Path,
    raw: pd.DataFrame,
    numbers: np.ndarray,
    unit: str,
    stopped: InteractionFileError | None,
) -> pd.DataFrame:
    """Type-check ``raw``, raise on its first bad row, then convert and de-duplicate.

    ``numbers`` holds each raw row's line (or row) number; ``stopped`` is a
    problem found after the last raw row, raised if no raw row is bad.
    """
    user = raw["user"].fillna("").str.strip()
    item = raw["item"].fillna("").str.strip()
    rating = pd.to_numeric(raw["rating"], errors="coerce").astype("float64")
    checks: list[tuple[pd.Series, Callable[[int], str]]] = [
        (user.eq(""), lambda _: "user id is empty"),
        (item.eq(""), lambda _: "item id is empty"),
        (
            ~np.isfinite(rating),
            lambda row: _describe("rating", raw["rating"].iat[row], "is not a number"),
        ),
    ]
    if "date" in raw:
        parsed = pd.to_datetime(raw["date"], format="ISO8601", errors="coerce", utc=True)
        checks += [
            (
                parsed.isna(),
                lambda row: _describe("date", raw["date"].iat[row], "is not an ISO 8601 date"),
            ),
            (
                parsed.notna() & ~parsed.between(_EARLIEST, _LATEST),
                lambda row: f"date {raw['date'].iat[row]!r} is outside {_EARLIEST:%Y-%m-%d}..{_LATEST:%Y-%m-%d}",
            ),
        ]

    first: tuple[int, str] | None = None
    for bad, describe in checks:
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            if first is None or row < first[0]:
                first = (row, describe(row))
    if first is not None:
        raise InteractionFileError(path, int(numbers[first[0]]), first[1], unit)
    if stopped is not None:
        raise stopped
    if raw.empty:
        raise _no_interactions(path)

    if "date" in raw:
        date = parsed.dt.tz_localize(None).astype("datetime64[ns]")
    else:
        date = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns]")
    frame = pd.DataFrame(
        {
            "user": user.astype("str"),
            "item": item.astype("str"),
            "rating": rating,
            "date": date,
            "position": np.arange(len(raw), dtype=np.int64),
        }
    )
    # Position is unique, so sorting by (date, position) puts each pair's latest row last.
    latest = frame.sort_values(["date", "position"]).drop_duplicates(["user", "item"], keep="last")
    return latest.sort_values("position").reset_index(drop=True)
