"""Writers' flags and tokens: once a view is known stale, writers skip the change log.

A view's *flag* (a sequence only the bookkeeping's owner sets) is raised when a writer
finds a mark that another transaction committed; while it is raised the triggers' WHEN
clause does not even call ``mark_stale``. Every removal of marks, and every refresh as soon
as it holds the barrier, lowers it. A session's *token* (a session setting that must be the
MD5 of the current epoch and the view id, the epoch being a random value only the owner
reads, replaced by every removal of marks) spares ``mark_views`` in between. Each test here
fails if a flag or a token outlives what it stands for.
"""

from __future__ import annotations

import itertools
import threading
import time
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


_CALLS = sa.text(
    "SELECT funcname, calls FROM pg_stat_xact_user_functions"
    " WHERE funcname IN ('mark_stale', 'mark_views')"
)


def _calls(conn: Connection, *keys: int) -> tuple[int, int]:
    """Insert ``keys`` in one transaction of their own: how often ``mark_stale`` (the
    trigger function) and ``mark_views`` (the slow path) ran in it."""
    # The counts include earlier transactions' until the backend flushes them (at most once
    # a second): only a difference within the transaction says what the INSERTs did.
    with conn.begin():
        conn.execute(sa.text("SET LOCAL track_functions = 'pl'"))
        before = dict(conn.execute(_CALLS).all())
        for key in keys:
            conn.execute(sa.text("INSERT INTO src_tok VALUES (:k)"), {"k": key})
        after = dict(conn.execute(_CALLS).all())
    return (
        after.get("mark_stale", 0) - before.get("mark_stale", 0),
        after.get("mark_views", 0) - before.get("mark_views", 0),
    )


def _insert(conn: Connection, key: int) -> int:
    """Insert a row in a transaction of its own; how often ``mark_views`` ran in it."""
    return _calls(conn, key)[1]


def _flag(engine: Engine) -> int | None:
    with engine.connect() as conn:
        return conn.scalar(
            sa.text(
                "SELECT pg_sequence_last_value(('sqlalchemy_matview.stale_' || v.id)::regclass)"
                " FROM sqlalchemy_matview.views v WHERE v.view_name = 'mv_tok'"
            )
        )


def test_once_a_committed_mark_is_seen_no_writer_calls_the_function(
    engine: Engine, tracked
) -> None:
    with engine.connect() as writer, engine.connect() as other:
        # fresh -> stale: the slow path adds a mark; its second statement has the token.
        assert _calls(writer, 1, 2) == (2, 1)
        assert _stale(engine)
        # That token served its own transaction only: the mark, committed now, is found,
        # the flag raised, and the statement after it calls nothing.
        assert _calls(writer, 3, 4) == (1, 1)
        assert _calls(writer, 5) == (0, 0)  # the flag: the WHEN clause, no function at all
        assert _calls(other, 6) == (0, 0)  # for every session
        refresh_views(engine, "mv_tok")
        assert not _stale(engine)
        assert _flag(engine) == 0
        # The refresh lowered the flag: the next write marks again, the one after raises it.
        assert _calls(other, 7) == (1, 1)
        assert _stale(engine)
        assert _calls(writer, 8) == (1, 1)
        assert _calls(other, 9) == (0, 0)
        assert _calls(writer, 10) == (0, 0)
        refresh_views(engine, "mv_tok")
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM mv_tok")) == 10


def test_a_refresh_waits_for_writers_that_skipped_on_the_flag(engine: Engine, tracked) -> None:
    """A writer that read the flag raised took no barrier; a refresh starting before it
    commits must wait for it (it holds a lock on the table), or its snapshot would miss the
    row while consuming the mark that stood for it: a change lost."""
    with engine.connect() as writer:
        _calls(writer, 1)
        _calls(writer, 2)
        assert _calls(writer, 3) == (0, 0)
        writer.begin()
        writer.execute(sa.text("INSERT INTO src_tok VALUES (4)"))  # skips on the flag
        outcome: list[object] = []
        refresher = threading.Thread(
            target=lambda: outcome.extend(refresh_views(engine, "mv_tok")), daemon=True
        )
        refresher.start()
        time.sleep(1.0)
        assert refresher.is_alive(), "the refresh did not wait for the open writer"
        assert _flag(engine) == 0  # lowered before waiting
        writer.commit()
        refresher.join(30)
        assert not refresher.is_alive()
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM mv_tok")) == 4
    assert not _stale(engine)


