"""Opaque page tokens (AIP-158), one codec for every list method of every service.

A token is ``base64url(json) + "." + base64url(HMAC-SHA256)``. The JSON holds where the next page
starts (the sort key of the last item returned) and a fingerprint of the query (method and
filters); the MAC covers that body and the caller's user id. So a token edited by hand, minted
without the key, replayed with other filters, or presented by another user is refused with
INVALID_ARGUMENT naming the field, and the position inside a token that passes is one this
deployment wrote: handlers never parse attacker-chosen bytes.

The key comes from configuration (``FITTRACKER_PAGE_TOKEN_KEY``, a Secret in a cluster) and is
the same on every replica, so a token stays valid across replicas and restarts. Outside
production a random key is created once in the keys directory beside the development signing key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.runtime import auth
from services.runtime.errors import InvalidArgument

KEY_FILE = "page-token.key"
#: Bytes of MAC kept: 128 bits, beyond guessing, keeps tokens short in URLs.
MAC_BYTES = 16
MIN_KEY_CHARS = 32
NOT_OURS = "is not a page token this method issued"


def fingerprint(*parts: Any) -> str:
    """A short digest of the query a token belongs to (method name and every filter)."""
    text = json.dumps(parts, separators=(",", ":"), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def page_size(requested: int, default: int) -> int:
    """The page size to use: ``default`` for 0; the contracts' rules already cap it."""
    return requested or default


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Issues and checks page tokens with one key."""

    def __init__(self, key: bytes) -> None:
        """Sign with ``key`` (at least 32 bytes of secret)."""
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"a page-token key needs at least {MIN_KEY_CHARS} bytes")
        self._key = key

    def _mac(self, body: bytes) -> bytes:
        principal = auth.optional_principal()
        caller = principal.user_id.encode() if principal is not None else b""
        return hmac.new(self._key, caller + b"\0" + body, hashlib.sha256).digest()[:MAC_BYTES]

    def encode(self, query: str, position: Sequence[str | int | float]) -> str:
        """A token for the page after ``position`` (the last item's sort key) in ``query``."""
        body = json.dumps({"q": query, "k": list(position)}, separators=(",", ":")).encode()
        return f"{_b64(body)}.{_b64(self._mac(body))}"

    def decode(self, token: str, query: str, *, field: str = "page_token") -> list[Any] | None:
        """The position ``token`` resumes after; None for an empty token (the first page)."""
        if not token:
            return None
        encoded, _, mac = token.partition(".")
        try:
            body, presented = _unb64(encoded), _unb64(mac)
        except (binascii.Error, ValueError):
            raise InvalidArgument.field(field, NOT_OURS) from None
        if not hmac.compare_digest(presented, self._mac(body)):
            raise InvalidArgument.field(field, NOT_OURS)
        payload = json.loads(body)  # ours: the MAC matched
        if payload["q"] != query:
            raise InvalidArgument.field(field, "belongs to a query with other filters; start again without it")
        position: list[Any] = payload["k"]
        return position


def load_key(configured: str, keys_dir: Path, *, allow_create: bool) -> bytes:
    """The configured key, else (outside production) the machine's development key file."""
    if configured:
        return configured.encode()
    path = keys_dir / KEY_FILE
    if not path.exists():
        if not allow_create:
            raise FileNotFoundError(f"no page-token key: set FITTRACKER_PAGE_TOKEN_KEY (or provision {path})")
        keys_dir.mkdir(parents=True, exist_ok=True)
        draft = path.with_suffix(f".{os.getpid()}.tmp")
        draft.write_text(secrets.token_hex(32))
        draft.chmod(0o600)
        # link() publishes a complete file and fails if one exists: of several processes starting
        # at once exactly one key wins, and nobody reads a half-written one.
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip().encode()
