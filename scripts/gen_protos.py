"""Regenerate the committed protobuf/gRPC code under p2p/proto from protos/.

Usage: python scripts/gen_protos.py [--out DIR]

This is the one way the generated code is produced; tests/p2p/test_proto_drift.py
runs it into a temporary directory and compares the result with the committed files.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
# Paths relative to PROTO_ROOT; they mirror the Python package they generate into.
PROTO_FILES = ("p2p/proto/gossip.proto",)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every proto file into out_dir and return the generated paths.

    Raises:
        RuntimeError: if protoc reports an error.
    """
    from grpc_tools import protoc  # dev dependency only; imported late on purpose

    out_dir.mkdir(parents=True, exist_ok=True)
    # The bundled well-known types, so imports of google/protobuf/*.proto resolve.
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_ROOT / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out_dir / path for name in PROTO_FILES for path in generated_names(name)]


def generated_names(proto: str) -> tuple[str, str, str]:
    """Return the three files protoc generates for one proto path."""
    stem = proto.removesuffix(".proto")
    return (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, generate, and print the written files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
