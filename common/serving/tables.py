"""The tables serving reads and writes: user lists, candidate pairs, recent histories, results.

Text (tab- or space-separated, or ``.csv``) and Parquet in, TSV out. Every
error names the file, the line and the problem, in one sentence.
"""

import csv
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.runtime.durable import atomic_write_bytes

CHUNK_ROWS = 1_000_000  # rows read, scored and written at once: a few hundred MB of text and frames


class ServingInputError(ValueError):
    """An input file of serving cannot be used; the message names the file, the line and the problem."""


def read_table(path: str | Path, required: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    """The ``required`` and present ``optional`` columns of a text, CSV or Parquet table, as text.

    ``.csv`` is comma-separated, ``.parquet`` a Parquet table, anything else
    text with fields separated by tabs or spaces (the XMarket format, TSV),
    header first. Other columns are kept; blank lines are skipped. The whole table is
    :func:`read_table_chunks`' one chunk, so both read and check alike.

    Raises
    ------
    ServingInputError
        If the file cannot be read, lacks a header or a required column, a line
        has the wrong number of fields, or a required value is empty.
    """
    frames = list(read_table_chunks(path, required, optional, rows=sys.maxsize))
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def read_table_chunks(
    path: str | Path, required: Sequence[str], optional: Sequence[str] = (), rows: int = CHUNK_ROWS
) -> Iterator[pd.DataFrame]:
    """The table of ``path`` in frames of at most ``rows`` rows, checked as :func:`read_table` says.

    Every frame has the file's columns as text, the required ones stripped, ``date`` (when
    optional and present) parsed. A file without data rows yields one empty frame with the
    header's columns.

    Raises
    ------
    ServingInputError
        As :func:`read_table`, when the chunk holding the problem is read
        (the chunks before it have been yielded).
    ValueError
        If ``rows`` is below 1 (at the call).
    """
    if rows < 1:
        raise ValueError(f"Chunks need at least 1 row, got {rows}.")
    return _chunks(Path(path), list(required), list(optional), rows)


def _chunks(path: Path, required: list[str], optional: list[str], rows: int) -> Iterator[pd.DataFrame]:
    parquet = path.suffix.lower() == ".parquet"
    unit = "row" if parquet else "line"
    raw = _parquet_chunks(path, rows) if parquet else _text_chunks(path, rows)
    checked_header = False
    while True:
        try:
            frame, lines = next(raw)
        except StopIteration:
            return
        except ServingInputError:
            raise
        except (OSError, UnicodeDecodeError, ValueError, ImportError) as err:
            raise ServingInputError(f"{path} cannot be read ({err}).") from err
        if not checked_header:
            missing = [column for column in required if column not in frame.columns]
            if missing:
                raise ServingInputError(
                    f"{path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                    f"(its header: {' '.join(map(str, frame.columns)) or 'none'})."
                )
            checked_header = True
        yield _checked(frame, lines, path, unit, required, optional)


def _checked(
    frame: pd.DataFrame, lines: np.ndarray, path: Path, unit: str, required: list[str], optional: list[str]
) -> pd.DataFrame:
    """One chunk, checked: required values present, dates ISO 8601."""
    for column in required:
        values = frame[column].str.strip()
        empty = values.eq("").to_numpy()
        if empty.any():
            raise ServingInputError(f"{path} {unit} {lines[int(np.argmax(empty))]}: {column} is empty.")
        frame[column] = values
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


def _text_chunks(path: Path, rows: int) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Raw chunks of a text or CSV table with their line numbers."""
    is_csv = path.suffix.lower() == ".csv"
    with open(path, encoding="utf-8-sig", newline="" if is_csv else None) as file:
        if is_csv:
            reader = csv.reader(file)
            records: Iterable[tuple[list[str], int]] = (
                ([field.strip() for field in fields], reader.line_num) for fields in reader
            )
        else:
            records = ((line.split(), number) for number, line in enumerate(file, start=1))
        header: list[str] | None = None
        fields_of: list[list[str]] = []
        lines: list[int] = []
        yielded = False
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
            fields_of.append(fields)
            lines.append(number)
            if len(fields_of) == rows:
                yield pd.DataFrame(fields_of, columns=header, dtype=object), np.asarray(lines, dtype=np.int64)
                fields_of, lines, yielded = [], [], True
        if header is None:
            raise ServingInputError(f"{path} is empty: it has no header line.")
        if fields_of or not yielded:
            yield pd.DataFrame(fields_of, columns=header, dtype=object), np.asarray(lines, dtype=np.int64)


def _parquet_chunks(path: Path, rows: int) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    done = 0
    for batch in parquet.iter_batches(batch_size=rows):
        frame = batch.to_pandas()
        frame = frame.astype(str).where(frame.notna(), "")
        yield frame, np.arange(done + 1, done + len(frame) + 1)
        done += len(frame)
    if done == 0:
        yield parquet.schema_arrow.empty_table().to_pandas().astype(object), np.zeros(0, np.int64)


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
