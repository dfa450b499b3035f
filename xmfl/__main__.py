"""``python -m xmfl``: the ``xmfl`` command, for an environment whose scripts are not on PATH."""

from xmfl.cli import main

main()
