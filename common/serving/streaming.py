"""Tables serving reads and writes a chunk at a time: ten million candidate pairs in bounded memory.

:func:`common.serving.tables.read_table_chunks` (through which ``read_table`` reads whole tables)
reads ``rows`` rows at a time with the same checks and one-sentence errors; :func:`write_table_chunks`
writes frames as one TSV, atomically and 0600 as :func:`common.serving.tables.write_table`
does, without holding them all. :func:`count_rows` is the total a progress bar shows.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from common.runtime.durable import atomic_write

_BLOCK = 1 << 24  # bytes read at once to count lines


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
