"""The base every layer may import: models, registries, devices, the text model (pure torch)."""
