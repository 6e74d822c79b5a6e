"""The asyncio :class:`RefreshWorker`, exported as ``sqlalchemy_matview.asyncio.RefreshWorker``.

It decides when to refresh exactly like the thread worker (both use
:mod:`~sqlalchemy_matview.orchestration.schedule`); only the waiting differs: it listens
with the engine's own async driver, asyncpg or psycopg 3, on a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

from ..errors import MaterializedViewError, SessionRequiredError, StandbyError
from .locking import lock_holders
from .objectives import due_views
from .pooling import check_session_async, refuse_standby, session_required, standby_error
from .results import RefreshResult
from .runner import LockMode, Timeout
from .schedule import (
    RefreshSchedule,
    backoff_delay,
    log_locked,
    lost_connection,
    needs_retry,
)
from .tracking import CHANNEL
from .worker import UnsupportedDriverError
from .worker_options import WorkerBase

__all__ = ["RefreshWorker"]

log = logging.getLogger("sqlalchemy_matview")

APPLICATION_NAME = "sqlalchemy_matview worker"
#: Longest start() waits for the servers' check before leaving it to the first connect.
START_CHECK_TIMEOUT = 5.0
_PING = 30.0  # idle seconds before the listener checks that its server is still there
_CLOSE_TIMEOUT = 2.0
# Connect arguments SQLAlchemy's async adapters consume themselves; the drivers reject them.


async def _new_connection(engine: AsyncEngine) -> Any:
    """A driver connection of the worker's own (asyncpg, or autocommit psycopg), made by
    ``engine``'s connect factory: checked out of its pool and detached from it, so that the
    URL, ``connect_args``, ``async_creator`` and ``connect`` event handlers all apply."""
    proxied = await greenlet_spawn(engine.sync_engine.raw_connection)
    conn: Any = proxied.driver_connection
    proxied.detach()
    if engine.dialect.driver == "psycopg":
        await conn.set_autocommit(True)
    return conn


class _Lost:
    """Queued when the listening connection dies."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


_WAKE = object()  # queued by stop(): leave the wait at once
_Item = str | _Lost | object


