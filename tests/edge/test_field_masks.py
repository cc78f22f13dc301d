"""Partial updates over JSON as AIP-134 has them: without a mask, only the fields sent change.

A mobile client PATCHes what the user edited; before, an omitted mask meant every writable field,
so the fields it did not send were blanked.
"""

from __future__ import annotations

import pytest

from tests.edge.conftest import Account, Edge

pytestmark = pytest.mark.edge


def test_a_json_patch_of_one_field_keeps_the_rest(edge: Edge, account: Account) -> None:
    token = account.access_token
    first = edge.json("PATCH", "/v1/users/me?update_mask=display_name,height_cm,weight_kg",
                      {"display_name": "Ada Lovelace", "height_cm": 170, "weight_kg": 61}, token=token)
    assert first.status == 200, first.body

    reply = edge.json("PATCH", "/v1/users/me", {"weight_kg": 60}, token=token)
    assert reply.status == 200, reply.body
    profile = edge.json("GET", "/v1/users/me", token=token).json()
    assert profile["weight_kg"] == 60
    assert profile["display_name"] == "Ada Lovelace"
    assert profile["height_cm"] == 170


def test_a_star_mask_replaces_every_field(edge: Edge, account: Account) -> None:
    token = account.access_token
    edge.json("PATCH", "/v1/users/me?update_mask=display_name,height_cm",
              {"display_name": "Ada", "height_cm": 170}, token=token)
    reply = edge.json("PATCH", "/v1/users/me?update_mask=*", {"display_name": "Grace"}, token=token)
    assert reply.status == 200, reply.body
    assert reply.json()["display_name"] == "Grace"
    assert reply.json()["height_cm"] == 0, "full replacement clears what was not sent"


def test_a_preferences_patch_of_one_field_keeps_the_rest(edge: Edge, account: Account) -> None:
    token = account.access_token
    edge.json("PATCH", "/v1/users/me/preferences?update_mask=time_zone", {"time_zone": "Europe/Paris"}, token=token)
    reply = edge.json("PATCH", "/v1/users/me/preferences", {"unit_system": "UNIT_SYSTEM_IMPERIAL"}, token=token)
    assert reply.status == 200, reply.body
    prefs = edge.json("GET", "/v1/users/me/preferences", token=token).json()
    assert prefs["unit_system"] == "UNIT_SYSTEM_IMPERIAL"
    assert prefs["time_zone"] == "Europe/Paris"
    assert prefs["notifications"]["push_enabled"] is True, "untouched groups keep their values"


def test_a_routine_patch_of_the_name_keeps_its_exercises(edge: Edge, account: Account) -> None:
    token = account.access_token
    squat = edge.json("GET", "/v1/exercises?query=back%20squat&page_size=1", token=token).json()["exercises"][0]
    routine = edge.json("POST", "/v1/users/me/routines", {
        "display_name": "Leg day", "description": "heavy",
        "exercises": [{"exercise": squat["name"], "target_sets": 3, "target_reps": 5}],
    }, token=token).json()
    reply = edge.json("PATCH", f"/v1/{routine['name']}", {"display_name": "Legs"}, token=token)
    assert reply.status == 200, reply.body
    assert reply.json()["display_name"] == "Legs"
    assert reply.json()["description"] == "heavy"
    assert [e["exercise"] for e in reply.json()["exercises"]] == [squat["name"]]


def test_an_unknown_field_in_the_mask_is_400_naming_it(edge: Edge, account: Account) -> None:
    reply = edge.json("PATCH", "/v1/users/me?update_mask=email", {"email": "x@example.com"},
                      token=account.access_token)
    assert reply.status == 400
    assert "update_mask" in reply.body.decode()
