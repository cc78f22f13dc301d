"""``python -m services.analytics``: run the analytics service."""

from services.analytics import build
from services.runtime.server import run_service

run_service("analytics", build)