def test_a_token_set_by_a_transaction_that_rolled_back_is_gone(engine: Engine, tracked) -> None:
    with engine.connect() as writer:
        trans = writer.begin()
        writer.execute(sa.text("INSERT INTO src_tok VALUES (1)"))  # marks, sets the token
        writer.execute(sa.text("INSERT INTO src_tok VALUES (5)"))  # the token: no mark_views
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
    with engine.connect() as writer, engine.connect() as other:
        _insert(other, 1)
        _insert(writer, 2)  # finds the other's mark committed: the flag, and the token
        token = writer.scalar(sa.text("SELECT current_setting(:s)"), {"s": setting})
        writer.commit()
        refresh_views(engine, "mv_tok")
        # The token of an epoch that has passed, replayed: the view is fresh, the write marks.
        writer.execute(sa.text("SELECT set_config(:s, :t, false)"), {"s": setting, "t": token})
        writer.commit()
        assert _insert(writer, 3) == 1
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
    even in replica mode: each moves the epoch on and lowers the flag."""
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
            _insert(writer, next(keys))
            assert _calls(writer, next(keys)) == (0, 0)
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
        _insert(writer, 2)
        assert _calls(writer, 3) == (0, 0)
        with engine.connect() as conn:
            secret, vid = conn.execute(
                sa.text(
                    "SELECT pg_sequence_last_value('sqlalchemy_matview.barrier_secret'), v.id"
                    " FROM sqlalchemy_matview.views v WHERE v.view_name = 'mv_tok'"
                )
            ).one()
        holder = engine.connect()
        try:
            # What a refresh does first: hold the barrier exclusive, then lower the flag.
            holder.execute(
                sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashint4extended(vid, secret)))
            )
            holder.execute(sa.text("SELECT sqlalchemy_matview.lower_flag(:v)"), {"v": vid})
            assert _insert(writer, 4) == 1
        finally:
            holder.rollback()
            holder.close()


def test_row_level_firings_use_the_token_too(engine: Engine) -> None:
    """A partitioned source (row-level triggers, cloned to every partition): the flag
    spares the function, and the trigger's WHEN clause still spares every further row of
    a transaction that had to call it."""
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
            assert _calls(writer, 1) == (1, 1)
            assert _calls(writer, 2) == (1, 1)
            assert _calls(writer, 3) == (0, 0)
            assert _calls(writer, 1003) == (0, 0)  # the other partition
            refresh_views(engine, "mv_tok")
            for raised in (False, True):
                if raised:
                    _calls(writer, 4)  # finds the mark of the bulk insert below: raised
                with writer.begin():
                    writer.execute(sa.text("SET LOCAL track_functions = 'pl'"))
                    before = dict(writer.execute(calls).all())
                    writer.execute(
                        sa.text(
                            "INSERT INTO src_tok"
                            " SELECT generate_series(CAST(:a AS int), CAST(:b AS int))"
                        ),
                        {"a": 10 + 1090 * raised, "b": 800 + 1090 * raised},
                    )
                    after = dict(writer.execute(calls).all())
                assert _stale(engine)
                made = tuple(
                    after.get(f, 0) - before.get(f, 0) for f in ("mark_stale", "mark_views")
                )
                # Lowered, the first row calls the function, its setting spares the others.
                assert made == ((0, 0) if raised else (1, 1)), (raised, made)
            refresh_views(engine, "mv_tok")
            with engine.connect() as conn:
                assert conn.scalar(sa.text("SELECT count(*) FROM mv_tok")) == 5 + 2 * 791
    finally:
        md.drop_all(engine)


def test_create_all_gives_triggers_of_bookkeeping_13_their_flags(engine: Engine, tracked) -> None:
    """Bookkeeping 13 had no flags and no WHEN clause on the statement trigger: the upgrade
    (the next create_all) creates the flag and puts the guarded trigger in place."""
    src, _ = tracked
    with engine.begin() as conn:
        definition = conn.scalar(
            sa.text(
                "SELECT pg_get_triggerdef(oid) FROM pg_trigger"
                " WHERE tgname = 'sqlalchemy_matview_stmt' AND tgrelid = 'src_tok'::regclass"
            )
        )
        head, _, tail = definition.partition(" WHEN (")
        unguarded = head + " EXECUTE FUNCTION " + tail.split(" EXECUTE FUNCTION ", 1)[1]
        conn.execute(sa.text("DROP TRIGGER sqlalchemy_matview_stmt ON src_tok"))
        conn.execute(sa.text(unguarded))
        flag = conn.scalar(
            sa.text(
                "SELECT 'sqlalchemy_matview.stale_' || id FROM sqlalchemy_matview.views"
                " WHERE view_name = 'mv_tok'"
            )
        )
        # (Its replica-mode row trigger names it too, and goes with it.)
        conn.execute(sa.text(f"DROP SEQUENCE {flag} CASCADE"))
        conn.execute(
            sa.text("COMMENT ON SCHEMA sqlalchemy_matview IS 'sqlalchemy_matview bookkeeping 13'")
        )
    src.metadata.create_all(engine)
    with engine.connect() as writer:
        assert writer.scalar(
            sa.text(
                "SELECT tgqual IS NOT NULL FROM pg_trigger"
                " WHERE tgname = 'sqlalchemy_matview_stmt' AND tgrelid = 'src_tok'::regclass"
            )
        )
        writer.rollback()
        _calls(writer, 1)
        _calls(writer, 2)
        assert _calls(writer, 3) == (0, 0)
    assert _flag(engine) is not None and _flag(engine) != 0
