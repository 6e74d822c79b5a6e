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

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["SessionCheck", "check_session"]

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
