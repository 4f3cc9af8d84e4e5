"""Settings: one table of flags/variables/defaults, parsed and validated once."""

from __future__ import annotations

import dataclasses

import pytest

from webhook import settings as settings_module
from webhook.observer import Flusher, ImageBuffer
from webhook.settings import FIELDS, Settings, SettingsError, load


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_dataclass_defaults_equal_the_documented_defaults(field):
    """FIELDS (what --help and the README show) and the Settings dataclass agree."""
    default = {f.name: f for f in dataclasses.fields(Settings)}[field.name]
    value = default.default_factory() if default.default_factory is not dataclasses.MISSING \
        else default.default
    if field.name == "namespace":
        assert value == "default"  # resolved at load time (the pod's own namespace)
        return
    assert value == field.parse(field.default)


def test_environment_is_parsed_and_flags_win():
    parsed = load(environ={"PREWARM_NAMESPACE": "pw", "PREWARM_IMAGE_TTL": "12h",
                           "PREWARM_DENY": "docker.io/library, ghcr.io/evil",
                           "PREWARM_TOLERATIONS": '[{"operator": "Exists"}]'})
    assert parsed.namespace == "pw" and parsed.image_ttl == 12 * 3600
    assert parsed.deny == ("docker.io/library", "ghcr.io/evil")
    assert parsed.tolerations == [{"operator": "Exists"}]
    assert "pw" in parsed.excluded_namespaces and "kube-system" in parsed.excluded_namespaces


@pytest.mark.parametrize("environ,message", [
    ({"PREWARM_ALLOW": "ghcr.io/ac*"}, "PREWARM_ALLOW"),
    ({"PREWARM_DENY": "nginx:latest"}, "PREWARM_DENY"),
    ({"PREWARM_FLUSH_INTERVAL": "0s"}, "PREWARM_FLUSH_INTERVAL"),
    ({"PREWARM_SHARD_SIZE": "0"}, "PREWARM_SHARD_SIZE"),
    ({"PREWARM_IMAGE_TTL": "forever"}, "PREWARM_IMAGE_TTL"),
    ({"PREWARM_NODE_SELECTOR": "[1]"}, "PREWARM_NODE_SELECTOR"),
    ({"PREWARM_BACKFILL": "maybe"}, "PREWARM_BACKFILL"),
    ({"PREWARM_MAX_BYTES": "1048576"}, "PREWARM_MAX_BYTES must be at most 1040384"),
    ({"PREWARM_DAEMONSET": "prewarm-images-2"}, "may not end in -<digits>"),
    ({"PREWARM_DAEMONSET": "Prewarm_Images"}, "PREWARM_DAEMONSET='Prewarm_Images': use lowercase"),
    ({"PREWARM_DAEMONSET": "p" * 61}, "its last shard, '" + "p" * 61 + "-49', would pass 63"),
    ({"PREWARM_SHARD_SIZE": "501"}, "PREWARM_SHARD_SIZE must be at most 500"),
    ({"PREWARM_LOG_LEVEL": "verbose"}, "PREWARM_LOG_LEVEL='verbose': use one of DEBUG, INFO"),
    ({"PREWARM_RUN_AS_USER": "0"}, "PREWARM_RUN_AS_USER must be a UID of at least 1"),
    ({"PREWARM_MAX_UNAVAILABLE": "0"}, "PREWARM_MAX_UNAVAILABLE='0'"),
    ({"PREWARM_MAX_UNAVAILABLE": "0%"}, "a percentage from 1% to 100%"),
    ({"PREWARM_MAX_UNAVAILABLE": "150%"}, "PREWARM_MAX_UNAVAILABLE='150%'"),
    ({"PREWARM_MAX_UNAVAILABLE": "ten"}, "PREWARM_MAX_UNAVAILABLE='ten'"),
    ({"PREWARM_PORT": "70000"}, "PREWARM_PORT must be from 1 to 65535"),
    ({"PREWARM_BIND_ADDRESS": "0.0.0.0:8443"},
     "PREWARM_BIND_ADDRESS='0.0.0.0:8443': has a ':' but is not an IPv6 address (the port "
     "is a setting of its own)"),
    ({"PREWARM_BIND_ADDRESS": "[10.0.0.1]"},
     "PREWARM_BIND_ADDRESS='[10.0.0.1]': brackets are for IPv6 addresses only"),
    ({"PREWARM_BIND_ADDRESS": "::gg"}, "has a ':' but is not an IPv6 address"),
    ({"PREWARM_BIND_ADDRESS": "fe80::1%eth0"}, "an IPv6 zone (%...) cannot be bound here"),
    ({"PREWARM_BIND_ADDRESS": "[fe80::1%eth0]"}, "an IPv6 zone"),
    ({"PREWARM_BIND_ADDRESS": "999.1.1.1"}, "PREWARM_BIND_ADDRESS='999.1.1.1': not an IPv4"),
    ({"PREWARM_BIND_ADDRESS": "my host"}, "not an IP address or a host name"),
    ({"PREWARM_BIND_ADDRESS": "-"}, "not an IP address or a host name"),
    ({"PREWARM_BIND_ADDRESS": ".."}, "not an IP address or a host name"),
    # an image in use would expire between two refreshes of its lastSeen (6h + 5m)
    ({"PREWARM_IMAGE_TTL": "1h"}, "PREWARM_IMAGE_TTL (3600s) must be longer than"),
    ({"PREWARM_IMAGE_TTL": "2h", "PREWARM_LAST_SEEN_REFRESH": "1h",
      "PREWARM_RESYNC_PERIOD": "1h"}, "PREWARM_LAST_SEEN_REFRESH + PREWARM_RESYNC_PERIOD"),
])
def test_bad_values_are_refused_naming_the_variable(environ, message):
    with pytest.raises(SettingsError) as error:
        load(environ={"PREWARM_NAMESPACE": "pw", **environ})
    assert message in str(error.value)


