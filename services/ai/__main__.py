"""``python -m services.ai``: run the ai service."""

from services.ai import build
from services.runtime.server import run_service

run_service("ai", build)
