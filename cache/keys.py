"""Cache keys: kind, model id, namespace (where the value depends on it) and a payload hash.

Search and answer keys also carry the namespace's version, which the cache actor appends
(`KeyRequest.namespace`), so any add or delete makes every older result unreachable.
Embeddings are content-addressed (model + normalised text) and never go stale.
"""

from __future__ import annotations

import enum
import hashlib
import json
import unicodedata
import zlib
from dataclasses import dataclass
from typing import Any


class Kind(enum.StrEnum):
    EMBEDDING = "embedding"
    SEARCH = "search"
    ANSWER = "answer"
    CHAT = "chat"


@dataclass(frozen=True)
class KeyRequest:
    """One lookup. `namespace` set = the actor appends that namespace's current version."""

    kind: Kind
    base: str
    namespace: str | None = None


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


def chat_key(model: str, payload: Any) -> KeyRequest:
    return KeyRequest(Kind.CHAT, f"{Kind.CHAT}:{digest([model, payload])}")


def versioned(base: str, version: str) -> str:
    return f"{base}@{version}"
