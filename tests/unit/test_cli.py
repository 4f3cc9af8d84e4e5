"""`python -m webhook` as a user runs it: failures are one line and an exit code."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO


def unreachable_kubeconfig(tmp_path: Path) -> Path:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n")
    return kubeconfig


@pytest.mark.parametrize("command", [["reconcile", "--once"], ["status"], ["render"]],
                         ids=" ".join)
def test_an_unreachable_api_server_is_one_line_not_a_traceback(command, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREWARM_")}
    env.update(KUBECONFIG=str(unreachable_kubeconfig(tmp_path)), PREWARM_NAMESPACE="prewarm",
               PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "webhook", *command], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Connection refused" in lines[0] or "cannot reach" in lines[0], lines[0]
    assert result.stdout == ""
