"""Cache keys: kind, model id, namespace (where the value depends on it) and a payload hash.

Search and answer keys also carry the namespace's version, which the cache actor appends
(`KeyRequest.namespace`), so any add or delete makes every older result unreachable.
Embeddings and generations are content-addressed (model + normalised text; model + prompt
and sampling) and never go stale.
"""

from __future__ import annotations

import enum
import hashlib
import json
import unicodedata
import zlib
from dataclasses import dataclass, field
from typing import Any

from mneme.priority import Priority


class Kind(enum.StrEnum):
    EMBEDDING = "embedding"
    SEARCH = "search"
    ANSWER = "answer"
    CHAT = "chat"  # a chat completion at temperature 0 or with a seed
    GENERATION = "generation"  # an answer's generation, by namespace and prompt


@dataclass(frozen=True)
class KeyRequest:
    """One lookup. `namespace` set = the actor appends that namespace's current version.
    `priority`: the class of the request asking (lower is more urgent); a miss that a less
    urgent request is computing is waited for only `cache.hedge_after_ms`."""

    kind: Kind
    base: str
    namespace: str | None = None
    priority: int = field(default=Priority.NORMAL, compare=False)


def bucket_of(text: str, buckets: int) -> int:
    """A stable bucket for `text` (the same in every process and run, unlike `hash`)."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % buckets


def normalise_text(text: str) -> str:
    """NFC and collapsed whitespace: changes nothing a sentence-transformers tokenizer sees."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def digest(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def embedding_key(model: str, text: str) -> KeyRequest:
    return KeyRequest(Kind.EMBEDDING, f"{Kind.EMBEDDING}:{digest([model, normalise_text(text)])}")


def namespaced_key(kind: Kind, model: str, namespace: str, payload: Any) -> KeyRequest:
    """The namespace is hashed with the payload and also kept apart for the version."""
    return KeyRequest(kind, f"{kind}:{digest([model, namespace, payload])}", namespace)


def prompt_key(kind: Kind, model: str, payload: Any, namespace: str | None) -> KeyRequest:
    """A generation is a function of its prompt and sampling, whatever version the namespace
    is at. A prompt built from a namespace's memories carries that namespace too, so no other
    namespace is served it, nor learns from a hit that it was computed."""
    parts = [model, payload] if namespace is None else [model, namespace, payload]
    return KeyRequest(kind, f"{kind}:{digest(parts)}")


def versioned(base: str, version: str) -> str:
    return f"{base}@{version}"
