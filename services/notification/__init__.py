"""The notification service: real-time streams, the inbox, push devices, delivery by push, email and SMS."""

from __future__ import annotations

import os
from datetime import timedelta

from fittracker.notification.v1 import notification_service_pb2_grpc

from services.notification.config import NotificationConfig
from services.notification.delivery import DeliveryWorker, Dispatcher, Providers
from services.notification.directory import Directory
from services.notification.events import CONSUMER_GROUP, STREAMS, EventHandler
from services.notification.hub import Hub
from services.notification.notifier import Notifier
from services.notification.providers.apns import ApnsProvider
from services.notification.providers.email import EmailProvider
from services.notification.providers.fcm import FcmProvider, ServiceAccount
from services.notification.providers.h2client import H2Client
from services.notification.providers.http import HttpClient
from services.notification.providers.sms import SmsProvider
from services.notification.repository import DeviceRepository, NotificationRepository
from services.notification.service import PUBLIC_METHODS, SERVICE, NotificationService
from services.runtime.resources import Resources
from services.runtime.server import ServiceDefinition
from services.runtime.settings import Settings, SettingsError
from services.runtime.timeutil import now


def build_providers(config: NotificationConfig) -> Providers:
    """The adapters the configuration enables."""
    http = HttpClient(config.provider_timeout_seconds)
    providers = Providers()
    if config.smtp_host:
        providers.email = EmailProvider(
            config.smtp_host, config.smtp_port, config.smtp_security, config.smtp_username, config.smtp_password,
            config.email_from, config.provider_timeout_seconds,
        )
    try:
        if config.fcm_enabled:
            account = ServiceAccount.load(config.fcm_credentials_file)
            providers.fcm = FcmProvider(config.fcm_endpoint, account, config.fcm_project_id, http)
        if config.apns_enabled:
            providers.apns = ApnsProvider(
                H2Client(config.apns_endpoint, config.provider_timeout_seconds),
                config.apns_key_file, config.apns_key_id, config.apns_team_id, config.apns_topic,
            )
    except (OSError, ValueError) as error:
        raise SettingsError(f"push credentials cannot be used: {error}") from None
    if config.sms_endpoint:
        providers.sms = SmsProvider(config.sms_endpoint, config.sms_api_key, config.sms_sender, http)
    return providers


async def build(settings: Settings, resources: Resources) -> ServiceDefinition:
    """Wire the notification service from the shared resources."""
    config = NotificationConfig.from_env({**os.environ, **settings.extra}, environment=settings.environment)
    notifications = NotificationRepository(resources.store, timedelta(days=config.retention_days))
    devices = DeviceRepository(resources.store)
    outbox = await resources.outbox()
    await notifications.ensure()
    await devices.ensure()
    directory = Directory(resources.client("user"), resources.client("workout"), resources.service_credentials)
    providers = build_providers(config)
    dispatcher = Dispatcher(config, notifications, devices, directory, resources.counters, providers, now)
    hub = Hub(notifications, resources.redis, config.poll_interval_seconds)
    await hub.start()
    notifier = Notifier(notifications, directory, dispatcher, hub, now)
    worker = DeliveryWorker(notifications, dispatcher, config.poll_interval_seconds, now)
    handler = EventHandler(notifier, directory, notifications, devices, hub, outbox)
    consumer = resources.events.consumer(CONSUMER_GROUP, STREAMS, handler, resources.store)
    servicer = NotificationService(config, notifications, devices, directory, notifier, hub, resources.page_tokens)

    async def close() -> None:
        await notifier.close()
        await providers.close()
        await hub.close()

    return ServiceDefinition.serving(
        servicer, notification_service_pb2_grpc.add_NotificationServiceServicer_to_server, SERVICE,
        public_methods=PUBLIC_METHODS,
        background=[hub.run, worker.run, consumer, outbox.relay],
        close=close,
        on_drain=hub.drain,
    )
