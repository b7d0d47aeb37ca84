"""Print the runtime dependencies of pyproject.toml, one per line, for the image's dependency layer.

The Dockerfile installs these before it copies the source, so editing code does not
re-download torch. Extra requirements given as arguments (the torch pins) replace the
pyproject entry of the same project, so the layer installs exactly one spec per package.
Standard library only: it runs in the bare base image.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def project_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, pins: list[str]) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pinned = {project_name(p): p for p in pins}
    out = [pinned.pop(project_name(d), d) for d in deps]
    if pinned:
        raise ValueError(f"pins for projects pyproject does not depend on: {sorted(pinned)}")
    return out


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1]), sys.argv[2:])))
