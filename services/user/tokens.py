"""Access tokens (short-lived ES256 JWTs) and rotating refresh tokens with reuse detection.

A login opens a session: a family of refresh tokens of which only the newest is live. Each
refresh spends the presented token and hands out its successor; presenting a spent token means
it was stolen or replayed, so the whole family is revoked (OAuth 2.0 Security BCP, section 4.14).
Only SHA-256 digests of refresh tokens are stored.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from services.runtime.auth import ALGORITHM, key_id
from services.runtime.errors import Unauthenticated
from services.runtime.revocation import Revocations
from services.runtime.storage import CollectionSpec, DocumentStore, IndexSpec
from services.runtime.timeutil import now as utc_now

SESSIONS = CollectionSpec(
    name="sessions",
    shard_key=("user_id",),
    why="sessions are listed and revoked per user; single lookups also carry the user id",
    indexes=(
        IndexSpec("user", (("user_id", 1),)),
        IndexSpec("expires_ttl", (("expires_at", 1),), expire_after_seconds=0),
    ),
)
REFRESH_TOKENS = CollectionSpec(
    name="refresh_tokens",
    shard_key=("_id",),
    why="a refresh is a point lookup by token digest, spread evenly by the hash",
    indexes=(
        IndexSpec("session", (("session_id", 1),)),
        IndexSpec("user", (("user_id", 1),)),
        IndexSpec("expires_ttl", (("expires_at", 1),), expire_after_seconds=0),
    ),
)


@dataclass(frozen=True)
class IssuedTokens:
    """A fresh access + refresh pair."""

    access_token: str
    access_expires: datetime
    refresh_token: str
    refresh_expires: datetime
    session_id: str


def digest(token: str) -> str:
    """The stored form of a refresh token."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenService:
    """Issues, rotates and revokes tokens."""

    def __init__(
        self,
        store: DocumentStore,
        revocations: Revocations,
        signing_key: ec.EllipticCurvePrivateKey,
        *,
        issuer: str,
        audience: str,
        access_ttl: timedelta,
        refresh_ttl: timedelta,
    ) -> None:
        """Sign with ``signing_key``; keep sessions and refresh digests in ``store``."""
        self._store = store
        self._revocations = revocations
        self._sessions = store.collection(SESSIONS)
        self._refresh = store.collection(REFRESH_TOKENS)
        self._key = signing_key
        self._kid = key_id(signing_key.public_key())
        self._issuer = issuer
        self._audience = audience
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl

    async def ensure(self) -> None:
        """Create the collections' indexes."""
        await self._store.ensure([SESSIONS, REFRESH_TOKENS])

    async def open_session(self, user_id: str, role: str) -> IssuedTokens:
        """Start a login session and issue its first pair."""
        now = utc_now()
        session_id = uuid.uuid4().hex
        await self._sessions.insert({
            "_id": session_id, "user_id": user_id, "role": role, "revoked": False,
            "create_time": now, "expires_at": now + self._refresh_ttl,
        })
        return await self._issue(user_id, role, session_id, now)

    async def rotate(self, refresh_token: str) -> IssuedTokens:
        """Spend ``refresh_token`` and issue its successor, detecting reuse."""
        now = utc_now()
        spent = await self._refresh.update_one(
            {"_id": digest(refresh_token), "used": False, "expires_at": {"$gt": now}},
            {"$set": {"used": True, "used_at": now}},
        )
        if spent is None:
            known = await self._refresh.get(digest(refresh_token))
            if known is not None and known["used"]:
                await self.revoke_session(known["session_id"])
                raise Unauthenticated("refresh token was already used; the session has been revoked")
            raise Unauthenticated("refresh token is invalid or expired")
        session = await self._sessions.get(spent["session_id"])
        if session is None or session["revoked"]:
            raise Unauthenticated("the session of this refresh token has ended")
        return await self._issue(session["user_id"], session["role"], session["_id"], now)

    async def session_of(self, refresh_token: str) -> dict[str, object] | None:
        """The session a refresh token (live or spent) belongs to, if it is known."""
        known = await self._refresh.get(digest(refresh_token))
        return None if known is None else await self._sessions.get(known["session_id"])

    async def revoke_session(self, session_id: str) -> None:
        """End a session: its refresh tokens at once, its access tokens within the revocation bound."""
        await self._revocations.revoke_session(session_id)
        await self._sessions.update_one({"_id": session_id}, {"$set": {"revoked": True}})
        await self._refresh.delete_many({"session_id": session_id})

    async def revoke_user(self, user_id: str) -> None:
        """End every session of a user (being deleted) and forget their tokens."""
        await self._revocations.revoke_user(user_id)
        await self._refresh.delete_many({"user_id": user_id})
        await self._sessions.delete_many({"user_id": user_id})

    async def _issue(self, user_id: str, role: str, session_id: str, now: datetime) -> IssuedTokens:
        access_expires = now + self._access_ttl
        access = jwt.encode(
            {
                "iss": self._issuer, "aud": self._audience, "sub": user_id, "role": role,
                "sid": session_id, "jti": uuid.uuid4().hex,
                "iat": int(now.timestamp()), "exp": int(access_expires.timestamp()),
            },
            self._key,
            algorithm=ALGORITHM,
            headers={"kid": self._kid},
        )
        refresh = f"rt_{secrets.token_urlsafe(32)}"
        refresh_expires = now + self._refresh_ttl
        await self._refresh.insert({
            "_id": digest(refresh), "session_id": session_id, "user_id": user_id, "used": False,
            "create_time": now, "expires_at": refresh_expires,
        })
        return IssuedTokens(access, access_expires, refresh, refresh_expires, session_id)
