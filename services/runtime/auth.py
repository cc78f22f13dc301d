"""Who is calling: bearer JWT verification, the caller's principal, ownership checks.

The user service signs access tokens with an ES256 key; every service verifies them against the
public keys published as a JSON Web Key Set in the keys directory (the edge reads the same file).
Handlers read the verified caller from ``current_principal()`` and check ownership themselves:
the edge's validation is a first filter, never the only one.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from services.runtime.errors import NotFound, PermissionDenied, Unauthenticated

ALGORITHM = "ES256"
SIGNING_KEY_FILE = "signing-key.pem"
JWKS_FILE = "jwks.json"
ADMIN_ROLE = "admin"
#: The role of tokens services mint for their own calls to each other (events, fan-out).
SERVICE_ROLE = "service"
SERVICE_TOKEN_TTL_SECONDS = 300
#: Verified access tokens remembered per process (LRU), so repeat calls skip the signature check.
VERIFIED_TOKEN_CACHE_SIZE = 20_000


@dataclass(frozen=True)
class Principal:
    """A verified caller."""

    user_id: str
    role: str
    #: The login session (refresh-token family) the access token belongs to.
    session_id: str
    token_id: str
    #: The bearer token itself, forwarded when this call makes calls on the user's behalf.
    token: str = ""

    @property
    def is_admin(self) -> bool:
        """Whether the caller may act on any user's data: an administrator or another service."""
        return self.role in (ADMIN_ROLE, SERVICE_ROLE)

    @property
    def is_service(self) -> bool:
        """Whether the caller is one of our services rather than a person."""
        return self.role == SERVICE_ROLE


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def current_principal() -> Principal:
    """The verified caller of the current call; UNAUTHENTICATED when the call carries no token."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("this method needs a bearer access token")
    return principal


def optional_principal() -> Principal | None:
    """The verified caller, or None on a public method called without a token."""
    return _principal.get()


def set_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Bind the caller for the current task (the auth interceptor calls this)."""
    return _principal.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    """Undo ``set_principal``."""
    _principal.reset(token)


def forwarded_credentials() -> tuple[tuple[str, str], ...]:
    """Metadata that makes an outgoing call on behalf of the current caller (their own token)."""
    principal = _principal.get()
    return (("authorization", f"Bearer {principal.token}"),) if principal and principal.token else ()


def resolve_user_id(user_segment: str) -> str:
    """Turn the ``{user}`` segment of a resource name into a user id; "me" is the caller."""
    return current_principal().user_id if user_segment == "me" else user_segment


def require_owner(user_id: str) -> Principal:
    """Allow the call only for the owner of ``user_id``'s data or an admin.

    Others get NOT_FOUND rather than PERMISSION_DENIED so that a caller cannot learn which user
    ids exist.
    """
    principal = current_principal()
    if principal.user_id != user_id and not principal.is_admin:
        raise NotFound(f"users/{user_id} not found")
    return principal


def require_admin() -> Principal:
    """Allow the call only for an admin."""
    principal = current_principal()
    if not principal.is_admin:
        raise PermissionDenied("this method is for administrators")
    return principal


