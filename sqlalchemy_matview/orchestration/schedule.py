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
import time
from collections.abc import Iterable, Sequence

import sqlalchemy as sa

from ..schema import materialized_views
from .locking import LockHolder
from .results import RefreshResult

__all__ = [
    "LockedViews",
    "RefreshSchedule",
    "Whitelist",
    "backoff_delay",
    "log_locked",
    "lost_connection",
    "needs_retry",
]

log = logging.getLogger("sqlalchemy_matview")


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


#: Lines an ignored-notification flood may log per window, and the window's length.
_LOG_LINES = 3
_LOG_WINDOW = 60.0
#: Characters of an ignored payload shown in the log (a payload may be 8000 bytes).
_SHOWN = 80


def _shown(payload: str) -> str:
    if len(payload) <= _SHOWN:
        return repr(payload)
    return f"{payload[:_SHOWN]!r}... ({len(payload)} characters)"


class Whitelist:
    """The notification payloads a worker acts on: ``schema.view`` of its declared views.

    Anything else is ignored, so that a stray or hostile ``pg_notify`` on the channel (any
    role that may connect can send one) can neither trigger refreshes nor flood the log
    nor fill memory: nothing is kept per payload, :attr:`ignored` counts them, and at
    most 3 WARNING lines a minute are logged (the last one of a window, or the first of
    the next, says how many more were counted).

    Example::

        whitelist = Whitelist(metadata, "sqlalchemy_matview")
        whitelist.load(current_schema="public")  # on every (re)connect
        whitelist.accept("public.mv_daily")  # True when mv_daily is declared
    """

    def __init__(self, metadata: sa.MetaData, channel: str) -> None:
        self.metadata = metadata
        self.channel = channel
        #: ``"schema.view"`` -> ``(schema, view)`` for every declared view.
        self.views: dict[str, tuple[str, str]] = {}
        #: Notifications ignored since the worker was created.
        self.ignored = 0
        self._window: float | None = None
        self._lines = 0
        self._unlogged = 0

    @property
    def names(self) -> frozenset[str]:
        """The payloads accepted: ``schema.view`` of every declared view."""
        return frozenset(self.views)

    def load(self, *, current_schema: str) -> None:
        """(Re)compute the names; views without a schema resolve to ``current_schema``."""
        self.views = {
            f"{v.schema or current_schema}.{v.name}": (v.schema or current_schema, v.name)
            for v in materialized_views(self.metadata, managed=True)
        }

    def accept(self, payload: str, now: float | None = None) -> bool:
        """True when ``payload`` names a declared view; otherwise count it and False."""
        if payload in self.views:
            return True
        now = time.monotonic() if now is None else now
        self.flush(now)
        self.ignored += 1
        if self._window is None:
            self._window, self._lines = now, 0
        if self._lines < _LOG_LINES:
            self._lines += 1
            log.warning(
                "refresh worker: ignoring notification %s on %r: not a view declared on "
                "its MetaData%s",
                _shown(payload),
                self.channel,
                (
                    f" (more are only counted for the next {_LOG_WINDOW:.0f}s)"
                    if self._lines == _LOG_LINES
                    else ""
                ),
            )
        else:
            self._unlogged += 1
        return False

    def flush(self, now: float) -> None:
        """Close the log window when it is over, saying how many payloads went unlogged.

        Called on every ignored payload and by the workers' loops, so the count of a flood
        that stopped is still reported.
        """
        if self._window is None or now - self._window < _LOG_WINDOW:
            return
        if self._unlogged:
            log.warning(
                "refresh worker: ignored %d more notification(s) on %r in the last %.0fs "
                "not naming a declared view (%d since start); something sends them: see "
                "pg_stat_activity",
                self._unlogged,
                self.channel,
                now - self._window,
                self.ignored,
            )
            # That line opens the next window: the limit holds across windows too.
            self._window, self._lines, self._unlogged = now, 1, 0
        else:
            self._window, self._lines = None, 0


class LockedViews:
    """Views a worker keeps finding locked by another session: since when, and when to warn.

    A refresh skipped because another session holds the view's advisory lock is normal
    while another worker refreshes it; for longer than ``max_delay`` it is not (a
    forgotten ``pg_advisory_lock``, a stuck session). :meth:`update` returns the views due
    a warning: locked for ``max_delay`` seconds or more, warned at most once per
    ``max(max_delay, 60)`` seconds each.

    Example::

        locked = LockedViews(max_delay=60.0)
        for view, seconds in locked.update(results, time.monotonic()):
            ...  # log who holds the lock
    """

    def __init__(self, max_delay: float) -> None:
        self.max_delay = max_delay
        self._since: dict[str, float] = {}
        self._warned: dict[str, float] = {}

    def update(self, results: Sequence[RefreshResult], now: float) -> list[tuple[str, float]]:
        """Record a pass's results; ``(view, seconds locked)`` for each view due a warning."""
        due: list[tuple[str, float]] = []
        for r in results:
            if r.status != "skipped_locked":
                self._since.pop(r.view, None)
                self._warned.pop(r.view, None)
                continue
            since = self._since.setdefault(r.view, now)
            if now - since < self.max_delay:
                continue
            warned = self._warned.get(r.view)
            if warned is not None and now - warned < max(self.max_delay, _LOG_WINDOW):
                continue
            self._warned[r.view] = now
            due.append((r.view, now - since))
        return due


def _holder(h: LockHolder) -> str:
    parts = [f"application_name {h.application_name!r}"]
    if h.user is not None:
        parts.append(f"user {h.user!r}")
    if h.client_addr is not None:
        parts.append(f"from {h.client_addr}")
    if h.state is not None:
        parts.append(f"state {h.state!r}")
    if h.xact_start is not None:
        parts.append(f"transaction started {h.xact_start.isoformat(timespec='seconds')}")
    return f"pid {h.pid} ({', '.join(parts)})"


def log_locked(view: str, seconds: float, holders: Sequence[LockHolder] | None) -> None:
    """Log the WARNING for a view :class:`LockedViews` found locked for too long.

    ``holders`` is what :func:`~sqlalchemy_matview.orchestration.locking.lock_holders`
    found, or None when it could not be asked.

    Example::

        log_locked("public.mv_daily", 75.0, lock_holders(conn, lock_key(mv_daily)))
    """
    granted = [h for h in holders or () if h.granted]
    if granted:
        who = "held by " + "; ".join(_holder(h) for h in granted)
    elif holders is None:
        who = "held by another session (pg_locks could not be read)"
    else:
        who = "held by a session that has released it since"
    log.warning(
        "refresh worker: %s skipped for %.0fs: its refresh lock is %s; retrying until it "
        "is released (SELECT pg_terminate_backend(pid) ends a stuck session)",
        view,
        seconds,
        who,
    )
