"""The tables serving reads and writes: user lists, candidate pairs, recent histories, results.

Text (tab- or space-separated, or ``.csv``) and Parquet in, TSV out. Every
error names the file, the line and the problem, in one sentence.
"""

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.runtime.durable import atomic_write_bytes


class ServingInputError(ValueError):
    """An input file of serving cannot be used; the message names the file, the line and the problem."""


def read_table(path: str | Path, required: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    """The ``required`` and present ``optional`` columns of a text, CSV or Parquet table, as text.

    ``.csv`` is comma-separated, ``.parquet`` a Parquet table, anything else
    text with fields separated by tabs or spaces (the XMarket format, TSV),
    header first. Other columns are kept; blank lines are skipped.

    Raises
    ------
    ServingInputError
        If the file cannot be read, lacks a header or a required column, a line
        has the wrong number of fields, or a required value is empty.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
            frame = frame.astype(str).where(frame.notna(), "")
            lines = np.arange(1, len(frame) + 1)
            unit = "row"
        else:
            frame, lines = _read_text_table(path)
            unit = "line"
    except ServingInputError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, ImportError) as err:
        raise ServingInputError(f"{path} cannot be read ({err}).") from err
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ServingInputError(
            f"{path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(its header: {' '.join(map(str, frame.columns)) or 'none'})."
        )
    for column in required:
        empty = frame[column].str.strip().eq("").to_numpy()
        if empty.any():
            raise ServingInputError(f"{path} {unit} {lines[int(np.argmax(empty))]}: {column} is empty.")
        frame[column] = frame[column].str.strip()
    if "date" in optional and "date" in frame.columns:
        dates = pd.to_datetime(frame["date"], format="ISO8601", errors="coerce", utc=True)
        bad = (dates.isna() & frame["date"].str.strip().ne("")).to_numpy()
        if bad.any():
            row = int(np.argmax(bad))
            raise ServingInputError(
                f"{path} {unit} {lines[row]}: date {frame['date'].iat[row]!r} is not an ISO 8601 date."
            )
        frame["date"] = dates.dt.tz_localize(None)
    return frame


def _read_text_table(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    text = path.read_bytes().decode("utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        records = (([field.strip() for field in fields], reader.line_num) for fields in reader)
    else:
        records = ((line.split(), number) for number, line in enumerate(text.splitlines(), start=1))
    header: list[str] | None = None
    rows, lines = [], []
    for fields, number in records:
        if not "".join(fields).strip():
            continue
        if header is None:
            header = fields
            if len(set(header)) != len(header):
                raise ServingInputError(f"{path} line {number}: the header names a column twice.")
            continue
        if len(fields) != len(header):
            raise ServingInputError(
                f"{path} line {number}: found {len(fields)} fields, expected {len(header)} ({' '.join(header)})."
            )
        rows.append(fields)
        lines.append(number)
    if header is None:
        raise ServingInputError(f"{path} is empty: it has no header line.")
    return pd.DataFrame(rows, columns=header, dtype=object), np.asarray(lines, dtype=np.int64)


def read_user_list(path: str | Path) -> list[str]:
    """User IDs of the ``userId`` column of ``path`` (header ``userId``, one user a line), each once."""
    users = list(dict.fromkeys(read_table(path, ["userId"])["userId"]))
    if not users:
        raise ServingInputError(f"{path} lists no users.")
    return users


def read_pairs(path: str | Path) -> pd.DataFrame:
    """Candidate ``(userId, itemId)`` pairs of ``path``; other columns are kept."""
    return read_table(path, ["userId", "itemId"])


def read_history(path: str | Path) -> pd.DataFrame:
    """Recent interactions like a market file: ``userId itemId [rating] [date]``."""
    return read_table(path, ["userId", "itemId"], ["date"])


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    """Write ``frame`` as TSV with a header, atomically and 0600 (it names users)."""
    text = frame.to_csv(sep="\t", index=False, na_rep="NaN", float_format="%.7g", lineterminator="\n")
    atomic_write_bytes(path, text.encode("utf-8"))
