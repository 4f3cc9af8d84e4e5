"""`python -m webhook` as a user runs it: failures are one line and an exit code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import python_env, unreachable_kubeconfig


@pytest.mark.parametrize("command", [["reconcile", "--once"], ["status"], ["render"]],
                         ids=" ".join)
def test_an_unreachable_api_server_is_one_line_not_a_traceback(command, tmp_path):
    env = python_env(KUBECONFIG=str(unreachable_kubeconfig(tmp_path)),
                     PREWARM_NAMESPACE="prewarm")
    result = subprocess.run([sys.executable, "-m", "webhook", *command], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Connection refused" in lines[0] or "cannot reach" in lines[0], lines[0]
    assert result.stdout == ""
