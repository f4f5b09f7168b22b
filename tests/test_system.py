"""What the agent tunes in the operating system: freed heap pages given back on request."""

from __future__ import annotations

import os
import platform

import pytest

from edge_agent.system import give_back_free_memory


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc")
def test_freed_heap_pages_go_back_to_the_system() -> None:
    """Memory let go below what is still held stays in the heap (resident) until it is given
    back: the agent's process does so once it let the network's weights go."""
    let_go = [os.urandom(4000) for _ in range(6000)]  # ~24 MB in the heap, below the next line
    held = [os.urandom(4000) for _ in range(10)]
    before = _rss_bytes()
    del let_go
    assert give_back_free_memory()
    assert before - _rss_bytes() > 12_000_000
    assert len(held) == 10
