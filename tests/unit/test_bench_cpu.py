"""The bench's server CPU time per review counts the whole server: the arbiter, which
mostly sleeps, and the workers it forked, which do the work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bench.__main__ import group_cpu_seconds

# a leader that sleeps while the child it forked spins: only the child uses CPU
SPINNING_CHILD = """
import os, time
if os.fork() == 0:
    while True:
        pass
time.sleep(60)
"""


def test_the_cpu_of_a_forked_child_counts_for_its_process_group():
    leader = subprocess.Popen([sys.executable, "-c", SPINNING_CHILD], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while group_cpu_seconds(leader.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_cpu_seconds(leader.pid) >= 0.3
        assert group_cpu_seconds(leader.pid + 10**7) == 0  # no such group
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(10)
