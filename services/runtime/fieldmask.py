"""Partial updates with field masks (AIP-134), checked against the fields a caller may write."""

from __future__ import annotations

from collections.abc import Collection
from typing import TypeVar

from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from services.runtime.errors import InvalidArgument

M = TypeVar("M", bound=Message)


#: The mask that asks for full replacement of every writable field (AIP-134).
FULL_REPLACEMENT = "*"


def apply_update_mask(current: M, patch: M, mask: FieldMask, writable: Collection[str]) -> tuple[M, list[str]]:
    """Return ``current`` with the masked fields copied from ``patch``, and the paths applied.

    ``writable`` lists the top-level fields a caller may change; a path may name one of them or a
    sub-field (``goals.primary_goal``). Per AIP-134, an omitted mask means the writable fields that
    are populated in ``patch`` (so a JSON PATCH of one field keeps the others), and ``*`` means
    every writable field (full replacement, unset fields cleared). Any other path is refused with
    INVALID_ARGUMENT naming it, before anything changes.
    """
    paths = _paths(mask, patch, writable)
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


def _paths(mask: FieldMask, patch: Message, writable: Collection[str]) -> list[str]:
    if not mask.paths:
        # Populated means: a scalar off its default, a set message, a non-empty list. A field is
        # set back to its default by naming it in the mask.
        return [f.name for f, _ in patch.ListFields() if f.name in writable]
    if FULL_REPLACEMENT in mask.paths:
        if len(mask.paths) > 1:
            raise InvalidArgument.field("update_mask", "'*' replaces every field and stands alone")
        return sorted(writable)
    return list(mask.paths)
