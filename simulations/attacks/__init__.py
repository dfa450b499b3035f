"""``xmfl benchmark attacks``: the attacks that would show this project's privacy claims broken.

Each attack is one module with one function, ``attack(settings) -> dict``, that runs against
the real ClientApp code (:mod:`simulations.attacks.hostile`: the server's side played by the
attacker, each market's side by :data:`clients.client_app.app`) and returns its JSON section of
``OUT/attacks.json``; :data:`ATTACKS` maps the section's name to it, so a new attack is a file and
a line. The command (:mod:`simulations.attacks.command`) runs them in order and writes
``attacks.json`` and a table.
"""

from simulations.attacks.settings import AttackSettings

__all__ = ["AttackSettings"]
