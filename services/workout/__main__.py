"""``python -m services.workout``: run the workout service."""

from services.runtime.server import run_service
from services.workout import build

run_service("workout", build)
