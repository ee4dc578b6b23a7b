"""The README's examples run as written (against the test app's port) and answer as shown."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _on_test_port(text: str, base_url: str) -> str:
    host_port = base_url.removeprefix("http://")
    return text.replace("localhost:8000", host_port).replace("127.0.0.1:8000", host_port)


def test_curl_examples_answer_with_json(served):
    blocks = re.findall(r"```bash\n(curl .*?)```", README, re.S)
    assert len(blocks) >= 6
    for block in blocks:
        out = subprocess.run(
            ["bash", "-c", "set -e\n" + _on_test_port(block, served.base_url)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        for line in filter(None, out.stdout.replace("}{", "}\n{").splitlines()):
            if line == "data: [DONE]":
                continue
            payload = json.loads(line.removeprefix("data: "))
            assert "error" not in payload, (block, payload)


def test_openai_client_example_runs(served):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    out = subprocess.run(
        [sys.executable, "-c", _on_test_port(code, served.base_url)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "['mneme-tiny-llama', 'all-MiniLM-L6-v2']"
    assert lines[1].startswith("2 384 ")
    assert lines[-1].endswith(("length", "stop"))
