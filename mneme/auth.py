"""API keys: bearer tokens, each allowed some namespaces and priorities up to a ceiling.

Keys are held as SHA-256 digests and compared in constant time; a token never appears in a log,
an error or the stats. With no keys configured, every request is let through (the default on
loopback); with keys, a request without a valid one is answered 401 before its body is read.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
from dataclasses import dataclass

from mneme.config import MIN_KEY_CHARS, AuthConfig
from mneme.errors import Forbidden, Unauthorized
from mneme.priority import Priority


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class Principal:
    """Who a valid key says the caller is, and what the key lets it do."""

    name: str
    namespaces: tuple[str, ...]  # fnmatch patterns
    max_priority: Priority

    @property
    def sees_every_namespace(self) -> bool:
        return "*" in self.namespaces

    def check_namespace(self, namespace: str, param: str = "namespace") -> None:
        if not any(fnmatch.fnmatchcase(namespace, pattern) for pattern in self.namespaces):
            raise Forbidden(
                f"API key {self.name!r} may not use namespace {namespace!r}",
                param=param,
                code="namespace_forbidden",
            )

    def priority(self, requested: Priority | None, param: str) -> Priority:
        """The request's class: what it asked for (403 above the key's ceiling), else normal
        capped at the ceiling."""
        if requested is None:
            return Priority(max(Priority.NORMAL, self.max_priority))
        if requested < self.max_priority:
            raise Forbidden(
                f"API key {self.name!r} may not use priority {requested.name.lower()!r} "
                f"(its highest is {self.max_priority.name.lower()!r})",
                param=param,
                code="priority_forbidden",
            )
        return requested


class KeyRing:
    """The configured keys, by digest. `enabled` is False when there are none."""

    def __init__(self, config: AuthConfig, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.public_paths = frozenset(config.public_paths)
        self._by_digest: dict[bytes, Principal] = {}
        for i, key in enumerate(config.keys):
            if key.key_env is not None:
                token = environ.get(key.key_env, "").strip()  # a Secret file's newline too
                if len(token) < MIN_KEY_CHARS:
                    raise ValueError(
                        f"auth.keys[{i}].key_env: environment variable {key.key_env!r} is "
                        f"not set on this node or shorter than {MIN_KEY_CHARS} characters"
                    )
            else:
                token = key.key.get_secret_value().strip()
            if digest(token) in self._by_digest:
                raise ValueError(f"auth.keys[{i}]: the same token as an earlier key")
            principal = Principal(
                name=key.name,
                namespaces=tuple(key.namespaces),
                max_priority=Priority[key.max_priority.upper()],
            )
            self._by_digest[digest(token)] = principal

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def is_public(self, path: str) -> bool:
        """`path` without the app's route prefix (Serve leaves it in the ASGI path)."""
        return path in self.public_paths

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The key's principal (None when auth is off); 401 for a missing or unknown key."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        wanted = digest(token.strip())
        found = None
        for known, principal in self._by_digest.items():  # no early exit: constant time
            if hmac.compare_digest(known, wanted):
                found = principal
        if found is None:
            raise Unauthorized("invalid API key")
        return found
