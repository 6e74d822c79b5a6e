"""Logical replication between two real clusters: the test component, and what apply fires.

The subscriber's apply worker writes the replicated rows with ``session_replication_role =
replica``: change tracking on a subscriber only sees them through triggers that fire there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import (
    MaterializedView,
    RefreshResult,
    RefreshWorker,
    refresh_stale,
)
from sqlalchemy_matview.testing.components import LogicalReplication

SOURCE = "CREATE TABLE events (id int PRIMARY KEY, grp int NOT NULL)"


@pytest.fixture
def pair(
    logical_replication: LogicalReplication, logical_replication_db: str
) -> LogicalReplication:
    for server in (logical_replication.publisher, logical_replication.subscriber):
        with server._connect(logical_replication_db) as conn:
            conn.execute(SOURCE)
    return logical_replication


@pytest.fixture
def publisher(pair: LogicalReplication, logical_replication_db: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pair.publisher.url(logical_replication_db))
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def subscriber(pair: LogicalReplication, logical_replication_db: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pair.subscriber.url(logical_replication_db))
    try:
        yield engine
    finally:
        engine.dispose()


def _ids(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT id FROM events ORDER BY id")))


def test_the_subscriber_copies_then_streams_the_published_table(
    pair: LogicalReplication,
    logical_replication_db: str,
    publisher: sa.Engine,
    subscriber: sa.Engine,
) -> None:
    db = logical_replication_db
    with publisher.begin() as conn:
        conn.execute(sa.text("INSERT INTO events VALUES (1, 1), (2, 1)"))
    pair.publish(db, ["public.events"])
    pair.subscribe(db)  # returns after the initial copy
    assert _ids(subscriber) == [1, 2]
    with publisher.begin() as conn:
        conn.execute(sa.text("INSERT INTO events SELECT g, 2 FROM generate_series(3, 100) g"))
    with publisher.begin() as conn:
        conn.execute(sa.text("DELETE FROM events WHERE id = 1"))
    lag = pair.wait_caught_up(db)
    assert _ids(subscriber) == list(range(2, 101))
    print(f"caught up {lag * 1000:.1f} ms after the publisher's commit")
    # The subscriber is a writable primary of its own, not a standby.
    with subscriber.connect() as conn:
        assert conn.scalar(sa.text("SELECT pg_is_in_recovery()")) is False


def test_apply_fires_replica_row_triggers_and_no_statement_trigger(
    pair: LogicalReplication,
    logical_replication_db: str,
    publisher: sa.Engine,
    subscriber: sa.Engine,
) -> None:
    """What fires on a subscriber: why tracking there needs triggers enabled ``REPLICA``."""
    db = logical_replication_db
    with subscriber.begin() as conn:
        conn.execute(sa.text("CREATE TABLE fired (n serial, kind text, role text)"))
        conn.execute(
            sa.text(
                "CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " INSERT INTO public.fired (kind, role)"
                " VALUES (TG_NAME, current_setting('session_replication_role'));"
                " RETURN NULL; END $$"
            )
        )
        for name, event, level, enable in (
            ("row_origin", "INSERT", "ROW", ""),
            ("stmt_origin", "INSERT", "STATEMENT", ""),
            ("row_replica", "INSERT", "ROW", "REPLICA"),
            ("stmt_replica", "INSERT", "STATEMENT", "REPLICA"),
            ("row_always", "INSERT", "ROW", "ALWAYS"),
            ("stmt_always", "INSERT", "STATEMENT", "ALWAYS"),
            ("truncate_origin", "TRUNCATE", "STATEMENT", ""),
            ("truncate_always", "TRUNCATE", "STATEMENT", "ALWAYS"),
        ):
            conn.execute(
                sa.text(
                    f"CREATE TRIGGER {name} AFTER {event} ON events"
                    f" FOR EACH {level} EXECUTE FUNCTION note()"
                )
            )
            if enable:
                conn.execute(sa.text(f"ALTER TABLE events ENABLE {enable} TRIGGER {name}"))

    def fired() -> list[tuple[str, str]]:
        with subscriber.begin() as conn:
            rows = conn.execute(sa.text("DELETE FROM fired RETURNING kind, role")).all()
        return sorted((r.kind, r.role) for r in rows)

    pair.publish(db, ["events"])
    pair.subscribe(db)
    # The initial copy is a COPY run as replica: statement triggers fire (rows: none to copy).
    assert fired() == [("stmt_always", "replica"), ("stmt_replica", "replica")]
    with publisher.begin() as conn:
        conn.execute(sa.text("INSERT INTO events VALUES (1, 1), (2, 1)"))
    pair.wait_caught_up(db)
    # Applied rows: row triggers enabled REPLICA or ALWAYS only, never a statement trigger.
    assert fired() == [
        ("row_always", "replica"),
        ("row_always", "replica"),
        ("row_replica", "replica"),
        ("row_replica", "replica"),
    ]
    with publisher.begin() as conn:
        conn.execute(sa.text("TRUNCATE events"))
    pair.wait_caught_up(db)
    # A replicated TRUNCATE does fire statement-level TRUNCATE triggers (REPLICA/ALWAYS).
    assert fired() == [("truncate_always", "replica")]
    assert _ids(subscriber) == []


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s"
        time.sleep(0.02)


def test_a_worker_on_the_subscriber_refreshes_after_replicated_writes(
    logical_replication: LogicalReplication, logical_replication_db: str
) -> None:
    pair, db = logical_replication, logical_replication_db
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("grp", sa.Integer, nullable=False),
    )
    mv = MaterializedView(
        "mv_events",
        md,
        sa.select(
            sa.func.count().label("n"),
            sa.func.coalesce(sa.func.sum(events.c.grp), 0).label("s"),
        ),
        columns=[sa.Column("n", sa.BigInteger), sa.Column("s", sa.BigInteger)],
        track_changes=True,
    )
    publisher = sa.create_engine(pair.publisher.url(db))
    subscriber = sa.create_engine(pair.subscriber.url(db))
    results: list[RefreshResult] = []
    worker = RefreshWorker(subscriber, md, debounce=0.05, on_result=results.append)
    try:
        events.create(publisher)  # only the table: the view lives on the subscriber
        md.create_all(subscriber)
        with publisher.begin() as conn:
            conn.execute(events.insert(), [{"id": i, "grp": 1} for i in range(1, 11)])
        pair.publish(db, ["events"])
        worker.start()

        def view_matches() -> bool:
            with subscriber.connect() as conn:
                view = tuple(conn.execute(sa.select(mv.c.n, mv.c.s)).one())
                table = tuple(
                    conn.execute(
                        sa.text("SELECT count(*), coalesce(sum(grp), 0) FROM events")
                    ).one()
                )
            return view == table

        pair.subscribe(db)  # the initial copy: rows arrive as a COPY run as replica
        _wait_for(view_matches, "the worker did not refresh after the initial copy")
        for statement in (
            "INSERT INTO events SELECT g, 2 FROM generate_series(11, 20) g",
            "UPDATE events SET grp = 5 WHERE id = 3",
            "DELETE FROM events WHERE id = 4",
            "TRUNCATE events",
            "INSERT INTO events VALUES (100, 7)",
        ):
            refreshed = len(results)
            with publisher.begin() as conn:
                conn.execute(sa.text(statement))
            pair.wait_caught_up(db)
            _wait_for(
                lambda n=refreshed: len(results) > n and view_matches(),  # type: ignore[misc]
                f"the worker did not refresh after the replicated {statement!r}",
            )
        assert worker.stop(timeout=30)
        assert {r.view: r.status for r in refresh_stale(subscriber, md)} == {
            "public.mv_events": "skipped_fresh"
        }
    finally:
        worker.stop(timeout=30)
        publisher.dispose()
        subscriber.dispose()
