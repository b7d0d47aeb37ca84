"""Gradient-inversion attacks as pure code: the API (attacker.api) and its implementations.

Importing any part of the package registers every attack: the implementations
register themselves when imported here.
"""

from attacker import analytic, dlg, ig, imprint, spear  # noqa: F401  (registration)
