"""keep_freed_host_memory (bakallm.acceleration): large blocks come from glibc's heap and stay in
the process when freed, so that the next step reuses their pages instead of faulting them in."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (Linux)")

# Frees a 256 MiB block and reports how much of it stays resident, as a fraction.
PROBE = textwrap.dedent(
    """
    import sys
    from bakallm.acceleration import keep_freed_host_memory

    def resident():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    applied = keep_freed_host_memory() if sys.argv[1] == "keep" else False
    size = 256 * 2**20
    before = resident()
    block = bytearray(size)  # zero-filled: every page touched
    del block
    print(applied, (resident() - before) / size)
    """
)


def freed_block_kept(mode: str, **environment: str) -> tuple[str, float]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**env, **environment}, capture_output=True, text=True, check=True
    )
    applied, kept = result.stdout.split()
    return applied, float(kept)


def test_freed_memory_stays_in_the_process_for_reuse():
    assert freed_block_kept("keep") == ("True", pytest.approx(1.0, abs=0.05))


def test_without_it_glibc_gives_a_large_freed_block_back():
    assert freed_block_kept("system") == ("False", pytest.approx(0.0, abs=0.05))


def test_the_users_own_malloc_settings_win():
    applied, kept = freed_block_kept("keep", MALLOC_ARENA_MAX="2")
    assert applied == "False" and kept == pytest.approx(0.0, abs=0.05)
