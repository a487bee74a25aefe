"""The supervisor reaps what a killed service leaves behind in its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from deploy.local.processes import pid_alive, wait_until
from deploy.platform import reap_group

# A "service" that starts a helper in its own group (as training's fork server is) and prints its pid.
SERVICE = """
import subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(helper.pid, flush=True)
time.sleep(60)
"""


def test_a_killed_service_leaves_no_helper_behind() -> None:
    service = subprocess.Popen(
        [sys.executable, "-c", SERVICE], stdout=subprocess.PIPE, start_new_session=True, text=True
    )
    assert service.stdout is not None
    helper = int(service.stdout.readline())
    os.kill(service.pid, signal.SIGKILL)
    service.wait()
    assert pid_alive(helper), "the helper outlives its SIGKILLed service: the leak this guards against"
    reap_group(service.pid)
    assert wait_until(lambda: not pid_alive(helper), timeout_s=5, interval_s=0.05)
    reap_group(service.pid)  # nothing left: a no-op
