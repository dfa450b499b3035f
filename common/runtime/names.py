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
