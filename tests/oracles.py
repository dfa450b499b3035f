"""Independent references the tests check the project against (not collected by pytest: no ``test_`` prefix)."""

from collections.abc import Iterable

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant


def dp_accounting_epsilon(
    delta: float,
    history: Iterable[tuple[float, float, int]] = (),
    releases: Iterable[float] = (),
    accountant: str = "rdp",
) -> float:
    """Epsilon at ``delta`` by Google's dp_accounting, to check ``common.privacy.ledger`` against.

    The composition of the Gaussian ``releases`` (noise multipliers at sample
    rate 1, e.g. a noised user count) and then, for each ``(sigma, rate, steps)``
    of ``history`` (a ledger's), ``steps`` Poisson-sampled Gaussian steps.
    ``accountant`` names the project's accountant to mirror: ``"prv"`` is checked
    against dp_accounting's PLD accountant, ``"rdp"`` against its RDP accountant.
    """
    event = dp_accounting.ComposedDpEvent(
        [
            *(dp_accounting.GaussianDpEvent(sigma) for sigma in releases),
            *(
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps
                )
                for sigma, rate, steps in history
            ),
        ]
    )
    if accountant == "prv":
        independent = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    else:
        independent = rdp_privacy_accountant.RdpAccountant()
    return independent.compose(event).get_epsilon(delta)
