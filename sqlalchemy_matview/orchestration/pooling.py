"""Can a connection hold session state? Connection poolers and standbys, found out at start.

``LISTEN`` belongs to a server session. Behind PgBouncer in transaction (or statement)
pooling mode, the client's next statement may run on another server connection, and the
notifications of the one that listened reach nobody, or another client: a worker listening
there would silently never wake up. A hot standby refuses ``LISTEN`` outright. Both are
found out when the worker connects, so it fails at once with a message saying what to do.

How transaction pooling is recognised, without access to PgBouncer's admin console:

1. the backend pid the client was told at connection (PostgreSQL's ``BackendKeyData``, which a
   pooler makes up) differs from ``pg_backend_pid()`` only behind a pooler;
2. then a second client opens a transaction. In session pooling the first client keeps its
   own server connection for as long as it is connected, so the second one can never be
   given it; in transaction pooling the first client gave its server connection back after
   its statement, and the pooler hands the most recently released one (PgBouncer's default
   ``server_round_robin = 0``) to the second client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import SessionRequiredError, StandbyError

__all__ = [
    "SessionCheck",
    "check_session",
    "check_session_async",
    "refuse_standby",
    "session_required",
    "standby_error",
]

_RECOVERY = sa.text("SELECT pg_catalog.pg_is_in_recovery()")


def standby_error(what: str) -> StandbyError:
    """The :class:`StandbyError` for ``what`` (``"refresh_views"``, ``"RefreshWorker"``...)."""
    return StandbyError(
        f"{what}: the server is a hot standby (pg_is_in_recovery() is true), which is "
        "read-only and cannot refresh materialized views; refresh on the primary: the "
        "standby's readers see the result once it is replayed"
    )


def refuse_standby(conn: Connection, what: str) -> None:
    """Raise :class:`StandbyError` when ``conn`` is connected to a hot standby.

    One query, run before anything is refreshed (a standby would refuse the first
    ``REFRESH`` with a bare "read-only transaction").

    Example::

        with engine.connect() as conn:
            refuse_standby(conn, "refresh_views")
    """
    if conn.scalar(_RECOVERY):
        raise standby_error(what)


def session_required(what: str, where: str) -> SessionRequiredError:
    """The :class:`SessionRequiredError` for a worker that would listen through ``where``."""
    return SessionRequiredError(
        f"{what}: {where} goes through a connection pooler in transaction (or statement) "
        "pooling mode, where LISTEN never hears anything; pass listen_url= a direct "
        "connection to the server (or one through a session-pooled PgBouncer) and keep "
        "the pooled engine for refreshing"
    )


_PID = "SELECT pg_backend_pid(), pg_is_in_recovery()"


@dataclass(frozen=True)
class SessionCheck:
    """What :func:`check_session` found about a server reached by a URL."""

    #: The server is a hot standby (``pg_is_in_recovery()``): no ``LISTEN``, no writes.
    standby: bool
    #: A connection pooler sits between the client and the server.
    pooled: bool
    #: The pooler hands server connections out per transaction: session state is lost.
    transaction_pooled: bool


def _query(conn: Any) -> tuple[int, bool]:
    row = conn.execute(_PID).fetchone()
    return int(row[0]), bool(row[1])


def check_session(connect: Callable[[], Any], *, wait: float = 2.0) -> SessionCheck:
    """Probe the server that ``connect()`` (a psycopg 3 connection factory) reaches.

    ``connect`` must return autocommit connections. A pooler whose pool is exhausted makes
    the second probe wait: ``wait`` seconds of that count as transaction pooling too (in
    session pooling the first client already holds its server connection).

    Example::

        import psycopg

        found = check_session(lambda: psycopg.connect(dsn, autocommit=True))
        if found.transaction_pooled:
            ...
    """
    first = connect()
    try:
        told = int(first.info.backend_pid)
        pid, standby = _query(first)
        if told == pid:
            return SessionCheck(standby=standby, pooled=False, transaction_pooled=False)
        second = connect()
        try:
            try:
                second.execute("BEGIN")
            except Exception:  # statement pooling refuses transaction blocks
                return SessionCheck(standby=standby, pooled=True, transaction_pooled=True)
            taken, _ = _query(second)
            if taken == pid:
                return SessionCheck(standby=standby, pooled=True, transaction_pooled=True)
            # The pooler may have given the second client another idle connection: see
            # whether the first client is still on its own one.
            seen: list[int] = []
            probe = threading.Thread(target=lambda: seen.append(_query(first)[0]), daemon=True)
            probe.start()
            probe.join(wait)
            waited = probe.is_alive()
            second.execute("COMMIT")
            probe.join()
        finally:
            second.close()
        moved = waited or (bool(seen) and seen[0] != pid)
        return SessionCheck(standby=standby, pooled=True, transaction_pooled=moved)
    finally:
        first.close()


async def _query_async(conn: Any) -> tuple[int, bool]:
    if hasattr(conn, "fetchrow"):  # asyncpg
        row = await conn.fetchrow(_PID)
    else:  # psycopg
        row = await (await conn.execute(_PID)).fetchone()
    return int(row[0]), bool(row[1])


def _told_pid(conn: Any) -> int:
    if hasattr(conn, "get_server_pid"):  # asyncpg
        return int(conn.get_server_pid())
    return int(conn.info.backend_pid)


async def check_session_async(
    connect: Callable[[], Awaitable[Any]], *, wait: float = 2.0
) -> SessionCheck:
    """:func:`check_session` for asyncio: ``connect()`` returns an asyncpg connection or an
    autocommit psycopg ``AsyncConnection``.

    Example::

        found = await check_session_async(lambda: asyncpg.connect(dsn))
    """
    first = await connect()
    try:
        told = _told_pid(first)
        pid, standby = await _query_async(first)
        if told == pid:
            return SessionCheck(standby=standby, pooled=False, transaction_pooled=False)
        second = await connect()
        try:
            try:
                await second.execute("BEGIN")
            except Exception:  # statement pooling refuses transaction blocks
                return SessionCheck(standby=standby, pooled=True, transaction_pooled=True)
            taken, _ = await _query_async(second)
            if taken == pid:
                return SessionCheck(standby=standby, pooled=True, transaction_pooled=True)
            probe = asyncio.ensure_future(_query_async(first))
            done, _ = await asyncio.wait({probe}, timeout=wait)
            waited = not done
            await second.execute("COMMIT")
            seen = (await probe)[0]
        finally:
            await second.close()
        moved = waited or seen != pid
        return SessionCheck(standby=standby, pooled=True, transaction_pooled=moved)
    finally:
        await first.close()
