"""Readers on a streaming hot standby during a side-by-side replace on the primary.

The swap reaches the standby as WAL: its ``ACCESS EXCLUSIVE`` locks are replayed, waiting for
the standby's short queries, which then read the new version by name, as on the primary.
"""

from __future__ import annotations

import sqlalchemy as sa
from matview_swap_helpers import Readers, migrate

from sqlalchemy_matview.testing.components import StandbyServer

SETUP = [
    "CREATE TABLE events (id int PRIMARY KEY, kind text NOT NULL, amount int NOT NULL)",
    "INSERT INTO events SELECT g, 'k' || mod(g, 5), g FROM generate_series(1, 5000) g",
    "CREATE MATERIALIZED VIEW mv AS SELECT kind, sum(amount)::int AS total FROM events"
    " GROUP BY kind",
    "CREATE UNIQUE INDEX mv_kind ON mv (kind)",
    "CREATE VIEW mv_big AS SELECT kind, total FROM mv WHERE total > 100",
]
NEW = "SELECT kind, (sum(amount) * 2)::int AS total, count(*)::int AS n FROM events GROUP BY kind"


def test_readers_on_a_standby_read_through_the_swap(
    engine: sa.Engine, pg_url: sa.URL, standby_server: StandbyServer
) -> None:
    with engine.begin() as conn:
        for statement in SETUP:
            conn.exec_driver_sql(statement)
    standby_server.wait_for_replay()
    assert pg_url.database is not None
    standby_url = standby_server.url(pg_url.database)
    readers = Readers(
        standby_url,
        ["SELECT kind, total FROM mv WHERE kind = 'k1'", "SELECT kind, total FROM mv_big"],
    ).start()
    try:
        for definition in (NEW, SETUP[2].split(" AS ", 1)[1]):
            migrate(
                engine,
                lambda op, d=definition: op.replace_materialized_view(  # type: ignore[misc]
                    "mv", d, strategy="side_by_side"
                ),
            )
            standby_server.wait_for_replay()
            readers.wait_for_reads(100)
    finally:
        readers.stop()
    assert readers.errors == []
    standby = sa.create_engine(standby_url)
    try:
        with standby.connect() as conn:
            assert conn.scalar(sa.text("SELECT pg_is_in_recovery()")) is True
            assert conn.scalar(sa.text("SELECT total FROM mv WHERE kind = 'k1'")) == sum(
                range(1, 5000, 5)
            )
            assert conn.scalar(sa.text("SELECT count(*) FROM mv_big")) == 5
    finally:
        standby.dispose()
