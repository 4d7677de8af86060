"""The leak check's short mode (``tests/leakcheck/run_leakcheck.sh --short``) on the library these
tests use: valgrind (10 load / generate / re-order / free cycles) and LeakSanitizer, each where it is
available, plus the RSS and heap-growth checks.  About half a minute; the full run is a separate
quality check (README)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from frankenllama._native import native_library_dir

SCRIPT = Path(__file__).resolve().parent / "leakcheck" / "run_leakcheck.sh"
CC = os.environ.get("CC", "gcc")

pytestmark = [
    pytest.mark.leakcheck,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the leak check runs on Linux"),
]


def _lsan_links(tmp_path: Path) -> bool:
    """Whether the C compiler can build a program with -fsanitize=leak."""
    if shutil.which(CC) is None:
        return False
    source = tmp_path / "lsan.c"
    source.write_text("int main(void) { return 0; }\n")
    proc = subprocess.run([CC, "-fsanitize=leak", str(source), "-o", str(tmp_path / "lsan")], capture_output=True)
    return proc.returncode == 0


def test_short_leakcheck(tmp_path):
    if shutil.which(CC) is None:
        pytest.skip(f"no C compiler ({CC})")
    if shutil.which("valgrind") is None and not _lsan_links(tmp_path):
        pytest.skip("neither valgrind nor LeakSanitizer is available")
    # no LIB_DIR argument: the script finds the library itself (FRANKENLLAMA_LIB_DIR or the package)
    env = {**os.environ, "LEAK_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--short"], env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert f"== lib dir: {native_library_dir()}\n" in proc.stdout, report
    assert "leakcheck: OK" in proc.stdout, report
