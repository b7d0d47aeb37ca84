"""p2p.memory: freed buffers are reused warm instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p2p import memory

# Allocate and free 1 MiB buffers the way the codec does per chunk frame; print the minor
# page faults that took. Run in a child so the setting under test starts from glibc's defaults.
_CHILD = """
import resource, sys
from p2p import memory
if sys.argv[1] == "retain":
    assert memory.retain_freed_memory(64 << 20)
chunk = b"x" * (1 << 20)
for _ in range(3):  # warm up: the first round always faults
    frames = [chunk + b"y" for _ in range(40)]
    del frames
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    frames = [chunk + b"y" for _ in range(40)]
    del frames
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_stops_page_faults_on_reused_buffers() -> None:
    default, retained = _faults("default"), _faults("retain")
    # 10 rounds of 40 MiB: glibc's defaults fault most of those 100k pages in again.
    assert default > 20_000
    assert retained < default / 20


def test_retention_only_rises_and_is_capped() -> None:
    assert memory.retain_freed_memory(8 << 20)
    now = memory.retained_bytes()
    assert now >= 8 << 20
    assert memory.retain_freed_memory(1 << 20)  # a smaller ask changes nothing
    assert memory.retained_bytes() == now


def test_retention_is_capped() -> None:
    # In a child: a 1 GiB retention would outlive this test in the test process.
    code = "from p2p import memory; print(memory.retain_freed_memory(1 << 40), memory.retained_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", str(memory.MAX_RETAINED)]


def test_negative_size_is_refused() -> None:
    before = memory.retained_bytes()
    with pytest.raises(ValueError, match="nbytes"):
        memory.retain_freed_memory(-1)
    assert memory.retained_bytes() == before
