"""`python -m webhook <command>`: serve, reconcile, render, status.

Every setting is a flag with a `PREWARM_*` environment equivalent (see settings.FIELDS);
`--help` of each command lists them with their defaults.
"""

from __future__ import annotations

import argparse
import sys

from webhook import settings as settings_module
from webhook.logs import setup as setup_logging


COMMANDS = {
    "serve": "run the observer: the admission webhook (gunicorn + flask over HTTPS) that "
             "records images into learned-images",
    "reconcile": "run the reconciler: keep DaemonSet prewarm-images in step with "
                 "learned-images (leader-elected; --once for one pass)",
    "render": "print the DaemonSet(s) the reconciler would apply, as YAML",
    "status": "print a table of learned images: state, source, namespaces, warm nodes",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m webhook",
        description="Prewarm learns the container images run in namespaces labelled "
                    "prewarm.io/learn=enabled and keeps them pulled on every node.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        settings_module.add_arguments(command, name)
        if name == "reconcile":
            command.add_argument("--once", action="store_true",
                                 help="one pass (backfill, expiry, apply, status) then exit: "
                                      "0 on success, 1 on failure (CronJob mode)")
        if name == "status":
            command.add_argument("--output", "-o", choices=("table", "json"), default="table",
                                 help="table (default) or json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_module.load(args)
    except settings_module.SettingsError as error:
        print(f"python -m webhook {args.command}: {error}", file=sys.stderr)
        return 2
    setup_logging(settings.log_format, settings.log_level)
    try:
        if args.command == "serve":
            from webhook.kube import check_config
            from webhook.server import serve

            check_config()  # no usable kubeconfig: say so now, not at the first flush
            # The kubernetes client imports its (pydantic) models lazily, which costs
            # seconds of CPU under the GIL. Done here, in the master, the workers inherit
            # them through fork instead of paying for them while answering reviews.
            from kubernetes.client import CoreV1Api, V1ConfigMap  # noqa: F401
            from kubernetes.client.models import v1_config_map, v1_object_meta  # noqa: F401

            serve(settings)
            return 0
        if args.command == "reconcile":
            from webhook.reconciler import run

            return run(settings, once=args.once)
        if args.command == "render":
            from webhook.reconciler import render

            sys.stdout.write(render(settings))
            return 0
        if args.command == "status":
            from webhook.status import status

            sys.stdout.write(status(settings, output=args.output))
            return 0
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # expected failures have their own message; no traceback
        from webhook.kube import KubeconfigError
        from webhook.server import CertificateError
        from webhook.store import StoreUnavailable

        if isinstance(error, (KubeconfigError, CertificateError, StoreUnavailable)):
            print(f"python -m webhook {args.command}: {error}", file=sys.stderr)
            return 1
        raise
    return 2


if __name__ == "__main__":
    sys.exit(main())
