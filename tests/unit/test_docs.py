"""README and --help stay true to the code: every setting documented with its default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from webhook.cli import COMMANDS
from webhook.settings import FIELDS

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("field", FIELDS, ids=[f.env for f in FIELDS])
def test_every_setting_is_in_the_readme_with_its_flag_and_default(field):
    default = field.default if field.default else "(empty)"
    row = next((line for line in README.splitlines() if line.startswith(f"| `{field.env}` |")), "")
    assert row, f"{field.env} missing from the README settings table"
    assert f"`{field.flag}`" in row and f"`{default}`" in row
    assert row.split(" | ")[3] == ", ".join(field.commands), "commands column"


def certs_variables() -> dict[str, tuple[str, str, list[str]]]:
    """variable -> (flag, default, commands) of `python -m certs`."""
    from certs.__main__ import COMMANDS as CERTS_COMMANDS

    found: dict[str, tuple[str, str, list[str]]] = {}
    for command, (_summary, _description, options) in CERTS_COMMANDS.items():
        for option in options:
            if option.env:
                default = "(empty)" if option.default is None else str(option.default)
                found.setdefault(option.env, (option.flag, default, []))[2].append(command)
    return found


def test_every_certs_variable_is_in_the_readme_with_its_flag_default_and_commands():
    section = README[README.index("The certificate tool, `python -m certs"):]
    variables = certs_variables()
    assert len(variables) >= 10
    for env, (flag, default, commands) in variables.items():
        row = next((line for line in section.splitlines() if line.startswith(f"| `{env}` |")), "")
        assert row, f"{env} missing from the README's certs table"
        assert row.split(" | ")[1:4] == [f"`{flag}`", f"`{default}`", ", ".join(commands)], row


def exported_metrics() -> list[str]:
    """Every metric name Prewarm's /metrics can show, as a scrape shows it."""
    from prometheus_client import Counter
    from prometheus_client.metrics import MetricWrapperBase

    from webhook import metrics

    names = [metrics.ServingCertificate.NAME]
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            names.append(value._name + ("_total" if isinstance(value, Counter) else ""))
    return names


def test_every_metric_is_in_the_readme():
    section = README[README.index("Metrics (`/metrics`"):]
    names = exported_metrics()
    assert len(names) >= 13  # the discovery above found them
    missing = [name for name in names if f"`{name}" not in section]
    assert not missing, f"metrics not in the README's list: {missing}"


def test_readme_leads_with_the_two_commands():
    assert README.index("make demo") < README.index("make test") < README.index("helm install")
    assert "kubectl label namespace" in README and "kubectl get configmap learned-images" in README


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_of_each_command_lists_its_settings(command):
    result = subprocess.run([sys.executable, "-m", "webhook", command, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for field in FIELDS:
        assert (field.env in result.stdout) == (command in field.commands), field.env


def test_bad_setting_value_is_a_clear_error_not_a_traceback():
    result = subprocess.run([sys.executable, "-m", "webhook", "render", "--shard-size", "zero"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--shard-size='zero'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("module", ["hack.demo", "bench", "hack.controlplane", "certs"])
def test_help_of_every_entry_point_explains_without_starting_anything(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and "etcd" not in result.stderr
