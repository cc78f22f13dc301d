"""The notification service, two replicas of it started by the production factory on free ports,
next to the real user service, over each storage backend, with provider peers on loopback.

The replicas share their storage (the embedded file, or FerretDB + Redis) like two pods would,
so fan-out between them is exercised: through the store poller on the embedded backend, through
Redis pub/sub on the other.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fittracker.events.v1 import events_pb2
from fittracker.notification.v1 import notification_pb2, notification_service_pb2, notification_service_pb2_grpc
from fittracker.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from google.protobuf.field_mask_pb2 import FieldMask

from services import notification, user
from services.runtime.server import RunningService, start_service
from services.runtime.settings import Settings
from tests.notification.peers import ApnsPeer, HttpPeer, SmtpPeer
from tests.support import bearer

if TYPE_CHECKING:
    from fittracker.notification.v1.notification_service_pb2_grpc import NotificationServiceAsyncStub
    from fittracker.user.v1.user_service_pb2_grpc import UserServiceAsyncStub

ADMIN_EMAIL = "ops@fittracker.test"
FCM_PROJECT = "fittracker-test"
APNS_KEY_ID = "KEY1234567"
APNS_TEAM_ID = "TEAM123456"
APNS_TOPIC = "app.fittracker.ios"
SMS_API_KEY = "sms-test-key-1"
SEND_LIMIT = 8


@dataclass
class Account:
    """A registered user and their access token."""

    user_id: str
    email: str
    token: str

    @property
    def name(self) -> str:
        return f"users/{self.user_id}"

    @property
    def auth(self) -> tuple[tuple[str, str]]:
        return bearer(self.token)


@dataclass
class ProviderKeys:
    """What the provider peers verify signatures with."""

    fcm_public_key: rsa.RSAPublicKey
    fcm_client_email: str
    apns_public_key: ec.EllipticCurvePublicKey


@dataclass
class NotificationEnv:
    """Two notification replicas, the user service, the peers, and helpers."""

    backend: str
    replicas: list[RunningService]
    stubs: list[NotificationServiceAsyncStub]
    users: UserServiceAsyncStub
    smtp: SmtpPeer
    http: HttpPeer
    apns: ApnsPeer
    keys: ProviderKeys
    admin: Account
    settings: Settings
    channels: list[grpc.aio.Channel]

    @property
    def stub(self) -> NotificationServiceAsyncStub:
        return self.stubs[0]

    async def account(self, email: str | None = None) -> Account:
        """Register a fresh user."""
        address = email or f"{uuid.uuid4().hex[:12]}@example.com"
        registered = await self.users.Register(
            user_service_pb2.RegisterRequest(email=address, password="correct horse battery", display_name="Ada")
        )
        return Account(registered.user.name.removeprefix("users/"), address, registered.tokens.access_token)

    async def set_notifications(self, account: Account, time_zone: str = "UTC", **fields: object) -> None:
        """Change the user's notification preferences (and time zone) in the user service."""
        prefs = user_pb2.Preferences(
            name=f"{account.name}/preferences",
            notifications=user_pb2.NotificationSettings(**fields),  # type: ignore[arg-type]
            time_zone=time_zone,
        )
        await self.users.UpdatePreferences(
            user_service_pb2.UpdatePreferencesRequest(
                preferences=prefs, update_mask=FieldMask(paths=["notifications", "time_zone"])
            ),
            metadata=account.auth,
        )

    async def send(
        self, account: Account, *channels: notification_pb2.Channel.ValueType, title: str = "Hello",
        body: str = "A message for you.", request_id: str = "", replica: int = 0,
        category: notification_pb2.Category.ValueType = notification_pb2.CATEGORY_SYSTEM,
        data: dict[str, str] | None = None,
    ) -> notification_pb2.Notification:
        """SendNotification as the admin."""
        return await self.stubs[replica].SendNotification(
            notification_service_pb2.SendNotificationRequest(
                parent=account.name, channels=list(channels), title=title, body=body, category=category,
                request_id=request_id, data=data or {},
            ),
            metadata=self.admin.auth,
        )

    async def register_device(
        self, account: Account, platform: notification_pb2.Platform.ValueType, token: str | None = None
    ) -> tuple[notification_pb2.Device, str]:
        """Register a device with a fresh (or given) push token."""
        push_token = token or f"tok{uuid.uuid4().hex}{uuid.uuid4().hex}"
        device = await self.stub.RegisterDevice(
            notification_service_pb2.RegisterDeviceRequest(
                parent=account.name,
                device=notification_pb2.Device(platform=platform, push_token=push_token, app_version="2.14.0",
                                               display_name="Test phone"),
            ),
            metadata=account.auth,
        )
        return device, push_token

    async def publish(self, envelope: events_pb2.EventEnvelope) -> None:
        """Put an event on the bus the replicas consume."""
        await self.replicas[0].resources.events.publish(envelope)


