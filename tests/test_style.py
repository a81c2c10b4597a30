"""One formatting and lint style across the repository (settings in pyproject.toml)."""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


@pytest.mark.parametrize(
    "command",
    [["pyink", "--check", "--quiet", "."], ["ruff", "check", "--quiet", "."]],
    ids=["pyink", "ruff"],
)
def test_repository_follows_the_checked_style(command):
  tool = os.path.join(BIN, command[0])
  result = subprocess.run([tool, *command[1:]], cwd=REPO_ROOT, capture_output=True, text=True)
  assert result.returncode == 0, (
      f"{command[0]} found files off style (fix: {command[0]} "
      f"{'.' if command[0] == 'pyink' else 'check --fix .'}):\n{result.stdout}{result.stderr}"
  )
