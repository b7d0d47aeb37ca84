"""gradleak: a peer-to-peer federated-learning testbed that measures gradient leakage."""

__version__ = "0.1.0"