def _provider_keys(directory: Path, token_uri: str) -> tuple[Path, Path, ProviderKeys]:
    """A Google service-account key file (RSA) and an APNs .p8 key (EC P-256), freshly made."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem, pkcs8, none = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    client_email = "push@fittracker-test.iam.gserviceaccount.com"
    fcm_file = directory / "fcm-service-account.json"
    fcm_file.write_text(json.dumps({
        "type": "service_account",
        "project_id": FCM_PROJECT,
        "private_key_id": "fcm-key-1",
        "private_key": rsa_key.private_bytes(pem, pkcs8, none).decode(),
        "client_email": client_email,
        "token_uri": token_uri,
    }))
    apns_file = directory / f"AuthKey_{APNS_KEY_ID}.p8"
    apns_file.write_bytes(ec_key.private_bytes(pem, pkcs8, none))
    return fcm_file, apns_file, ProviderKeys(rsa_key.public_key(), client_email, ec_key.public_key())


@pytest_asyncio.fixture(scope="module")
async def env(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> AsyncIterator[NotificationEnv]:
    """Peers, the user service, two notification replicas, and an admin account."""
    mongo_url = request.getfixturevalue("mongo_url") if backend == "mongo" else ""
    redis_url = request.getfixturevalue("redis_url") if backend == "mongo" else ""
    root = tmp_path_factory.mktemp(f"notification-{backend}")
    keys_dir = root / "keys"
    smtp, http, apns = SmtpPeer(), HttpPeer(FCM_PROJECT), ApnsPeer()
    for peer in (smtp, http, apns):
        await peer.start()
    fcm_file, apns_file, keys = _provider_keys(root, f"{http.url}/token")

    user_settings = Settings(
        service="user", environment="test", port=0, data_dir=root / "user", jwt_keys_dir=keys_dir,
        mongo_url=mongo_url, mongo_database=f"user_{uuid.uuid4().hex[:8]}", redis_url=redis_url,
        argon2_memory_kib=1024, argon2_time_cost=1, admin_emails=ADMIN_EMAIL, log_level="WARNING",
    )
    user_service = await start_service(user_settings, user.build)
    settings = Settings(
        service="notification", environment="test", port=0, data_dir=root / "notification",
        jwt_keys_dir=keys_dir, mongo_url=mongo_url, mongo_database=f"notification_{uuid.uuid4().hex[:8]}",
        redis_url=redis_url, log_level="WARNING", user_addr=f"127.0.0.1:{user_service.port}",
        # Nothing listens there: exercise names fall back to readable ids, quickly.
        workout_addr="127.0.0.1:1",
        extra={
            "FITTRACKER_SMTP_HOST": "127.0.0.1",
            "FITTRACKER_SMTP_PORT": str(smtp.port),
            "FITTRACKER_SMTP_SECURITY": "none",
            "FITTRACKER_EMAIL_FROM": "FitTracker <no-reply@fittracker.test>",
            "FITTRACKER_FCM_ENDPOINT": http.url,
            "FITTRACKER_FCM_CREDENTIALS_FILE": str(fcm_file),
            "FITTRACKER_APNS_ENDPOINT": apns.url,
            "FITTRACKER_APNS_KEY_FILE": str(apns_file),
            "FITTRACKER_APNS_KEY_ID": APNS_KEY_ID,
            "FITTRACKER_APNS_TEAM_ID": APNS_TEAM_ID,
            "FITTRACKER_APNS_TOPIC": APNS_TOPIC,
            "FITTRACKER_SMS_ENDPOINT": f"{http.url}/sms",
            "FITTRACKER_SMS_API_KEY": SMS_API_KEY,
            "FITTRACKER_SMS_SENDER": "FitTracker",
            "FITTRACKER_POLL_INTERVAL_SECONDS": "0.1",
            "FITTRACKER_RETRY_BASE_SECONDS": "0.05",
            "FITTRACKER_RETRY_MAX_SECONDS": "0.2",
            "FITTRACKER_PROVIDER_TIMEOUT_SECONDS": "5",
            "FITTRACKER_SEND_LIMIT_PER_USER": str(SEND_LIMIT),
        },
    )
    replicas = [await start_service(settings, notification.build) for _ in range(2)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") for r in replicas]
    user_channel = grpc.aio.insecure_channel(f"127.0.0.1:{user_service.port}")
    users: UserServiceAsyncStub = user_service_pb2_grpc.UserServiceStub(user_channel)
    admin_registered = await users.Register(
        user_service_pb2.RegisterRequest(email=ADMIN_EMAIL, password="correct horse battery", display_name="Ops")
    )
    admin_id = admin_registered.user.name.removeprefix("users/")
    admin = Account(admin_id, ADMIN_EMAIL, admin_registered.tokens.access_token)
    yield NotificationEnv(
        backend=backend, replicas=replicas,
        stubs=[notification_service_pb2_grpc.NotificationServiceStub(c) for c in channels],
        users=users, smtp=smtp, http=http, apns=apns, keys=keys, admin=admin,
        settings=settings, channels=channels,
    )
    for channel in (*channels, user_channel):
        await channel.close()
    for running in replicas:
        await running.stop(grace=0.5)
    await user_service.stop(grace=0.5)
    for peer in (smtp, http, apns):
        await peer.stop()
