"""`make run DIRECT_INGRESS=1`: Ray Serve's direct ingress, where the Router replica answers
HTTP on its own port and requests skip the proxy hop.

The flag is read when Ray's modules are imported, by the controller and every replica, so
the graph runs in its own `serve run` process here (a fresh local Ray), as `make run` runs
it. It runs before tests/integration (directory order): two vLLMs never run side by side.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray._private.services import get_node_ip_address as node_ip_address

from benchmarks.serving import free_port
from graphs.serve_env import SERVE_ENV, direct_ingress_env

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


def test_the_router_answers_on_its_own_port(tmp_path):
    proxy_port, direct_port = free_port(), free_port()
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = proxy_port
    args = config["applications"][0]["args"]
    args["vector_search"]["storage"]["data_dir"] = str(tmp_path / "memories")
    path = tmp_path / "direct.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        **direct_ingress_env(direct_port, 1),  # what `make run DIRECT_INGRESS=1` exports
        **SERVE_ENV,
    }
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    serve = Path(sys.executable).with_name("serve")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(serve), "run", "--address", "local", str(path)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    direct, proxy = f"http://127.0.0.1:{direct_port}", f"http://127.0.0.1:{proxy_port}"
    try:
        wait_until_healthy(direct, proc, log)
        with httpx.Client(base_url=direct, timeout=60) as http:
            r = http.post("/v1/embeddings", json={"input": ["a quiet lake at dawn"]})
            assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
            added = http.post(
                "/v1/memories",
                json={"namespace": "direct", "items": [{"id": "m1", "text": "the lake at dawn"}]},
            )
            assert added.status_code == 200, added.text
            bad = http.post("/v1/memories/search", json={"namespace": "direct", "top_k": 0})
            assert bad.status_code == 400 and bad.json()["error"]["param"], bad.text
            chat = http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
            assert chat.status_code == 200, chat.text
        # loopback only, like the proxy (http_options.host): not on the machine's own address
        address = node_ip_address()
        if not address.startswith("127."):
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{address}:{direct_port}/healthz", timeout=5)
        # the proxy still serves the same application (and the same memories)
        found = httpx.post(
            f"{proxy}/v1/memories/search",
            json={"namespace": "direct", "query": "lake", "top_k": 1},
            timeout=60,
        )
        assert found.status_code == 200 and found.json()["hits"][0]["id"] == "m1", found.text
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a `make run` user stops it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
