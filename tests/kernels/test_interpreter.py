"""Runs ``interpreter_cases.py`` (every Triton kernel vs its reference) under ``TRITON_INTERPRET=1``.

Triton decides interpreted-vs-compiled when it is first imported, so the cases need a fresh
process with the variable set from the start.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("interpreter_cases.py")
ROOT = CASES.parents[2]


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed on this platform")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout
