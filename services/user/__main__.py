"""``python -m services.user``: run the user service."""

from services.runtime.server import run_service
from services.user import build

run_service("user", build)
