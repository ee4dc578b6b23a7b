"""Bulk import of memories from JSONL into a running Mneme, resumable after any crash.

    python -m mneme.importer memories.jsonl [--url http://127.0.0.1:8000] [--namespace NS]
        [--api-key KEY]   (or $MNEME_API_KEY, where the service has API keys on)
    make import FILE=memories.jsonl

One JSON object per line: {"text": ..., "id"?: ..., "metadata"?: {...}, "namespace"?: ...}
(`--namespace` for lines without one). Lines go in batches through `POST /v1/memories`, a
few batches in flight. Progress is checkpointed in `<file>.import-state.json` after every
contiguous run of acknowledged lines (of that file's content, into that URL and default
namespace), so a re-run continues where the last one stopped. A line without an id gets one
derived from its namespace, text and metadata: a line sent twice (acknowledged but not yet
checkpointed when the crash came, or sent again after the file was fixed and the import
started over) replaces itself instead of being stored twice, and identical lines are one
memory. Where an id repeats, the later line wins: a batch never holds an id twice, and a
batch waits while an earlier one with any of its ids is in flight. A 503 or a lost
connection is retried (after Retry-After); a line the server refuses (4xx) stops the import
with its line number and the server's reason.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from cache.keys import digest


class ImportFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Batch:
    first_line: int  # 1-based line number of the first item
    last_line: int
    namespace: str
    items: list[dict[str, Any]]
    lines: list[int]  # each item's line number (blank lines between them are skipped)


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def content_id(namespace: str, text: str, metadata: Any) -> str:
    return f"import-{digest([namespace, text, metadata])}"


def read_batches(path: Path, start_line: int, default_ns: str | None, size: int) -> Iterator[Batch]:
    """Batches of consecutive lines of one namespace, from line `start_line + 1` on; a batch
    ends before an id it already holds (the server refuses an id twice in one add)."""
    items: list[dict[str, Any]] = []
    lines: list[int] = []
    first, namespace = 0, None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if number <= start_line or not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError('expected an object with a "text" string')
            except ValueError as exc:
                raise ImportFailed(f"{path}:{number}: {exc}") from None
            ns = record.get("namespace", default_ns)
            if not isinstance(ns, str):
                raise ImportFailed(f"{path}:{number}: no namespace (give --namespace)")
            metadata = record.get("metadata") or {}
            item = {
                "id": str(record.get("id") or content_id(ns, record["text"], metadata)),
                "text": record["text"],
                "metadata": metadata,
            }
            repeated = any(other["id"] == item["id"] for other in items)
            if items and (ns != namespace or len(items) >= size or repeated):
                yield Batch(first, number - 1, namespace, items, lines)
                items, lines = [], []
            if not items:
                first, namespace = number, ns
            items.append(item)
            lines.append(number)
            last = number
    if items:
        yield Batch(first, last, namespace, items, lines)


class Checkpoint:
    """`<file>.import-state.json`: how many lines of which file version are acknowledged,
    by which service (URL) into which default namespace; another of any starts over."""

    def __init__(self, path: Path, digest: str, url: str, namespace: str | None):
        self.path = path.with_name(path.name + ".import-state.json")
        self.key = {"sha256": digest, "url": url, "namespace": namespace}
        self.lines_done = 0
        if self.path.exists():
            try:
                state = json.loads(self.path.read_text())
            except ValueError:  # cut short by a crash while written: start over (ids repeat)
                state = {}
            if {k: state.get(k) for k in self.key} == self.key:
                self.lines_done = int(state["lines_done"])

    def save(self, lines_done: int) -> None:
        self.lines_done = lines_done
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.key, "lines_done": lines_done}))
        tmp.replace(self.path)


async def send(client: httpx.AsyncClient, batch: Batch, path: Path, retries: int) -> None:
    body = {"namespace": batch.namespace, "items": batch.items}
    for attempt in range(retries + 1):
        try:
            r = await client.post("/v1/memories", json=body, headers={"X-Priority": "background"})
        except httpx.TransportError as exc:
            if attempt == retries:
                raise ImportFailed(f"lines {batch.first_line}-{batch.last_line}: {exc}") from exc
            await asyncio.sleep(min(2**attempt, 10))
            continue
        if r.status_code == 200:
            return
        if r.status_code in (429, 503, 504) and attempt < retries:
            await asyncio.sleep(float(r.headers.get("retry-after", 1)))
            continue
        error = r.json().get("error", {}) if "json" in r.headers.get("content-type", "") else {}
        where = f"{path}:{batch.first_line}-{batch.last_line}"
        param = error.get("param") or ""
        if param.startswith("items["):  # items[i]... -> the line it came from
            index = int(param[6 : param.index("]")])
            where = f"{path}:{batch.lines[index]}"
        raise ImportFailed(f"{where}: HTTP {r.status_code}: {error.get('message', r.text)}")


async def run_import(
    path: Path,
    url: str,
    namespace: str | None = None,
    batch_size: int = 64,
    in_flight: int = 4,
    retries: int = 8,
    progress: bool = True,
    api_key: str | None = None,
) -> dict[str, int]:
    checkpoint = Checkpoint(path, file_digest(path), url, namespace)
    with open(path, encoding="utf-8") as f:
        total = sum(1 for _ in f)
    bar = tqdm(total=total, initial=checkpoint.lines_done, unit="line", file=sys.stderr,
               disable=not progress)  # fmt: skip
    issued: deque[Batch] = deque()  # in file order; the checkpoint follows its acked head
    acked: set[int] = set()
    sent = 0

    def acknowledge(batch: Batch) -> None:
        acked.add(batch.first_line)
        while issued and issued[0].first_line in acked:
            head = issued.popleft()
            acked.discard(head.first_line)
            bar.update(head.last_line - checkpoint.lines_done)
            checkpoint.save(head.last_line)

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as client:

        async def one(batch: Batch) -> Batch:
            await send(client, batch, path, retries)
            return batch

        pending: dict[asyncio.Task, set[tuple[str, str]]] = {}  # -> its (namespace, id)s

        async def wait_for_one() -> None:
            done, _ = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
            for task in done:
                del pending[task]
                acknowledge(task.result())

        try:
            for batch in read_batches(path, checkpoint.lines_done, namespace, batch_size):
                ids = {(batch.namespace, item["id"]) for item in batch.items}
                # the later line of an id must land last
                while len(pending) >= in_flight or any(
                    ids & sent_ids for sent_ids in pending.values()
                ):
                    await wait_for_one()
                issued.append(batch)
                pending[asyncio.create_task(one(batch))] = ids
                sent += len(batch.items)
            while pending:
                await wait_for_one()
        finally:
            for task in pending:
                task.cancel()
            bar.close()
    if checkpoint.lines_done < total:  # trailing blank lines
        checkpoint.save(total)
    return {"lines": total, "sent": sent, "lines_done": checkpoint.lines_done}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--namespace", help="for lines without a namespace")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MNEME_API_KEY"),
        help="a key allowed the namespaces written (default: $MNEME_API_KEY; none: no auth)",
    )
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(
            run_import(
                args.file,
                args.url,
                args.namespace,
                args.batch_size,
                args.in_flight,
                progress=not args.no_progress,
                api_key=args.api_key,
            )
        )
    except ImportFailed as exc:
        print(f"import stopped: {exc}", file=sys.stderr)
        print(
            "run the same command again: it resumes after the last acknowledged line; after "
            "a fix to the file it starts over (already stored lines are replaced, not doubled)"
        )
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
