"""The benchmark's CPU by role: a process counts for the replica it runs under."""

from __future__ import annotations

import subprocess
import time

import psutil

from benchmarks.compare import CpuMeter


def test_a_process_under_a_replica_counts_for_that_replica():
    # a "replica" (its title set the way Ray sets it) whose child has a title of its own
    replica = subprocess.Popen(
        ["bash", "-c", "exec -a ray::ServeReplica:mneme:Generator bash -c 'sleep 30 & wait'"]
    )
    try:
        deadline = time.monotonic() + 10
        while not (children := psutil.Process(replica.pid).children(recursive=True)):
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        [child] = children
        assert child.cmdline()[0] == "sleep"
        assert CpuMeter._role(child) == "Generator"
        assert CpuMeter._role(psutil.Process(replica.pid)) == "Generator"
        assert CpuMeter._role(psutil.Process()) == "other (Ray, controller)"
    finally:
        for process in psutil.Process(replica.pid).children(recursive=True):
            process.kill()
        replica.kill()
        replica.wait()
