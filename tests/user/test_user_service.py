"""The user service through a real channel: auth, profiles, preferences, ownership, errors."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Awaitable

import grpc
import jwt
import pytest
from fittracker.common.v1 import fitness_pb2
from fittracker.user.v1 import user_pb2, user_service_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.auth import load_or_create_signing_key
from tests.support import bearer, field_violations
from tests.user.conftest import ADMIN_EMAIL, UserApi


def forge_subject(token: str, subject: str) -> str:
    """The same token with another subject and the original signature: a tampered token."""
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = subject
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{signature}"


async def test_register_then_read_own_profile(user_api: UserApi) -> None:
    email = f"Mixed.{uuid.uuid4().hex[:8]}@Example.com"
    registered = await user_api.register(email=email, display_name="  Grace  ")
    assert registered.user.email == email.lower()
    assert registered.user.display_name == "Grace"
    assert registered.user.role == user_pb2.ROLE_MEMBER
    assert registered.tokens.token_type == "Bearer"
    me = await user_api.stub.GetUser(
        user_service_pb2.GetUserRequest(name="users/me"), metadata=bearer(registered.tokens.access_token)
    )
    assert me.name == registered.user.name
    assert me.etag == registered.user.etag


async def test_register_rejects_a_taken_email(user_api: UserApi) -> None:
    first = await user_api.register()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.register(email=first.user.email.upper())
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_register_is_idempotent_under_a_request_id(user_api: UserApi) -> None:
    request = user_service_pb2.RegisterRequest(
        email=f"{uuid.uuid4().hex[:8]}@example.com", password="pass phrase 1234", display_name="Retry",
        request_id=str(uuid.uuid4()),
    )
    first = await user_api.stub.Register(request)
    again = await user_api.stub.Register(request)
    assert again.user.name == first.user.name
    request.password = "another password!"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.Register(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err.value) == ["request_id"]


async def test_a_request_id_never_hands_over_an_account(user_api: UserApi) -> None:
    """Ids are the server's: another payload under the same request id, or a replay after deletion, gets nothing."""
    request_id = str(uuid.uuid4())
    first = await user_api.stub.Register(user_service_pb2.RegisterRequest(
        email=f"{uuid.uuid4().hex[:8]}@example.com", password="pass phrase 1234", display_name="D",
        request_id=request_id,
    ))
    other = await user_api.stub.Register(user_service_pb2.RegisterRequest(
        email=f"{uuid.uuid4().hex[:8]}@example.com", password="pass phrase 1234", display_name="D",
        request_id=str(uuid.uuid4()),
    ))
    assert other.user.name != first.user.name
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.Register(user_service_pb2.RegisterRequest(
            email=f"{uuid.uuid4().hex[:8]}@example.com", password="pass phrase 1234", display_name="E",
            request_id=request_id,
        ))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err.value) == ["request_id"]

    await user_api.stub.DeleteUser(
        user_service_pb2.DeleteUserRequest(name="users/me"), metadata=bearer(first.tokens.access_token)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.Register(user_service_pb2.RegisterRequest(
            email=first.user.email, password="pass phrase 1234", display_name="D", request_id=request_id,
        ))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Without the request id the same email is simply a new account, with a new id.
    again = await user_api.stub.Register(user_service_pb2.RegisterRequest(
        email=first.user.email, password="pass phrase 1234", display_name="D",
    ))
    assert again.user.name != first.user.name


async def test_logout_ends_the_access_token_too(user_api: UserApi) -> None:
    account = await user_api.register()
    auth = bearer(account.tokens.access_token)
    await user_api.stub.GetUser(user_service_pb2.GetUserRequest(name="users/me"), metadata=auth)
    await user_api.stub.Logout(
        user_service_pb2.LogoutRequest(refresh_token=account.tokens.refresh_token), metadata=auth
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.GetUser(user_service_pb2.GetUserRequest(name="users/me"), metadata=auth)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "session has ended" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"password": "short"}, "password"),
        ({"display_name": ""}, "display_name"),
    ],
)
async def test_register_names_the_invalid_field(user_api: UserApi, change: dict[str, str], field: str) -> None:
    values = {"email": "valid@example.com", "password": "long enough pass", "display_name": "Ok", **change}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.Register(user_service_pb2.RegisterRequest(**values))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")
    assert field in field_violations(err.value)


