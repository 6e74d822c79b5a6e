"""When a refresh worker refreshes: debounce, ``max_delay``, ``interval``, retries, backoff.

Driver- and concurrency-independent, so that the thread worker
(:class:`sqlalchemy_matview.RefreshWorker`) and the asyncio worker
(:class:`sqlalchemy_matview.asyncio.RefreshWorker`) decide identically. Times are
``time.monotonic()`` seconds passed in by the caller; nothing here sleeps or does I/O.

Example::

    schedule = RefreshSchedule(debounce=1.0, max_delay=10.0, interval=None)
    schedule.changed(now)              # a notification naming a declared view
    reason = schedule.take(now + 1.0)  # "change": time for refresh_stale
    schedule.finished(unfinished=False, now=now + 1.2)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import sqlalchemy as sa

from ..schema import materialized_views
from .results import RefreshResult

__all__ = [
    "RefreshSchedule",
    "Whitelist",
    "backoff_delay",
    "check_timings",
    "lost_connection",
    "needs_retry",
]

log = logging.getLogger("sqlalchemy_matview")


def check_timings(
    debounce: float, max_delay: float, interval: float | None
) -> tuple[float, float, float | None]:
    """Validate a worker's timings; returns ``(debounce, max_delay, interval)`` as floats.

    ``max_delay`` is raised to ``debounce`` when smaller: a burst can never be held back
    for less than the quiet period it waits for.

    Example::

        debounce, max_delay, interval = check_timings(5, 60, None)
    """
    if debounce < 0 or max_delay < 0 or (interval is not None and interval <= 0):
        raise ValueError("debounce and max_delay must be >= 0 and interval > 0")
    return (
        float(debounce),
        max(float(max_delay), float(debounce)),
        None if interval is None else float(interval),
    )


def backoff_delay(attempt: int, max_backoff: float) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0-based): 0.5, 1, 2, ... capped.

    Example::

        backoff_delay(3, max_backoff=30.0)  # 4.0
    """
    return float(min(max_backoff, 0.5 * 2 ** min(attempt, 32)))


def needs_retry(results: Iterable[RefreshResult]) -> bool:
    """True when a pass left a view to retry (it failed, or another session held its lock).

    Example::

        if needs_retry(results):
            ...
    """
    return any(r.status in ("failed", "skipped_locked") for r in results)


def lost_connection(results: Iterable[RefreshResult]) -> BaseException | None:
    """The error of a refresh that failed because the server went away, if any.

    A worker re-raises it to reconnect and catch up rather than retry on a dead server.

    Example::

        err = lost_connection(results)
        if err is not None:
            raise err
    """
    for r in results:
        err = r.error
        if isinstance(err, sa.exc.DBAPIError) and err.connection_invalidated:
            return err
    return None


class RefreshSchedule:
    """The worker's clock: when the next ``refresh_stale`` pass is due, and why.

    A burst of changes is debounced: the pass is due ``debounce`` seconds after the last
    change, but never later than ``max_delay`` seconds after the first. ``interval`` adds
    a periodic pass. A pass that left views unfinished (see :func:`needs_retry`) is
    retried after ``max(debounce, 1)`` seconds, doubling up to ``max_delay``.

    Example::

        schedule = RefreshSchedule(0.5, 10.0, None, now=time.monotonic())
        schedule.changed(time.monotonic())
        wait = schedule.deadline() - time.monotonic()
    """

    def __init__(
        self, debounce: float, max_delay: float, interval: float | None, *, now: float
    ) -> None:
        self.debounce = debounce
        self.max_delay = max_delay
        self.interval = interval
        self._first: float | None = None
        self._last: float | None = None
        self._retry_at: float | None = None
        self._retry_delay = self._base_retry()
        self._next_periodic = now + interval if interval else None

    def _base_retry(self) -> float:
        return max(self.debounce, 1.0)

    @property
    def pending(self) -> bool:
        """True while changes wait for their debounced pass."""
        return self._first is not None

    def changed(self, now: float) -> None:
        """Record a change notification received at ``now``."""
        self._last = now
        if self._first is None:
            self._first = now

    def deadline(self) -> float | None:
        """The earliest time a pass becomes due, or None when nothing is scheduled."""
        times: list[float] = []
        if self._first is not None and self._last is not None:
            times.append(min(self._last + self.debounce, self._first + self.max_delay))
        if self._retry_at is not None:
            times.append(self._retry_at)
        if self._next_periodic is not None:
            times.append(self._next_periodic)
        return min(times) if times else None

    def take(self, now: float) -> str | None:
        """The reason a pass is due at ``now`` (``"change"``, ``"retry"``, ``"interval"``).

        Returns None when none is due. A due pass consumes the pending changes and
        restarts the periodic timer; call :meth:`finished` once the pass is done.
        """
        reason = None
        if (
            self._first is not None
            and self._last is not None
            and (now >= self._last + self.debounce or now >= self._first + self.max_delay)
        ):
            reason = "change"
        elif self._retry_at is not None and now >= self._retry_at:
            reason = "retry"
        elif self._next_periodic is not None and now >= self._next_periodic:
            reason = "interval"
        if reason is not None:
            self._first = self._last = None
            if self.interval:
                self._next_periodic = now + self.interval
        return reason

    def finished(self, unfinished: bool, now: float) -> None:
        """Record the end of a pass at ``now``; ``unfinished`` schedules a retry."""
        if unfinished:
            self._retry_at = now + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self.max_delay)
        else:
            self._retry_at = None
            self._retry_delay = self._base_retry()


class Whitelist:
    """The notification payloads a worker acts on: ``schema.view`` of its declared views.

    Anything else is logged once (per payload, per worker) and ignored, so that a stray
    or hostile ``pg_notify`` on the channel can neither trigger refreshes nor flood
    the log.

    Example::

        whitelist = Whitelist(metadata, "sqlalchemy_matview")
        whitelist.load(current_schema="public")  # on every (re)connect
        whitelist.accept("public.mv_daily")  # True when mv_daily is declared
    """

    def __init__(self, metadata: sa.MetaData, channel: str) -> None:
        self.metadata = metadata
        self.channel = channel
        self.names: frozenset[str] = frozenset()
        self._logged: set[str] = set()

    def load(self, *, current_schema: str) -> None:
        """(Re)compute the names; views without a schema resolve to ``current_schema``."""
        self.names = frozenset(
            f"{v.schema or current_schema}.{v.name}"
            for v in materialized_views(self.metadata, managed=True)
        )

    def accept(self, payload: str) -> bool:
        """True when ``payload`` names a declared view; otherwise log (once) and False."""
        if payload in self.names:
            return True
        if payload not in self._logged:
            self._logged.add(payload)
            log.warning(
                "refresh worker: ignoring notification %r on %r: not a view declared on its "
                "MetaData",
                payload,
                self.channel,
            )
        return False
