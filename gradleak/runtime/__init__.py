"""The runtime layer: Ray actors hosting peers, the attacker's capture, the evaluator, metrics, records."""
