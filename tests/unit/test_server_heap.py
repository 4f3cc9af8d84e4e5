"""A serving worker freezes its start-up heap, so a full garbage collection no longer
stops every review in flight to scan flask's and the kubernetes client's objects."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO, python_env

SCRIPT = """
import gc, json
from webhook import settings
from webhook.app import create_app
from webhook.server import freeze_startup_heap
app = create_app(settings.load())
before = len(gc.get_objects())
frozen = freeze_startup_heap()
after = gc.get_objects()
print(json.dumps({"before": before, "frozen": frozen, "after": len(after),
                  "app_still_scanned": any(o is app for o in after)}))
"""


def test_a_worker_freezes_what_start_up_allocated(tmp_path):
    # a process of its own: freezing is for good, and pytest's heap is not a worker's
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=True,
                         env=python_env(PREWARM_NAMESPACE="prewarm",
                                        PROMETHEUS_MULTIPROC_DIR=str(tmp_path)))
    heap = json.loads(out.stdout)
    assert heap["frozen"] > 10000  # flask, werkzeug, the kubernetes client's models
    assert not heap["app_still_scanned"]
    assert heap["after"] < heap["before"] / 20  # what a full collection still scans
