"""Tables serving reads and writes a chunk at a time: ten million candidate pairs in bounded memory.

:func:`read_table_chunks` reads what :func:`common.serving.tables.read_table` reads (text with
tab- or space-separated fields, ``.csv``, Parquet) with the same checks and the same one-sentence
errors naming the file and the line, but ``rows`` rows at a time; :func:`write_table_chunks`
writes frames as one TSV, atomically and 0600 as :func:`common.serving.tables.write_table`
does, without holding them all. :func:`count_rows` is the total a progress bar shows.
"""

import csv
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from common.runtime.durable import atomic_write
from common.serving.tables import ServingInputError

CHUNK_ROWS = 1_000_000  # rows read, scored and written at once: a few hundred MB of text and frames
_BLOCK = 1 << 24  # bytes read at once to count lines


def read_table_chunks(
    path: str | Path, required: Sequence[str], optional: Sequence[str] = (), rows: int = CHUNK_ROWS
) -> Iterator[pd.DataFrame]:
    """The table of ``path`` in frames of at most ``rows`` rows, checked as :func:`~common.serving.tables.read_table`.

    Every frame has the file's columns as text, the required ones stripped, ``date`` (when
    optional and present) parsed. A file without data rows yields one empty frame with the
    header's columns.

    Raises
    ------
    ServingInputError
        As :func:`~common.serving.tables.read_table`, when the chunk holding the problem is read
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
    """One chunk with :func:`~common.serving.tables.read_table`'s checks: values present, dates ISO 8601."""
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
    """Raw chunks of a text or CSV table with their line numbers, as ``tables._read_text_table`` splits it."""
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


def count_rows(path: str | Path) -> int | None:
    """Data rows of a table, for a progress bar: Parquet's count, or a text file's lines less the header.

    Blank lines count too (an upper bound); None when the file cannot be read.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        lines, last = 0, b"\n"
        with open(path, "rb") as file:
            while block := file.read(_BLOCK):
                lines += block.count(b"\n")
                last = block[-1:]
        return max(0, lines + (last != b"\n") - 1)
    except (OSError, ImportError, ValueError):
        return None


def write_table_chunks(frames: Iterable[pd.DataFrame], path: str | Path, columns: Sequence[str] | None = None) -> None:
    """Write ``frames`` as one TSV with a header, atomically and 0600, a frame at a time.

    The same text :func:`~common.serving.tables.write_table` writes for their concatenation.
    The header is the first frame's columns (``columns`` when given, and the header of a table
    without frames); a frame with other columns is refused. Until the last frame is written
    the file is a hidden temporary sibling: a failure leaves the old file or none.
    """

    def write(file: BinaryIO) -> None:
        header = None if columns is None else list(columns)
        first = True
        for frame in frames:
            if header is None:
                header = list(frame.columns)
            if list(frame.columns) != header:
                raise ValueError(f"A chunk has the columns {list(frame.columns)}, the table {header}.")
            text = _formatted(frame).to_csv(sep="\t", index=False, header=first, lineterminator="\n")
            file.write(text.encode("utf-8"))
            first = False
        if first and header is not None:
            file.write(("\t".join(header) + "\n").encode("utf-8"))

    atomic_write(path, write)


def _formatted(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its float columns as the text ``to_csv(float_format="%.7g", na_rep="NaN")`` writes.

    Formatted here in one pass per column: pandas formats a float column value by value
    through Python, at twice the cost.
    """
    floats = [column for column in frame.columns if frame[column].dtype.kind == "f"]
    if not floats:
        return frame
    formatted = frame.copy(deep=False)
    for column in floats:
        formatted[column] = ["NaN" if value != value else format(value, ".7g") for value in frame[column].tolist()]
    return formatted
