"""Service settings read from ``FITTRACKER_*`` environment variables, checked once at start.

One typed class holds everything a process may be configured with; a bad value stops the process
with a message naming the variable, instead of failing later in a handler.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

PREFIX = "FITTRACKER_"

ServiceName = Literal["user", "workout", "ai", "notification", "analytics"]
SERVICES: tuple[ServiceName, ...] = get_args(ServiceName)

#: The port each service listens on by default; the edge and the other services use the same map.
DEFAULT_PORTS: dict[ServiceName, int] = {
    "user": 50051,
    "workout": 50052,
    "ai": 50053,
    "notification": 50054,
    "analytics": 50055,
}


class SettingsError(ValueError):
    """A setting has a value the service cannot run with."""


@dataclass(frozen=True)
class Settings:
    """Everything a service process is configured with. Field ``x`` reads ``FITTRACKER_X``."""

    service: ServiceName = "user"
    #: ``development`` may generate missing signing keys; ``production`` refuses to.
    environment: Literal["development", "test", "production"] = "development"
    host: str = "127.0.0.1"
    #: 0 picks a free port (tests); otherwise the service's default from DEFAULT_PORTS.
    port: int = -1
    #: Worker processes sharing the port through SO_REUSEPORT; 0 means one per core.
    workers: int = 1
    #: Set by the supervisor for each worker it starts; numbers its metrics port and log lines.
    worker_index: int = 0
    #: First Prometheus /metrics port; worker i serves on metrics_port + i. 0 turns it off.
    metrics_port: int = 0
    #: Seconds in-flight calls get to finish after SIGTERM before they are cancelled.
    grace_seconds: float = 10.0
    #: How long health stays NOT_SERVING before the listener closes: long enough for the edge's
    #: active health checks (1 s interval, 2 failures) to take the instance out of rotation.
    drain_notice_seconds: float = 3.0
    #: Longest deadline a call may ask for; longer (or missing) deadlines are capped by handlers.
    max_deadline_seconds: float = 30.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Where the embedded store, event log and development keys live.
    data_dir: Path = Path(".data")
    #: A MongoDB URL switches storage from the embedded store to MongoDB.
    mongo_url: str = ""
    mongo_database: str = "fittracker"
    #: A Redis URL turns on the shared L2 cache, Redis Streams events and shared rate limits.
    redis_url: str = ""
    #: An event pending this long for a consumer that stopped answering (crashed, hung) is
    #: reclaimed by another replica of its group; it must exceed the slowest handler's run.
    events_claim_idle_seconds: float = 60.0
    #: Directory holding the ES256 signing key (user service) and the public JWKS (everyone).
    jwt_keys_dir: Path = Path("")
    jwt_issuer: str = "https://auth.fittracker.app"
    jwt_audience: str = "fittracker-api"
    access_token_ttl_seconds: int = 900
    refresh_token_ttl_seconds: int = 30 * 24 * 3600
    #: How often each replica reads new session revocations: the bound on how long an access token
    #: still works after logout, refresh-token reuse or account deletion.
    revocation_poll_seconds: float = 1.0
    #: Seconds between an account's deletion and the start of its erasure, so that calls which
    #: passed the token check before every replica knew (the revocation bound) and then ran for
    #: up to the longest deadline are erased too. -1 derives it from those two.
    erasure_delay_seconds: float = -1.0
    #: HMAC key of page tokens, the same on every replica (a Secret in a cluster); outside
    #: production an empty value means a key generated once in the keys directory.
    page_token_key: str = ""
    #: Comma-separated emails that get the admin role when they register (operators' bootstrap).
    admin_emails: str = ""
    #: argon2id cost: memory in KiB and passes. Lower them only for tests.
    argon2_memory_kib: int = 65536
    argon2_time_cost: int = 3
    #: Failed logins allowed per account and per client address within the window.
    login_max_failures: int = 5
    login_failure_window_seconds: int = 900
    #: OTLP gRPC endpoint for traces; empty keeps spans in-process (still propagated).
    otlp_endpoint: str = ""
    #: Share of the traces started here that are recorded; -1 means all with an OTLP endpoint, none
    #: without. Calls that arrive with a sampled traceparent are always recorded.
    trace_sample_ratio: float = -1.0
    #: Addresses of the other services, "host:port", for outgoing calls.
    user_addr: str = ""
    workout_addr: str = ""
    ai_addr: str = ""
    notification_addr: str = ""
    analytics_addr: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def keys_dir(self) -> Path:
        """The JWT key directory, defaulting to ``<data_dir>/keys``."""
        return self.jwt_keys_dir if str(self.jwt_keys_dir) not in ("", ".") else self.data_dir / "keys"

    @property
    def erasure_delay(self) -> float:
        """The configured erasure delay, or the longest call plus the revocation bound (and slack)."""
        if self.erasure_delay_seconds >= 0:
            return self.erasure_delay_seconds
        return self.max_deadline_seconds + 2 * self.revocation_poll_seconds + 1.0

    @property
    def listen_port(self) -> int:
        """The port to bind: the configured one, or the service's default."""
        return DEFAULT_PORTS[self.service] if self.port < 0 else self.port

    def address_of(self, service: ServiceName) -> str:
        """Where to reach another service: its configured address or its default local port."""
        configured: str = getattr(self, f"{service}_addr")
        return configured or f"127.0.0.1:{DEFAULT_PORTS[service]}"

    @classmethod
    def from_env(cls, service: ServiceName, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings for ``service`` from the environment, refusing values that cannot work."""
        env = os.environ if env is None else env
        values: dict[str, object] = {"service": service}
        for f in fields(cls):
            if f.name in ("service", "extra"):
                continue
            raw = env.get(PREFIX + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _parse(f.name, raw, f.type)
        settings = cls(**values)  # type: ignore[arg-type]  # keys come from fields(cls) above
        settings.validate()
        return settings

    def validate(self) -> None:  # noqa: PLR0912 - one plain check per setting reads best
        """Check ranges and combinations; raise SettingsError naming the variable."""
        if self.service not in SERVICES:
            raise SettingsError(f"{PREFIX}SERVICE must be one of {', '.join(SERVICES)}")
        if not -1 <= self.port <= 65535:
            raise SettingsError(f"{PREFIX}PORT must be between 0 and 65535, got {self.port}")
        if not 0 <= self.workers <= 64:
            raise SettingsError(f"{PREFIX}WORKERS must be between 0 and 64, got {self.workers}")
        if not (self.trace_sample_ratio == -1 or 0 <= self.trace_sample_ratio <= 1):
            raise SettingsError(f"{PREFIX}TRACE_SAMPLE_RATIO must be between 0 and 1")
        if self.grace_seconds < 0 or self.drain_notice_seconds < 0:
            raise SettingsError(f"{PREFIX}GRACE_SECONDS and {PREFIX}DRAIN_NOTICE_SECONDS must not be negative")
        if self.access_token_ttl_seconds < 30 or self.access_token_ttl_seconds > 3600:
            raise SettingsError(f"{PREFIX}ACCESS_TOKEN_TTL_SECONDS must be between 30 and 3600")
        if not 0.05 <= self.revocation_poll_seconds <= 10:
            raise SettingsError(f"{PREFIX}REVOCATION_POLL_SECONDS must be between 0.05 and 10")
        if not 0.5 <= self.events_claim_idle_seconds <= 3600:
            raise SettingsError(f"{PREFIX}EVENTS_CLAIM_IDLE_SECONDS must be between 0.5 and 3600")
        if self.refresh_token_ttl_seconds <= self.access_token_ttl_seconds:
            raise SettingsError(f"{PREFIX}REFRESH_TOKEN_TTL_SECONDS must exceed the access token TTL")
        for url, name, schemes in (
            (self.mongo_url, "MONGO_URL", ("mongodb://", "mongodb+srv://")),
            (self.redis_url, "REDIS_URL", ("redis://", "rediss://", "unix://")),
        ):
            if url and not url.startswith(schemes):
                raise SettingsError(f"{PREFIX}{name} must start with {' or '.join(schemes)}")
        if self.page_token_key and len(self.page_token_key) < 32:
            raise SettingsError(f"{PREFIX}PAGE_TOKEN_KEY must be at least 32 characters")
        if self.environment == "production" and str(self.jwt_keys_dir) in ("", "."):
            raise SettingsError(f"{PREFIX}JWT_KEYS_DIR must name provisioned keys in production")


_TYPE_NAMES = {"int": int, "float": float, "str": str, "Path": Path, "bool": bool}


def _parse(name: str, raw: str, annotation: object) -> object:
    """Turn one environment string into the field's type, or raise SettingsError."""
    text = str(annotation)
    var = PREFIX + name.upper()
    if text.startswith("Literal["):
        allowed = [a.strip().strip("'\"") for a in text[len("Literal[") : -1].split(",")]
        if raw not in allowed:
            raise SettingsError(f"{var} must be one of {', '.join(allowed)}, got {raw!r}")
        return raw
    kind = _TYPE_NAMES.get(text, str)
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{var} must be a {kind.__name__}, got {raw!r}") from None
