"""The ai service's gRPC surface: form analysis, recommendations and adaptive plans.

Handlers check ownership, gather what they need from the user and workout services through
``Peers`` (within a budget taken from the caller's deadline), and hand the real work to the pure
modules: ``form`` (pose analysis), ``recommender`` and ``planner``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from fittracker.ai.v1 import ai_pb2, ai_service_pb2, ai_service_pb2_grpc
from fittracker.common.v1 import fitness_pb2 as fit
from fittracker.workout.v1 import workout_pb2

from services.ai.catalog import Equipment
from services.ai.form import FormAnalyzer
from services.ai.peers import Peers
from services.ai.planner import LoggedSet, NoExercises, PlanInputs, SessionLog, adapt, design_weeks, plan_end
from services.ai.recommender import History, NothingToRecommend, Request, UserContext, recommend
from services.ai.repository import (
    MAX_PLANS_PER_USER,
    PlanRepository,
    document_to_plan,
    etag_of,
    plan_to_document,
)
from services.ai.training import equipment_name, goal_profile, join_words
from services.runtime import paging
from services.runtime.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.runtime.names import USER, Pattern
from services.runtime.storage import Document
from services.runtime.timeutil import now, to_timestamp

SERVICE = "fittracker.ai.v1.AiService"
#: Every method needs a token: all of them read or write one user's data or use their history.
PUBLIC_METHODS: frozenset[str] = frozenset()
MIN_FRAMES, MAX_FRAMES = 2, 1800
#: An hour at 30 frames a second.
MAX_STREAM_FRAMES = 108_000
HISTORY_DAYS = 28
#: Time allowed for reading from the other services: at most this, and at most a share of the
#: caller's remaining deadline, so a degraded answer still arrives in time.
PEER_BUDGET_SECONDS = 1.5
PEER_SHARE_OF_DEADLINE = 0.6
DEFAULT_PAGE_SIZE = 20
#: Plan ids derive from the caller's request id, so a retried CreatePlan finds its first result.
REQUEST_ID_NAMESPACE = uuid.UUID("0b8f3a53-6f7e-4a51-9d1c-2f5e8c7a4b10")
#: The plan fields a CreatePlan retry must repeat for its request id to be accepted.
_REQUEST_FIELDS = ("display_name", "goal", "days_per_week", "week_count", "start_date", "equipment")

Context = grpc.aio.ServicerContext[Any, Any]
PLAN = Pattern("users/{user}/plans/{plan}")
T = TypeVar("T")


class OutOfRange(DomainError):
    """A stream went past its limit."""

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "OUT_OF_RANGE"


class QuotaExceeded(DomainError):
    """A per-user limit on stored resources was reached (not a rate limit: no retry delay)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"


def analyze(request: ai_service_pb2.AnalyzeFormRequest) -> ai_pb2.FormAnalysis:
    """Analyse a whole recording (CPU-bound: run it off the event loop)."""
    analyzer = FormAnalyzer(request.config)
    for i, frame in enumerate(request.frames):
        analyzer.add(frame, f"frames[{i}]")
    return analyzer.finish()


