"""Gradient-inversion attacks (pure code) and the malicious peer that runs them live."""
