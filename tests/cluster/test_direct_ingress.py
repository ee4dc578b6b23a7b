"""`make run DIRECT_INGRESS=1`: Ray Serve's direct ingress, where the Router replica answers
HTTP on its own port and requests skip the proxy hop; and `make run HAPROXY=1`, where
HAProxy takes the proxy's port and forwards to that replica port.

The flags are read when Ray's modules are imported, by the controller and every replica, so
each graph runs in its own `serve run` process here (a fresh local Ray), as `make run` runs
it. They run before tests/integration (directory order): two vLLMs never run side by side.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from ray._private.services import get_node_ip_address as node_ip_address

from benchmarks.serving import free_port
from graphs.haproxy_orphans import orphans, stop_orphans
from graphs.serve_env import SERVE_ENV, direct_ingress_env, haproxy_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve run exited:\n" + log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("the Router never answered on its own port:\n" + log.read_text()[-3000:])


@contextlib.contextmanager
def serve_run(tmp_path: Path, proxy_port: int, ray_env: dict[str, str]):
    """`serve run` of configs/local.yaml with the proxy on `proxy_port` and `ray_env` (what a
    `make run` flag exports); stopped with Ctrl-C, as a `make run` user stops it. Yields the
    process and its log."""
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = proxy_port
    args = config["applications"][0]["args"]
    args["vector_search"]["storage"]["data_dir"] = str(tmp_path / "memories")
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **ray_env, **SERVE_ENV}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    serve = Path(sys.executable).with_name("serve")
    stop_orphans()  # an HAProxy an earlier run left behind would share the port
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(serve), "run", "--address", "local", str(path)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Ctrl-C stops it even where this runs with SIGINT ignored (a background job)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        yield proc, log
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stop_orphans()  # what a killed run leaves, as `make run` does before its next start


def assert_loopback_only(port: int) -> None:
    """Like the proxy (http_options.host): not on the machine's own address."""
    address = node_ip_address()
    if not address.startswith("127."):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{address}:{port}/healthz", timeout=5)


def embeds_adds_and_refuses_bad_input(http: httpx.Client, namespace: str) -> None:
    """An embed, an add (memory m1) and a bad search, each answered as the Router answers."""
    r = http.post("/v1/embeddings", json={"input": ["a quiet lake at dawn"]})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    added = http.post(
        "/v1/memories",
        json={"namespace": namespace, "items": [{"id": "m1", "text": "the lake at dawn"}]},
    )
    assert added.status_code == 200, added.text
    bad = http.post("/v1/memories/search", json={"namespace": namespace, "top_k": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "query", bad.text


def test_the_router_answers_on_its_own_port(tmp_path):
    proxy_port, direct_port = free_port(), free_port()
    with serve_run(tmp_path, proxy_port, direct_ingress_env(direct_port, 1)) as (proc, log):
        direct, proxy = f"http://127.0.0.1:{direct_port}", f"http://127.0.0.1:{proxy_port}"
        wait_until_healthy(direct, proc, log)
        with httpx.Client(base_url=direct, timeout=60) as http:
            embeds_adds_and_refuses_bad_input(http, "direct")
            chat = http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
            assert chat.status_code == 200, chat.text
        assert_loopback_only(direct_port)
        # the proxy still serves the same application (and the same memories)
        found = httpx.post(
            f"{proxy}/v1/memories/search",
            json={"namespace": "direct", "query": "lake", "top_k": 1},
            timeout=60,
        )
        assert found.status_code == 200 and found.json()["hits"][0]["id"] == "m1", found.text


def listener_of(port: int) -> str:
    """The name of the process listening on loopback `port`."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid).name()
    raise AssertionError(f"nothing listens on port {port}")


def test_haproxy_takes_the_proxy_port_and_forwards_to_the_router(tmp_path):
    proxy_port, direct_port = free_port(), free_port()
    env = haproxy_env(direct_port, 1, metrics_port=free_port(), stats_port=free_port())
    with serve_run(tmp_path, proxy_port, env) as (proc, log):
        proxy = f"http://127.0.0.1:{proxy_port}"
        wait_until_healthy(proxy, proc, log)
        assert listener_of(proxy_port) == "haproxy"
        assert orphans() == []  # Ray's live HAProxy is its manager's child, never stopped
        with httpx.Client(base_url=proxy, timeout=60) as http:
            embeds_adds_and_refuses_bad_input(http, "ha")
            # no Python proxy to refuse a big body: the Router's own limit does (4 MiB)
            big = http.post("/v1/embeddings", content=b"x" * (5 * 1024 * 1024))
            assert big.status_code == 413 and big.json()["error"]["type"], big.text
            found = http.post(
                "/v1/memories/search", json={"namespace": "ha", "query": "lake", "top_k": 1}
            )
            assert found.status_code == 200 and found.json()["hits"][0]["id"] == "m1"
        assert_loopback_only(proxy_port)
    with pytest.raises(httpx.ConnectError):  # nothing left on the port once stopped
        httpx.get(f"http://127.0.0.1:{proxy_port}/healthz", timeout=5)
