"""The user service's domain: accounts, authentication, profiles and preferences.

It also produces the account events: UserRegistered, and UserDeleted, the first step of the
deletion saga that ``DeletionSaga`` drives (see its docstring).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc
from fittracker.events.v1 import events_pb2
from fittracker.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from google.protobuf import json_format

from services.runtime import auth
from services.runtime.counters import Counters
from services.runtime.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from services.runtime.events import Outbox, fact_id, make_envelope
from services.runtime.fieldmask import apply_update_mask
from services.runtime.names import USER, Pattern
from services.runtime.settings import Settings
from services.runtime.storage import Document
from services.runtime.timeutil import now, to_timestamp
from services.user.deletion import DeletionSaga
from services.user.passwords import Passwords
from services.user.repository import (
    PROFILE_FIELDS,
    IdRetired,
    Registrations,
    UserRepository,
    address_of,
    profile_etag,
    unconfirmed,
)
from services.user.tokens import IssuedTokens, TokenService

SERVICE = "fittracker.user.v1.UserService"
PUBLIC_METHODS = frozenset(f"/{SERVICE}/{m}" for m in ("Register", "Login", "RefreshToken", "GetJwks"))
PREFERENCE_FIELDS = ("unit_system", "goals", "notifications", "time_zone")
INVALID_LOGIN = "email or password is incorrect"
#: Set by the edge (tools/envoy_config.py) to the client address it determined.
CLIENT_ADDRESS_HEADER = "x-fittracker-client-address"

log = logging.getLogger("fittracker.user")

Context = grpc.aio.ServicerContext[Any, Any]


def default_preferences() -> dict[str, Any]:
    """What a new account starts with: metric units, push and email on, UTC."""
    return {
        "unit_system": "UNIT_SYSTEM_METRIC",
        "notifications": {"push_enabled": True, "email_enabled": True},
        "time_zone": "UTC",
    }


PREFERENCES = Pattern("users/{user}/preferences")


def user_id_of(name: str, pattern: Pattern = USER, field_name: str = "name") -> str:
    """The ``{user}`` of ``name`` (per ``pattern``), with "me" resolved to the caller."""
    return auth.resolve_user_id(pattern.parse(name, field_name)["user"])


class UserService(user_service_pb2_grpc.UserServiceServicer):
    """Implements fittracker.user.v1.UserService."""

    def __init__(
        self,
        settings: Settings,
        users: UserRepository,
        registrations: Registrations,
        tokens: TokenService,
        passwords: Passwords,
        counters: Counters,
        jwks: list[dict[str, str]],
        outbox: Outbox,
        deletions: DeletionSaga,
    ) -> None:
        """Take every dependency from the caller (built once at start)."""
        self._settings = settings
        self._users = users
        self._registrations = registrations
        self._tokens = tokens
        self._passwords = passwords
        self._counters = counters
        self._outbox = outbox
        self._deletions = deletions
        self._jwks = user_service_pb2.GetJwksResponse(keys=[user_pb2.JsonWebKey(**k) for k in jwks])
        self._admins = {e.strip().lower() for e in settings.admin_emails.split(",") if e.strip()}

    # --- authentication -------------------------------------------------------------------

    async def Register(  # noqa: N802 - gRPC method names are the contract's
        self, request: user_service_pb2.RegisterRequest, context: Context
    ) -> user_service_pb2.RegisterResponse:
        """Create an account (idempotent under request_id) and sign it in."""
        email = request.email.strip().lower()
        display_name = request.display_name.strip()
        user_id = uuid.uuid4().hex
        if request.request_id:
            claim = await self._registrations.claim(request.request_id, user_id, email, display_name)
            if not claim.fresh and (claim.email, claim.display_name) != (email, display_name):
                raise InvalidArgument.field("request_id", "was already used by a different request")
            user_id = claim.user_id
        role = "admin" if email in self._admins else "member"
        password_hash = await self._passwords.hash(request.password)
        doc = new_account(user_id, email, password_hash, display_name, role, request.request_id)
        try:
            stored, created = await self._open_account(doc)
        except IdRetired:
            # A replay of a request whose account was deleted since: it must not come back.
            raise FailedPrecondition(
                "the account this request_id created has been deleted; register with a new request_id"
            ) from None
        if not created and not await self._passwords.verify(stored["password_hash"], request.password):
            # A replayed request id with another password must not hand out the account.
            raise InvalidArgument.field("request_id", "was already used by a different request")
        # Added on a replay too: if the first attempt died between the insert and this line, the
        # client's retry still announces the account; the fact id makes a second add a no-op.
        await self._outbox.add(registered_event(stored))
        issued = await self._tokens.open_session(stored["_id"], stored["role"])
        return user_service_pb2.RegisterResponse(user=self._to_user(stored), tokens=_token_pair(issued))

    async def _open_account(self, doc: Document) -> tuple[Document, bool]:
        """Create the account; if its address has one already, answer the same way regardless.

        Telling the caller "this email has an account" would let anyone test addresses. Instead
        the caller gets an account of their own that does not hold the address (``unconfirmed``),
        and the address's owner is told by email (RegistrationAttempted). Both paths write one
        account and one event to the outbox, so neither answer nor timing sets them apart much.
        """
        try:
            return await self._users.create(doc)
        except AlreadyExists:
            owner = await self._users.by_email(doc["email"])
            stored, created = await self._users.create(unconfirmed(doc))
            if created and owner is not None:
                await self._outbox.add(registration_attempted_event(owner, stored))
            return stored, created

    async def Login(  # noqa: N802
        self, request: user_service_pb2.LoginRequest, context: Context
    ) -> user_service_pb2.LoginResponse:
        """Check the password, counting failures per account and per client address."""
        email = request.email.strip().lower()
        window = self._settings.login_failure_window_seconds
        limit = self._settings.login_max_failures
        keys = (f"login:account:{email}", f"login:client:{_client_address(context)}")
        # A client address may front many honest users (a NAT, an office): it gets more room.
        if await self._counters.get(keys[0]) >= limit or await self._counters.get(keys[1]) >= limit * 4:
            raise ResourceExhausted("too many failed logins; try again later", retry_after_seconds=window)
        stored = await self._users.by_email(email)
        if not await self._passwords.verify(stored["password_hash"] if stored else None, request.password):
            stored = await self._unconfirmed_account(email, request.password)
        if stored is None:
            for key in keys:
                await self._counters.incr(key, window)
            raise Unauthenticated(INVALID_LOGIN)
        await self._counters.reset(keys[0])
        if self._passwords.needs_rehash(stored["password_hash"]):
            await self._users.update(stored["_id"], {"password_hash": await self._passwords.hash(request.password)})
        issued = await self._tokens.open_session(stored["_id"], stored["role"])
        return user_service_pb2.LoginResponse(user=self._to_user(stored), tokens=_token_pair(issued))

    async def _unconfirmed_account(self, email: str, password: str) -> Document | None:
        """The account opened with ``email`` while another held it, whose password this is."""
        for claim in await self._users.claims_of(email):
            if await self._passwords.verify(claim["password_hash"], password):
                return claim
        return None

    async def RefreshToken(  # noqa: N802
        self, request: user_service_pb2.RefreshTokenRequest, context: Context
    ) -> user_service_pb2.RefreshTokenResponse:
        """Rotate the refresh token."""
        issued = await self._tokens.rotate(request.refresh_token)
        return user_service_pb2.RefreshTokenResponse(tokens=_token_pair(issued))

    async def Logout(  # noqa: N802
        self, request: user_service_pb2.LogoutRequest, context: Context
    ) -> user_service_pb2.LogoutResponse:
        """End the session the refresh token belongs to, if it is the caller's."""
        principal = auth.current_principal()
        session = await self._tokens.session_of(request.refresh_token)
        if session is not None and (session["user_id"] == principal.user_id or principal.is_admin):
            await self._tokens.revoke_session(str(session["_id"]))
        return user_service_pb2.LogoutResponse()

    async def GetJwks(  # noqa: N802
        self, request: user_service_pb2.GetJwksRequest, context: Context
    ) -> user_service_pb2.GetJwksResponse:
        """The public signing keys."""
        return self._jwks

    # --- profile ----------------------------------------------------------------------------

    async def GetUser(self, request: user_service_pb2.GetUserRequest, context: Context) -> user_pb2.User:  # noqa: N802
        """The caller's (or, for an admin, anyone's) profile."""
        return self._to_user(await self._owned(user_id_of(request.name)))

    async def UpdateUser(  # noqa: N802
        self, request: user_service_pb2.UpdateUserRequest, context: Context
    ) -> user_pb2.User:
        """Apply the masked profile fields."""
        user_id = user_id_of(request.user.name, USER, "user.name")
        stored = await self._owned(user_id)
        current = self._to_user(stored)
        updated, paths = apply_update_mask(current, request.user, request.update_mask, PROFILE_FIELDS)
        if "display_name" in paths and not updated.display_name.strip():
            raise InvalidArgument.field("user.display_name", "must not be empty")
        if request.user.etag and request.user.etag != current.etag:
            raise Aborted("the profile changed since it was read; read it again and retry")
        changes = {
            "display_name": updated.display_name.strip(),
            "birth_date": updated.birth_date,
            "height_cm": updated.height_cm,
            "weight_kg": updated.weight_kg,
            "fitness_level": user_pb2.FitnessLevel.Name(updated.fitness_level),
        }
        result = await self._users.update(user_id, changes, request.user.etag)
        if result is None:
            await self._owned(user_id)
            raise Aborted("the profile changed concurrently; read it again and retry")
        return self._to_user(result)

    async def DeleteUser(  # noqa: N802
        self, request: user_service_pb2.DeleteUserRequest, context: Context
    ) -> user_service_pb2.DeleteUserResponse:
        """Delete the account, end all its sessions, and start the erasure of its data everywhere."""
        user_id = user_id_of(request.name)
        await self._owned(user_id)
        saga = await self._deletions.begin(user_id)
        await self._tokens.revoke_user(user_id)
        await self._users.delete(user_id)
        self._deletions.announce_later(saga)
        return user_service_pb2.DeleteUserResponse()

    # --- preferences ------------------------------------------------------------------------

    async def GetPreferences(  # noqa: N802
        self, request: user_service_pb2.GetPreferencesRequest, context: Context
    ) -> user_pb2.Preferences:
        """The caller's preferences."""
        user_id = user_id_of(request.name, PREFERENCES)
        return self._to_preferences(await self._owned(user_id))

    async def UpdatePreferences(  # noqa: N802
        self, request: user_service_pb2.UpdatePreferencesRequest, context: Context
    ) -> user_pb2.Preferences:
        """Apply the masked preferences."""
        user_id = user_id_of(request.preferences.name, PREFERENCES, "preferences.name")
        current = self._to_preferences(await self._owned(user_id))
        updated, _ = apply_update_mask(current, request.preferences, request.update_mask, PREFERENCE_FIELDS)
        updated.ClearField("name")
        updated.ClearField("update_time")
        document = json_format.MessageToDict(updated, preserving_proto_field_name=True)
        result = await self._users.update(user_id, {"preferences": {**document, "update_time": now()}})
        if result is None:
            await self._owned(user_id)
            raise Aborted("the preferences changed concurrently; read them again and retry")
        return self._to_preferences(result)

    # --- helpers ----------------------------------------------------------------------------

    async def _owned(self, user_id: str) -> Document:
        """The user document, if the caller may see it; NOT_FOUND otherwise."""
        auth.require_owner(user_id)
        stored = await self._users.get(user_id)
        if stored is None:
            raise NotFound(f"users/{user_id} not found")
        return stored

    def _to_user(self, doc: Document) -> user_pb2.User:
        return user_pb2.User(
            name=f"users/{doc['_id']}",
            email=address_of(doc),
            display_name=doc["display_name"],
            birth_date=doc.get("birth_date", ""),
            height_cm=doc.get("height_cm", 0.0),
            weight_kg=doc.get("weight_kg", 0.0),
            fitness_level=user_pb2.FitnessLevel.Value(doc.get("fitness_level", "FITNESS_LEVEL_UNSPECIFIED")),
            role=user_pb2.ROLE_ADMIN if doc.get("role") == "admin" else user_pb2.ROLE_MEMBER,
            create_time=to_timestamp(doc["create_time"]),
            update_time=to_timestamp(doc["update_time"]),
            etag=profile_etag(doc),
        )

    def _to_preferences(self, doc: Document) -> user_pb2.Preferences:
        stored = dict(doc.get("preferences") or default_preferences())
        update_time = stored.pop("update_time", doc["update_time"])
        prefs = json_format.ParseDict(stored, user_pb2.Preferences(), ignore_unknown_fields=True)
        prefs.name = f"users/{doc['_id']}/preferences"
        prefs.update_time.FromDatetime(update_time)
        return prefs


