"""Partial updates with field masks (AIP-134), checked against the fields a caller may write."""

from __future__ import annotations

from collections.abc import Collection
from typing import TypeVar

from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from services.runtime.errors import InvalidArgument

M = TypeVar("M", bound=Message)


def apply_update_mask(current: M, patch: M, mask: FieldMask, writable: Collection[str]) -> tuple[M, list[str]]:
    """Return ``current`` with the masked fields copied from ``patch``, and the paths applied.

    ``writable`` lists the top-level fields a caller may change; a path may name one of them or a
    sub-field (``goals.primary_goal``). An empty mask means every writable field. Any other path
    is refused with INVALID_ARGUMENT naming it, before anything changes.
    """
    paths = list(mask.paths) or sorted(writable)
    for path in paths:
        top = path.split(".", 1)[0]
        if top not in writable:
            raise InvalidArgument.field("update_mask", f"{path!r} is not a field that can be updated")
        probe = FieldMask(paths=[path])
        if not probe.IsValidForDescriptor(current.DESCRIPTOR):  # type: ignore[arg-type]  # upb descriptors are Descriptors at runtime
            raise InvalidArgument.field("update_mask", f"{path!r} is not a field of {current.DESCRIPTOR.name}")
    updated = type(current)()
    updated.CopyFrom(current)
    FieldMask(paths=paths).MergeMessage(patch, updated, replace_message_field=True, replace_repeated_field=True)
    return updated, paths
