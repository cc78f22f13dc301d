"""The user service: accounts, authentication, profiles and preferences."""

from __future__ import annotations

from datetime import timedelta

from fittracker.user.v1 import user_service_pb2_grpc

from services.runtime.auth import load_or_create_signing_key, public_jwk
from services.runtime.cache import DocumentCodec
from services.runtime.resources import Resources
from services.runtime.server import ServiceDefinition
from services.runtime.settings import Settings
from services.user.deletion import DeletionSaga
from services.user.passwords import Passwords
from services.user.repository import Registrations, UserRepository
from services.user.service import PUBLIC_METHODS, SERVICE, UserService
from services.user.tokens import TokenService

#: How long a Register request id keeps answering with the account it created (retries of one
#: sign-up happen within minutes; a day covers an app that retries after a night offline).
REGISTER_IDEMPOTENCY_SECONDS = 24 * 3600


async def build(settings: Settings, resources: Resources) -> ServiceDefinition:
    """Wire the user service from the shared resources."""
    signing_key = load_or_create_signing_key(settings.keys_dir, allow_create=settings.environment != "production")
    users = UserRepository(resources.store, await resources.shared_cache("users", DocumentCodec()))
    tokens = TokenService(
        resources.store,
        resources.revocations,
        signing_key,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        access_ttl=timedelta(seconds=settings.access_token_ttl_seconds),
        refresh_ttl=timedelta(seconds=settings.refresh_token_ttl_seconds),
    )
    await users.ensure()
    await tokens.ensure()
    outbox = await resources.outbox()
    registrations = Registrations(resources.store, timedelta(seconds=REGISTER_IDEMPOTENCY_SECONDS))
    await registrations.ensure()
    deletions = DeletionSaga(resources.store, users, outbox, erasure_delay_seconds=settings.erasure_delay)
    await deletions.ensure()
    servicer = UserService(
        settings,
        users,
        registrations,
        tokens,
        Passwords(time_cost=settings.argon2_time_cost, memory_kib=settings.argon2_memory_kib),
        resources.counters,
        jwks=[public_jwk(signing_key.public_key())],
        outbox=outbox,
        deletions=deletions,
    )

    return ServiceDefinition.serving(
        servicer, user_service_pb2_grpc.add_UserServiceServicer_to_server, SERVICE,
        public_methods=PUBLIC_METHODS,
        background=[
            outbox.relay, deletions.consumer(resources.events, resources.store), deletions.announcer,
            deletions.recover,
        ],
    )