@pytest.mark.parametrize("text,host", [
    ("", ""), ("  ", ""), ("0.0.0.0", "0.0.0.0"), ("127.0.0.1", "127.0.0.1"),
    ("::", "::"), ("[::]", "::"), ("::1", "::1"), ("[fd00::5]", "fd00::5"),
    ("localhost", "localhost"), ("observer-0.prewarm.svc", "observer-0.prewarm.svc"),
    ("[::ffff:10.0.0.1]", "::ffff:10.0.0.1"),
])
def test_bind_addresses_are_kept_without_brackets(text, host):
    assert load(environ={"PREWARM_BIND_ADDRESS": text}, command="serve").bind_address == host


def test_a_refused_flag_is_named_as_given():
    """A value passed as a flag is named by its flag in the error, not by a variable the
    user never set."""
    import argparse

    parser = argparse.ArgumentParser()
    settings_module.add_arguments(parser, "reconcile")
    args = parser.parse_args(["--image-ttl", "1h", "--shard-size", "5"])
    with pytest.raises(SettingsError) as error:
        load(args, environ={"PREWARM_NAMESPACE": "pw"}, command="reconcile")
    assert str(error.value).startswith("--image-ttl (3600s) must be longer than "
                                       "PREWARM_LAST_SEEN_REFRESH + PREWARM_RESYNC_PERIOD")
    with pytest.raises(SettingsError, match=r"^--shard-size must be at least 1"):
        load(parser.parse_args(["--shard-size", "0"]), environ={}, command="reconcile")
    with pytest.raises(SettingsError, match=r"^PREWARM_SHARD_SIZE must be at least 1"):
        load(parser.parse_args([]), environ={"PREWARM_SHARD_SIZE": "0"}, command="reconcile")


class _BrokenStore:
    """A store whose write fails with an error nobody planned for."""

    def update(self, mutate):
        raise TypeError("unforeseen")


def test_a_failed_flush_keeps_the_whole_batch_for_the_next_attempt():
    buffer = ImageBuffer(limit=100)
    flusher = Flusher(buffer, _BrokenStore, Settings(namespace="pw"), clock=lambda: 1000.0)
    buffer.add(["a.io/x:1", "a.io/y:1"], "team", 999.0)
    assert flusher.flush() is None
    assert sorted(buffer.drain()) == ["a.io/x:1", "a.io/y:1"]
    assert flusher.last_error


def test_each_command_reads_and_checks_only_the_settings_it_uses():
    # the observer never expires images: its TTL is the reconciler's to check
    environ = {"PREWARM_NAMESPACE": "pw", "PREWARM_IMAGE_TTL": "363m",
               "PREWARM_RESYNC_PERIOD": "1m"}
    assert load(environ={**environ, "PREWARM_RESYNC_PERIOD": "1h"}, command="serve")
    assert load(environ=environ, command="reconcile").image_ttl == 363 * 60
    with pytest.raises(SettingsError, match="PREWARM_IMAGE_TTL"):
        load(environ={**environ, "PREWARM_RESYNC_PERIOD": "1h"}, command="reconcile")
    # a value only another command reads does not stop this one
    assert load(environ={"PREWARM_SHARD_SIZE": "zero"}, command="status")
    with pytest.raises(SettingsError, match="PREWARM_SHARD_SIZE"):
        load(environ={"PREWARM_SHARD_SIZE": "zero"}, command="render")


def test_settings_module_has_one_entry_per_dataclass_field():
    assert {f.name for f in FIELDS} == {f.name for f in dataclasses.fields(Settings)}
    assert settings_module.parse_duration("1.5m") == 90


def test_default_keepalive_outlasts_the_api_servers_idle_connections():
    # client-go's transport (utilnet.SetOldTransportDefaults) keeps an idle webhook
    # connection for Go's default 90 s; closing sooner races the API server's next POST
    assert Settings().keepalive > 90
