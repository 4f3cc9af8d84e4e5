"""Settings: parsed once from `PREWARM_*` environment variables, overridable by flags.

Every setting has one entry in `FIELDS` (flag name, environment variable, default and
help text); the CLI builds its argparse options from that table and the chart's values
docs name the same variables, so the three cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

SERVICEACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# Namespaces never learned, whatever their labels: the control plane's own and, added at
# runtime, the namespace Prewarm runs in (it must not learn its own pods).
ALWAYS_EXCLUDED_NAMESPACES = ("kube-system", "kube-node-lease")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `12h` or `30d`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 12h, 30d)")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def parse_list(text: str) -> tuple[str, ...]:
    """A comma- or whitespace-separated list; empty items dropped."""
    return tuple(item for item in re.split(r"[,\s]+", text.strip()) if item)


def parse_json(text: str) -> Any:
    return json.loads(text) if text.strip() else None


_HOST_NAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def parse_bind_address(text: str) -> str:
    """A host to listen on: an IPv4 address, an IPv6 address (with or without brackets)
    or a host name; "" for every address (webhook.listen). Returned without brackets."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError("brackets are for IPv6 addresses only")
    if ":" in host:
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has a ':' but is not an IPv6 address (the port is a "
                             "setting of its own)") from None
        if address.scope_id:
            raise ValueError("an IPv6 zone (%...) cannot be bound here: use the address "
                             "without it, or leave this empty for every address")
        return host
    if re.fullmatch(r"[0-9.]*[0-9][0-9.]*", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError("not an IPv4 address") from None
    elif host and not _HOST_NAME_RE.fullmatch(host):
        raise ValueError("not an IP address or a host name")
    return host


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


@dataclass(frozen=True)
class Field:
    name: str  # attribute on Settings; flag is --name-with-dashes, env PREWARM_NAME
    default: str  # as it would be written in the environment
    parse: Callable[[str], Any]
    help: str
    commands: tuple[str, ...] = ("serve", "reconcile", "render", "status")

    @property
    def env(self) -> str:
        return "PREWARM_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


ALL = ("serve", "reconcile", "render", "status")
SERVE = ("serve",)
RECONCILE = ("reconcile", "render")  # what render needs to draw the DaemonSets
LEARN = ("serve", "reconcile")  # the writers of learned-images: the observer and backfill
RECONCILER = ("reconcile",)

FIELDS: tuple[Field, ...] = (
    # -- where Prewarm keeps its state ---------------------------------------------------
    Field("namespace", "", str, "namespace of learned-images, the DaemonSet and the Lease "
          "(default: the pod's own namespace, else 'default')"),
    Field("configmap", "learned-images", str, "name of the learned-images ConfigMap"),
    Field("log_format", "text", str, "log format: text or json"),
    Field("log_level", "INFO", str, "log level: DEBUG, INFO, WARNING, ERROR"),
    # -- the observer -------------------------------------------------------------------
    Field("port", "8443", int, "HTTPS port of the observer", SERVE),
    Field("bind_address", "", parse_bind_address, "address the observer listens on; empty: "
          "every address, IPv6 and IPv4 (0.0.0.0 where the kernel has no IPv6)", SERVE),
    Field("tls_cert_file", "", str, "serving certificate (PEM); re-read when it changes", SERVE),
    Field("tls_key_file", "", str, "serving private key (PEM); re-read when it changes", SERVE),
    Field("workers", "2", int, "gunicorn worker processes", SERVE),
    Field("threads", "8", int, "threads per gunicorn worker (gthread)", SERVE),
    # The API server's webhook client (client-go's transport cache, utilnet's transport
    # defaults) keeps an idle connection for Go's default 90 s. A server that closes
    # first races the client's next POST on that connection, which Go does not retry
    # (not idempotent): that review would fail and, under failurePolicy Ignore, go unseen.
    Field("keepalive", "120", int, "seconds an idle keep-alive connection is held open; longer "
          "than the API server's idle reuse (90 s) so TLS connections are reused", SERVE),
    Field("max_body_bytes", str(3 * 1024 * 1024), int, "largest AdmissionReview accepted; "
          "etcd caps objects at 1.5 MiB and a review carries the object twice on UPDATE", SERVE),
    Field("flush_interval", "1s", parse_duration, "how often buffered images are written", SERVE),
    Field("buffer_max", "20000", int, "images a worker holds while the API server is "
          "unreachable; beyond it new images are dropped and counted "
          "(prewarm_images_dropped_total), and backfill re-learns them", SERVE),
    Field("last_seen_refresh", "6h", parse_duration, "an already-known image's lastSeen is "
          "rewritten at most this often (steady state makes no other writes)", LEARN),
    # -- the learned set (shared by every writer) ---------------------------------------
    Field("max_images", "5000", int, "cap on images in learned-images", LEARN),
    Field("max_images_per_namespace", "500", int, "cap on images first learned from one "
          "namespace", LEARN),
    Field("max_bytes", str(900 * 1024), int, "cap on learned-images' size: its values, plus "
          "80 bytes per image kept for the reconciler's state fields; at most 1040384, as the "
          "API server refuses a ConfigMap over 1 MiB", LEARN),
    Field("image_ttl", "30d", parse_duration, "images not seen for this long expire; longer "
          "than last_seen_refresh + resync_period", RECONCILER),
    Field("allow", "", parse_list, "if set, only images under these registries/repositories "
          "are learned (comma-separated; matched on whole path segments, '*' matches one "
          "segment), e.g. 'ghcr.io/acme,docker.io/library'", LEARN),
    Field("deny", "", parse_list, "images under these registries/repositories are never "
          "learned (same syntax as --allow; deny wins)", LEARN),
    Field("exclude_namespaces", "", parse_list, "namespaces never learned, besides "
          "kube-system, kube-node-lease and Prewarm's own", LEARN),
    # -- the reconciler -----------------------------------------------------------------
    Field("daemonset", "prewarm-images", str, "name of the pre-pull DaemonSet (shards get "
          "-<n>)", RECONCILE),
    Field("shard_size", "100", int, "at most this many images per DaemonSet (at most 500)",
          RECONCILE),
    Field("resync_period", "5m", parse_duration, "full reconcile + backfill period",
          RECONCILER),
    Field("status_interval", "10s", parse_duration, "how often the leader looks at the "
          "prepuller pods' pull statuses when nothing else triggers a pass", RECONCILER),
    Field("backfill", "true", parse_bool, "learn images of running Pods in opted-in "
          "namespaces on start and every resync", RECONCILER),
    Field("failure_backoff", "30m", parse_duration, "a failing image is first retried after "
          "this, then twice as long after each failed retry, up to a day (counted by the "
          "running leader: --once and a new leader start again from this)", RECONCILER),
    Field("lease_name", "prewarm-reconciler", str, "Lease used for leader election",
          RECONCILER),
    Field("lease_duration", "15s", parse_duration, "leader lease duration", RECONCILER),
    Field("identity", "", str, "leader-election identity (default: hostname-pid)", RECONCILER),
    Field("helper_image", "ghcr.io/prewarm/prewarm:latest", str, "Prewarm's own image; its "
          "static no-op helper is copied into every pre-pull pod", RECONCILE),
    Field("helper_path", "/usr/local/bin/prewarm-noop", str, "path of the no-op helper in "
          "--helper-image", RECONCILE),
    Field("pause_image", "registry.k8s.io/pause:3.10", str, "main container of the pre-pull "
          "pods", RECONCILE),
    Field("run_as_user", "65532", int, "numeric UID of every pre-pull container", RECONCILE),
    Field("priority_class", "", str, "priorityClassName of the pre-pull pods", RECONCILE),
    Field("node_selector", '{"kubernetes.io/os": "linux"}', parse_json, "nodeSelector of "
          "the pre-pull pods (JSON object)", RECONCILE),
    Field("tolerations", "", parse_json, "tolerations of the pre-pull pods (JSON list)",
          RECONCILE),
    Field("affinity", "", parse_json, "affinity of the pre-pull pods (JSON object)",
          RECONCILE),
    Field("image_pull_secrets", "", parse_list, "imagePullSecrets names for the pre-pull "
          "pods (comma-separated, in Prewarm's namespace)", RECONCILE),
    Field("max_unavailable", "10%", str, "rollingUpdate.maxUnavailable of the DaemonSet",
          RECONCILE),
    Field("health_port", "8081", int, "reconciler's /healthz, /readyz and /metrics port, on every "
          "address, IPv6 and IPv4 (0: off)", RECONCILER),
)


@dataclass(frozen=True)
class Settings:
    namespace: str = "default"
    configmap: str = "learned-images"
    log_format: str = "text"
    log_level: str = "INFO"
    port: int = 8443
    bind_address: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    workers: int = 2
    threads: int = 8
    keepalive: int = 120
    max_body_bytes: int = 3 * 1024 * 1024
    flush_interval: float = 1.0
    buffer_max: int = 20000
    last_seen_refresh: float = 6 * 3600.0
    max_images: int = 5000
    max_images_per_namespace: int = 500
    max_bytes: int = 900 * 1024
    image_ttl: float = 30 * 86400.0
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    exclude_namespaces: tuple[str, ...] = ()
    daemonset: str = "prewarm-images"
    shard_size: int = 100
    resync_period: float = 300.0
    status_interval: float = 10.0
    backfill: bool = True
    failure_backoff: float = 1800.0
    lease_name: str = "prewarm-reconciler"
    lease_duration: float = 15.0
    identity: str = ""
    helper_image: str = "ghcr.io/prewarm/prewarm:latest"
    helper_path: str = "/usr/local/bin/prewarm-noop"
    pause_image: str = "registry.k8s.io/pause:3.10"
    run_as_user: int = 65532
    priority_class: str = ""
    node_selector: Any = field(default_factory=lambda: {"kubernetes.io/os": "linux"})
    tolerations: Any = None
    affinity: Any = None
    image_pull_secrets: tuple[str, ...] = ()
    max_unavailable: str = "10%"
    health_port: int = 8081

    @property
    def excluded_namespaces(self) -> frozenset[str]:
        """Namespaces whose objects are never learned (checked in code as well as by the
        webhook's namespaceSelector, so a hand-edited configuration cannot undo it)."""
        return frozenset(ALWAYS_EXCLUDED_NAMESPACES) | {self.namespace} | set(
            self.exclude_namespaces)


def default_namespace() -> str:
    try:
        with open(SERVICEACCOUNT_NAMESPACE_FILE, encoding="utf-8") as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds a flag for every setting used by `command`; help names the env variable."""
    for spec in FIELDS:
        if command not in spec.commands:
            continue
        parser.add_argument(
            spec.flag, dest=spec.name, default=None, metavar=spec.env,
            # argparse %-formats help strings: a literal % (the "10%" default) is %%
            help=f"{spec.help} [env {spec.env}, default {spec.default!r}]".replace("%", "%%"))


def load(args: argparse.Namespace | None = None,
         environ: dict[str, str] | os._Environ[str] | None = None, *,
         command: str | None = None) -> Settings:
    """Settings from flags (if given) over `PREWARM_*` environment over defaults. With a
    command (or `args.command`), only the settings that command uses are read and checked:
    the chart gives both deployments the same environment, and the observer must not
    refuse a value only the reconciler reads."""
    environ = os.environ if environ is None else environ
    command = command or getattr(args, "command", None)
    used = {spec.name for spec in FIELDS if command is None or command in spec.commands}
    values: dict[str, Any] = {}
    given: dict[str, str] = {}  # name -> the flag or variable its value came from
    for spec in FIELDS:
        if spec.name not in used:
            continue
        raw = getattr(args, spec.name, None) if args is not None else None
        source = spec.flag
        if raw is None:
            raw, source = environ.get(spec.env), spec.env
        if raw is None:
            continue
        try:
            values[spec.name] = spec.parse(str(raw))
        except (ValueError, json.JSONDecodeError) as error:
            raise SettingsError(f"{source}={raw!r}: {error}") from None
        given[spec.name] = source
    if not values.get("namespace"):
        values["namespace"] = default_namespace()
    settings = Settings(**values)
    _validate(settings, used, given=given)
    return settings


# PREWARM_MAX_BYTES already counts the room the reconciler's fields may take
# (store.RECONCILER_RESERVE per image): it may go up to what a write may hold.
MAX_BYTES_CEILING = 1024 * 1024 - 8 * 1024  # also store.DATA_LIMIT, what a write may hold


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Each pull container is some 0.6 kB of a DaemonSet, and of each of its pods, which also
# carry a status for each: at 2,000 the DaemonSet alone was refused by etcd ("request
# is too large").
MAX_SHARD_SIZE = 500


def _validate(settings: Settings, used: set[str] | None = None, *,
              given: dict[str, str] | None = None) -> None:
    """Checks the settings in `used` (all of them by default). A message names a setting
    as it was `given` (its flag, or its variable), else by its variable."""
    if used is None:
        used = {spec.name for spec in FIELDS}
    given = given or {}

    def named(name: str) -> str:
        return given.get(name) or f"PREWARM_{name.upper()}"

    if settings.log_format not in ("text", "json"):
        raise SettingsError(f"{named('log_format')}={settings.log_format!r}: use text or json")
    if settings.log_level.upper() not in LOG_LEVELS:
        raise SettingsError(f"{named('log_level')}={settings.log_level!r}: use one of "
                            f"{', '.join(LOG_LEVELS)}")
    for name in ("workers", "threads", "max_images", "max_images_per_namespace", "shard_size",
                 "buffer_max", "max_bytes"):
        if getattr(settings, name) < 1:
            raise SettingsError(f"{named(name)} must be at least 1")
    for name in ("flush_interval", "resync_period", "status_interval", "lease_duration"):
        if getattr(settings, name) <= 0:
            raise SettingsError(f"{named(name)} must be more than 0")
    if settings.run_as_user < 1:
        raise SettingsError(f"{named('run_as_user')} must be a UID of at least 1: the pre-pull "
                            "containers run as non-root (restricted Pod Security profile)")
    if not re.fullmatch(r"[1-9][0-9]*|([1-9][0-9]?|100)%", settings.max_unavailable):
        raise SettingsError(f"{named('max_unavailable')}={settings.max_unavailable!r}: use a "
                            f"number of pods (at least 1) or a percentage from 1% to 100%")
    for name, lowest in (("port", 1), ("health_port", 0)):
        if not lowest <= getattr(settings, name) <= 65535:
            raise SettingsError(f"{named(name)} must be from {lowest} to 65535")
    if settings.shard_size > MAX_SHARD_SIZE:
        raise SettingsError(
            f"{named('shard_size')} must be at most {MAX_SHARD_SIZE}: a DaemonSet of more pull "
            f"containers, or its pods with a status for each, nears the API server's limit "
            f"on an object's size, and every pass would fail")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", settings.daemonset):
        raise SettingsError(
            f"{named('daemonset')}={settings.daemonset!r}: use lowercase letters, digits and "
            f"'-', starting and ending with a letter or digit (a DaemonSet's name, also a "
            f"label value)")
    last = f"{settings.daemonset}-{-(-settings.max_images // settings.shard_size) - 1}"
    if "daemonset" in used and len(last) > 63:
        raise SettingsError(
            f"{named('daemonset')}={settings.daemonset!r} is too long: its last shard, "
            f"{last!r}, would pass 63 characters (its name is a label value)")
    if re.search(r"-[0-9]+$", settings.daemonset):
        raise SettingsError(
            f"{named('daemonset')}={settings.daemonset!r} may not end in -<digits>: its shards "
            f"are named <daemonset>-<n>, and another release's would be taken for its own")
    if settings.max_bytes > MAX_BYTES_CEILING:
        raise SettingsError(
            f"{named('max_bytes')} must be at most {MAX_BYTES_CEILING}: the API server refuses a "
            f"ConfigMap over 1 MiB")
    if "image_ttl" in used and \
            settings.image_ttl <= settings.last_seen_refresh + settings.resync_period:
        raise SettingsError(
            f"{named('image_ttl')} ({settings.image_ttl:g}s) must be longer than "
            f"{named('last_seen_refresh')} + {named('resync_period')} "
            f"({settings.last_seen_refresh + settings.resync_period:g}s): an image in use "
            f"would otherwise expire between two refreshes of its lastSeen")
    from webhook.images import ImageFilter

    try:
        ImageFilter(allow=settings.allow, deny=settings.deny)
    except ValueError as error:
        raise SettingsError(f"{named('allow')} / {named('deny')}: {error}") from None
    if settings.node_selector is not None and not isinstance(settings.node_selector, dict):
        raise SettingsError(f"{named('node_selector')} must be a JSON object")
    if settings.tolerations is not None and not isinstance(settings.tolerations, list):
        raise SettingsError(f"{named('tolerations')} must be a JSON list")
    if settings.affinity is not None and not isinstance(settings.affinity, dict):
        raise SettingsError(f"{named('affinity')} must be a JSON object")


def replace(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, **changes)