class AiService(ai_service_pb2_grpc.AiServiceServicer):
    """Implements fittracker.ai.v1.AiService."""

    def __init__(self, plans: PlanRepository, peers: Peers, pages: paging.PageTokens, *,
                 clock: Callable[[], float] = time.monotonic, max_stream_frames: int = MAX_STREAM_FRAMES) -> None:
        """Take every dependency from the caller (built once at start)."""
        self._plans = plans
        self._peers = peers
        self._pages = pages
        self._clock = clock
        self._max_stream_frames = max_stream_frames

    # --- form analysis ------------------------------------------------------------------------

    async def AnalyzeForm(  # noqa: N802 - gRPC method names are the contract's
        self, request: ai_service_pb2.AnalyzeFormRequest, context: Context
    ) -> ai_pb2.FormAnalysis:
        """Analyse a complete recording."""
        count = len(request.frames)
        if not MIN_FRAMES <= count <= MAX_FRAMES:
            raise InvalidArgument.field("frames", f"must hold {MIN_FRAMES} to {MAX_FRAMES} frames, got {count}")
        # Up to ~0.1 s of pure Python: a worker thread keeps the event loop answering other calls.
        return await asyncio.to_thread(analyze, request)

    async def StreamFormAnalysis(  # noqa: N802
        self, request_iterator: AsyncIterator[ai_service_pb2.StreamFormAnalysisRequest], context: Context
    ) -> AsyncIterator[ai_service_pb2.StreamFormAnalysisResponse]:
        """Analyse a live recording: a reply after every completed repetition and a final one."""
        analyzer: FormAnalyzer | None = None
        async for request in request_iterator:
            content = request.WhichOneof("content")
            if analyzer is None:
                if content != "config":
                    raise InvalidArgument.field("config", "the first request must carry the config")
                analyzer = FormAnalyzer(request.config)
                continue
            if content != "frame":
                raise InvalidArgument.field("frame", "every request after the first must carry a frame")
            if analyzer.frame_count >= self._max_stream_frames:
                raise OutOfRange(f"a stream may carry at most {self._max_stream_frames} frames")
            try:
                completed = analyzer.add(request.frame, "frame")
            except InvalidArgument as error:
                # The field path cannot say which frame; the description does.
                index = analyzer.frame_count
                raise InvalidArgument([(f, f"{d} (frame {index})") for f, d in error.violations]) from None
            if completed:
                yield ai_service_pb2.StreamFormAnalysisResponse(analysis=analyzer.analysis(), final=False)
        if analyzer is None:
            raise InvalidArgument.field("config", "the stream ended before the config was sent")
        yield ai_service_pb2.StreamFormAnalysisResponse(analysis=analyzer.finish(), final=True)

    # --- recommendations ----------------------------------------------------------------------

    async def RecommendNextWorkout(  # noqa: N802
        self, request: ai_service_pb2.RecommendNextWorkoutRequest, context: Context
    ) -> ai_pb2.Recommendation:
        """Recommend the next workout; degraded rather than failed when a dependency is down."""
        user_id = USER.owner(request.user, "user")
        deadline = self._deadline(context)
        current = now()
        since = current - timedelta(days=HISTORY_DAYS)
        profile, sessions, maxima, (catalog, catalog_note) = await asyncio.gather(
            _attempt(self._peers.context(user_id, deadline)),
            _attempt(self._peers.sessions(user_id, since, deadline)),
            _attempt(self._peers.maxima(user_id, deadline)),
            self._peers.catalog(deadline),
        )
        degraded: list[str] = []
        if isinstance(profile, NotFound):
            raise NotFound(f"users/{user_id} not found")
        if isinstance(profile, Unavailable):
            profile = UserContext(known=False)
            degraded.append("Your goals and equipment could not be read in time, so the workout follows general "
                            "fitness with the equipment in the request (body weight when none).")
        history: History | None = None
        if isinstance(sessions, Unavailable) or isinstance(maxima, Unavailable):
            degraded.append("Your workout history could not be read in time, so the workout follows your goal and "
                            "level only, without your recent sessions and loads.")
        else:
            history = History(
                sessions=[] if isinstance(sessions, NotFound) else sessions,
                maxima={} if isinstance(maxima, NotFound) else maxima,
                days=HISTORY_DAYS,
            )
        equipment = frozenset(request.equipment) or profile.equipment or frozenset({fit.EQUIPMENT_BODYWEIGHT})
        resolved = Request(
            user=f"users/{user_id}",
            minutes=request.available_minutes if request.HasField("available_minutes") else 60,
            focus=frozenset(request.focus_muscle_groups),
            equipment=equipment | {fit.EQUIPMENT_BODYWEIGHT},
            max_exercises=request.max_exercises if request.HasField("max_exercises") else None,
            now=current,
            reasons=[catalog_note] if catalog_note else [],
            degraded_reasons=degraded,
        )
        try:
            return recommend(resolved, profile, history, catalog)
        except NothingToRecommend:
            raise FailedPrecondition(_no_exercise_message(equipment)) from None

    # --- plans --------------------------------------------------------------------------------

    async def CreatePlan(  # noqa: N802
        self, request: ai_service_pb2.CreatePlanRequest, context: Context
    ) -> ai_pb2.Plan:
        """Design and store a plan (idempotent under request_id)."""
        user_id = USER.owner(request.parent, "parent")
        wanted = request.plan
        plan_id = (uuid.uuid5(REQUEST_ID_NAMESPACE, f"{user_id}:{request.request_id}").hex
                   if request.request_id else uuid.uuid4().hex)
        fingerprint = _fingerprint(wanted)
        if request.request_id:
            existing = await self._plans.get(user_id, plan_id)
            if existing is not None:
                return _replayed(existing, fingerprint)
        if await self._plans.count(user_id) >= MAX_PLANS_PER_USER:
            raise QuotaExceeded(f"a user may keep at most {MAX_PLANS_PER_USER} plans; delete one first")
        deadline = self._deadline(context)
        profile, maxima, (catalog, _) = await asyncio.gather(
            _attempt(self._peers.context(user_id, deadline)),
            _attempt(self._peers.maxima(user_id, deadline)),
            self._peers.catalog(deadline),
        )
        if isinstance(profile, NotFound):
            raise NotFound(f"users/{user_id} not found")
        if isinstance(profile, Unavailable):
            profile = UserContext(known=False)
        zone = _zone(profile.time_zone)
        today = datetime.now(zone).date()
        start = _start_date(wanted.start_date, today)
        equipment = (frozenset(wanted.equipment) - {fit.EQUIPMENT_UNSPECIFIED}) or profile.equipment \
            or frozenset({fit.EQUIPMENT_BODYWEIGHT})
        inputs = PlanInputs(
            goal=wanted.goal, level=profile.level, days_per_week=wanted.days_per_week, week_count=wanted.week_count,
            start=start, equipment=equipment | {fit.EQUIPMENT_BODYWEIGHT}, catalog=catalog,
            maxima={} if isinstance(maxima, DomainError) else maxima,
        )
        try:
            weeks = design_weeks(inputs)
        except NoExercises:
            raise FailedPrecondition(_no_exercise_message(equipment)) from None
        created = now()
        plan = ai_pb2.Plan(
            name=f"users/{user_id}/plans/{plan_id}",
            display_name=wanted.display_name.strip() or _default_title(wanted),
            goal=wanted.goal, days_per_week=wanted.days_per_week, week_count=wanted.week_count,
            start_date=start.isoformat(), equipment=sorted(equipment), weeks=weeks, revision=0,
            create_time=to_timestamp(created), update_time=to_timestamp(created),
        )
        doc: Document = {
            "_id": plan_id, "user_id": user_id, "plan": plan_to_document(plan), "revision": 0, "assessed": [],
            "time_zone": zone.key, "request_id": request.request_id, "fingerprint": fingerprint,
            "create_time": created, "update_time": created,
        }
        stored, fresh = await self._plans.create(doc)
        return document_to_plan(stored) if fresh else _replayed(stored, fingerprint)

    async def GetPlan(self, request: ai_service_pb2.GetPlanRequest, context: Context) -> ai_pb2.Plan:  # noqa: N802
        """Read one of the caller's plans."""
        return document_to_plan(await self._owned_plan(request.name))

    async def ListPlans(  # noqa: N802
        self, request: ai_service_pb2.ListPlansRequest, context: Context
    ) -> ai_service_pb2.ListPlansResponse:
        """List the caller's plans, newest first."""
        user_id = USER.owner(request.parent, "parent")
        size = request.page_size or DEFAULT_PAGE_SIZE
        query = paging.fingerprint("plans", user_id)
        position = self._pages.decode(request.page_token, query)
        after = (datetime.fromisoformat(position[0]), str(position[1])) if position else None
        docs = await self._plans.page(user_id, size + 1, after)
        response = ai_service_pb2.ListPlansResponse(plans=[document_to_plan(d) for d in docs[:size]])
        if len(docs) > size:
            last = docs[size - 1]
            response.next_page_token = self._pages.encode(query, [last["create_time"].isoformat(), last["_id"]])
        return response

    async def AdaptPlan(  # noqa: N802
        self, request: ai_service_pb2.AdaptPlanRequest, context: Context
    ) -> ai_service_pb2.AdaptPlanResponse:
        """Adapt the rest of a plan to the sessions logged since it started or was last adapted."""
        doc = await self._owned_plan(request.name)
        if request.etag and request.etag != etag_of(doc):
            raise Aborted("the plan changed since it was read; read it again and retry")
        plan = document_to_plan(doc)
        zone = _zone(doc.get("time_zone", "UTC"))
        today = datetime.now(zone).date()
        if today > plan_end(plan):
            raise FailedPrecondition(f"the plan ended on {plan_end(plan).isoformat()}; create a new one")
        first_day = date.fromisoformat(plan.weeks[0].days[0].date)
        since = datetime.combine(first_day - timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        deadline = self._deadline(context)
        sessions, (catalog, _) = await asyncio.gather(
            _attempt(self._peers.sessions(doc["user_id"], since, deadline)),
            self._peers.catalog(deadline),
        )
        if isinstance(sessions, Unavailable):
            raise Unavailable(f"the workout history cannot be read now ({sessions.message}); try again shortly")
        logs = _session_logs([] if isinstance(sessions, NotFound) else sessions, zone)
        names = {e.name: e.display_name for e in catalog}
        steps = {e.name: e.load_step() for e in catalog}
        result = adapt(plan, logs, set(doc.get("assessed", [])), today, names, steps)
        changed = now()
        adaptation = ai_pb2.PlanAdaptation(revision=doc["revision"] + 1, adapt_time=to_timestamp(changed),
                                           changes=result.changes)
        plan.adaptations.append(adaptation)
        plan.revision = adaptation.revision
        plan.update_time.FromDatetime(changed)
        plan.ClearField("etag")
        updated = {
            **doc, "plan": plan_to_document(plan), "revision": adaptation.revision,
            "assessed": [*doc.get("assessed", []), *result.assessed], "update_time": changed,
        }
        stored = await self._plans.replace(updated, doc["revision"])
        if stored is None:
            raise Aborted("the plan changed while it was being adapted; read it again and retry")
        return ai_service_pb2.AdaptPlanResponse(plan=document_to_plan(stored), adaptation=adaptation)

    # --- helpers ------------------------------------------------------------------------------

    async def _owned_plan(self, name: str) -> Document:
        user_id, ids = PLAN.owned(name)
        doc = await self._plans.get(user_id, ids["plan"])
        if doc is None:
            raise NotFound(f"{name} not found")
        return doc

    def _deadline(self, context: Context) -> float:
        """When calls to other services must be done, on this service's clock."""
        remaining = context.time_remaining()
        budget = PEER_BUDGET_SECONDS if remaining is None else min(PEER_BUDGET_SECONDS,
                                                                    PEER_SHARE_OF_DEADLINE * remaining)
        return self._clock() + budget


async def _attempt(call: Awaitable[T]) -> T | NotFound | Unavailable:
    """Await ``call``, returning the two expected failures instead of raising them."""
    try:
        return await call
    except (NotFound, Unavailable) as error:
        return error


def _no_exercise_message(equipment: frozenset[Equipment]) -> str:
    kit = join_words([equipment_name(e) for e in sorted(equipment)]) or "body weight"
    return f"the exercise catalog has no exercise for the equipment available ({kit})"


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _start_date(text: str, today: date) -> date:
    """The requested first day, or the next Monday; within a year of today."""
    if not text:
        return today + timedelta(days=(7 - today.weekday()) % 7 or 7)
    try:
        start = date.fromisoformat(text)
    except ValueError:
        raise InvalidArgument.field("plan.start_date", f"{text!r} is not a calendar date") from None
    if abs((start - today).days) > 366:
        raise InvalidArgument.field("plan.start_date", "must be within a year of today")
    return start


def _default_title(plan: ai_pb2.Plan) -> str:
    goal = goal_profile(plan.goal).title
    days = "1 day" if plan.days_per_week == 1 else f"{plan.days_per_week} days"
    weeks = "1 week" if plan.week_count == 1 else f"{plan.week_count} weeks"
    return f"{goal[0].upper()}{goal[1:]}: {days} a week for {weeks}"


def _fingerprint(plan: ai_pb2.Plan) -> str:
    body = {f: getattr(plan, f) for f in _REQUEST_FIELDS}
    body["equipment"] = sorted(plan.equipment)
    return json.dumps(body, sort_keys=True)


def _replayed(doc: Document, fingerprint: str) -> ai_pb2.Plan:
    if doc.get("fingerprint") != fingerprint:
        raise InvalidArgument.field("request_id", "was already used by a different request")
    return document_to_plan(doc)




def _session_logs(sessions: Sequence[workout_pb2.Session], zone: ZoneInfo) -> list[SessionLog]:
    """Completed sessions as the planner reads them: local date and working sets by exercise."""
    logs = []
    for session in sessions:
        if session.state != workout_pb2.SESSION_STATE_COMPLETED:
            continue
        local = _zone(session.time_zone) if session.time_zone else zone
        started = session.start_time.ToDatetime(tzinfo=UTC).astimezone(local).date()
        sets: dict[str, list[LoggedSet]] = {}
        for s in session.sets:
            if s.set_type == workout_pb2.SET_TYPE_WARMUP:
                continue
            sets.setdefault(s.exercise, []).append(LoggedSet(s.reps, s.weight_kg, s.rpe if s.HasField("rpe") else None))
        logs.append(SessionLog(session.name, started, sets))
    return logs
