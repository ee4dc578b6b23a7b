"""Bulk import: killed mid-way and run again, every line is stored exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mneme.importer import ImportFailed, run_import
from tests.integration.test_durability import listed_ids

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, namespace: str, n: int) -> None:
    lines = []
    for i in range(n):
        record = {"text": f"imported memory {i} about topic {i % 7}", "metadata": {"i": i}}
        if i % 3 == 0:
            record["id"] = f"given-{i}"  # some lines carry their own id
        if i % 50 == 49:
            lines.append("")  # blank lines are skipped
        lines.append(json.dumps(record | {"namespace": namespace}))
    path.write_text("\n".join(lines) + "\n")


def test_an_import_killed_midway_resumes_without_duplicates(served, http, tmp_path):
    namespace = f"import-{uuid.uuid4().hex[:8]}"
    data = tmp_path / "memories.jsonl"
    write_jsonl(data, namespace, 300)
    state = data.with_name(data.name + ".import-state.json")
    cmd = [sys.executable, "-m", "mneme.importer", str(data), "--url", served.base_url]
    cmd += ["--batch-size", "10", "--in-flight", "2", "--no-progress"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not state.exists():
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)  # a crash, after some lines were acknowledged
    first.wait()
    done_at_crash = json.loads(state.read_text())["lines_done"]
    assert 0 < done_at_crash
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["lines_done"] == result["lines"] == 306
    assert result["sent"] <= 300 - done_at_crash + 20  # resumed, not started over
    stored = listed_ids(http, namespace)
    assert len(stored) == len(set(stored)) == 300
    assert {f"given-{i}" for i in range(0, 300, 3)} <= set(stored)


def test_a_refused_line_stops_the_import_and_names_the_line(served, tmp_path):
    data = tmp_path / "bad.jsonl"
    good = {"text": "fine", "namespace": "import-bad"}
    data.write_text("\n".join(json.dumps(r) for r in [good, good, {**good, "text": ""}]) + "\n")
    import asyncio

    with pytest.raises(ImportFailed, match=r"bad\.jsonl:3: HTTP 400"):
        asyncio.run(run_import(data, served.base_url, progress=False))
    lines = [json.dumps(good), "", "", json.dumps(good), json.dumps({**good, "text": ""})]
    data.write_text("\n".join(lines) + "\n")  # blank lines before it: still its own line
    with pytest.raises(ImportFailed, match=r"bad\.jsonl:5: HTTP 400"):
        asyncio.run(run_import(data, served.base_url, progress=False))
    with pytest.raises(ImportFailed, match=r"bad\.jsonl:1: no namespace"):
        data.write_text(json.dumps({"text": "x"}) + "\n")
        asyncio.run(run_import(data, served.base_url, progress=False))


def stored(http, namespace: str) -> dict[str, str]:
    r = http.get("/v1/memories", params={"namespace": namespace, "limit": 1000})
    return {m["id"]: m["text"] for m in r.json()["data"]}


def test_fixed_and_run_again_every_line_is_stored_once(served, http, tmp_path):
    """The file changed, so the import starts over; lines without an id get the same ids as
    before (from their content), so the lines sent the first time replace themselves."""
    import asyncio

    space = f"import-fix-{uuid.uuid4().hex[:6]}"
    data = tmp_path / "fix.jsonl"
    lines = [{"text": f"line {i}"} for i in range(9)]
    lines[6]["text"] = ""  # refused: the import stops there
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(ImportFailed, match=r"fix\.jsonl:7"):
        asyncio.run(
            run_import(data, served.base_url, space, batch_size=2, in_flight=1, progress=False)
        )
    assert len(stored(http, space)) == 6  # the batches before the refused one landed
    lines[6]["text"] = "line 6, fixed"
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    asyncio.run(run_import(data, served.base_url, space, batch_size=2, progress=False))
    assert sorted(stored(http, space).values()) == sorted(r["text"] for r in lines)
    # the same file into another namespace is a new import, not "already done"
    other = f"{space}-b"
    asyncio.run(run_import(data, served.base_url, other, batch_size=2, progress=False))
    assert len(stored(http, other)) == len(lines)


def test_the_last_line_of_a_repeated_id_wins(served, http, tmp_path):
    import asyncio

    space = f"import-repeat-{uuid.uuid4().hex[:6]}"
    data = tmp_path / "repeat.jsonl"
    texts = ["x v1", "a", "x v2", "b", "c", "d", "x v3", "e"]  # x in one batch and across
    records = [{"id": t.split()[0], "text": t} for t in texts]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    asyncio.run(run_import(data, served.base_url, space, batch_size=3, progress=False))
    assert stored(http, space) == {"x": "x v3", "a": "a", "b": "b", "c": "c", "d": "d", "e": "e"}
