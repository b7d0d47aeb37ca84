"""Gossip protocol: updates, codec, defences, topology, peers and their gRPC/Ray adapters."""
