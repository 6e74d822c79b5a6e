""":class:`RefreshWorker`: refresh stale views as their sources change, in the background."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..errors import MaterializedViewError, SessionRequiredError, StandbyError
from .locking import lock_holders, lock_key
from .objectives import due_views
from .pooling import check_session, refuse_standby, session_required, standby_error
from .results import RefreshResult
from .runner import LockMode, Timeout, refresh_stale, refresh_views
from .schedule import (
    RefreshSchedule,
    backoff_delay,
    log_locked,
    lost_connection,
    needs_retry,
)
from .tracking import CHANNEL
from .worker_options import WorkerBase

__all__ = ["RefreshWorker", "UnsupportedDriverError"]

log = logging.getLogger("sqlalchemy_matview")

_SLICE = 0.25  # longest uninterrupted wait: how quickly stop() is noticed
APPLICATION_NAME = "sqlalchemy_matview worker"
#: Longest start() waits for the servers' check before leaving it to the first connect.
START_CHECK_TIMEOUT = 5.0


def _new_connection(engine: Engine) -> Any:
    """A psycopg connection of the worker's own, made by ``engine``'s connect factory.

    Checked out of the engine's pool and detached from it: the URL, ``connect_args``,
    ``creator`` and the pool's ``connect`` event handlers all apply, as for the
    application's connections, but the pool never hands it out again.
    """
    proxied = engine.raw_connection()
    raw: Any = proxied.dbapi_connection
    proxied.detach()
    raw.autocommit = True
    return raw


class UnsupportedDriverError(MaterializedViewError, TypeError):
    """The worker listens with psycopg (3); the engine uses another driver."""


class RefreshWorker(WorkerBase):
    """Listen for changes and refresh stale views, debounced, surviving faults.

    The worker opens its own connection (never one from the engine's pool) and
    ``LISTEN``\\ s on ``channel``, where the change-tracking triggers notify
    ``schema.view``. A burst of notifications naming declared views is debounced:
    :func:`~sqlalchemy_matview.refresh_stale` runs after ``debounce`` seconds of quiet,
    but never more than ``max_delay`` seconds after the first change. ``interval`` adds a
    periodic pass as a safety net. Payloads that do not name a view declared on
    ``metadata`` are ignored and counted (:attr:`ignored_notifications`); any role that may
    connect can send them, so they cost no memory and at most 3 log lines a minute.

    When its connection dies (terminated backend, server restart) it reconnects with
    capped exponential backoff and, after every (re)connect, refreshes whatever became
    stale meanwhile: no change is lost, since staleness lives in the database. Any
    number of workers may run against one database; the views' advisory locks make sure
    at most one refreshes a view at a time. A view skipped because another session holds
    its lock is retried; once that has lasted ``max_delay`` seconds, a WARNING names the
    holder (pid, ``application_name``; see
    :func:`~sqlalchemy_matview.orchestration.locking.lock_holders`).

    Every option is checked here, before anything connects:
    :class:`~sqlalchemy_matview.errors.WorkerOptionError` names the option and the fix
    (an unknown ``lock``, a delay that is negative, NaN or infinite, a ``metadata`` that
    declares no view with ``track_changes=True``...).

    :param engine: a sync psycopg ``Engine``; refreshes use its pool.
    :param metadata: the ``MetaData`` declaring the views; at least one must have
        ``track_changes=True`` (nothing else wakes the worker).
    :param debounce: seconds of quiet after a change before the pass (0 or more).
    :param max_delay: longest wait after the first change of a burst, in seconds (0 or
        more; raised to ``debounce`` when smaller).
    :param interval: seconds between periodic passes (more than 0), or None.
    :param lock: passed to ``refresh_stale`` (``"skip"``: leave a view to the worker
        already refreshing it).
    :param on_result: called with every :class:`RefreshResult` (in the worker thread).

    Example::

        worker = RefreshWorker(engine, metadata, debounce=1.0, max_delay=10.0)
        worker.start()        # background thread
        ...
        worker.stop()         # or worker.run() in a dedicated process (SIGTERM stops it)
    """

    def __init__(
        self,
        engine: Engine,
        metadata: sa.MetaData,
        *,
        debounce: float = 5.0,
        max_delay: float = 60.0,
        interval: float | None = None,
        channel: str = CHANNEL,
        lock: LockMode = "skip",
        on_result: Callable[[RefreshResult], Any] | None = None,
        concurrently: bool | Literal["auto"] = "auto",
        lock_timeout: Timeout = None,
        statement_timeout: Timeout = None,
        max_backoff: float = 30.0,
        lock_namespace: str | None = None,
        listen_url: str | sa.URL | None = None,
    ) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(
                f"RefreshWorker needs a sync Engine, got {type(engine).__name__}; for an "
                "AsyncEngine pass async_engine.sync_engine of a psycopg URL, or create_engine()"
            )
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            raise UnsupportedDriverError(
                f"RefreshWorker listens with psycopg 3, but the engine uses "
                f"{engine.dialect.name}+{engine.dialect.driver}; create it from a "
                "postgresql+psycopg:// URL"
            )
        self._configure(
            "RefreshWorker",
            engine,
            metadata,
            debounce=debounce,
            max_delay=max_delay,
            interval=interval,
            channel=channel,
            lock=lock,
            on_result=on_result,
            concurrently=concurrently,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
            max_backoff=max_backoff,
            lock_namespace=lock_namespace,
            listen_url=listen_url,
        )
        self.engine: Engine = engine
        # LISTEN goes there when listen_url is given; never pooled (one connection, kept).
        self._listen_engine = (
            sa.create_engine(self.listen_url, poolclass=sa.NullPool)
            if self.listen_url is not None
            else engine
        )
        self.on_result = on_result
        self._stop = threading.Event()
        # Set by the SIGINT/SIGTERM handler of run(): see there why it is not self._stop.
        self._signal: int | None = None
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    # -- lifecycle --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the background thread (or :meth:`run`) is active."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> RefreshWorker:
        """Run in a daemon thread; returns ``self``.

        First checks the servers (:meth:`check_server`, for at most
        ``START_CHECK_TIMEOUT`` seconds): a standby or a transaction pooler raises here.
        Should one turn up later (after a failover), the thread stops, logs an ERROR and
        keeps the exception in :attr:`error`.
        """
        if self.running:
            return self
        self._check_at_start()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name="sqlalchemy_matview-worker", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop and wait for the thread (a refresh in progress finishes its current view).

        Returns False when the thread is still running after ``timeout`` seconds.
        """
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def run(self) -> None:
        """Run in the calling thread until :meth:`stop`, SIGINT or SIGTERM.

        Raises :class:`~sqlalchemy_matview.errors.StandbyError` or
        :class:`~sqlalchemy_matview.errors.SessionRequiredError` when the server turns out
        to be a standby, or reached through a transaction pooler (see :meth:`check_server`).
        """
        self._check_at_start()
        self._stop.clear()
        self._signal = None
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def handler(signum: int, frame: FrameType | None) -> None:
                # A handler runs between any two bytecodes of the main thread: inside
                # Event.wait() holding the event's lock (Event.set() would deadlock) or in
                # the middle of a log write (logging again raises "reentrant call", which
                # the loop would take for a lost connection). So it only records the signal.
                self._signal = signum

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[int(sig)] = signal.signal(sig, handler)
        try:
            self._loop()
        finally:
            if self._signal is not None:
                log.info("refresh worker: signal %s, stopped", self._signal)
            for signum, old in previous.items():
                signal.signal(signum, old)
        if self.error is not None:
            raise self.error

    def __enter__(self) -> RefreshWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop ---------------------------------------------------------------------

    def check_server(self) -> None:
        """Check the servers: raise when the worker cannot work there.

        :class:`~sqlalchemy_matview.errors.SessionRequiredError` when the listening
        connection goes through a pooler in transaction or statement mode (pass
        ``listen_url=``); :class:`~sqlalchemy_matview.errors.StandbyError` when the engine's
        server, or the one to listen on, is a hot standby. :meth:`start` and :meth:`run`
        call it, and every reconnect (after a failover the server may be a standby); a
        connection error propagates (then the first connect checks).
        """
        if self._checked:
            return
        found = check_session(lambda: _new_connection(self._listen_engine))
        where = "listen_url" if self.listen_url is not None else "the engine's URL"
        if found.standby:
            raise standby_error(f"RefreshWorker ({where})")
        if found.transaction_pooled:
            raise session_required("RefreshWorker", where)
        if self.listen_url is not None:
            with self.engine.connect() as conn:
                refuse_standby(conn, "RefreshWorker")
        self._checked = True

    def _check_at_start(self) -> None:
        self.error = None
        # In a thread of its own: a server that accepts TCP connections but never answers
        # would hold the caller until the driver's timeout (none by default).
        outcome: list[BaseException | None] = []

        def check() -> None:
            try:
                self.check_server()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        probe = threading.Thread(target=check, name="sqlalchemy_matview-check", daemon=True)
        probe.start()
        probe.join(START_CHECK_TIMEOUT)
        found = outcome[0] if outcome else TimeoutError("no answer yet")
        if isinstance(found, MaterializedViewError):
            raise found
        if found is not None:  # unreachable for now: the loop's connects retry and check
            log.debug("refresh worker: servers not checked at start: %r", found)

    def _connect(self) -> Any:
        self.check_server()
        self._checked = False  # checked again at the next connect: a failover may come
        raw = _new_connection(self._listen_engine)
        try:
            if not raw.execute("SHOW application_name").fetchone()[0]:
                raw.execute(
                    "SELECT pg_catalog.set_config('application_name', %s, false)",
                    (APPLICATION_NAME,),
                )
            quoted = self.engine.dialect.identifier_preparer.quote(self.channel)
            raw.execute(f"LISTEN {quoted}")
            current = raw.execute("SELECT pg_catalog.current_schema()").fetchone()[0]
        except BaseException:
            with contextlib.suppress(Exception):
                raw.close()
            raise
        self._whitelist.load(current_schema=current)
        return raw

    def _stopping(self) -> bool:
        return self._signal is not None or self._stop.is_set()

    def _sleep(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less once stopping (a signal sets no event)."""
        deadline = time.monotonic() + delay
        while not self._stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._stop.wait(min(_SLICE, remaining))

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _loop(self) -> None:
        attempt = 0
        while not self._stopping():
            try:
                try:
                    self._conn = self._connect()
                except (StandbyError, SessionRequiredError) as exc:
                    log.error("refresh worker: %s", exc)
                    self.error = exc
                    break
                self.connections += 1
                log.info("refresh worker listening on %r", self.channel)
                attempt = 0
                # LISTEN comes first, so nothing committed after this pass goes unnoticed.
                unfinished = self._pass("catch-up")
                self._listen(unfinished)
            except Exception as exc:
                if self._stopping():
                    break
                delay = backoff_delay(attempt, self.max_backoff)
                attempt += 1
                log.warning(
                    "refresh worker: %s; reconnecting in %.1fs",
                    exc.__class__.__name__,
                    delay,
                    exc_info=exc,
                )
                self._close()
                self._sleep(delay)
            finally:
                self._close()
        log.info("refresh worker stopped")

    def _listen(self, unfinished: bool) -> None:
        schedule = RefreshSchedule(
            self.debounce, self.max_delay, self.interval, now=time.monotonic()
        )
        # A view the catch-up pass found locked is retried like after any other pass.
        schedule.finished(unfinished, time.monotonic())
        conn = self._conn
        while not self._stopping():
            now = time.monotonic()
            deadline = schedule.deadline()
            # Never block longer than _SLICE, so that stop() is noticed promptly.
            wait = _SLICE if deadline is None else max(0.01, min(_SLICE, deadline - now))
            for notify in conn.notifies(timeout=wait):
                if self._whitelist.accept(notify.payload):
                    schedule.changed(time.monotonic())
            self._whitelist.flush(time.monotonic())
            reason = schedule.take(time.monotonic())
            if reason is None:
                continue
            unfinished = self._pass(reason)
            schedule.finished(unfinished, time.monotonic())

    def _pass(self, reason: str) -> bool:
        """One ``refresh_stale``; True when some view should be retried."""
        log.debug("refresh worker: %s pass", reason)
        results = refresh_stale(
            self.engine,
            self.metadata,
            concurrently=self.concurrently,
            lock=self.lock,
            lock_timeout=self.lock_timeout,
            statement_timeout=self.statement_timeout,
            lock_namespace=self.lock_namespace,
            _should_stop=self._stopping,
        )
        if self._periodic and lost_connection(results) is None and not self._stopping():
            results += self._refresh_due()
        self.passes += 1
        for result in results:
            if self.on_result is not None:
                try:
                    self.on_result(result)
                except Exception:
                    log.exception("refresh worker: on_result raised for %s", result.view)
        err = lost_connection(results)
        if err is not None:
            raise err  # the server went away: reconnect, then catch up
        for view, seconds in self._locked.update(results, time.monotonic()):
            log_locked(view, seconds, self._holders(view))
        return needs_retry(results)

    def _refresh_due(self) -> list[RefreshResult]:
        """Refresh the views without tracking whose objective says they are due."""
        with self.engine.connect() as conn:
            due = due_views(conn, self.metadata)
        if not due:
            return []
        return refresh_views(
            self.engine,
            *due,
            concurrently=self.concurrently,
            lock=self.lock,
            lock_timeout=self.lock_timeout,
            statement_timeout=self.statement_timeout,
            lock_namespace=self.lock_namespace,
        )

    def _holders(self, view: str) -> list[Any] | None:
        schema, _, name = view.partition(".")
        key = lock_key(
            self._whitelist.views.get(view, (schema, name)), namespace=self.lock_namespace
        )
        try:
            with self.engine.connect() as conn:
                return list(lock_holders(conn, key))
        except Exception as exc:  # the warning matters more than who is named in it
            log.debug("refresh worker: cannot read pg_locks: %s", exc)
            return None
