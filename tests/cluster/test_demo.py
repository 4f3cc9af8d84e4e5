"""`DEMO_EXIT=1 make demo`: the whole loop on its own control plane, as a newcomer runs it."""

from __future__ import annotations

import os
import re
import subprocess

from tests.support import REPO, python_module


def test_demo_shows_learned_images_and_one_prepuller_pod_per_fake_node():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREWARM_")}
    env.update(DEMO_EXIT="1", PYTHONPATH=str(REPO))
    run = subprocess.run(python_module("hack.demo"), env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    # learned-images as kubectl prints it: the sample's images, normalized, warm
    assert "kubectl get configmap learned-images" in out
    assert '"image":"docker.io/library/nginx:1.27"' in out
    assert '"image":"quay.io/jupyter/scipy-notebook:2024-10-07"' in out  # CronJob only
    assert '"state":"warm"' in out
    # the DaemonSet's pull containers run the copied helper
    assert re.search(r"pull-[0-9a-f]{10}\s+docker.io/envoyproxy/envoy:v1.31.0\s+\[\"/prewarm-bin/noop\"\]", out)
    # one Running prepuller pod on each of the 3 kwok nodes
    pods = re.findall(r"^prewarm-images-\S+\s+1/1\s+Running\s.*?(kwok-node-\d)", out, re.M)
    assert sorted(pods) == ["kwok-node-0", "kwok-node-1", "kwok-node-2"]
    assert "4 images in prewarm/learned-images" in out
