"""Lint and format check with ruff (settings in pyproject.toml), so style drift fails CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(args):
    proc = subprocess.run([sys.executable, "-m", "ruff", *args, "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"ruff {' '.join(args)} found problems (fix: ruff check --fix . && ruff format .):\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    )
