"""``python -m services.notification``: run the notification service."""

from services.notification import build
from services.runtime.server import run_service

run_service("notification", build)
