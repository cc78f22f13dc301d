"""Stored documents to API messages. Enum values are stored by name, so the store reads clearly."""

from __future__ import annotations

from fittracker.notification.v1 import notification_pb2

from services.runtime.storage import Document
from services.runtime.timeutil import to_timestamp


def notification_name(doc: Document) -> str:
    """"users/{user}/notifications/{id}"."""
    return f"users/{doc['user_id']}/notifications/{doc['_id']}"


def to_notification(doc: Document) -> notification_pb2.Notification:
    """The API view of a stored notification (internal bookkeeping left out)."""
    message = notification_pb2.Notification(
        name=notification_name(doc),
        title=doc["title"],
        body=doc["body"],
        category=notification_pb2.Category.Value(doc["category"]),
        create_time=to_timestamp(doc["create_time"]),
        read_time=to_timestamp(doc.get("read_time")),
        data=doc.get("data") or {},
        cursor=int(doc["cursor"]),
    )
    for entry in doc.get("deliveries") or []:
        message.deliveries.append(
            notification_pb2.Delivery(
                channel=notification_pb2.Channel.Value(entry["channel"]),
                status=notification_pb2.DeliveryStatus.Value(entry["status"]),
                attempt_count=int(entry.get("attempt_count", 0)),
                update_time=to_timestamp(entry.get("update_time")),
                error_message=entry.get("error_message", ""),
            )
        )
    return message


def to_device(doc: Document) -> notification_pb2.Device:
    """The API view of a device; the push token is input-only and never leaves the service."""
    return notification_pb2.Device(
        name=f"users/{doc['user_id']}/devices/{doc['_id']}",
        platform=notification_pb2.Platform.Value(doc["platform"]),
        app_version=doc.get("app_version", ""),
        display_name=doc.get("display_name", ""),
        create_time=to_timestamp(doc["create_time"]),
        update_time=to_timestamp(doc["update_time"]),
    )
