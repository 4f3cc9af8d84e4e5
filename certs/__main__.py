"""`python -m certs`: CA + serving certificates for the webhook, without cert-manager.

    generate  write ca.crt, ca.key, tls.crt, tls.key into a folder (tests, `make demo`)
    secret    ensure the TLS Secret exists and is valid, then patch the caBundle (Helm hook)
    check     verify a cert/key/CA triple (exit 1 listing the problems)

Options with a `PREWARM_*` environment equivalent show it in --help; a flag wins
over its variable. Exit codes: 0 done, 1 failed (or `check` found problems), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certs import tls

SERVICEACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class UsageError(Exception):
    """Bad or missing settings: exit code 2."""


class Failure(Exception):
    """An expected runtime failure: one line on stderr, exit code 1."""


# -- options with environment fallbacks --------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _dns_name(text: str) -> str:
    try:
        return tls.normalize_dns_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ip_address(text: str) -> str:
    try:
        return tls.normalize_ip_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _text(text: str) -> str:
    return text


@dataclass(frozen=True)
class Option:
    flag: str
    env: str | None
    help: str
    type: Callable[[str], Any] = _text
    many: bool = False  # repeatable / several values; the variable is comma-separated
    default: Any = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        help_text = self.help
        if self.env:
            help_text += f" [env {self.env}{', comma-separated' if self.many else ''}]"
        if self.default is not None:
            help_text += f" (default: {self.default})"
        kwargs: dict[str, Any] = {"dest": self.dest, "type": self.type, "help": help_text,
                                  "metavar": self.metavar, "default": None}
        if self.many:
            kwargs.update(action="extend", nargs="+")
        parser.add_argument(self.flag, **kwargs)

    def resolve(self, args: argparse.Namespace) -> None:
        """Fill the value from the environment, then the default, converting and
        validating the variable as the flag would be."""
        if getattr(args, self.dest) is not None:
            return
        raw = os.environ.get(self.env, "").strip() if self.env else ""
        if not raw:
            setattr(args, self.dest, [] if self.many else self.default)
            return
        items = [item for item in raw.replace(",", " ").split() if item] if self.many else [raw]
        try:
            values = [self.type(item) for item in items]
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise UsageError(f"{self.env}: {exc}") from None
        setattr(args, self.dest, values if self.many else values[0])


DNS = Option("--dns", "PREWARM_CERT_DNS", "DNS name for the SANs (repeatable)",
             type=_dns_name, many=True, metavar="NAME")
IP = Option("--ip", "PREWARM_CERT_IPS", "IP address for the SANs (repeatable)",
            type=_ip_address, many=True, metavar="IP")
DAYS = Option("--days", "PREWARM_CERT_DAYS", "validity of the serving certificate in days",
              type=_positive_int, default=365, metavar="N")
CA_DAYS = Option("--ca-days", "PREWARM_CA_DAYS", "validity of a new CA in days",
                 type=_positive_int, default=3650, metavar="N")

COMMANDS: dict[str, tuple[str, str, list[Option]]] = {
    "generate": (
        "write a new CA and serving pair into a folder",
        "Write a new CA and a serving pair signed by it: ca.crt, ca.key, tls.crt, tls.key "
        "(keys mode 0600). At least one --dns or --ip.",
        [
            DNS, IP,
            Option("--out-dir", "PREWARM_CERT_DIR", "folder to write the four files into "
                   "(created if missing; existing files are replaced)", metavar="DIR"),
            DAYS, CA_DAYS,
        ],
    ),
    "secret": (
        "ensure the TLS Secret and patch caBundle (Helm hook)",
        "Ensure the kubernetes.io/tls Secret holds a valid pair for the Service (created "
        "once, reused while valid, renewed from the stored CA when expiring), then set "
        "caBundle on the named webhook configurations. Cluster access from --kubeconfig, "
        "KUBECONFIG, ~/.kube/config, else in-cluster (as the observer's).",
        [
            Option("--namespace", "PREWARM_NAMESPACE", "namespace of the Secret and the "
                   "Service (default in a pod: its own namespace)", metavar="NS"),
            Option("--name", "PREWARM_CERT_SECRET", "name of the Secret", metavar="NAME"),
            Option("--service", "PREWARM_SERVICE", "Service of the webhook: adds <svc>, "
                   "<svc>.<ns>, <svc>.<ns>.svc, <svc>.<ns>.svc.cluster.local", metavar="SVC"),
            Option("--dns", "PREWARM_CERT_DNS", "extra DNS name for the SANs (repeatable)",
                   type=_dns_name, many=True, metavar="NAME"),
            IP,
            Option("--validating-webhook", "PREWARM_VALIDATING_WEBHOOKS",
                   "ValidatingWebhookConfiguration to patch (repeatable)", many=True,
                   metavar="NAME"),
            Option("--mutating-webhook", "PREWARM_MUTATING_WEBHOOKS",
                   "MutatingWebhookConfiguration to patch (repeatable)", many=True,
                   metavar="NAME"),
            DAYS, CA_DAYS,
            Option("--kubeconfig", "KUBECONFIG", "kubeconfig file", metavar="PATH"),
        ],
    ),
    "check": (
        "verify a certificate, its key and CA",
        "Check that a certificate matches its key, is signed by the CA, is valid for more "
        f"than {tls.RENEW_BEFORE.days} days and carries the required names. Exit 0 if "
        "good, 1 listing the problems.",
        [
            Option("--cert", "PREWARM_TLS_CERT_FILE", "serving certificate (PEM)", metavar="FILE"),
            Option("--key", "PREWARM_TLS_KEY_FILE", "its private key (PEM)", metavar="FILE"),
            Option("--ca", "PREWARM_TLS_CA_FILE", "CA certificate(s) (PEM)", metavar="FILE"),
            Option("--dns", None, "DNS name that must be in the SANs (repeatable)",
                   type=_dns_name, many=True, metavar="NAME"),
            Option("--ip", None, "IP address that must be in the SANs (repeatable)",
                   type=_ip_address, many=True, metavar="IP"),
        ],
    ),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="python -m certs",
        description="CA + serving certificate generation, Secret writing and caBundle "
        "patching for the Prewarm webhook when cert-manager is not installed.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers = {}
    for name, (summary, description, options) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=description)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log what is done (INFO)")
        for option in options:
            option.add_to(p)
        if name == "secret":
            p.add_argument("--skip-missing-webhooks", action="store_true",
                           help="leave out webhook configurations that do not exist yet "
                                "(before an install), instead of failing")
        subparsers[name] = p
    return parser, subparsers


def _require(args: argparse.Namespace, option: str, env: str) -> None:
    if not getattr(args, option.lstrip("-").replace("-", "_")):
        raise UsageError(f"{option} is required (or set {env})")


# -- commands ---------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` atomically with `data`, created with `mode` from the start (a key
    is never readable by others, not even for a moment); a reader watching the folder
    sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_generate(args: argparse.Namespace) -> int:
    _require(args, "--out-dir", "PREWARM_CERT_DIR")
    if not args.dns and not args.ip:
        raise UsageError("at least one --dns or --ip is needed (a CN-only certificate "
                         "is refused by the API server)")
    ca_crt, ca_key = tls.generate_ca(days=args.ca_days)
    crt, key = tls.generate_serving(ca_crt, ca_key, dns_names=args.dns, ip_addresses=args.ip,
                                    days=args.days)
    out = Path(args.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        files = [
            ("ca.crt", ca_crt, 0o644, "CA certificate: " + tls.describe(ca_crt)),
            ("ca.key", ca_key, 0o600, "CA private key, mode 0600"),
            ("tls.key", key, 0o600, "serving private key, mode 0600"),
            ("tls.crt", crt, 0o644, "serving certificate: " + tls.describe(crt)),
        ]
        for name, data, mode, what in files:
            _write(out / name, data, mode)
            print(f"wrote {out / name} ({what})")
    except OSError as exc:
        raise Failure(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from None
    return 0


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise Failure(f"cannot read {path}: {exc.strerror or exc}") from None


def cmd_check(args: argparse.Namespace) -> int:
    _require(args, "--cert", "PREWARM_TLS_CERT_FILE")
    _require(args, "--key", "PREWARM_TLS_KEY_FILE")
    _require(args, "--ca", "PREWARM_TLS_CA_FILE")
    cert, key, ca = _read(args.cert), _read(args.key), _read(args.ca)
    problems = tls.check_pair(cert, key, ca, dns_names=args.dns, ip_addresses=args.ip)
    if problems:
        for problem in problems:
            print(f"problem: {problem}")
        return 1
    print(f"ok: {args.cert} ({tls.describe(cert)}) matches {args.key} and is signed by {args.ca}")
    return 0


def _pod_namespace() -> str | None:
    try:
        return Path(SERVICEACCOUNT_NAMESPACE_FILE).read_text().strip() or None
    except OSError:
        return None


def _api_client(kubeconfig: str | None) -> Any:
    """A client found as the observer and reconciler find theirs (webhook/kube.py)."""
    from webhook.kube import KubeconfigError, NoCluster, api_client

    try:
        return api_client(kubeconfig)
    except NoCluster:
        raise UsageError(str(NoCluster("pass --kubeconfig, set KUBECONFIG"))) from None
    except KubeconfigError as exc:
        raise Failure(f"cluster configuration: {exc}") from None


def cmd_secret(args: argparse.Namespace) -> int:
    args.namespace = args.namespace or _pod_namespace()
    _require(args, "--namespace", "PREWARM_NAMESPACE")
    _require(args, "--name", "PREWARM_CERT_SECRET")
    dns = tls.service_dns_names(args.service, args.namespace) if args.service else []
    dns += [n for n in args.dns if n not in dns]
    if not dns and not args.ip:
        raise UsageError("--service (or PREWARM_SERVICE), --dns or --ip is required")

    from kubernetes import client

    from certs import kube

    with _api_client(args.kubeconfig) as api_client:
        data, action = kube.ensure_secret(
            client.CoreV1Api(api_client), namespace=args.namespace, name=args.name,
            dns_names=dns, ip_addresses=args.ip, days=args.days, ca_days=args.ca_days,
        )
        print(f"secret {args.namespace}/{args.name}: {action} ({tls.describe(data['tls.crt'])})")
        targets = [("validating", n) for n in args.validating_webhook]
        targets += [("mutating", n) for n in args.mutating_webhook]
        if targets:
            missing: list[tuple[str, str]] = []
            changed = kube.patch_ca_bundle(
                client.AdmissionregistrationV1Api(api_client), ca_pem=data["ca.crt"],
                validating=args.validating_webhook, mutating=args.mutating_webhook,
                skip_missing=args.skip_missing_webhooks, missing=missing,
            )
            for kind, name in targets:
                state = ("not there yet, skipped" if (kind, name) in missing
                         else "updated" if name in changed else "unchanged")
                print(f"{kind}webhookconfiguration {name}: caBundle {state}")
    return 0


# -- entry point ------------------------------------------------------------------------


def _api_error(exc: Any) -> str:
    message = ""
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        pass
    return f"API error {exc.status} {exc.reason}" + (f": {message}" if message else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # urllib3 warns on each connection retry; the final failure is reported once below.
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    command = {"generate": cmd_generate, "secret": cmd_secret, "check": cmd_check}[args.command]
    try:
        for option in COMMANDS[args.command][2]:
            option.resolve(args)
        return command(args)
    except UsageError as exc:
        subparsers[args.command].error(str(exc))  # exits 2 with the usage line
    except (Failure, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # Only the Kubernetes-side failures are expected here; anything else is a bug
        # and keeps its traceback.
        from urllib3.exceptions import HTTPError

        from kubernetes.client.exceptions import ApiException

        from certs.kube import CertsError

        if isinstance(exc, ApiException):
            print(f"error: {_api_error(exc)}", file=sys.stderr)
        elif isinstance(exc, HTTPError):
            print(f"error: cannot reach the API server: {getattr(exc, 'reason', None) or exc}",
                  file=sys.stderr)
        elif isinstance(exc, CertsError):
            print(f"error: {exc}", file=sys.stderr)
        else:
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
