"""`stepfleet.allocator`: one malloc arena, applied by the CLI before any thread starts."""

import subprocess
import sys

from stepfleet.allocator import single_malloc_arena


def test_an_arena_limit_from_the_environment_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert single_malloc_arena() is False


def test_glibc_takes_the_limit():
    if not sys.platform.startswith("linux"):
        return
    # In a fresh interpreter (the test process's own allocator state stays untouched).
    code = "import os; os.environ.pop('MALLOC_ARENA_MAX', None); " \
           "from stepfleet.allocator import single_malloc_arena as f; print(f())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