class TokenVerifier:
    """Verifies access tokens against the public keys of a JWKS file, reloading it when it changes."""

    def __init__(self, jwks_path: Path, issuer: str, audience: str) -> None:
        """Read keys from ``jwks_path``; tokens must carry ``issuer`` and ``audience``."""
        self._path = jwks_path
        self._issuer = issuer
        self._audience = audience
        self._keys: dict[str, Any] = {}
        self._mtime = -1.0
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def _refresh(self) -> None:
        try:
            mtime = self._path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        document = json.loads(self._path.read_text())
        self._keys = {k["kid"]: ECAlgorithm.from_jwk(json.dumps(k)) for k in document.get("keys", [])}
        self._mtime = mtime

    def verify(self, token: str) -> Principal:
        """Return the token's principal or raise UNAUTHENTICATED saying why.

        A verified token is remembered until it expires: an app sends the same access token on
        every call for its 15 minutes, and an ECDSA verification costs more than most handlers.
        """
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires:
                self._verified.move_to_end(token)
                return principal
            del self._verified[token]
        principal, expires = self._verify_signature(token)
        self._verified[token] = (principal, expires)
        if len(self._verified) > VERIFIED_TOKEN_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _verify_signature(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed access token") from None
        kid = header.get("kid", "")
        if kid not in self._keys:
            self._refresh()
        key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("access token signed by an unknown key")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "iat", "sub", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("access token expired") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid access token") from None
        principal = Principal(
            user_id=str(claims["sub"]),
            role=str(claims.get("role", "member")),
            session_id=str(claims.get("sid", "")),
            token_id=str(claims["jti"]),
            token=token,
        )
        return principal, float(claims["exp"])


def bearer_token(metadata: Mapping[str, str | bytes]) -> str | None:
    """The token of an ``authorization: Bearer ...`` header, or None when there is none."""
    value = metadata.get("authorization")
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    scheme, _, token = text.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization header must be 'Bearer <access token>'")
    return token.strip()


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """A stable key id: the RFC 7638 thumbprint of the public key."""
    jwk = json.loads(ECAlgorithm.to_jwk(public_key))
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    return jwt.utils.base64url_encode(hashlib.sha256(canonical.encode()).digest()).decode()


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public key as a JWK dict with kid, use and alg."""
    jwk: dict[str, str] = json.loads(ECAlgorithm.to_jwk(public_key))
    jwk.update(kid=key_id(public_key), use="sig", alg=ALGORITHM)
    return jwk


def load_or_create_signing_key(keys_dir: Path, *, allow_create: bool) -> ec.EllipticCurvePrivateKey:
    """Load the ES256 signing key, creating it (and the JWKS) on first use outside production.

    Several workers may start at once: the key file is created with O_EXCL so exactly one of them
    writes it and the others read it.
    """
    key_path = keys_dir / SIGNING_KEY_FILE
    if not key_path.exists():
        if not allow_create:
            raise FileNotFoundError(f"no signing key at {key_path}; provision one for production")
        keys_dir.mkdir(parents=True, exist_ok=True)
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(key_path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another worker is writing it; fall through and wait for the rename below
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            os.replace(key_path.with_suffix(".tmp"), key_path)
        _wait_for(key_path)
    loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    write_jwks(keys_dir, [loaded.public_key()])
    return loaded


def write_jwks(keys_dir: Path, public_keys: list[ec.EllipticCurvePublicKey]) -> Path:
    """Publish the public keys as ``jwks.json`` (atomically), for the edge and the services."""
    path = keys_dir / JWKS_FILE
    document = json.dumps({"keys": [public_jwk(k) for k in public_keys]}, indent=2, sort_keys=True)
    if path.exists() and path.read_text() == document:
        return path
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(document)
    os.replace(tmp, path)
    return path


def _wait_for(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


class ServiceCredentials:
    """Short-lived tokens with the service role, for calls a service makes on its own behalf.

    They are signed with the key in the shared keys directory. On one machine every service can
    read it; in a cluster the mesh's mTLS identities (mesh/istio) are what authorise such calls,
    and this token only carries the caller's name to the handler.
    """

    def __init__(self, keys_dir: Path, service: str, issuer: str, audience: str) -> None:
        """Mint tokens for ``service``; the signing key is read on first use."""
        self._keys_dir = keys_dir
        self._service = service
        self._issuer = issuer
        self._audience = audience
        self._token = ""
        self._expires = 0.0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """``authorization`` metadata with a token valid for at least another minute."""
        now = time.time()
        if now > self._expires - 60:
            key = load_or_create_signing_key(self._keys_dir, allow_create=False)
            self._expires = now + SERVICE_TOKEN_TTL_SECONDS
            self._token = jwt.encode(
                {
                    "iss": self._issuer, "aud": self._audience, "sub": f"service-{self._service}",
                    "role": SERVICE_ROLE, "jti": os.urandom(8).hex(), "iat": int(now), "exp": int(self._expires),
                },
                key,
                algorithm=ALGORITHM,
                headers={"kid": key_id(key.public_key())},
            )
        return (("authorization", f"Bearer {self._token}"),)
