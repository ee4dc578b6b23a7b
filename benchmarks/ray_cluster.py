"""A real multi-node Ray cluster on this one machine: a head and workers as separate
`ray start --block` processes on loopback, each killable alone (a node failure).

Token authentication: Ray 2.60 enables it on a new head; every process of ours (workers, the
`serve` CLI, drivers) gets the same per-cluster token through RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH
and leaves ~/.ray alone. Nothing here uses `ray stop` (it kills every Ray on the machine): a
node is killed by its process group, then by its session id (actor processes get their own
group but keep the session).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from benchmarks.serving import free_port
from graphs import serve_env

BIN = Path(sys.executable).parent


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) != sid:
                    continue
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    out.append(int(entry))
            except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
                pass
    return out


def kill_node(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGKILL a node: its process group, then whatever is left of its session."""
    sid = proc.pid  # start_new_session=True: pid == pgid == sid
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    deadline = time.monotonic() + timeout_s
    while left := session_members(sid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of node {sid} survived SIGKILL: {left}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


class LocalRayCluster:
    def __init__(self, work_dir: Path, env: dict[str, str] | None = None):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.temp_dir = f"/tmp/mn-{self.gcs_port}"  # short: Unix socket paths are limited
        token = secrets.token_hex(32)
        token_path = self.work_dir / "ray_auth_token"
        token_path.write_text(token)
        self.env = {
            **serve_env.apply(dict(os.environ)),  # for `ray start`
            **(env or {}),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
        }
        self.env.pop("RAY_ADDRESS", None)
        self.headers = {"Authorization": f"Bearer {token}"}
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()

    def _start(self, name: str, args: list[str]) -> None:
        log = (self.work_dir / f"{name}.log").open("w")
        self.nodes[name] = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--temp-dir", self.temp_dir, *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_head(self, num_cpus: float) -> None:
        self._start(
            "head",
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                f"--num-cpus={num_cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",  # loopback: never expose Ray's ports
                f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                "--disable-usage-stats",
            ],
        )
        self.wait(lambda: self.get("/api/version").status_code == 200, 90, "the head node")

    def start_worker(self, name: str, num_cpus: float) -> None:
        expected = len(self.alive_nodes()) + 1
        self._start(
            name,
            [
                f"--address={self.address}",
                f"--num-cpus={num_cpus}",
                f"--dashboard-agent-listen-port={free_port()}",
            ],
        )
        self.wait(lambda: len(self.alive_nodes()) >= expected, 90, f"worker {name}")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.dashboard + path, headers=self.headers, timeout=10)

    def alive_nodes(self) -> dict[str, bool]:
        """node id -> is head, for nodes alive now."""
        rows = self.get("/api/v0/nodes").json()["data"]["result"]["result"]
        return {n["node_id"]: n["is_head_node"] for n in rows if n["state"] == "ALIVE"}

    def serve_deploy(self, config_path: Path) -> None:
        cmd = [str(BIN / "serve"), "deploy", str(config_path), "--address", self.dashboard]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"serve deploy failed:\n{done.stdout}\n{done.stderr}")

    def applications(self) -> dict:
        return self.get("/api/serve/applications/").json()

    def wait(
        self,
        ready: Callable[[], bool],
        timeout_s: float,
        what: str,
        state: Callable[[], object] = lambda: None,
    ) -> float:
        """Seconds until `ready()`; fails early when a node process (not one we killed) exits,
        and on timeout says what `state()` last showed."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            for name, proc in self.nodes.items():
                if proc.poll() is not None and name not in self.killed:
                    log = self.work_dir / f"{name}.log"
                    raise RuntimeError(f"node {name} exited ({proc.returncode}); see {log}")
            try:
                if ready():
                    return time.monotonic() - start
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s; last seen {state()}")

    def kill(self, name: str) -> None:
        """A node failure: SIGKILL of every process of the node."""
        self.killed.add(name)
        kill_node(self.nodes[name])

    def shutdown(self) -> None:
        """Workers first, then the head; a node already killed is not touched again (its
        pid may since belong to another process)."""
        try:
            for name in sorted(self.nodes, key=lambda n: n == "head"):
                if name not in self.killed:
                    self.killed.add(name)
                    kill_node(self.nodes[name])
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
