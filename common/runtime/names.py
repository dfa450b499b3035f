"""Names that become parts of file paths: markets and regions.

A market name names its state file, its served model's directory and its
credentials, so a name like ``../../x`` would put them outside the directory
they belong in. Names are also compared case-sensitively while some
filesystems are not, so ``DE`` and ``de`` are refused as a pair by the callers
that see several names at once.
"""

import re

# Starts with a letter or digit; then letters, digits, '_', '-' or '.'; at most 64 characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str, kind: str = "market") -> str:
    """Return ``name`` if it is safe as one path component; raise ``ValueError`` otherwise.

    Parameters
    ----------
    name : str
        The market or region name.
    kind : str
        What the name names, for the error message.

    Raises
    ------
    ValueError
        If ``name`` is empty, longer than 64 characters, starts with anything but a
        letter or digit, or holds anything but letters, digits, ``_``, ``-`` and ``.``
        (so no path separator and no ``..`` component).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{kind} name {name!r} is not allowed: use 1 to 64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit."
        )
    return name


MAX_TEXT = 300  # characters of a region's text (an error reason) the server logs or keeps
# A metric's name: as the protocol's keys and their prefixes, at most 64 characters.
_METRIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@/-]{0,63}")


def printable(text: object, limit: int = MAX_TEXT) -> str:
    """``text`` safe for one log line: control characters escaped, at most ``limit`` characters.

    Text a region controls (an error reason) reaches the server's log and files; a newline or
    terminal escape in it could forge log lines, and its length is the sender's to choose.
    """
    shown = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text)[: limit + 1])
    if len(shown) > limit or len(str(text)) > limit:
        return shown[:limit] + f"... ({len(str(text))} characters)"
    return shown


def check_metric_name(name: object) -> str | None:
    """What is wrong with ``name`` as a metric's name, or None (letters, digits, ``_.@/-``; at most 64)."""
    if not isinstance(name, str) or not _METRIC.fullmatch(name):
        return f"metric name {printable(name, 80)!r} is not 1 to 64 letters, digits or '_.@/-'"
    return None