def new_account(
    user_id: str, email: str, password_hash: str, display_name: str, role: str, request_id: str
) -> Document:
    """The document of a new account: an empty profile and the default preferences."""
    created = now()
    return {
        "_id": user_id,
        "email": email,
        "password_hash": password_hash,
        "display_name": display_name,
        "birth_date": "",
        "height_cm": 0.0,
        "weight_kg": 0.0,
        "fitness_level": "FITNESS_LEVEL_UNSPECIFIED",
        "role": role,
        "preferences": {**default_preferences(), "update_time": created},
        "request_id": request_id,
        "create_time": created,
        "update_time": created,
    }


def registered_event(user: Document) -> events_pb2.EventEnvelope:
    """UserRegistered for a stored user; the same document always gives the same event id.

    The creation time is part of the fact: an id recreated later (Register replays its request id
    after the account was deleted) is a new account, and its event must not be taken for the old one.
    """
    created = user["create_time"]
    return make_envelope(
        "user",
        user["_id"],
        events_pb2.UserRegistered(display_name=user["display_name"]),
        event_id=fact_id("user.registered", user["_id"], str(int(created.timestamp() * 1000))),
        occur_time=created,
    )


def registration_attempted_event(owner: Document, opened: Document) -> events_pb2.EventEnvelope:
    """RegistrationAttempted to the address's owner, once per account opened with their address."""
    return make_envelope(
        "user",
        owner["_id"],
        events_pb2.RegistrationAttempted(),
        event_id=fact_id("user.registration_attempted", owner["_id"], opened["_id"]),
    )


def _token_pair(issued: IssuedTokens) -> user_pb2.TokenPair:
    return user_pb2.TokenPair(
        access_token=issued.access_token,
        access_token_expire_time=to_timestamp(issued.access_expires),
        refresh_token=issued.refresh_token,
        refresh_token_expire_time=to_timestamp(issued.refresh_expires),
        token_type="Bearer",  # noqa: S106 - the OAuth token type, not a secret
    )


def _client_address(context: Context) -> str:
    """The caller's address as the edge saw it, else the peer (a direct call inside the mesh).

    Never X-Forwarded-For: its first entries are whatever the client wrote, so trusting them let
    anyone dodge the per-address lock-out, or lock a victim's address out.
    """
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ADDRESS_HEADER:
            return value.decode() if isinstance(value, bytes) else value
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0]
