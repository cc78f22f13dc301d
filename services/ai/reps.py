"""Counting repetitions: a hysteresis state machine on the key angle of an exercise."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from services.ai.body import Measure

#: A repetition is never longer than this; a longer excursion is not counted (and memory stays bounded).
MAX_REP_FRAMES = 1800
#: Frames of rest kept before each repetition, where a movement's first signs may show.
PRE_ROLL_FRAMES = 60
#: Weight of each new frame in the running jitter estimate (about the last 20 frames count).
JITTER_WEIGHT = 0.05


@dataclass(frozen=True)
class RepFrames:
    """The frames of a completed repetition, and up to PRE_ROLL_FRAMES frames of rest before it."""

    before: list[Measure]
    frames: list[Measure]


class RepCounter:
    """Counts repetitions with a hysteresis state machine on the key angle.

    The machine works on ``s``, the key angle oriented so that the resting position is high (the
    hip angle is negated for a deadlift, which rests on the floor). A repetition leaves rest, goes
    at least ``hysteresis`` degrees away, and comes back at least as far:

    - AT_REST: follows the highest ``s`` (the top); leaving it by more than the hysteresis starts
      a repetition on the last frame that was within ``edge`` of the top.
    - AWAY: follows the lowest ``s`` (the bottom); rising more than the hysteresis above it starts
      the return.
    - RETURNING: follows the new highest ``s``; the repetition ends once ``s`` falls ``settle``
      degrees below it (the next repetition begins) or holds for ``plateau_seconds``, on the first
      frame that came within ``edge`` of that top. A top short of the first one is still a
      repetition (it is what incomplete lockout looks like); bounces smaller than the hysteresis
      are not.

    ``edge`` widens with the jitter left after smoothing (estimated from the second differences of
    ``s``, which smooth motion keeps near zero), so that on a noisy recording the top is a band
    rather than the single highest, luckiest frame.

    The frames before a start are kept (up to PRE_ROLL_FRAMES) because a movement can begin
    before the key angle changes: in a deadlift whose hips shoot up, the knees straighten while
    the hip angle stays shut.
    """

    AT_REST, AWAY, RETURNING = "at_rest", "away", "returning"

    def __init__(self, hysteresis: float, rest_high: bool, *, edge: float = 2.0, settle: float = 6.0,
                 plateau_seconds: float = 0.3) -> None:
        """Set the thresholds in degrees, and which end of the key angle is rest."""
        self._hysteresis = hysteresis
        self._sign = 1.0 if rest_high else -1.0
        self._edge = edge
        self._settle = settle
        self._plateau = plateau_seconds
        self.state = self.AT_REST
        self._buffer: list[Measure] = []
        self._top = -math.inf
        self._start = 0  # position in _buffer where the current repetition starts
        self._bottom = math.inf
        self._bottom_pos = 0
        self._peak = -math.inf
        self._anchor = -math.inf
        self._peak_time = 0.0
        self._history: deque[float] = deque(maxlen=2)
        self._jitter = 0.0  # running mean of |second difference| of s
        self._samples = 0

    @property
    def edge(self) -> float:
        """How close to the top a frame must be to count as at the top, in degrees."""
        # For smoothed jitter, the standard deviation is about 1.4 times the mean |second difference|.
        return min(self._hysteresis / 3, max(self._edge, 2.5 * 1.4 * self._jitter))

    def push(self, m: Measure) -> RepFrames | None:
        """Add a frame; return the repetition it completes, if any."""
        s = self._sign * m.key
        if len(self._history) == 2:
            second = s - 2 * self._history[1] + self._history[0]
            self._samples += 1
            # A plain mean over the first frames, so the estimate is usable from the start.
            self._jitter += max(JITTER_WEIGHT, 1 / self._samples) * (abs(second) - self._jitter)
        self._history.append(s)
        self._buffer.append(m)
        last = len(self._buffer) - 1
        if self.state == self.AT_REST:
            self._top = max(self._top, s)
            if s >= self._top - self.edge:
                self._start = last
                self._trim()
            elif s < self._top - self._hysteresis:
                self.state, self._bottom, self._bottom_pos = self.AWAY, s, last
            elif last - self._start > MAX_REP_FRAMES:
                self._start += 1  # hovering just off the top for a minute: the start moves on
                self._trim()
            return None
        if last - self._start > MAX_REP_FRAMES:
            self._reset(m, s)  # far too long for a repetition: someone resting at the bottom
            return None
        if self.state == self.AWAY:
            if s < self._bottom:
                self._bottom, self._bottom_pos = s, last
            elif s > self._bottom + self._hysteresis:
                self.state, self._peak, self._anchor, self._peak_time = self.RETURNING, s, s, m.time
            return None
        if s > self._anchor + 1.0:
            # Still rising by more than a degree: the plateau clock starts again.
            self._anchor, self._peak_time = s, m.time
        self._peak = max(self._peak, s)
        if s < self._peak - self._settle or m.time - self._peak_time >= self._plateau:
            return self._complete()
        return None

    def finish(self) -> RepFrames | None:
        """End of the recording: a repetition on its way back counts; one still away does not."""
        return self._complete() if self.state == self.RETURNING else None

    def _complete(self) -> RepFrames:
        signs = [self._sign * m.key for m in self._buffer]
        edge = self.edge
        end = next(i for i in range(self._bottom_pos, len(signs)) if signs[i] >= self._peak - edge)
        rep = RepFrames(self._buffer[max(0, self._start - PRE_ROLL_FRAMES) : self._start],
                        self._buffer[self._start : end + 1])
        self.state, self._top = self.AT_REST, self._peak
        # Completion comes within ``settle`` of the top, so the next repetition has not started yet.
        self._start = max(i for i in range(end, len(signs)) if signs[i] >= self._top - edge)
        self._trim()
        return rep

    def _trim(self) -> None:
        """Keep PRE_ROLL_FRAMES frames before the start, no more."""
        extra = self._start - PRE_ROLL_FRAMES
        if extra > 0:
            del self._buffer[:extra]
            self._start -= extra
            self._bottom_pos -= extra

    def _reset(self, m: Measure, s: float) -> None:
        self.state, self._top, self._buffer, self._start = self.AT_REST, s, [m], 0
