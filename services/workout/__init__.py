"""The workout service: exercise catalog, routines, workout sessions and personal records."""

from __future__ import annotations

from fittracker.workout.v1 import workout_service_pb2_grpc

from services.runtime.events import UserDeletedHandler, stream_of
from services.runtime.resources import Resources
from services.runtime.server import ServiceDefinition
from services.runtime.settings import Settings
from services.workout.catalog import Catalog
from services.workout.completion import Completer
from services.workout.events import GROUP, PRODUCER, eraser
from services.workout.repository import ALL_COLLECTIONS, RecordRepository, RoutineRepository, SessionRepository
from services.workout.service import PUBLIC_METHODS, SERVICE, WorkoutService


async def build(settings: Settings, resources: Resources) -> ServiceDefinition:
    """Wire the workout service from the shared resources."""
    catalog = Catalog.packaged()
    await catalog.seed(resources.store)
    await resources.store.ensure(ALL_COLLECTIONS)
    routines = RoutineRepository(resources.store)
    sessions = SessionRepository(resources.store)
    records = RecordRepository(resources.store)
    outbox = await resources.outbox()
    completer = Completer(sessions, records, outbox, catalog)
    servicer = WorkoutService(catalog, routines, sessions, records, completer, resources.page_tokens)
    erase_deleted_users = resources.events.consumer(
        GROUP, [stream_of("user")], UserDeletedHandler(PRODUCER, eraser(routines, sessions, records), outbox),
        resources.store,
    )

    return ServiceDefinition.serving(
        servicer, workout_service_pb2_grpc.add_WorkoutServiceServicer_to_server, SERVICE,
        public_methods=PUBLIC_METHODS,
        background=[outbox.relay, erase_deleted_users, completer.sweep],
    )