async def test_login_fails_the_same_way_for_unknown_email_and_wrong_password(user_api: UserApi) -> None:
    account = await user_api.register(password="the right password")
    messages = []
    for email, password in ((account.user.email, "the wrong password"), ("nobody@example.com", "whatever")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await user_api.stub.Login(user_service_pb2.LoginRequest(email=email, password=password))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        messages.append(err.value.details())
    assert messages[0] == messages[1]
    ok = await user_api.stub.Login(
        user_service_pb2.LoginRequest(email=account.user.email, password="the right password")
    )
    assert ok.user.name == account.user.name


async def test_login_locks_an_account_after_repeated_failures(user_api: UserApi) -> None:
    account = await user_api.register(password="the right password")
    wrong = user_service_pb2.LoginRequest(email=account.user.email, password="wrong wrong")
    for _ in range(user_api.settings.login_max_failures):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await user_api.stub.Login(wrong)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.Login(
            user_service_pb2.LoginRequest(email=account.user.email, password="the right password")
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_refresh_rotates_and_reuse_revokes_the_session(user_api: UserApi) -> None:
    account = await user_api.register()
    first = account.tokens.refresh_token
    second = (await user_api.stub.RefreshToken(user_service_pb2.RefreshTokenRequest(refresh_token=first))).tokens
    assert second.refresh_token != first
    third = (await user_api.stub.RefreshToken(
        user_service_pb2.RefreshTokenRequest(refresh_token=second.refresh_token)
    )).tokens
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.RefreshToken(user_service_pb2.RefreshTokenRequest(refresh_token=first))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.RefreshToken(user_service_pb2.RefreshTokenRequest(refresh_token=third.refresh_token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_logout_ends_the_session(user_api: UserApi) -> None:
    account = await user_api.register()
    await user_api.stub.Logout(
        user_service_pb2.LogoutRequest(refresh_token=account.tokens.refresh_token),
        metadata=bearer(account.tokens.access_token),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.RefreshToken(
            user_service_pb2.RefreshTokenRequest(refresh_token=account.tokens.refresh_token)
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_calls_without_a_valid_token_are_unauthenticated(user_api: UserApi) -> None:
    account = await user_api.register()
    key = load_or_create_signing_key(user_api.settings.keys_dir, allow_create=False)
    header = jwt.get_unverified_header(account.tokens.access_token)
    expired = jwt.encode(
        {"sub": account.user.name.split("/")[1], "iss": user_api.settings.jwt_issuer,
         "aud": user_api.settings.jwt_audience, "jti": "x", "iat": int(time.time()) - 100,
         "exp": int(time.time()) - 50},
        key, algorithm="ES256", headers={"kid": header["kid"]},
    )
    tampered = forge_subject(account.tokens.access_token, "someone-else")
    request = user_service_pb2.GetUserRequest(name="users/me")
    for metadata, needle in (
        ((), "needs a bearer"),
        ((("authorization", "Basic abc"),), "Bearer"),
        (bearer("not.a.jwt"), "access token"),
        (bearer(tampered), "invalid access token"),
        (bearer(expired), "expired"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await user_api.stub.GetUser(request, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, needle
        assert needle in (err.value.details() or ""), err.value.details()


async def test_a_member_never_reads_or_changes_another_users_data(user_api: UserApi) -> None:
    alice = await user_api.register(display_name="Alice")
    bob = await user_api.register(display_name="Bob")
    as_bob = bearer(bob.tokens.access_token)
    calls: list[Awaitable[object]] = [
        user_api.stub.GetUser(user_service_pb2.GetUserRequest(name=alice.user.name), metadata=as_bob),
        user_api.stub.UpdateUser(
            user_service_pb2.UpdateUserRequest(
                user=user_pb2.User(name=alice.user.name, display_name="pwned"),
                update_mask=FieldMask(paths=["display_name"]),
            ),
            metadata=as_bob,
        ),
        user_api.stub.GetPreferences(
            user_service_pb2.GetPreferencesRequest(name=f"{alice.user.name}/preferences"), metadata=as_bob
        ),
        user_api.stub.DeleteUser(user_service_pb2.DeleteUserRequest(name=alice.user.name), metadata=as_bob),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    still = await user_api.stub.GetUser(
        user_service_pb2.GetUserRequest(name="users/me"), metadata=bearer(alice.tokens.access_token)
    )
    assert still.display_name == "Alice"


async def test_an_admin_reads_any_profile(user_api: UserApi) -> None:
    member = await user_api.register()
    admin = await user_api.register(email=ADMIN_EMAIL)
    assert admin.user.role == user_pb2.ROLE_ADMIN
    seen = await user_api.stub.GetUser(
        user_service_pb2.GetUserRequest(name=member.user.name), metadata=bearer(admin.tokens.access_token)
    )
    assert seen.email == member.user.email


async def test_update_profile_with_a_field_mask(user_api: UserApi) -> None:
    account = await user_api.register(display_name="Before")
    auth = bearer(account.tokens.access_token)
    updated = await user_api.stub.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(name="users/me", display_name="After", height_cm=180, weight_kg=75),
            update_mask=FieldMask(paths=["display_name", "height_cm"]),
        ),
        metadata=auth,
    )
    assert (updated.display_name, updated.height_cm, updated.weight_kg) == ("After", 180, 0)
    assert updated.etag != account.user.etag
    for paths, user, field in (
        (["email"], user_pb2.User(name="users/me"), "update_mask"),
        (["no_such_field"], user_pb2.User(name="users/me"), "update_mask"),
        (["height_cm"], user_pb2.User(name="users/me", height_cm=999), "user.height_cm"),
        (["display_name"], user_pb2.User(name="users/me", display_name="   "), "user.display_name"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await user_api.stub.UpdateUser(
                user_service_pb2.UpdateUserRequest(user=user, update_mask=FieldMask(paths=paths)), metadata=auth
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, paths
        assert field in field_violations(err.value), (paths, err.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.UpdateUser(
            user_service_pb2.UpdateUserRequest(
                user=user_pb2.User(name="users/me", weight_kg=70, etag=account.user.etag),
                update_mask=FieldMask(paths=["weight_kg"]),
            ),
            metadata=auth,
        )
    assert err.value.code() == grpc.StatusCode.ABORTED
    again = await user_api.stub.GetUser(user_service_pb2.GetUserRequest(name="users/me"), metadata=auth)
    assert (again.display_name, again.height_cm, again.weight_kg) == ("After", 180, 0)


async def test_preferences_have_defaults_and_take_masked_updates(user_api: UserApi) -> None:
    account = await user_api.register()
    auth = bearer(account.tokens.access_token)
    prefs = await user_api.stub.GetPreferences(
        user_service_pb2.GetPreferencesRequest(name="users/me/preferences"), metadata=auth
    )
    assert prefs.unit_system == user_pb2.UNIT_SYSTEM_METRIC
    assert prefs.notifications.push_enabled and prefs.notifications.email_enabled
    updated = await user_api.stub.UpdatePreferences(
        user_service_pb2.UpdatePreferencesRequest(
            preferences=user_pb2.Preferences(
                name="users/me/preferences",
                unit_system=user_pb2.UNIT_SYSTEM_IMPERIAL,
                goals=user_pb2.Goals(
                    primary_goal=fitness_pb2.FITNESS_GOAL_STRENGTH, weekly_workout_target=4,
                    available_equipment=[fitness_pb2.EQUIPMENT_BARBELL],
                ),
            ),
            update_mask=FieldMask(paths=["goals.primary_goal", "goals.weekly_workout_target"]),
        ),
        metadata=auth,
    )
    assert updated.unit_system == user_pb2.UNIT_SYSTEM_METRIC
    assert updated.goals.primary_goal == fitness_pb2.FITNESS_GOAL_STRENGTH
    assert updated.goals.weekly_workout_target == 4
    assert list(updated.goals.available_equipment) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.UpdatePreferences(
            user_service_pb2.UpdatePreferencesRequest(
                preferences=user_pb2.Preferences(
                    name="users/me/preferences",
                    notifications=user_pb2.NotificationSettings(phone_number="12345"),
                ),
                update_mask=FieldMask(paths=["notifications"]),
            ),
            metadata=auth,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "preferences.notifications.phone_number" in field_violations(err.value)


async def test_deleting_an_account_removes_it_and_its_sessions(user_api: UserApi) -> None:
    account = await user_api.register(password="delete me please")
    auth = bearer(account.tokens.access_token)
    await user_api.stub.DeleteUser(user_service_pb2.DeleteUserRequest(name="users/me"), metadata=auth)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.GetUser(user_service_pb2.GetUserRequest(name="users/me"), metadata=auth)
    # The replica that deleted the account knows at once that its access tokens are void.
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.RefreshToken(
            user_service_pb2.RefreshTokenRequest(refresh_token=account.tokens.refresh_token)
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_api.stub.Login(
            user_service_pb2.LoginRequest(email=account.user.email, password="delete me please")
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_jwks_publishes_the_key_tokens_are_signed_with(user_api: UserApi) -> None:
    account = await user_api.register()
    jwks = await user_api.stub.GetJwks(user_service_pb2.GetJwksRequest())
    kid = jwt.get_unverified_header(account.tokens.access_token)["kid"]
    assert [k.kid for k in jwks.keys] == [kid]
    assert (jwks.keys[0].kty, jwks.keys[0].crv, jwks.keys[0].alg) == ("EC", "P-256", "ES256")


async def test_health_reports_serving(user_api: UserApi) -> None:
    health = health_pb2_grpc.HealthStub(user_api.channel)
    for service in ("", "fittracker.user.v1.UserService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
