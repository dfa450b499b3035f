"""The ``xmfl`` command and where the installed Flower app lives (see :mod:`xmfl.app`, :mod:`xmfl.cli`)."""
