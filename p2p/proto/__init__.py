"""Generated protobuf/gRPC code for the gossip protocol; regenerate with scripts/gen_protos.py."""
