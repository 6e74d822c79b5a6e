"""Writers' tokens: a session that saw a view stale skips the change log until a refresh.

The hot path of ``mark_stale`` trusts a session setting only when its value is the MD5 of
the barrier secret, the view id and the current epoch, and the epoch moves on with every
statement that removes marks. Each test here fails if the token outlives what it stands for.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from sqlalchemy_matview import MaterializedView, refresh_views
from sqlalchemy_matview.orchestration import tracking
from sqlalchemy_matview.orchestration.tracking_sql import token_prefix


@pytest.fixture
def tracked(engine: Engine) -> Iterator[tuple[sa.Table, MaterializedView]]:
    md = sa.MetaData()
    src = sa.Table("src_tok", md, sa.Column("id", sa.Integer, primary_key=True))
    mv = MaterializedView("mv_tok", md, sa.select(src.c.id), unique_key="id", track_changes=True)
    md.create_all(engine)
    yield src, mv
    md.drop_all(engine)


def _stale(engine: Engine) -> bool:
    with engine.connect() as conn:
        return tracking.view_states(conn)[("public", "mv_tok")].stale


def _setting(engine: Engine) -> str:
    with engine.connect() as conn:
        vid = conn.scalar(
            sa.text("SELECT id FROM sqlalchemy_matview.views WHERE view_name = 'mv_tok'")
        )
    return f"{token_prefix('sqlalchemy_matview')}{vid}"


def _insert(conn: Connection, key: int) -> int:
    """Insert a row in a transaction of its own; how often ``mark_views`` ran in it."""
    # The counts include earlier transactions' until the backend flushes them (at most once
    # a second): only a difference within the transaction says what the INSERT did.
    calls = sa.text(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions"
        " WHERE funcname = 'mark_views'"
    )
    with conn.begin():
        conn.execute(sa.text("SET LOCAL track_functions = 'pl'"))
        before = conn.scalar(calls)
        conn.execute(sa.text("INSERT INTO src_tok VALUES (:k)"), {"k": key})
        after = conn.scalar(calls)
    return int(after - before)


def test_a_session_that_saw_the_view_stale_skips_the_log(engine: Engine, tracked) -> None:
    with engine.connect() as writer:
        assert _insert(writer, 1) == 1  # fresh -> stale: the slow path, which sets the token
        assert _stale(engine)
        assert _insert(writer, 2) == 0  # the token: no query at all
        assert _insert(writer, 3) == 0
        refresh_views(engine, "mv_tok")
        assert not _stale(engine)
        # The refresh moved the epoch on: the token is void, the write marks again.
        assert _insert(writer, 4) == 1
        assert _stale(engine)
        assert _insert(writer, 5) == 0
        refresh_views(engine, "mv_tok")
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM mv_tok")) == 5


def test_a_token_set_by_a_transaction_that_rolled_back_is_gone(engine: Engine, tracked) -> None:
    with engine.connect() as writer:
        trans = writer.begin()
        writer.execute(sa.text("INSERT INTO src_tok VALUES (1)"))  # marks, sets the token
        trans.rollback()  # the mark is gone, and so is the token
        assert not _stale(engine)
        assert _insert(writer, 2) == 1
        assert _stale(engine)
        refresh_views(engine, "mv_tok")
        with writer.begin():
            savepoint = writer.begin_nested()
            writer.execute(sa.text("INSERT INTO src_tok VALUES (3)"))
            savepoint.rollback()
            writer.execute(sa.text("INSERT INTO src_tok VALUES (4)"))
        assert _stale(engine)


def test_a_forged_or_replayed_token_does_not_skip_marking(engine: Engine, tracked) -> None:
    setting = _setting(engine)
    with engine.connect() as writer:
        _insert(writer, 1)
        token = writer.scalar(sa.text("SELECT current_setting(:s)"), {"s": setting})
        refresh_views(engine, "mv_tok")
        # The token of an epoch that has passed, replayed: the view is fresh, the write marks.
        writer.execute(sa.text("SELECT set_config(:s, :t, false)"), {"s": setting, "t": token})
        writer.commit()
        assert _insert(writer, 2) == 1
        assert _stale(engine)
        refresh_views(engine, "mv_tok")
        for forged in ("", "x", token.upper()):
            writer.execute(sa.text("SELECT set_config(:s, :t, false)"), {"s": setting, "t": forged})
            writer.commit()
            assert _insert(writer, 10 + len(forged)) == 1, forged
            assert _stale(engine), forged
            refresh_views(engine, "mv_tok")


def test_removing_marks_any_way_voids_every_token(engine: Engine, tracked) -> None:
    """A refresh, an untrack, a DELETE or TRUNCATE of the log by its owner (repair by hand),
    even in replica mode: each moves the epoch on."""
    keys = itertools.count()
    with engine.connect() as writer:
        for removal in (
            ["DELETE FROM sqlalchemy_matview.changes"],
            ["TRUNCATE sqlalchemy_matview.changes"],
            [
                "SET LOCAL session_replication_role = replica",
                "DELETE FROM sqlalchemy_matview.changes",
            ],
            ["SELECT sqlalchemy_matview.untrack('public', 'mv_tok')"],
        ):
            _insert(writer, next(keys))
            assert _insert(writer, next(keys)) == 0
            with engine.begin() as conn:
                for statement in removal:
                    conn.execute(sa.text(statement))
            if "untrack" in removal[0]:
                # No trigger left to mark anything; tracked again, it marks from scratch.
                tracked[0].metadata.create_all(engine)
                assert not _stale(engine)
                assert _insert(writer, next(keys)) == 1
                break
            assert not _stale(engine), removal
            assert _insert(writer, next(keys)) == 1, removal
            assert _stale(engine), removal


def test_a_token_is_only_valid_while_holding_the_barrier(engine: Engine, tracked) -> None:
    """While a refresh holds the barrier, a session with a valid token still adds a mark of
    its own (the refresh may not see its change), and the view stays stale after it."""
    with engine.connect() as writer:
        _insert(writer, 1)
        assert _insert(writer, 2) == 0
        with engine.connect() as conn:
            secret, vid = conn.execute(
                sa.text(
                    "SELECT pg_sequence_last_value('sqlalchemy_matview.barrier_secret'), v.id"
                    " FROM sqlalchemy_matview.views v WHERE v.view_name = 'mv_tok'"
                )
            ).one()
        holder = engine.connect()
        try:
            # What a refresh does first: hold the barrier exclusive.
            holder.execute(
                sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashint4extended(vid, secret)))
            )
            assert _insert(writer, 3) == 1
        finally:
            holder.rollback()
            holder.close()


def test_row_level_firings_use_the_token_too(engine: Engine) -> None:
    """A partitioned source (row-level triggers, cloned to every partition): the token
    spares mark_views, and the trigger's WHEN clause still spares every further row."""
    md = sa.MetaData()
    src = sa.Table(
        "src_tok",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        postgresql_partition_by="RANGE (id)",
    )
    MaterializedView("mv_tok", md, sa.select(src.c.id), unique_key="id", track_changes=True)
    with engine.begin() as conn:
        md.create_all(conn, tables=[src])
        for low in (0, 1000):
            conn.execute(
                sa.text(
                    f"CREATE TABLE src_tok_{low} PARTITION OF src_tok"
                    f" FOR VALUES FROM ({low}) TO ({low + 1000})"
                )
            )
    md.create_all(engine)
    calls = sa.text(
        "SELECT funcname, calls FROM pg_stat_xact_user_functions"
        " WHERE funcname IN ('mark_stale', 'mark_views')"
    )
    try:
        with engine.connect() as writer:
            assert _insert(writer, 1) == 1
            assert _insert(writer, 2) == 0
            refresh_views(engine, "mv_tok")
            assert _insert(writer, 3) == 1
            assert _stale(engine)
            with writer.begin():
                writer.execute(sa.text("SET LOCAL track_functions = 'pl'"))
                before = dict(writer.execute(calls).all())
                writer.execute(sa.text("INSERT INTO src_tok SELECT generate_series(10, 1500)"))
                after = dict(writer.execute(calls).all())
            assert after.get("mark_views", 0) == before.get("mark_views", 0)
            assert after["mark_stale"] - before.get("mark_stale", 0) == 1
            refresh_views(engine, "mv_tok")
            with engine.connect() as conn:
                assert conn.scalar(sa.text("SELECT count(*) FROM mv_tok")) == 1494
    finally:
        md.drop_all(engine)
