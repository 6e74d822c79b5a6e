"""The options of both refresh workers, validated in ``__init__`` before anything connects.

A worker runs for days in a process of its own: an option that cannot work (a lock mode
that does not exist, an infinite debounce, a ``metadata`` with nothing to watch) must fail
at once with a message naming the option and the fix, not reconnect forever or sleep
until the end of time. The thread worker (:class:`sqlalchemy_matview.RefreshWorker`) and
the asyncio one (:class:`sqlalchemy_matview.asyncio.RefreshWorker`) share this module so
that they accept and refuse exactly the same things.

Example::

    options = worker_options(metadata, debounce=1.0, max_delay=10.0, owner="RefreshWorker")
    options.debounce  # 1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from ..errors import MaterializedViewError, WorkerOptionError
from ..schema import materialized_views
from .locking import lock_key
from .objectives import periodic_interval, periodic_views, tracked_cap
from .runner import LockMode, RefreshOptionError, RunOptions, Timeout, run_options
from .schedule import LockedViews, Whitelist

__all__ = ["WorkerBase", "WorkerOptions", "worker_options"]

# PostgreSQL's NAMEDATALEN - 1: pg_notify() refuses longer channel names, LISTEN truncates them.
_MAX_CHANNEL_BYTES = 63


@dataclass(frozen=True)
class WorkerOptions:
    """A worker's validated options (built by :func:`worker_options`)."""

    debounce: float
    #: Never below ``debounce`` (a burst cannot be held back for less than the quiet it waits
    #: for), except that a tracked view's ``max_staleness`` caps it at half the objective.
    max_delay: float
    interval: float | None
    channel: str
    max_backoff: float
    #: What every ``refresh_stale`` pass of the worker is run with.
    run: RunOptions
    #: Where to ``LISTEN`` instead of the engine's server (with the engine's driver).
    listen_url: sa.URL | None


def _seconds(owner: str, name: str, value: object, *, positive: bool, example: str) -> float:
    bound = "more than 0" if positive else "0 or more"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WorkerOptionError(
            f"{owner}({name}={value!r}): {name} takes a number of seconds, {bound}; "
            f"pass e.g. {name}={example}"
        )
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise WorkerOptionError(
            f"{owner}({name}={value!r}): {name} must be a finite number of seconds, {bound}; "
            f"pass e.g. {name}={example}"
        )
    return number


def _check_metadata(owner: str, metadata: object) -> None:
    if not isinstance(metadata, sa.MetaData):
        hint = (
            " (for a declarative base, pass Base.metadata)" if hasattr(metadata, "metadata") else ""
        )
        raise WorkerOptionError(
            f"{owner}(metadata={type(metadata).__name__}): metadata must be the "
            f"sqlalchemy MetaData on which the views are declared{hint}"
        )
    if not any(
        v.track_changes or v.incremental is not None or v.max_staleness is not None
        for v in materialized_views(metadata, managed=True)
    ):
        raise WorkerOptionError(
            f"{owner}: metadata declares no materialized view with track_changes=True, "
            "incremental= or "
            "max_staleness=, so nothing would ever wake the worker; declare "
            "track_changes=True on the views whose sources change (or max_staleness= for a "
            "periodic refresh), or refresh on a schedule instead (schedule_refresh, or "
            "refresh_all from cron)"
        )


def _check_channel(owner: str, channel: object) -> str:
    if not isinstance(channel, str) or not channel:
        raise WorkerOptionError(
            f"{owner}(channel={channel!r}): channel must be a non-empty string; leave it out "
            "for the channel the change-tracking triggers notify"
        )
    if len(channel.encode()) > _MAX_CHANNEL_BYTES:
        raise WorkerOptionError(
            f"{owner}(channel={channel[:20]!r}...): channel is {len(channel.encode())} bytes "
            f"long; PostgreSQL channel names have at most {_MAX_CHANNEL_BYTES}"
        )
    return channel


def _check_listen_url(owner: str, listen_url: object, drivername: str) -> sa.URL | None:
    if listen_url is None:
        return None
    try:
        url = sa.make_url(listen_url)  # type: ignore[arg-type]
    except Exception:
        url = None
    if url is None or url.get_backend_name() != "postgresql":
        shown = listen_url.render_as_string() if isinstance(listen_url, sa.URL) else listen_url
        raise WorkerOptionError(
            f"{owner}(listen_url={shown!r}): listen_url must be a postgresql:// URL of a "
            "direct connection to the server (or of a session-pooled PgBouncer)"
        )
    # The engine's driver listens: the URL only says where.
    return url.set(drivername=drivername)


