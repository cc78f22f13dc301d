"""Opaque page tokens (AIP-158): the last sort key of a page, bound to the query it came from.

A token is ``base64url(json) + "." + checksum``. The JSON holds the sort key of the last item
returned and a fingerprint of the query (the method, the owner and every filter), so a token
reused with other filters, or by another user, is refused instead of silently paging through
something else. The checksum is a keyed BLAKE2b, so a token edited by hand is refused with
INVALID_ARGUMENT rather than decoded into a nonsensical key.

The key is not a secret, on purpose: a token only says where the next page starts, ownership is
checked on the request's parent every time, so a forged token can reach nothing the caller could
not list anyway. A constant key keeps tokens valid across replicas and restarts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

from services.runtime.errors import InvalidArgument

_KEY = b"fittracker.workout.page-token.v1"
_DIGEST_BYTES = 12


def _checksum(body: bytes) -> str:
    digest = hashlib.blake2b(body, key=_KEY, digest_size=_DIGEST_BYTES).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def fingerprint(*parts: Any) -> str:
    """A short digest of the query a token belongs to (method, owner, filters)."""
    text = json.dumps(parts, separators=(",", ":"), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(query: str, last_key: Sequence[Any]) -> str:
    """A token for the page after the item whose sort key is ``last_key``, for ``query``."""
    body = json.dumps({"q": query, "k": list(last_key)}, separators=(",", ":")).encode()
    return f"{base64.urlsafe_b64encode(body).rstrip(b'=').decode()}.{_checksum(body)}"


def decode(token: str, query: str, *, field: str = "page_token") -> list[Any] | None:
    """The sort key ``token`` resumes after; None for an empty token (the first page).

    Raises INVALID_ARGUMENT naming ``field`` for a token that was altered, is not ours, or was
    issued for a different query.
    """
    if not token:
        return None
    encoded, _, checksum = token.partition(".")
    try:
        body = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise InvalidArgument.field(field, "is not a page token this method issued") from None
    if not checksum or not hmac.compare_digest(checksum, _checksum(body)):
        raise InvalidArgument.field(field, "is not a page token this method issued") from None
    payload = json.loads(body)
    if payload.get("q") != query:
        raise InvalidArgument.field(field, "belongs to a query with other filters; start again without it")
    key = payload.get("k")
    if not isinstance(key, list):
        raise InvalidArgument.field(field, "is not a page token this method issued")
    return key


def page_size(requested: int, default: int) -> int:
    """The page size to use: ``default`` for 0; the contract's rules already cap it at 100."""
    return requested or default
