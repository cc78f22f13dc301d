"""The notification service's own settings: provider endpoints, retries, limits, fan-out.

They are ``FITTRACKER_*`` environment variables like the shared ``Settings``, read and checked
once at start by one typed class; a bad value stops the process with a message naming the
variable. ``Settings.extra`` entries override the environment (tests point providers at local
peers that way). An empty endpoint turns its provider off: deliveries on that channel then end
FAILED with "not configured", so an operator sees the gap instead of silence.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from services.runtime.settings import PREFIX, SettingsError

#: Values that mean "nobody filled this in"; refused for secrets outside development.
PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "secret", "password", "xxx", "todo"})


@dataclass(frozen=True)
class NotificationConfig:
    """Everything the notification service adds to the shared settings. Field ``x`` reads ``FITTRACKER_X``."""

    # --- email (SMTP) ---------------------------------------------------------------------------
    #: The SMTP relay's host name; empty turns email off.
    smtp_host: str = ""
    smtp_port: int = 587
    #: ``starttls`` upgrades a plain connection (port 587), ``tls`` is implicit TLS (port 465),
    #: ``none`` is plain text and only allowed to a loopback relay.
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_username: str = ""
    smtp_password: str = ""
    email_from: str = "FitTracker <no-reply@fittracker.app>"

    # --- push: FCM HTTP v1 (Android, web) -------------------------------------------------------
    #: Base URL of the FCM API; messages go to ``<endpoint>/v1/projects/<project>/messages:send``.
    fcm_endpoint: str = "https://fcm.googleapis.com"
    #: A Google service-account JSON key file (client_email, private_key, token_uri); empty turns FCM off.
    fcm_credentials_file: Path = Path("")
    #: The Firebase project id; defaults to the one in the credentials file.
    fcm_project_id: str = ""

    # --- push: APNs (iOS) -----------------------------------------------------------------------
    #: Base URL of APNs over HTTP/2: production ``https://api.push.apple.com``, or the sandbox.
    apns_endpoint: str = "https://api.push.apple.com"
    #: The ``.p8`` token-signing key from the Apple developer account; empty turns APNs off.
    apns_key_file: Path = Path("")
    apns_key_id: str = ""
    apns_team_id: str = ""
    #: The app's bundle id, sent as ``apns-topic``.
    apns_topic: str = ""

    # --- SMS (a JSON HTTP gateway) --------------------------------------------------------------
    #: The gateway's send URL (POST, JSON ``{"from","to","body"}``); empty turns SMS off.
    sms_endpoint: str = ""
    sms_api_key: str = ""
    #: The sender id or number the gateway sends from.
    sms_sender: str = "FitTracker"

    # --- behaviour ------------------------------------------------------------------------------
    #: Seconds one provider request may take before it counts as a (retryable) failure.
    provider_timeout_seconds: float = 10.0
    #: Attempts per channel before a delivery is FAILED.
    delivery_max_attempts: int = 5
    #: The first retry waits this long; each further one twice as long, up to retry_max_seconds.
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    #: Push, email and SMS sends allowed per user per window; the inbox is never limited.
    send_limit_per_user: int = 20
    send_limit_window_seconds: int = 3600
    #: How often replicas look for deliveries due for a retry, and (without Redis) for
    #: notifications other processes created for local subscribers.
    poll_interval_seconds: float = 1.0
    #: Notifications older than this are deleted (a TTL index); Subscribe reports the loss.
    retention_days: int = 90
    #: The most notifications one Subscribe replays; beyond that the client reloads its inbox.
    max_replay: int = 500

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, environment: str = "development") -> NotificationConfig:
        """Read the variables from ``env`` (the process environment by default) and check them."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, raw, str(f.type))
        config = cls(**values)  # type: ignore[arg-type]  # keys and types come from fields(cls)
        config.validate(environment)
        return config

    def validate(self, environment: str = "development") -> None:
        """Check ranges, URLs and secrets; raise SettingsError naming the variable."""
        self._validate_providers(environment)
        self._validate_behaviour()

    def _validate_providers(self, environment: str) -> None:
        if not 0 < self.smtp_port <= 65535:
            raise SettingsError(f"{PREFIX}SMTP_PORT must be between 1 and 65535, got {self.smtp_port}")
        if self.smtp_host and self.smtp_security == "none" and not is_loopback(self.smtp_host):
            raise SettingsError(f"{PREFIX}SMTP_SECURITY=none is only allowed for a loopback SMTP_HOST")
        for name in ("fcm_endpoint", "apns_endpoint", "sms_endpoint"):
            check_endpoint(name, getattr(self, name))
        if self.apns_enabled and not (self.apns_key_id and self.apns_team_id and self.apns_topic):
            raise SettingsError(f"{PREFIX}APNS_KEY_FILE needs {PREFIX}APNS_KEY_ID, APNS_TEAM_ID and APNS_TOPIC")
        if self.sms_endpoint and not self.sms_api_key:
            raise SettingsError(f"{PREFIX}SMS_ENDPOINT needs {PREFIX}SMS_API_KEY")
        if environment == "production":
            for name in ("smtp_password", "sms_api_key"):
                if str(getattr(self, name)).strip().lower() in PLACEHOLDER_SECRETS:
                    raise SettingsError(f"{PREFIX}{name.upper()} is a placeholder; set the real secret")

    def _validate_behaviour(self) -> None:
        if not 0.1 <= self.provider_timeout_seconds <= 120:
            raise SettingsError(f"{PREFIX}PROVIDER_TIMEOUT_SECONDS must be between 0.1 and 120")
        if not 1 <= self.delivery_max_attempts <= 20:
            raise SettingsError(f"{PREFIX}DELIVERY_MAX_ATTEMPTS must be between 1 and 20")
        if not 0 < self.retry_base_seconds <= self.retry_max_seconds:
            raise SettingsError(f"{PREFIX}RETRY_BASE_SECONDS must be positive and at most RETRY_MAX_SECONDS")
        if self.send_limit_per_user < 1 or self.send_limit_window_seconds < 1:
            raise SettingsError(f"{PREFIX}SEND_LIMIT_PER_USER and SEND_LIMIT_WINDOW_SECONDS must be positive")
        if not 0.05 <= self.poll_interval_seconds <= 60:
            raise SettingsError(f"{PREFIX}POLL_INTERVAL_SECONDS must be between 0.05 and 60")
        if not 1 <= self.retention_days <= 3650:
            raise SettingsError(f"{PREFIX}RETENTION_DAYS must be between 1 and 3650")
        if not 1 <= self.max_replay <= 10_000:
            raise SettingsError(f"{PREFIX}MAX_REPLAY must be between 1 and 10000")

    @property
    def fcm_enabled(self) -> bool:
        """Whether FCM credentials are configured."""
        return str(self.fcm_credentials_file) not in ("", ".")

    @property
    def apns_enabled(self) -> bool:
        """Whether an APNs signing key is configured."""
        return str(self.apns_key_file) not in ("", ".")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine, so that plain text never leaves it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint(name: str, url: str) -> None:
    """Refuse an endpoint that is not an absolute http(s) URL, or plain http to another machine."""
    if not url:
        return
    parts = urllib.parse.urlsplit(url)
    var = PREFIX + name.upper()
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise SettingsError(f"{var} must be an absolute https URL, got {url!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        # Provider credentials travel in headers: cleartext is for a local test peer only.
        raise SettingsError(f"{var} may use http only for a loopback host, got {url!r}")


_KINDS: dict[str, type] = {"int": int, "float": float, "str": str, "Path": Path}


def _parse(name: str, raw: str, annotation: str) -> object:
    """Turn one environment string into the field's type, or raise SettingsError naming it."""
    var = PREFIX + name.upper()
    if annotation.startswith("Literal["):
        allowed = [a.strip().strip("'\"") for a in annotation[len("Literal[") : -1].split(",")]
        if raw not in allowed:
            raise SettingsError(f"{var} must be one of {', '.join(allowed)}, got {raw!r}")
        return raw
    kind = _KINDS.get(annotation, str)
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{var} must be a {kind.__name__}, got {raw!r}") from None