def worker_options(
    metadata: object,
    *,
    owner: str,
    debounce: object = 5.0,
    max_delay: object = 60.0,
    interval: object = None,
    channel: object = "sqlalchemy_matview",
    lock: object = "skip",
    on_result: object = None,
    concurrently: object = "auto",
    lock_timeout: object = None,
    statement_timeout: object = None,
    max_backoff: object = 30.0,
    lock_namespace: object = None,
    listen_url: object = None,
    drivername: str = "postgresql+psycopg",
) -> WorkerOptions:
    """Validate a worker's options; raise :class:`WorkerOptionError` naming the first bad one.

    ``owner`` is the class name the messages start with. ``metadata`` is checked last, so
    that a bad timing is reported even on an empty ``MetaData``.

    Example::

        worker_options(metadata, owner="RefreshWorker", lock="bogus")
        # WorkerOptionError: RefreshWorker(lock='bogus'): pass 'skip' (...), 'wait' or 'none'
    """
    debounce_s = _seconds(owner, "debounce", debounce, positive=False, example="5.0")
    max_delay_s = _seconds(owner, "max_delay", max_delay, positive=False, example="60.0")
    interval_s = (
        None
        if interval is None
        else _seconds(owner, "interval", interval, positive=True, example="300 (or None)")
    )
    backoff_s = _seconds(owner, "max_backoff", max_backoff, positive=True, example="30.0")
    if on_result is not None and not callable(on_result):
        raise WorkerOptionError(
            f"{owner}(on_result={on_result!r}): on_result must be a function called with "
            "each RefreshResult (or None)"
        )
    try:
        run = run_options(
            False,
            concurrently,  # type: ignore[arg-type]
            lock,  # type: ignore[arg-type]
            lock_timeout,  # type: ignore[arg-type]
            statement_timeout,  # type: ignore[arg-type]
            lock_namespace,  # type: ignore[arg-type]
        )
    except RefreshOptionError as exc:
        raise WorkerOptionError(f"{owner}: {exc}") from exc
    name = _check_channel(owner, channel)
    listen = _check_listen_url(owner, listen_url, drivername)
    _check_metadata(owner, metadata)
    assert isinstance(metadata, sa.MetaData)
    # Freshness objectives shorten the waits: a tracked view's change is never held back
    # past half its objective, and views without tracking are looked at on a period.
    delay = max(max_delay_s, debounce_s)
    cap = tracked_cap(metadata)
    period = periodic_interval(metadata)
    return WorkerOptions(
        debounce=debounce_s,
        max_delay=delay if cap is None else min(delay, cap),
        interval=min(p for p in (interval_s, period) if p is not None)
        if interval_s is not None or period is not None
        else None,
        channel=name,
        max_backoff=backoff_s,
        run=run,
        listen_url=listen,
    )


class WorkerBase:
    """The state both workers keep: their checked options, counters, whitelist, lock watch."""

    engine: Any
    metadata: sa.MetaData
    debounce: float
    max_delay: float
    interval: float | None
    channel: str
    lock: LockMode
    concurrently: bool | Literal["auto"]
    lock_timeout: Timeout
    statement_timeout: Timeout
    max_backoff: float
    lock_namespace: str | None
    listen_url: sa.URL | None
    #: Why the worker stopped by itself (a standby, a transaction pooler), else None.
    error: MaterializedViewError | None
    #: Completed ``refresh_stale`` passes (catch-ups, debounced and periodic ones).
    passes: int
    #: Number of successful (re)connections so far.
    connections: int

    def _configure(self, owner: str, engine: Any, metadata: sa.MetaData, **options: Any) -> None:
        checked = worker_options(metadata, owner=owner, drivername=engine.url.drivername, **options)
        self.engine = engine
        self.metadata = metadata
        self.debounce = checked.debounce
        self.max_delay = checked.max_delay
        self.interval = checked.interval
        self.channel = checked.channel
        self.lock = checked.run.lock
        self.concurrently = checked.run.concurrently
        self.lock_timeout = options.get("lock_timeout")
        self.statement_timeout = options.get("statement_timeout")
        self.max_backoff = checked.max_backoff
        self.lock_namespace = checked.run.lock_namespace
        self.listen_url = checked.listen_url
        self.error = None
        # Whether the servers were checked (no transaction pooler for LISTEN, no standby)
        # since the last connect: start() checks, and every connect checks unless start()
        # just did.
        self._checked = False
        self.passes = 0
        self.connections = 0
        self._whitelist = Whitelist(metadata, checked.channel)
        # Views without tracking that have an objective: refreshed by every pass when due.
        self._periodic = bool(periodic_views(metadata))
        self._locked = LockedViews(checked.max_delay)

    @property
    def ignored_notifications(self) -> int:
        """Notifications received on ``channel`` that named no declared view (ignored)."""
        return self._whitelist.ignored

    def _lock_key(self, view: str) -> int:
        """The advisory-lock key of ``view``, a ``RefreshResult.view`` label."""
        schema, _, name = view.partition(".")
        qname = self._whitelist.views.get(view, (schema, name))
        return lock_key(qname, namespace=self.lock_namespace)
