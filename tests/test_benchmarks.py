"""Every benchmark script imports: a rename in the library or in benchmarks/common.py that a
script still uses fails here, not hours into a run by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_benchmark_script_imports(script: str) -> None:
    # A fresh interpreter: the scripts import their sibling `common` from benchmarks/.
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import {script}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
