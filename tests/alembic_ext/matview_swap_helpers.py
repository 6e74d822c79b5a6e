"""Helpers for the side-by-side replace tests: readers in threads, a gate, a catalog snapshot."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

import sqlalchemy_matview.alembic

sqlalchemy_matview.alembic.register()

#: Advisory key of the gate: a definition calling ``gate()`` waits while a test holds it.
GATE_KEY = 4242

GATE_FUNCTION = f"""
CREATE FUNCTION gate() RETURNS int LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_lock_shared({GATE_KEY});
    PERFORM pg_advisory_unlock_shared({GATE_KEY});
    RETURN 1;
END $$
"""


def dsn(url: sa.URL) -> str:
    """The libpq URL of a SQLAlchemy psycopg URL."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; a generous deadline, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Gate:
    """Holds the gate's advisory lock, so that a build calling ``gate()`` waits."""

    def __init__(self, url: sa.URL) -> None:
        self.conn = psycopg.connect(dsn(url), autocommit=True)
        self.conn.execute("SELECT pg_advisory_lock(%s)", (GATE_KEY,))

    def waiters(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s"
            " AND NOT granted",
            (GATE_KEY,),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def open(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (GATE_KEY,))
        self.conn.close()


class Readers:
    """``threads`` connections (psycopg, autocommit, statements prepared after 5 runs as
    psycopg does by default) running ``queries`` in turn until :meth:`stop`."""

    def __init__(
        self,
        url: sa.URL,
        queries: Sequence[str],
        threads: int = 4,
        prepare_threshold: int | None = 5,
    ) -> None:
        self.url = url
        self.queries = list(queries)
        self.count = threads
        self.prepare_threshold = prepare_threshold
        self.reads = 0
        self.errors: list[str] = []
        self.worst = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self) -> None:
        conn = psycopg.connect(
            dsn(self.url), autocommit=True, prepare_threshold=self.prepare_threshold
        )
        try:
            while not self._stop.is_set():
                for query in self.queries:
                    started = time.perf_counter()
                    try:
                        conn.execute(query).fetchall()
                    except psycopg.Error as exc:
                        with self._lock:
                            self.errors.append(f"{query}: {exc}")
                        continue
                    spent = time.perf_counter() - started
                    with self._lock:
                        self.reads += 1
                        self.worst = max(self.worst, spent)
        finally:
            conn.close()

    def start(self) -> Readers:
        for _ in range(self.count):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.wait_for_reads(10 * self.count)
        return self

    def wait_for_reads(self, n: int, timeout: float = 60.0) -> None:
        """Wait until ``n`` more reads have completed."""
        target = self.reads + n
        wait_until(lambda: self.reads >= target or bool(self.errors), f"{n} reads", timeout)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


class Background:
    """Run ``work`` in a thread; :meth:`result` re-raises what it raised."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self.error: BaseException | None = None
        self.value: Any = None

        def run() -> None:
            try:
                self.value = work()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = 120.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.value


def migrate(engine: sa.Engine, run: Callable[[Operations], None]) -> None:
    """Run operations as ``alembic upgrade`` does: in a transaction the context owns."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn)
        with context.begin_transaction():
            run(Operations(context))


def swap_leftovers(conn: sa.Connection) -> list[str]:
    """Staging schemas (and anything in them) still in the database."""
    rows = conn.execute(
        sa.text(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'sqlalchemy\\_matview\\_swap\\_%'"
        )
    )
    return [r[0] for r in rows]


def catalog_state(conn: sa.Connection, names: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """What a replace must keep of each relation: kind, schema, populated state, options,
    comment, owner, privileges, indexes, definition."""
    rows = conn.execute(
        sa.text(
            """
            SELECT c.relname, c.relkind::text, c.relnamespace::regnamespace::text,
                   c.relispopulated, c.reloptions, obj_description(c.oid, 'pg_class'),
                   pg_get_userbyid(c.relowner)::text, c.relacl::text[],
                   ARRAY(SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
                          WHERE i.indrelid = c.oid ORDER BY 1),
                   CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END
              FROM pg_class c
             WHERE c.relname = ANY (:names) AND c.relkind IN ('v', 'm')
             ORDER BY 1
            """
        ),
        {"names": list(names)},
    ).all()
    return {r[0]: tuple(r[1:]) for r in rows}
