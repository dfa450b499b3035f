"""Differential privacy of one region: its own settings, its budget and ledger, DP-SGD with Opacus.

:mod:`~common.privacy.region` reads what only a region's node config may decide;
:mod:`~common.privacy.ledger` keeps the lifetime budget and calibrates noise (stateless maths
beside stateful bookkeeping, as in Opacus's accountants); :mod:`~common.privacy.dp_sgd` trains
under it; :mod:`~common.privacy.ghost_norms` gives Opacus exact per-example norms, cheaper.
"""

__all__ = ["dp_sgd", "ghost_norms", "ledger", "region"]