class _Listener:
    """A dedicated ``LISTEN`` connection; its notifications and its death land in ``queue``."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.current_schema = "public"

    async def ping(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class _AsyncpgListener(_Listener):
    def __init__(self) -> None:
        super().__init__()
        self._conn: Any = None

    async def open(self, conn: Any, channel: str, quoted: str) -> None:
        self._conn = conn
        if not await conn.fetchval("SHOW application_name"):
            await conn.execute(f"SET application_name = '{APPLICATION_NAME}'")
        # asyncpg quotes the channel itself (always, so "MyChannel" keeps its case).
        await conn.add_listener(channel, self._notified)
        conn.add_termination_listener(self._terminated)
        self.current_schema = await conn.fetchval("SELECT pg_catalog.current_schema()")

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.queue.put_nowait(payload)

    def _terminated(self, conn: Any) -> None:
        self.queue.put_nowait(_Lost(ConnectionError("the listening connection was closed")))

    async def ping(self) -> None:
        await self._conn.fetchval("SELECT 1")

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.remove_termination_listener(self._terminated)
        try:
            await conn.close(timeout=_CLOSE_TIMEOUT)
        except Exception:
            conn.terminate()


class _PsycopgListener(_Listener):
    def __init__(self) -> None:
        super().__init__()
        self._conn: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self, conn: Any, channel: str, quoted: str) -> None:
        self._conn = conn
        row = await (await conn.execute("SHOW application_name")).fetchone()
        if not row[0]:
            await conn.execute(f"SET application_name = '{APPLICATION_NAME}'")
        await conn.execute(f"LISTEN {quoted}")
        row = await (await conn.execute("SELECT pg_catalog.current_schema()")).fetchone()
        self.current_schema = row[0]
        self._reader = asyncio.create_task(self._read(), name="sqlalchemy_matview-listener")

    async def _read(self) -> None:
        try:
            async for notify in self._conn.notifies():
                self.queue.put_nowait(notify.payload)
        except Exception as exc:
            self.queue.put_nowait(_Lost(exc))
        else:
            self.queue.put_nowait(_Lost(ConnectionError("the listening connection was closed")))

    async def ping(self) -> None:
        # notifies() holds the connection; a closed socket ends it, which _read reports.
        if self._conn.closed or self._conn.broken:
            raise ConnectionError("the listening connection is closed")

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), _CLOSE_TIMEOUT)


OnResult = Callable[[RefreshResult], Any] | Callable[[RefreshResult], Awaitable[Any]]


class RefreshWorker(WorkerBase):
    """Listen for changes and refresh stale views from an asyncio application.

    The asyncio twin of :class:`sqlalchemy_matview.RefreshWorker`, with the same
    parameters, the same checks of them (:class:`~sqlalchemy_matview.errors.WorkerOptionError`)
    and the same decisions: it ``LISTEN``\\ s on ``channel`` on a connection of its own
    (never one from the engine's pool), ignores and counts payloads that do not name a view
    declared on ``metadata`` (:attr:`ignored_notifications`, at most 3 log lines a
    minute), names the holder of a lock that kept a view from being refreshed for longer
    than ``max_delay``, runs
    :func:`sqlalchemy_matview.asyncio.refresh_stale` after ``debounce`` seconds of quiet
    but never more than ``max_delay`` seconds after the first change, adds a periodic
    pass every ``interval`` seconds if given, and after its connection dies reconnects
    with capped exponential backoff (up to ``max_backoff`` seconds). Every (re)connect
    starts with a catch-up pass, so no change is lost.

    It listens with the engine's driver: asyncpg (``postgresql+asyncpg``) or psycopg 3
    (``postgresql+psycopg``); refreshes use the engine's pool. ``on_result`` may be a
    plain function or a coroutine function; it is called with every
    :class:`~sqlalchemy_matview.RefreshResult`. Use one worker from one event loop.

    Example (a FastAPI lifespan)::

        @contextlib.asynccontextmanager
        async def lifespan(app):
            async with RefreshWorker(async_engine, metadata, debounce=1.0):
                yield

    or ``await worker.start()`` / ``await worker.stop()``, or ``await worker.run()``
    in a process of its own (SIGINT and SIGTERM stop it).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        metadata: sa.MetaData,
        *,
        debounce: float = 5.0,
        max_delay: float = 60.0,
        interval: float | None = None,
        channel: str = CHANNEL,
        lock: LockMode = "skip",
        on_result: OnResult | None = None,
        concurrently: bool | Literal["auto"] = "auto",
        lock_timeout: Timeout = None,
        statement_timeout: Timeout = None,
        max_backoff: float = 30.0,
        lock_namespace: str | None = None,
        listen_url: str | sa.URL | None = None,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise TypeError(
                f"sqlalchemy_matview.asyncio.RefreshWorker needs an AsyncEngine, got "
                f"{type(engine).__name__}; for a sync Engine use sqlalchemy_matview.RefreshWorker"
            )
        dialect = engine.dialect
        if dialect.name != "postgresql" or dialect.driver not in ("asyncpg", "psycopg"):
            raise UnsupportedDriverError(
                f"sqlalchemy_matview.asyncio.RefreshWorker listens with asyncpg or psycopg 3, "
                f"but the engine uses {dialect.name}+{dialect.driver}; create it from a "
                "postgresql+asyncpg:// or postgresql+psycopg:// URL"
            )
        self._configure(
            "sqlalchemy_matview.asyncio.RefreshWorker",
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
        self.engine: AsyncEngine = engine
        # LISTEN goes there when listen_url is given; never pooled (one connection, kept).
        self._listen_engine = (
            create_async_engine(self.listen_url, poolclass=sa.NullPool)
            if self.listen_url is not None
            else engine
        )
        self.on_result = on_result
        self._stopping = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._listener: _Listener | None = None
        self._connecting = False
        self._start_check: asyncio.Future[None] | None = None

    # -- lifecycle --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the worker's task is active."""
        return self._task is not None and not self._task.done()

    async def start(self) -> RefreshWorker:
        """Run as a task of the current event loop; returns ``self``.

        First checks the servers (:meth:`check_server`, for at most
        ``START_CHECK_TIMEOUT`` seconds): a standby or a transaction pooler raises here.
        Should one turn up later (after a failover), the task stops, logs an ERROR and
        keeps the exception in :attr:`error`.
        """
        if self.running:
            return self
        self._stopping = False
        self._task = None
        await self._check_at_start()
        if self._stopping:
            return self  # stop() was called during the check
        # Created here, not in __init__: asyncio objects belong to the loop that runs them.
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="sqlalchemy_matview-worker")
        return self

    async def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop and wait for the task (a refresh in progress finishes its current view).

        After ``timeout`` seconds the task is cancelled; returns False in that case.
        """
        self._request_stop()
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return True
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            return True
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return False

    async def run(self) -> None:
        """Run until :meth:`stop`, SIGINT or SIGTERM (or until the caller is cancelled).

        Raises :class:`~sqlalchemy_matview.errors.StandbyError` or
        :class:`~sqlalchemy_matview.errors.SessionRequiredError` when the server turns out
        to be a standby, or reached through a transaction pooler (see :meth:`check_server`).
        """
        await self.start()
        task = self._task
        if task is None:
            return  # stopped before it started
        loop = asyncio.get_running_loop()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old = signal.getsignal(sig)
                try:
                    loop.add_signal_handler(sig, self._signalled, sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    continue  # no signal support on this loop or platform
                previous[sig] = old
        try:
            await asyncio.shield(task)
            if self.error is not None:
                raise self.error
        except asyncio.CancelledError:
            if task.cancelled() and self._stopping:
                return  # stop() cancelled a connect in progress: a normal stop
            await self.stop()  # the caller was cancelled (asyncio.run on Ctrl-C, say)
            raise
        finally:
            for sig, old in previous.items():
                loop.remove_signal_handler(sig)
                if old is not None:  # None: installed outside Python, cannot be restored
                    signal.signal(sig, old)

    async def __aenter__(self) -> RefreshWorker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def check_server(self) -> None:
        """Check the servers: raise when the worker cannot work there.

        :class:`~sqlalchemy_matview.errors.SessionRequiredError` when the listening
        connection goes through a pooler in transaction or statement mode (pass
        ``listen_url=``); :class:`~sqlalchemy_matview.errors.StandbyError` when the engine's
        server, or the one to listen on, is a hot standby. :meth:`start` calls it (for at
        most a few seconds: an unreachable server is checked at the first connect).
        """
        if self._checked:
            return
        found = await check_session_async(lambda: _new_connection(self._listen_engine))
        where = "listen_url" if self.listen_url is not None else "the engine's URL"
        if found.standby:
            raise standby_error(f"sqlalchemy_matview.asyncio.RefreshWorker ({where})")
        if found.transaction_pooled:
            raise session_required("sqlalchemy_matview.asyncio.RefreshWorker", where)
        if self.listen_url is not None:
            async with self.engine.connect() as conn:
                await conn.run_sync(
                    lambda c: refuse_standby(c, "sqlalchemy_matview.asyncio.RefreshWorker")
                )
        self._checked = True

    async def _check_at_start(self) -> None:
        self.error = None
        check = self._start_check = asyncio.ensure_future(self.check_server())
        try:
            await asyncio.wait({check}, timeout=START_CHECK_TIMEOUT)
        finally:
            self._start_check = None
        if not check.done():
            check.cancel()  # a silent server: the loop's connects retry (stop() cancels them)
            with contextlib.suppress(BaseException):
                await check
            log.debug("refresh worker: servers not checked at start: no answer yet")
            return
        if check.cancelled():
            return  # stop() was called
        found = check.exception()
        if isinstance(found, MaterializedViewError):
            raise found
        if found is not None:  # unreachable for now: the loop's connects retry and check
            log.debug("refresh worker: servers not checked at start: %r", found)

    def _signalled(self, sig: signal.Signals) -> None:
        log.info("refresh worker: signal %s, stopping", sig.name)
        self._request_stop()

    def _request_stop(self) -> None:
        self._stopping = True
        if self._start_check is not None:
            self._start_check.cancel()
        if self._wakeup is not None:
            self._wakeup.set()
        if self._listener is not None:
            self._listener.queue.put_nowait(_WAKE)
        if self._connecting and self._task is not None:
            # A connect to an unreachable server can take its full timeout: don't wait.
            self._task.cancel()

    # -- the loop ---------------------------------------------------------------------

    async def _connect(self) -> _Listener:
        listener: _AsyncpgListener | _PsycopgListener
        if self.engine.dialect.driver == "asyncpg":
            listener = _AsyncpgListener()
        else:
            listener = _PsycopgListener()
        self._listener = listener
        self._connecting = True
        try:
            await self.check_server()
            self._checked = False  # checked again at the next connect: a failover may come
            conn = await _new_connection(self._listen_engine)
            listener._conn = conn  # closed by _close() if open() fails
            quoted = self.engine.dialect.identifier_preparer.quote(self.channel)
            await listener.open(conn, self.channel, quoted)
        except BaseException:
            await self._close()
            raise
        finally:
            self._connecting = False
        self._whitelist.load(current_schema=listener.current_schema)
        return listener

    async def _close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.close()

    async def _loop(self) -> None:
        attempt = 0
        try:
            while not self._stopping:
                try:
                    try:
                        listener = await self._connect()
                    except (StandbyError, SessionRequiredError) as exc:
                        log.error("refresh worker: %s", exc)
                        self.error = exc
                        break
                    self.connections += 1
                    log.info("refresh worker listening on %r", self.channel)
                    attempt = 0
                    # LISTEN comes first, so nothing committed after this pass goes unnoticed.
                    unfinished = await self._pass("catch-up")
                    await self._listen(listener, unfinished)
                except Exception as exc:
                    if self._stopping:
                        break
                    delay = backoff_delay(attempt, self.max_backoff)
                    attempt += 1
                    log.warning(
                        "refresh worker: %s; reconnecting in %.1fs",
                        exc.__class__.__name__,
                        delay,
                        exc_info=exc,
                    )
                    await self._close()
                    await self._sleep(delay)
                finally:
                    await self._close()
        finally:
            log.info("refresh worker stopped")

    async def _sleep(self, seconds: float) -> None:
        assert self._wakeup is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), seconds)

    async def _listen(self, listener: _Listener, unfinished: bool) -> None:
        schedule = RefreshSchedule(
            self.debounce, self.max_delay, self.interval, now=time.monotonic()
        )
        # A view the catch-up pass found locked is retried like after any other pass.
        schedule.finished(unfinished, time.monotonic())
        queue = listener.queue
        last_seen = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            deadline = schedule.deadline()
            wait = _PING if deadline is None else min(_PING, max(0.0, deadline - now))
            items: list[_Item] = []
            with contextlib.suppress(asyncio.TimeoutError):
                items.append(await asyncio.wait_for(queue.get(), wait))
            while not queue.empty():
                items.append(queue.get_nowait())
            for item in items:
                if isinstance(item, _Lost):
                    raise item.error or ConnectionError("the listening connection was lost")
                if isinstance(item, str):
                    last_seen = time.monotonic()
                    if self._whitelist.accept(item):
                        schedule.changed(last_seen)
            if self._stopping:
                break
            now = time.monotonic()
            self._whitelist.flush(now)
            if not items and now - last_seen >= _PING:
                await asyncio.wait_for(listener.ping(), _PING)
                last_seen = now
            reason = schedule.take(now)
            if reason is None:
                continue
            unfinished = await self._pass(reason)
            schedule.finished(unfinished, time.monotonic())

    async def _pass(self, reason: str) -> bool:
        """One ``refresh_stale``; True when some view should be retried."""
        # Imported here: sqlalchemy_matview.asyncio imports this module.
        from ..asyncio import refresh_stale

        log.debug("refresh worker: %s pass", reason)
        results = await refresh_stale(
            self.engine,
            self.metadata,
            concurrently=self.concurrently,
            lock=self.lock,
            lock_timeout=self.lock_timeout,
            statement_timeout=self.statement_timeout,
            lock_namespace=self.lock_namespace,
            _should_stop=lambda: self._stopping,
        )
        if self._periodic and lost_connection(results) is None and not self._stopping:
            results += await self._refresh_due()
        self.passes += 1
        for result in results:
            if self.on_result is not None:
                try:
                    outcome = self.on_result(result)
                    if inspect.isawaitable(outcome):
                        await outcome
                except Exception:
                    log.exception("refresh worker: on_result raised for %s", result.view)
        err = lost_connection(results)
        if err is not None:
            raise err  # the server went away: reconnect, then catch up
        for view, seconds in self._locked.update(results, time.monotonic()):
            log_locked(view, seconds, await self._holders(view))
        return needs_retry(results)

    async def _refresh_due(self) -> list[RefreshResult]:
        """Refresh the views without tracking whose objective says they are due."""
        from ..asyncio import refresh_views

        metadata = self.metadata
        async with self.engine.connect() as conn:
            due = await conn.run_sync(lambda c: due_views(c, metadata))
        if not due:
            return []
        return await refresh_views(
            self.engine,
            *due,
            concurrently=self.concurrently,
            lock=self.lock,
            lock_timeout=self.lock_timeout,
            statement_timeout=self.statement_timeout,
            lock_namespace=self.lock_namespace,
        )

    async def _holders(self, view: str) -> list[Any] | None:
        key = self._lock_key(view)
        try:
            async with self.engine.connect() as conn:
                return await conn.run_sync(lambda c: list(lock_holders(c, key)))
        except Exception as exc:  # the warning matters more than who is named in it
            log.debug("refresh worker: cannot read pg_locks: %s", exc)
            return None
